"""The vector index of a whole embedding index: exact for small archives, a persisted IVF-SQ8 kept in step.

    vectors_for(store, scenes, x16) -> VectorIndex   # over every complete scene; ids = scene_id << 32 | row

Up to :data:`.vectors.EXACT_MAX` tiles the vectors are searched exactly and nothing is stored. Beyond, the
approximate index lives in ``<index>/vectors/ann.faiss`` (+ ``ann.faiss.json``: method, lists, nprobe, the
recall and latency measured when it was tuned, and the scene ids and keys it holds). Each time it is opened
it is brought in step with the catalog: scenes that were replaced are removed by id range, new scenes are
added to the trained lists (no retraining), and the nprobe is re-tuned; it is rebuilt from scratch when
missing, unreadable, built for another model, or stale (grown past ``STALE_GROWTH`` times what its lists were
trained on). ``tileprompt index`` does this after adding scenes, so searches find it ready; a search that finds
the catalog moved on (another process indexed) does it first. A read-only index folder only costs the update
on each load.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from . import vectors
from .store import VECTORS_DIR, IndexStore, SceneRecord

log = logging.getLogger(__name__)

ANN_FILE = "ann.faiss"
#: Tile ids live in the low 32 bits of a vector id, the scene id above them.
SCENE_SHIFT = 32


def scene_ids(scene: SceneRecord) -> np.ndarray:
    """The vector ids of a scene's embedding rows."""
    return (np.int64(scene.scene_id) << SCENE_SHIFT) + np.arange(scene.tiles, dtype=np.int64)


def vectors_for(store: IndexStore, scenes: Sequence[SceneRecord], x16: np.ndarray, method: str = "auto",
                seed: int = 0) -> vectors.VectorIndex:
    """A vector index over ``x16`` (the scenes' embeddings, concatenated in ``scenes`` order).

    ``exact`` search is answered from ``x16`` itself; the approximate index is loaded, updated and saved as
    the module doc says. Its ids are ``scene_id << 32 | row``; :func:`rows_of` maps them to rows of ``x16``.
    """
    offsets = np.concatenate([[0], np.cumsum([s.tiles for s in scenes])]).astype(np.int64)
    all_ids = np.concatenate([scene_ids(s) for s in scenes]) if scenes else np.zeros(0, np.int64)
    chosen = vectors.choose_method(len(x16)) if method == "auto" else method
    if chosen not in ("ivf", "hnsw"):
        return vectors.VectorIndex.build(x16, all_ids, method=chosen)
    exact = exact_fn(scenes, offsets, x16)
    path = store.root / VECTORS_DIR / ANN_FILE
    vi, changed = _updated(path, store, scenes, x16, offsets, chosen, seed, exact)
    if vi is None:
        log.info("building the %s vector index of %s (%d tiles)", chosen, store.root, len(x16))
        vi = vectors.VectorIndex.build(x16, all_ids, method=chosen, seed=seed, exact=exact)
        changed = True
    if changed:
        vi.extra = {"model_key": store.meta.get("model_key"), "scene_ids": [s.scene_id for s in scenes],
                    "keys": [s.key for s in scenes]}
        try:
            vi.save(path, vi.extra)
            for old in path.parent.glob("*.faiss*"):  # earlier formats (vectors/<state>.faiss)
                if not old.name.startswith(ANN_FILE):
                    old.unlink(missing_ok=True)
        except OSError as e:
            log.warning("vector index not kept in %s: %s", path.parent, e)
    return vi


def _updated(path, store: IndexStore, scenes, x16, offsets, method, seed, exact):
    """(the saved index brought in step with ``scenes``, whether it changed), or (None, True) to rebuild."""
    if not path.is_file():
        return None, True
    try:
        vi = vectors.VectorIndex.load(path)
    except ValueError as e:
        log.warning("%s; rebuilding it", e)
        return None, True
    extra = vi.extra
    if vi.method != method or vi.dim != x16.shape[1] or extra.get("model_key") != store.meta.get("model_key"):
        return None, True
    have = dict(zip(extra.get("scene_ids", []), extra.get("keys", [])))
    want = {s.scene_id: s for s in scenes}
    gone = [sid for sid in have if sid not in want or want[sid].key != have[sid]]
    new = [i for i, s in enumerate(scenes) if s.scene_id not in have or have[s.scene_id] != s.key]
    if not gone and not new:
        return vi, False
    if gone and vi.method == "hnsw":
        return None, True
    for sid in gone:
        vi.remove_range(sid << SCENE_SHIFT, (sid + 1) << SCENE_SHIFT)
    for i in new:
        vi.add(x16[offsets[i]:offsets[i + 1]], scene_ids(scenes[i]))
    if vi.stale() or vi.n != len(x16):
        return None, True
    all_ids = np.concatenate([scene_ids(s) for s in scenes])
    vi.tune(x16, all_ids, seed, exact)
    return vi, True


def rows_of(scenes: Sequence[SceneRecord], offsets: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows of the concatenated embeddings for vector ids (-1 stays -1)."""
    ids = np.asarray(ids, dtype=np.int64)
    max_sid = max((s.scene_id for s in scenes), default=0)
    base = np.full(max_sid + 2, -1, np.int64)
    for i, s in enumerate(scenes):
        base[s.scene_id] = offsets[i]
    sid = np.clip(ids >> SCENE_SHIFT, 0, max_sid + 1)
    rows = base[sid] + (ids & ((1 << SCENE_SHIFT) - 1))
    return np.where((ids < 0) | (base[sid] < 0), -1, rows)


def exact_fn(scenes: Sequence[SceneRecord], offsets: np.ndarray, x16: np.ndarray) -> vectors.ExactFn:
    """ids -> their stored vectors as unit float32 (the re-scoring of IVF candidates)."""
    def exact(ids: np.ndarray) -> np.ndarray:
        v = x16[rows_of(scenes, offsets, ids)].astype(np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return exact
