"""Similar-tile and text search over an index: query vector(s) -> top-k tiles -> GeoPackage (+ heat map).

- ``like``: geometries (WKT/GeoJSON, in ``like_crs`` or the scene's CRS) on one scene of the index select query
  tiles with the rule of an area of interest (``tiling.make_grid``: tiles at least 50 % covered, or every tile
  touched when the geometry is smaller than that);
- ``tile_ids``: query tiles by id on that scene;
- ``text``: a description, embedded with the card's templates exactly like a classification class
  (``engine.head.class_embedding``; ``a | b`` pools synonyms).

``fuse="mean"``: one query, the re-normalised mean of the query tiles' embeddings. ``fuse="max"``: every query
tile searches on its own and each candidate keeps its best similarity. The query's own tiles never appear in
the results. Hits from every scene of the index are ranked together.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import shapely

from .. import __version__, validation
from ..engine.embed import Cancelled
from ..engine.head import class_embedding, l2_normalize
from ..outputs import WRITER_TAG, write_tiles_gpkg
from ..tiling import make_grid, reproject_geometry
from . import ann, vectors
from .heatmap import write_heatmap
from .reuse import stale_files
from .store import IndexStore, SceneRecord, guard_search_outputs, weights_hash

FUSE = ("mean", "max")
FIELDS = {"id": "int", "scene": "str", "row": "int", "col": "int", "rank": "int", "similarity": "float",
          "query": "str", "col_off": "int", "row_off": "int", "width": "int", "height": "int"}
LAYER = "similar"
#: Loaded indexes kept in memory per process (a server searches the same index again and again).
VIEW_CACHE_SIZE = 2


@dataclass
class SearchResult:
    out: Path
    heatmap: Path | None
    hits: int
    query_tiles: list[int]
    seconds: float
    search_method: str
    scene: str | None = None  # the raster the query tiles (and the heat map) belong to
    k: int = 0  # results asked for after clamping to the tiles available
    warnings: list[str] = field(default_factory=list)  # e.g. scenes whose raster changed since indexing
    run: dict = field(repr=False, default_factory=dict)


@dataclass
class Hit:
    scene: SceneRecord
    tile_id: int
    similarity: float
    query: str


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- loaded index ------------------------------------------------------------------------------------------------

class IndexView:
    """Every complete scene of an index loaded for search: float16 memory maps, tile ids, a vector index."""

    def __init__(self, store: IndexStore, state: str):
        self.store = store
        self.state = state
        self.scenes = store.scenes()
        if not self.scenes:
            raise ValueError(f"index {store.root} holds no complete scenes: index a raster into it first")
        # copied into memory (float16), not kept memory-mapped: a long-lived process must not fault on a file
        # that another process replaces
        self.x16 = np.concatenate([np.asarray(store.embeddings(s)) for s in self.scenes])
        self.tile_ids = store.all_tile_ids(self.scenes)
        # tile id -> row by binary search (a dict per tile costs ~100 bytes a tile: 100 MB per million)
        self._order = [np.argsort(ids, kind="stable") for ids in self.tile_ids]
        self._sorted = [ids[o] for ids, o in zip(self.tile_ids, self._order)]
        sizes = np.array([s.tiles for s in self.scenes], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.n = int(self.offsets[-1])
        if self.n == 0:
            raise ValueError(f"index {store.root} holds no tiles (every tile of its scenes was nodata)")
        self.vectors = ann.vectors_for(store, self.scenes, self.x16)
        self._exact = ann.exact_fn(self.scenes, self.offsets, self.x16)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, global rows) of the top ``k`` for each query, best first (-1 / -inf: none)."""
        sims, ids = self.vectors.search(queries, k, self._exact)
        return sims, ann.rows_of(self.scenes, self.offsets, ids)

    def _find(self, scene_pos: int, tile_ids: Sequence[int]) -> np.ndarray:
        """Row within the scene of each tile id, -1 where the scene has no such tile."""
        ids, order = self._sorted[scene_pos], self._order[scene_pos]
        want = np.asarray(tile_ids, dtype=np.int64).reshape(-1)
        at = np.clip(np.searchsorted(ids, want), 0, max(len(ids) - 1, 0))
        found = (len(ids) > 0) & (ids[at] == want) if len(ids) else np.zeros(len(want), bool)
        return np.where(found, order[at] if len(ids) else -1, -1)

    def rows(self, scene_pos: int, tile_ids: Sequence[int]) -> np.ndarray:
        pos = self._find(scene_pos, tile_ids)
        if np.any(pos < 0):
            raise KeyError(int(np.asarray(tile_ids).reshape(-1)[np.argmax(pos < 0)]))
        return self.offsets[scene_pos] + pos

    def has_tile(self, scene_pos: int, tile_id: int) -> bool:
        return bool(self._find(scene_pos, [tile_id])[0] >= 0)

    def emb(self, scene_pos: int) -> np.ndarray:
        """A scene's (tiles, dim) float16 embeddings."""
        return self.x16[self.offsets[scene_pos]:self.offsets[scene_pos + 1]]

    def vectors_of(self, scene_pos: int, tile_ids: Sequence[int]) -> np.ndarray:
        """Unit float32 vectors of some tiles of a scene."""
        return l2_normalize(self.x16[self.rows(scene_pos, tile_ids)].astype(np.float32))

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scene position, tile id) of global rows."""
        rows = np.asarray(rows, dtype=np.int64)
        scene_pos = np.searchsorted(self.offsets, rows, side="right") - 1
        tile = np.array([self.tile_ids[s][r - self.offsets[s]] for s, r in zip(scene_pos, rows)], dtype=np.int64)
        return scene_pos, tile

    def scene_pos(self, record: SceneRecord) -> int:
        return next(i for i, s in enumerate(self.scenes) if s.key == record.key)


_views: OrderedDict[tuple[str, str, str], IndexView] = OrderedDict()
_views_lock = threading.Lock()


def load_view(store: IndexStore) -> IndexView:
    """The loaded index, from the in-process cache while the index has not changed."""
    state = store.state()
    key = (str(store.root), state, vectors.choose_method(store.total_tiles()))
    with _views_lock:
        if key in _views:
            _views.move_to_end(key)
            return _views[key]
    view = IndexView(store, state)
    with _views_lock:
        _views[key] = view
        while len(_views) > VIEW_CACHE_SIZE:
            _views.popitem(last=False)
    return view


def loaded_indexes() -> list[dict]:
    """The indexes loaded for search in this process: size, search method, measured recall and latency, memory
    (``/v1/health`` reports them)."""
    with _views_lock:
        views = list(_views.values())
    out = []
    for v in views:
        r = v.vectors.report()
        out.append({"index": str(v.store.root), "tiles": v.n, "search_method": v.vectors.description,
                    "recall": r["recall"], "latency_ms": r["latency_ms"],
                    "memory_mb": round((v.x16.nbytes + v.vectors.nbytes) / 2**20, 1)})
    return out


# --- text side ---------------------------------------------------------------------------------------------------


def index_card(store: IndexStore):
    """The model card an index was built with, checked against the card hash and weights it recorded."""
    from ..models import resolve_card

    meta = store.meta
    card = None
    for ref in (meta.get("model_ref"), meta.get("model")):
        if not ref:
            continue
        try:
            card = resolve_card(ref)
        except ValueError:
            continue
        if card.card_hash() == meta.get("card_hash"):
            break
        card = None
    if card is None:
        raise ValueError(f"index {store.root} was built with model {meta.get('model')!r} (card {meta.get('card_hash')}); "
                         "that model card is not installed any more (or has changed), so text cannot be searched")
    if weights_hash(card) != meta.get("weights_hash"):
        raise ValueError(f"the weights of model {card.id!r} changed since index {store.root} was built: re-index")
    return card


def text_vector(store: IndexStore, text: str, device: str = "auto") -> np.ndarray:
    """A description -> a unit query vector, with the card's templates (the classification head's recipe)."""
    from ..engine.prompts import MAX_PHRASE_CHARS, load_templates
    from ..models import cached_model

    phrases = tuple(dict.fromkeys(p.strip() for p in str(text or "").split("|") if p.strip()))
    if not phrases:
        raise ValueError("search text is empty: type a description, e.g. \"river with sand banks\"")
    for p in phrases:
        if len(p) > MAX_PHRASE_CHARS:
            raise ValueError(f"search text is too long ({len(p)} characters, at most {MAX_PHRASE_CHARS})")
    card = index_card(store)
    templates = load_templates(card.templates)
    return class_embedding(cached_model(card, device=device).encode_text, phrases, templates)


# --- queries -----------------------------------------------------------------------------------------------------

def tiles_under(info, tile_px: int, stride: int | None, like: Sequence[str], like_crs: str | None,
                raster: str) -> set[int]:
    """Ids of the grid's tiles under any of the query geometries (``raster`` names the raster in messages)."""
    ids: set[int] = set()
    for i, geom in enumerate(like):
        where = f"query geometry {i + 1} of {len(like)}" if len(like) > 1 else "query geometry"
        try:
            grid = make_grid(info, tile_px, stride, aoi=geom, aoi_crs=like_crs)
        except ValueError as e:
            raise ValueError(f"{where}: " + str(e).replace("area of interest", "geometry").replace(
                "the raster", raster)) from None
        ids.update(t.id for t in grid.tiles)
    return ids


