"""Cross-modal search: query an index with tiles embedded by another card of the same embedding space.

An index built with one card (say the aligned Sentinel-2 encoder) can be queried with a region of another raster
(an RGB orthophoto) embedded by another card (the CLIP the encoder was aligned to), and back: both cards name the
same ``space`` (``models.identity``), so their embeddings are comparable. Cards of different spaces are refused.

The query raster is cut into tiles of the index tiles' ground size when both CRSs measure in metres (an index
tile of 32 px at 10 m = 320 m; on a 0.5 m orthophoto that is 640 px), else into the query card's own tile size;
``query_tile`` overrides. Tiles under the query geometries are chosen as an area of interest chooses them
(``tiling.make_grid``); mostly-nodata ones are skipped; each tile is embedded through the query card's own
preprocessing. Nothing of the index is excluded from the results: the query tiles are not in it (when the query
raster is itself indexed, its tiles at the same place are the cross-modal positives).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pyproj import CRS

from ..engine.embed import check_bands, embed_tiles
from ..sentinel2 import open_raster
from ..tiling import make_grid
from .query import index_card, tiles_under
from .store import IndexStore, SceneRecord


@dataclass
class CrossModalQuery:
    vectors: np.ndarray  # (M, D) unit query vectors, one per query tile
    tile_ids: list[int]  # the query tiles' ids on the query raster's grid
    raster: str
    tile_px: int
    model: str
    space: str


def cards_of_one_space(store: IndexStore, query_model: str):
    """(query card, index card, their shared space); different spaces are a ValueError naming both."""
    from ..models import resolve_card
    from ..models.identity import check_same_space

    query = resolve_card(query_model)
    indexed = index_card(store)
    return query, indexed, check_same_space(indexed, query, "cross-modal search")


def _metres(crs) -> bool:
    if crs is None:
        return False
    try:
        c = CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    except Exception:  # noqa: BLE001 - an unreadable CRS simply does not measure in metres for us
        return False
    return c.is_projected and all(a.unit_name in ("metre", "meter") for a in c.axis_info[:2])


def query_tile_px(scene: SceneRecord, index_tile_px: int, info, card, override: int | None = None) -> int:
    """Query tile size in the query raster's pixels: ``override`` (checked by ``validation.tile_px`` where it
    comes in), else the index tiles' ground size, else the card's own tile size."""
    if override is not None:
        return int(override)
    scene_info = scene.grid_info()
    if _metres(scene_info.crs) and _metres(info.crs):
        ground = index_tile_px * abs(scene_info.transform.a)
        return max(1, int(round(ground / abs(info.transform.a))))
    return int(card.input.tile_px)


def _query_plan(store: IndexStore, query_model: str, raster: str, src, like: list[str], like_crs: str | None,
                query_tile: int | None):
    """(query card, shared space, query tile px, query tile ids) for the query raster ``raster``, open as ``src``."""
    from ..index.build import required_bands

    query, _, space = cards_of_one_space(store, query_model)
    scenes = store.scenes()
    if not scenes:
        raise ValueError(f"index {store.root} holds no complete scenes (was its indexing cancelled?)")
    check_bands(src.info, required_bands(query, src.info), query.id)
    tile = query_tile_px(scenes[0], store.tile_px, src.info, query, query_tile)
    return query, space, tile, tiles_under(src.info, tile, None, like, like_crs, f"query raster {raster}")


def check_cross_modal(store: IndexStore, query_model: str, raster: str, like: list[str], like_crs: str | None,
                      query_tile: int | None = None) -> None:
    """Everything cheap about a cross-modal query, before any model loads (the job queue calls this on submit)."""
    with open_raster(raster) as src:
        _query_plan(store, query_model, raster, src, like, like_crs, query_tile)


def cross_modal_queries(store: IndexStore, query_model: str, raster: str, like: list[str], like_crs: str | None,
                        query_tile: int | None = None, device: str = "auto", cancel=None) -> CrossModalQuery:
    """Embed the query raster's tiles under ``like`` with ``query_model``; unit vectors, one per usable tile."""
    from ..models import cached_model, cached_runner

    with open_raster(raster) as src:
        query, space, tile, ids = _query_plan(store, query_model, raster, src, like, like_crs, query_tile)
        tiles = [t for t in make_grid(src.info, tile).tiles if t.id in ids]
        model = cached_model(query, device=device)
        runner = cached_runner(model, backend="torch")
        done, vectors = [], []
        for batch_tiles, emb in embed_tiles(src, tiles, model, runner, cancel=cancel):
            done.extend(t.id for t in batch_tiles)
            vectors.append(np.asarray(emb, dtype=np.float32))
    if not done:
        raise ValueError(f"the {len(tiles)} tile(s) under the query geometry on {raster} are nodata")
    v = np.concatenate(vectors)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return CrossModalQuery(v, done, str(raster), tile, query.id, space)
