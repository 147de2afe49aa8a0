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
    from .query import index_card

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
    """Query tile size in the query raster's pixels: ``override``, else the index tiles' ground size, else the
    card's own tile size."""
    if override is not None:
        if override < 1:
            raise ValueError(f"query tile size must be a positive number of pixels, got {override}")
        return int(override)
    scene_info = scene.grid_info()
    if _metres(scene_info.crs) and _metres(info.crs):
        ground = index_tile_px * abs(scene_info.transform.a)
        return max(1, int(round(ground / abs(info.transform.a))))
    return int(card.input.tile_px)


def _query_grid_ids(info, tile_px: int, like: list[str], like_crs: str | None, raster: str) -> set[int]:
    ids: set[int] = set()
    for i, geom in enumerate(like):
        where = f"query geometry {i + 1} of {len(like)}" if len(like) > 1 else "query geometry"
        try:
            grid = make_grid(info, tile_px, aoi=geom, aoi_crs=like_crs)
        except ValueError as e:
            raise ValueError(f"{where}: " + str(e).replace("area of interest", "geometry").replace(
                "the raster", f"query raster {raster}")) from None
        ids.update(t.id for t in grid.tiles)
    return ids


def check_cross_modal(store: IndexStore, query_model: str, raster: str, like: list[str], like_crs: str | None,
                      query_tile: int | None = None) -> None:
    """Everything cheap about a cross-modal query, before any model loads (the job queue calls this on submit)."""
    from ..index.build import required_bands

    query, _, _ = cards_of_one_space(store, query_model)
    scenes = store.scenes()
    if not scenes:
        raise ValueError(f"index {store.root} holds no complete scenes (was its indexing cancelled?)")
    with open_raster(raster) as src:
        check_bands(src.info, required_bands(query, src.info), query.id)
        tile = query_tile_px(scenes[0], store.tile_px, src.info, query, query_tile)
        _query_grid_ids(src.info, tile, like, like_crs, raster)


def cross_modal_queries(store: IndexStore, query_model: str, raster: str, like: list[str], like_crs: str | None,
                        query_tile: int | None = None, device: str = "auto", cancel=None) -> CrossModalQuery:
    """Embed the query raster's tiles under ``like`` with ``query_model``; unit vectors, one per usable tile."""
    from ..index.build import required_bands
    from ..models import cached_model, cached_runner

    query, _, space = cards_of_one_space(store, query_model)
    scenes = store.scenes()
    if not scenes:
        raise ValueError(f"index {store.root} holds no complete scenes (was its indexing cancelled?)")
    with open_raster(raster) as src:
        info = src.info
        check_bands(info, required_bands(query, info), query.id)
        tile = query_tile_px(scenes[0], store.tile_px, info, query, query_tile)
        ids = _query_grid_ids(info, tile, like, like_crs, raster)
        grid = make_grid(info, tile)
        tiles = [t for t in grid.tiles if t.id in ids]
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