def like_tiles(view: IndexView, scene_pos: int, like: Sequence[str], like_crs: str | None) -> list[int]:
    """Indexed tiles under query geometries, chosen like an area of interest chooses tiles (tiling.make_grid)."""
    scene = view.scenes[scene_pos]
    ids = tiles_under(scene.grid_info(), view.store.tile_px, view.store.stride, like, like_crs,
                      f"scene {scene.name}")
    indexed = sorted(t for t in ids if view.has_tile(scene_pos, t))
    if not indexed:
        raise ValueError(f"no indexed tiles under the query geometry: the {len(ids)} tile(s) it covers on scene "
                         f"{scene.name} are nodata")
    return indexed


def check_tile_ids(view: IndexView, scene_pos: int, tile_ids: Sequence[int]) -> list[int]:
    scene = view.scenes[scene_pos]
    ids = sorted({int(t) for t in tile_ids})
    if not ids:
        raise ValueError("no query tile ids given")
    n = scene.n_rows * scene.n_cols
    off = [t for t in ids if not 0 <= t < n]
    if off:
        raise ValueError(f"tile id(s) {', '.join(map(str, off[:10]))} are not on the grid of scene {scene.name} "
                         f"(ids 0..{n - 1}, {scene.n_rows} rows x {scene.n_cols} columns)")
    missing = [t for t in ids if not view.has_tile(scene_pos, t)]
    if missing:
        raise ValueError(f"tile id(s) {', '.join(map(str, missing[:10]))} of scene {scene.name} are nodata tiles, "
                         "not in the index")
    return ids


