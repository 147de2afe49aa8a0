"""The classify pipeline's use of the index: read embeddings of an indexed scene, store those it computed."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..engine.embed import Cancelled, CancelFn, EmbedStats, ProgressFn
from .store import META_FILE, IndexStore, SceneRecord, default_index_dir, model_key, scene_fingerprint, scene_key
from .store import scene_record

log = logging.getLogger(__name__)


@dataclass
class CachedScene:
    """A complete scene of an index whose embeddings stand in for the image encoder."""

    store: IndexStore
    record: SceneRecord

    @property
    def runner(self) -> str:
        return self.record.runner or "unknown runner"

    def batches(self, tiles: Sequence, batch_size: int, stats: EmbedStats, progress: ProgressFn | None = None,
                cancel: CancelFn | None = None) -> Iterator[tuple[list, np.ndarray]]:
        """(tiles, float16 embeddings) in the batches ``embed_tiles`` would yield: the grid's usable tiles in
        order, ``batch_size`` at a time; tiles missing from the index are the scene's nodata tiles."""
        pos = {int(t): i for i, t in enumerate(self.store.tile_ids(self.record))}
        emb = self.store.embeddings(self.record)
        stats.tiles_total = len(tiles)
        usable = [t for t in tiles if t.id in pos]
        stats.skipped_ids = [t.id for t in tiles if t.id not in pos]
        stats.skipped_nodata = len(stats.skipped_ids)
        for i in range(0, len(usable), batch_size):
            if cancel is not None and cancel():
                raise Cancelled("cancelled by the user")
            chunk = usable[i:i + batch_size]
            stats.tiles_encoded += len(chunk)
            if progress is not None:
                progress(stats.tiles_encoded + stats.skipped_nodata, stats.tiles_total)
            yield chunk, np.asarray(emb[[pos[t.id] for t in chunk]])
        if progress is not None:
            progress(stats.tiles_total, stats.tiles_total)


def cached_embeddings(card, info, band_map, level, grid, index: str | Path | None) -> CachedScene | None:
    """The index scene holding this raster's tiles for (card, grid tile size, stride), or None.

    ``index`` names an index folder (an existing one built with another model, tile size or stride is a
    ValueError); None looks in the default cache index of the model + tile + stride.
    """
    mk = model_key(card, grid.tile_px, grid.stride)
    if mk is None:  # weights not downloaded yet: nothing can have been indexed with them
        return None
    root = Path(index).expanduser() if index is not None else default_index_dir(mk)
    if not (root / META_FILE).is_file():
        if index is not None and root.exists() and (not root.is_dir() or any(root.iterdir())):
            IndexStore.open(root)  # raises: the folder is not an index
        return None
    store = IndexStore.open(root)
    store.check_model(mk)
    record = store.scene(scene_key(scene_fingerprint(info, band_map, level), mk))
    if record is None:
        return None
    try:
        store.embeddings(record)
    except ValueError as e:  # damaged on disk: recompute rather than fail
        log.warning("%s", e)
        return None
    return CachedScene(store, record)


def changed_since_indexed(card, info, band_map, level, grid, index: str | Path | None) -> str | None:
    """A note when the index (``index`` or the default one) holds this raster (same path, band map, level) but
    from files that have changed since: its embeddings are stale and the tiles are embedded anew."""
    mk = model_key(card, grid.tile_px, grid.stride)
    if mk is None:
        return None
    root = Path(index).expanduser() if index is not None else default_index_dir(mk)
    if not (root / META_FILE).is_file():
        return None
    try:
        store = IndexStore.open(root)
        fp = scene_fingerprint(info, band_map, level)
        old = [s for s in store.scenes() if s.raster == fp["raster"] and s.band_map == fp["band_map"]
               and s.level == level]
    except ValueError:
        return None
    if not old:
        return None
    return (f"{Path(info.path).name} changed since it was indexed ({old[0].completed}): its tiles are embedded "
            "anew")


def stale_files(record: SceneRecord) -> list[str]:
    """The files of an indexed scene that are missing or differ (size, mtime) from when it was indexed."""
    changed = []
    for path, size, mtime_ns in record.info.get("fingerprint", {}).get("files", []):
        try:
            st = os.stat(path)
        except OSError:
            changed.append(path)
            continue
        if st.st_size != size or st.st_mtime_ns != mtime_ns:
            changed.append(path)
    return changed


def store_embeddings(card, info, band_map, level, grid, index: str | Path | None, tiles: Sequence,
                     chunks: Sequence[np.ndarray], skipped_nodata: int, runner: str) -> Path | None:
    """Keep a classification's embeddings of a full grid in the index; returns its folder (None if not kept).

    Best effort: a read-only or full cache only costs recomputing next time.
    """
    mk = model_key(card, grid.tile_px, grid.stride)
    if mk is None or not tiles:
        return None
    root = Path(index).expanduser() if index is not None else default_index_dir(mk)
    try:
        store = IndexStore.create_or_open(root, mk)
        store.cleanup()
        fp = scene_fingerprint(info, band_map, level)
        record = scene_record(info, fp, scene_key(fp, mk), grid, band_map, level)
        record.skipped_nodata, record.runner = int(skipped_nodata), runner
        store.add_scene(record, tiles, np.concatenate(chunks))
        return store.root
    except OSError as e:
        log.warning("embeddings not kept in index %s: %s", root, e)
        return None
