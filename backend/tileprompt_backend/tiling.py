"""A regular tile grid over a raster, in the raster's own CRS and pixel grid.

Tiles are ``tile_px`` square windows every ``stride`` pixels, starting at the raster's top-left pixel.
The grid covers the whole raster: the last row/column may reach past the edge, and the reader fills
those pixels with nodata (tiles that end up mostly nodata are skipped by the engine). A tile's id is
``row * n_cols + col`` of the full grid, so it stays the same whatever area of interest selects it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import shapely
import shapely.errors
import shapely.prepared
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.windows import Window
from shapely.geometry import Polygon, shape
from shapely.geometry.base import BaseGeometry

#: A tile is kept when at least this share of the tile lies inside the area of interest.
AOI_MIN_COVER = 0.5
#: A tile is skipped when more than this share of its pixels is nodata.
MAX_NODATA_FRACTION = 0.5


@dataclass(frozen=True)
class Tile:
    id: int
    row: int
    col: int
    window: Window  # pixel window on the raster's reference grid
    polygon: Polygon  # footprint in the raster CRS


@dataclass
class TileGrid:
    tile_px: int
    stride: int
    n_rows: int
    n_cols: int
    crs: Any  # the raster's CRS (rasterio CRS)
    transform: Affine
    tiles: list[Tile] = field(default_factory=list)
    skipped_outside: int = 0  # grid tiles left out by the area of interest
    aoi: BaseGeometry | None = None  # area of interest in the raster CRS

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)


def tile_polygon(transform: Affine, window: Window) -> Polygon:
    """The footprint of a pixel window: its four corners mapped through the geotransform."""
    c0, r0 = window.col_off, window.row_off
    c1, r1 = c0 + window.width, r0 + window.height
    return Polygon([transform @ (c, r) for c, r in ((c0, r0), (c1, r0), (c1, r1), (c0, r1))])


def grid_polygons(transform: Affine, col_off: np.ndarray, row_off: np.ndarray, size: int) -> np.ndarray:
    """:func:`tile_polygon` of many square windows at once (the same corners, in the same order)."""
    c0, r0 = np.asarray(col_off, np.float64), np.asarray(row_off, np.float64)
    corners_c = np.stack([c0, c0 + size, c0 + size, c0, c0], axis=1)
    corners_r = np.stack([r0, r0, r0 + size, r0 + size, r0], axis=1)
    t = transform
    x = t.a * corners_c + t.b * corners_r + t.c
    y = t.d * corners_c + t.e * corners_r + t.f
    return shapely.polygons(np.stack([x, y], axis=2))


def grid_shape(width: int, height: int, tile_px: int, stride: int) -> tuple[int, int]:
    """(rows, cols) of a grid that covers the raster completely."""
    def count(n: int) -> int:
        return 1 if n <= tile_px else math.ceil((n - tile_px) / stride) + 1
    return count(height), count(width)


def make_grid(info, tile_px: int, stride: int | None = None, aoi: str | dict | BaseGeometry | None = None,
              aoi_crs: str | None = None) -> TileGrid:
    """Lay a grid over a raster (any object with crs, transform, width, height: a RasterInfo).

    ``aoi`` is WKT, GeoJSON (text or dict; geometry, Feature or FeatureCollection) or a shapely geometry in
    ``aoi_crs`` (default: the raster's CRS). Tiles covering less than :data:`AOI_MIN_COVER` of their area with
    the AOI are skipped and counted; when that leaves none (an AOI smaller than a tile), every tile touching
    the AOI is kept.
    """
    tile_px = int(tile_px)
    if tile_px < 1:
        raise ValueError(f"tile size must be a positive number of pixels, got {tile_px}")
    stride = tile_px if stride is None else int(stride)
    if stride < 1:
        raise ValueError(f"stride must be a positive number of pixels, got {stride}")
    if tile_px > 10 * max(info.width, info.height):
        raise ValueError(f"tile size {tile_px} px is absurd for a {info.width}x{info.height} px raster")
    n_rows, n_cols = grid_shape(info.width, info.height, tile_px, stride)
    grid = TileGrid(tile_px=tile_px, stride=stride, n_rows=n_rows, n_cols=n_cols, crs=info.crs,
                    transform=info.transform)
    rows, cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    polygons = grid_polygons(info.transform, cols * stride, rows * stride, tile_px)
    all_tiles = [Tile(id=r * n_cols + c, row=r, col=c, window=Window(c * stride, r * stride, tile_px, tile_px),
                      polygon=p) for r, c, p in zip(rows.tolist(), cols.tolist(), polygons)]
    if aoi is None:
        grid.tiles = all_tiles
        return grid

    if info.crs is None and aoi_crs is not None:
        raise ValueError("the raster has no CRS, so an area of interest in another CRS cannot be placed on it")
    area = parse_geometry(aoi)
    if aoi_crs is not None:
        area = reproject_geometry(area, aoi_crs, info.crs)
    raster_box = tile_polygon(info.transform, Window(0, 0, info.width, info.height))
    if not area.intersects(raster_box) or area.intersection(raster_box).area <= 0:
        l, b, r, t = area.bounds
        L, B, R, T = raster_box.bounds
        raise ValueError(
            f"area of interest does not overlap the raster: AOI bounds ({l:.6g}, {b:.6g}, {r:.6g}, {t:.6g}) vs "
            f"raster bounds ({L:.6g}, {B:.6g}, {R:.6g}, {T:.6g}) in the raster CRS")
    grid.aoi = area
    prepared = shapely.prepared.prep(area)
    touching = [t for t in all_tiles if prepared.intersects(t.polygon)]
    covered = [t for t in touching if t.polygon.intersection(area).area >= AOI_MIN_COVER * t.polygon.area]
    grid.tiles = covered or [t for t in touching if t.polygon.intersection(area).area > 0]
    grid.skipped_outside = len(all_tiles) - len(grid.tiles)
    return grid


def parse_geometry(value: str | dict | BaseGeometry) -> BaseGeometry:
    """WKT, GeoJSON text/dict (geometry, Feature, FeatureCollection) or shapely -> a valid shapely geometry."""
    if isinstance(value, BaseGeometry):
        geom = value
    else:
        if isinstance(value, str):
            text = value.strip()
            if not text:
                raise ValueError("area of interest is empty")
            if text.startswith("{"):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"area of interest is not valid GeoJSON: {e}") from None
            else:
                try:
                    geom = shapely.from_wkt(text)
                except shapely.errors.GEOSException:
                    # GEOS quotes the text it could not read: the message names the problem only
                    raise ValueError("area of interest is not valid WKT (nor GeoJSON)") from None
                value = None
        if isinstance(value, dict):
            geom = _geojson_to_shape(value)
    if geom.is_empty:
        raise ValueError("area of interest is an empty geometry")
    if geom.geom_type not in ("Polygon", "MultiPolygon", "GeometryCollection"):
        raise ValueError(f"area of interest must be a polygon, got {geom.geom_type}")
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    return geom


def _geojson_to_shape(obj: dict) -> BaseGeometry:
    kind = obj.get("type")
    try:
        if kind == "FeatureCollection":
            parts = [shape(f["geometry"]) for f in obj.get("features", []) if f.get("geometry")]
            if not parts:
                raise ValueError("area of interest: the FeatureCollection has no geometries")
            return shapely.union_all(parts)
        if kind == "Feature":
            return shape(obj["geometry"])
        return shape(obj)
    except (KeyError, TypeError, AttributeError, shapely.errors.GEOSException) as e:
        raise ValueError(f"area of interest is not valid GeoJSON ({kind}): {e}") from None


def reproject_geometry(geom: BaseGeometry, src_crs, dst_crs) -> BaseGeometry:
    """Transform a geometry between CRSs with pyproj, densified first so long edges follow the projection."""
    return reproject_geometries(np.array([geom], dtype=object), src_crs, dst_crs)[0]


def reproject_geometries(geoms: np.ndarray, src_crs, dst_crs, segments: int = 64) -> np.ndarray:
    """:func:`reproject_geometry` for an array of geometries in one pass: each is densified to ``segments``
    pieces along its longest side, then every vertex goes through one pyproj transformer."""
    try:
        src, dst = CRS.from_user_input(_crs_text(src_crs)), CRS.from_user_input(_crs_text(dst_crs))
    except Exception as e:  # pyproj raises CRSError with a useful message
        raise ValueError(f"unknown CRS: {e}") from None
    geoms = np.asarray(geoms, dtype=object)
    if src == dst or not len(geoms):
        return geoms
    transformer = Transformer.from_crs(src, dst, always_xy=True)
    bounds = shapely.bounds(geoms)
    longest = np.maximum(bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1]) / segments
    dense = shapely.segmentize(geoms, np.where(longest > 0, longest, 1.0))
    out = shapely.transform(dense, lambda x, y: transformer.transform(x, y), interleaved=False)
    if not np.all(np.isfinite(shapely.bounds(out))):
        raise ValueError(f"area of interest cannot be transformed from {src.to_string()} to {dst.to_string()}")
    invalid = ~shapely.is_valid(out)
    if invalid.any():
        out[invalid] = shapely.make_valid(out[invalid])
    return out


def _crs_text(crs) -> str:
    """rasterio CRS objects, pyproj CRS objects and strings all become something pyproj reads."""
    if hasattr(crs, "to_wkt"):
        return crs.to_wkt()
    return str(crs)


def nodata_fraction(cube: np.ndarray, nodata: float) -> float:
    """Share of pixels whose every band equals ``nodata`` (or is NaN), for a (C, H, W) array."""
    if cube.size == 0:
        return 1.0
    # only pixels whose first band is nodata can be empty: check the other bands there alone (the engine calls
    # this for every tile, and most pixels are valid)
    first = cube[0]
    maybe = (first == nodata) | np.isnan(first)
    if not maybe.any():
        return 0.0
    rest = cube[:, maybe]
    empty = np.all((rest == nodata) | np.isnan(rest), axis=0)
    return float(empty.sum() / first.size)