def rank(view: IndexView, queries: np.ndarray, k: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k global rows for (M, D) queries, max-fused over the M queries, ``exclude`` rows left out.

    Returns (rows, similarities, index of the query that gave each similarity), best first. Exact with exact
    search: a candidate of the fused top k is within the top k + |exclude| of the query giving its max.
    """
    exclude = np.unique(np.asarray(exclude, dtype=np.int64))
    kk = min(view.n, k + len(exclude))
    sims, idx = view.search(queries, kk)
    qj = np.repeat(np.arange(len(queries)), idx.shape[1])
    sims, idx = sims.ravel(), idx.ravel()
    keep = (idx >= 0) & ~np.isin(idx, exclude)
    sims, idx, qj = sims[keep], idx[keep], qj[keep]
    order = np.lexsort((-sims, idx))  # by row, best similarity first within a row
    sims, idx, qj = sims[order], idx[order], qj[order]
    first = np.unique(idx, return_index=True)[1]
    sims, idx, qj = sims[first], idx[first], qj[first]
    best = np.lexsort((idx, -sims))[:k]  # by similarity, ties by row
    return idx[best], sims[best], qj[best]


def _describe_tiles(ids: Sequence[int], limit: int = 12) -> str:
    ids = list(ids)
    more = f", ... ({len(ids)} tiles)" if len(ids) > limit else ""
    return ", ".join(map(str, ids[:limit])) + more


# --- the search --------------------------------------------------------------------------------------------------

def search(index: str | Path, *, like: list[str] | None = None, like_crs: str | None = None,
           tile_ids: list[int] | None = None, scene: str | None = None, text: str | None = None,
           fuse: str = "mean", k: int = 50, out: str | Path, heatmap: str | Path | None = None,
           progress: Callable[[int, int], None] | None = None, cancel: Callable[[], bool] | None = None,
           device: str = "auto", overwrite: bool = False, layer: str | None = None,
           query_model: str | None = None, query_tile: int | None = None) -> SearchResult:
    """Rank the tiles of ``index`` by similarity to a query and write the top ``k`` to ``out`` (layer ``similar``).

    Exactly one of ``like`` (geometries), ``tile_ids`` or ``text``. With ``query_model``, ``like`` lies on the
    raster ``scene`` (indexed or not) and its tiles are embedded by that card, which must share the index card's
    embedding space (cross-modal search, :mod:`.crossmodal`). ``k`` above the number of candidate tiles
    is clamped to it; above :data:`~tileprompt_backend.validation.MAX_K` it is an error. Every bad input is a
    ValueError naming it; ``cancel()`` returning True raises ``Cancelled`` before anything is written.
    ``out`` and ``heatmap`` pass ``outputs.guard_output`` against the index and every indexed raster file
    (``overwrite``, ``layer``: as for classify). A scene whose raster changed since it was indexed is
    searched on its old embeddings, with a warning.
    """
    started, t0 = _now(), time.perf_counter()
    steps = 4

    def step(i: int) -> None:
        if cancel is not None and cancel():
            raise Cancelled("cancelled by the user")
        if progress is not None:
            progress(i, steps)

    # validate everything cheap first
    like = [like] if isinstance(like, str) else like
    given = [name for name, v in (("like", like), ("tile_ids", tile_ids), ("text", text)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one query: geometries (like), tile ids or text"
                         + (f" (got {' and '.join(given)})" if given else ""))
    if like is not None and not like:
        raise ValueError("no query geometries given")
    text = validation.text(text)
    if fuse not in FUSE:
        raise ValueError(f"unknown fuse {fuse!r} (valid: {', '.join(FUSE)})")
    if query_model is not None and (like is None or scene is None):
        raise ValueError("a query model (cross-modal search) needs query geometries (like) and the raster they lie on "
                         "(scene / --scene RASTER)")
    query_tile = validation.tile_px(query_tile)
    k = validation.k(int(k) if isinstance(k, np.integer) else k)
    store = IndexStore.open(index)
    out, heatmap = guard_search_outputs(store, out, heatmap, overwrite, layer,
                                        query_raster=scene if query_model is not None else None)
    step(0)

    view = load_view(store)
    step(1)
    if query_model is not None:  # ``scene`` is the query raster; it may or may not be one of the index's scenes
        from .crossmodal import cross_modal_queries

        cross = cross_modal_queries(store, query_model, scene, like, like_crs, query_tile, device, cancel)
        indexed = [s for s in view.scenes if s.raster == str(Path(scene).expanduser().resolve())]
        scene_rec = indexed[0] if len(indexed) == 1 else view.scenes[0] if len(view.scenes) == 1 else None
    else:
        cross = None
        scene_rec = store.find_scene(scene, view.scenes) if scene is not None else (
            view.scenes[0] if len(view.scenes) == 1 else None)
    if scene_rec is None and cross is None and (like is not None or tile_ids is not None):
        raise ValueError(f"index {store.root} holds {len(view.scenes)} scenes: name the scene the query "
                         "geometries or tile ids refer to (scene / --scene RASTER)")
    if scene_rec is None and heatmap is not None:
        raise ValueError(f"index {store.root} holds {len(view.scenes)} scenes: name the scene the heat map "
                         "covers (scene / --scene RASTER)")
    scene_pos = view.scene_pos(scene_rec) if scene_rec is not None else None

    query_ids: list[int] = []
    exclude = np.zeros(0, dtype=np.int64)
    if text is not None:
        queries = text_vector(store, text, device=device)[None, :]
        labels = [str(text).strip()]
        kind = "text"
    elif cross is not None:
        kind = "like-cross-modal"
        if fuse == "mean" or len(cross.vectors) == 1:
            queries = l2_normalize(cross.vectors.mean(axis=0, keepdims=True))
            labels = [f"{cross.model}: " + (f"tile {cross.tile_ids[0]}" if len(cross.tile_ids) == 1
                                            else f"mean of tiles {_describe_tiles(cross.tile_ids)}")]
        else:
            queries = cross.vectors
            labels = [f"{cross.model}: tile {t}" for t in cross.tile_ids]
    else:
        query_ids = (like_tiles(view, scene_pos, like, like_crs) if like is not None
                     else check_tile_ids(view, scene_pos, tile_ids))
        exclude = view.rows(scene_pos, query_ids)
        q = view.vectors_of(scene_pos, query_ids)
        kind = "like" if like is not None else "tile_ids"
        if fuse == "mean" or len(q) == 1:
            queries = l2_normalize(q.mean(axis=0, keepdims=True))
            labels = [f"tile {query_ids[0]}" if len(q) == 1 else f"mean of tiles {_describe_tiles(query_ids)}"]
        else:
            queries = q
            labels = [f"tile {t}" for t in query_ids]
    candidates = view.n - len(exclude)
    if candidates < 1:
        raise ValueError(f"index {store.root} holds no tiles besides the query's own")
    k_eff = min(int(k), candidates)
    step(2)

    rows, sims, qj = rank(view, queries, k_eff, exclude)
    scene_idx, hit_tiles = view.locate(rows)
    hits = [Hit(view.scenes[s], int(t), float(v), labels[j]) for s, t, v, j in zip(scene_idx, hit_tiles, sims, qj)]
    warnings = stale_warnings([scene_rec] + [h.scene for h in hits])
    out_scene = scene_rec if scene_rec is not None else (hits[0].scene if hits else view.scenes[0])
    features = _features(store, hits, out_scene)
    step(3)

    run = {
        "run_id": uuid.uuid4().hex, "software": f"tileprompt {__version__}", "kind": "search",
        "started": started, "finished": _now(), "index": str(store.root), "model": store.meta.get("model"),
        "model_card_hash": store.meta.get("card_hash"), "weights_hash": store.meta.get("weights_hash"),
        "tile_px": store.tile_px, "stride": store.stride, "query_kind": kind,
        "like": list(like) if like is not None else None, "like_crs": like_crs,
        "tile_ids": list(query_ids) if kind != "text" else None, "text": text,
        "scene": scene_rec.raster if scene_rec is not None else None, "fuse": fuse, "k": int(k),
        "k_effective": k_eff, "hits": len(hits), "index_scenes": len(view.scenes), "index_tiles": view.n,
        "search_method": view.vectors.description, "crs_of_scene": out_scene.raster,
        "heatmap": str(heatmap) if heatmap is not None else None,
        "query_model": cross.model if cross is not None else None,
        "query_space": cross.space if cross is not None else None,
        "query_raster": cross.raster if cross is not None else None,
        "query_tile_px": cross.tile_px if cross is not None else None,
        "query_raster_tiles": list(cross.tile_ids) if cross is not None else None,
        "warnings": warnings,
    }
    if heatmap is not None:
        _heatmap(view, scene_pos, queries, query_ids, heatmap, run)
    write_tiles_gpkg(out, out_scene.rasterio_crs(), FIELDS, features, run, layer=layer or LAYER,
                     add_layer=layer is not None)
    step(4)
    return SearchResult(out=out, heatmap=heatmap, hits=len(hits),
                        query_tiles=list(query_ids) if cross is None else list(cross.tile_ids),
                        seconds=time.perf_counter() - t0, search_method=view.vectors.description,
                        scene=scene_rec.raster if scene_rec is not None else None, k=k_eff, warnings=warnings,
                        run=run)


def stale_warnings(scenes: Sequence[SceneRecord | None]) -> list[str]:
    """One warning per distinct scene whose raster files changed (or vanished) since it was indexed."""
    notes, seen = [], set()
    for s in scenes:
        if s is None or s.key in seen:
            continue
        seen.add(s.key)
        changed = stale_files(s)
        if changed:
            notes.append(f"{s.name} changed since it was indexed ({s.completed}): its results come from the "
                         f"old embeddings ({len(changed)} file(s) differ); re-index it")
    return notes


def _features(store: IndexStore, hits: list[Hit], out_scene: SceneRecord) -> list[tuple[Any, dict]]:
    """Polygons (in the output scene's CRS) and attributes of the hits, in rank order."""
    by_scene: dict[str, list[Hit]] = {}
    for h in hits:
        by_scene.setdefault(h.scene.key, []).append(h)
    rows: dict[tuple[str, int], tuple] = {}
    for key, group in by_scene.items():
        for tid, r in store.tile_rows(group[0].scene, [h.tile_id for h in group]).items():
            rows[(key, tid)] = r
    features = []
    for rank_, h in enumerate(hits, start=1):
        row, col, col_off, row_off, width, height, wkb = rows[(h.scene.key, h.tile_id)]
        geom = shapely.from_wkb(wkb)
        if h.scene.crs != out_scene.crs:
            if h.scene.crs is None or out_scene.crs is None:
                raise ValueError(f"hits come from scenes with and without a CRS ({h.scene.name}, {out_scene.name}): "
                                 "they cannot share one layer")
            geom = reproject_geometry(geom, h.scene.crs, out_scene.crs)
        features.append((geom, {"id": h.tile_id, "scene": h.scene.raster, "row": row, "col": col, "rank": rank_,
                                "similarity": h.similarity, "query": h.query, "col_off": col_off,
                                "row_off": row_off, "width": width, "height": height}))
    return features


def _heatmap(view: IndexView, scene_pos: int, queries: np.ndarray, query_ids: Sequence[int], path: Path,
             run: dict) -> None:
    """Every indexed tile of the scene: its (max-fused) cosine to the query; the query's own tiles stay nodata."""
    scene = view.scenes[scene_pos]
    ids = view.tile_ids[scene_pos]
    emb = l2_normalize(view.emb(scene_pos).astype(np.float32))
    values = (emb @ queries.T).max(axis=1)
    keep = ~np.isin(ids, np.asarray(query_ids, dtype=np.int64))
    rows = view.store.tile_rows(scene, ids[keep])
    windows = np.array([rows[int(t)][2:6] for t in ids[keep]], dtype=np.int64).reshape(-1, 4)
    write_heatmap(path, scene, windows, values[keep],
                  tags={WRITER_TAG: run["run_id"], "query": run["text"] or run["query_kind"],
                        "scene": scene.raster, "tile_px": view.store.tile_px, "stride": view.store.stride})
