"""GeoPackage results: readable by GDAL/OGR, self-describing, never half-written."""

import fiona
import pytest
from rasterio.crs import CRS
from shapely.geometry import box

from tileprompt_backend.outputs import check_output_path, read_run_table, write_tiles_gpkg

FIELDS = {"id": "int", "class": "str", "score": "float"}


def _features(n, fail_at=None):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("disk full")
        yield box(i, 0, i + 1, 1), {"id": i, "class": "water", "score": 0.5}


def test_write_and_read_back(tmp_path):
    out = write_tiles_gpkg(tmp_path / "r.gpkg", CRS.from_epsg(32633), FIELDS, _features(3), {"model": "m", "n": 3})
    assert fiona.listlayers(out) == ["tiles", "tileprompt_runs"]
    with fiona.open(out, layer="tiles") as layer:
        assert len(layer) == 3
        assert list(layer.schema["properties"]) == ["id", "class", "score"]
        assert layer.crs.to_epsg() == 32633
    assert read_run_table(out) == [{"model": "m", "n": 3, "layer": "tiles"}]
    assert not list(tmp_path.glob(".*partial*"))


def test_failure_leaves_no_file_and_keeps_the_old_one(tmp_path):
    out = tmp_path / "r.gpkg"
    with pytest.raises(RuntimeError):
        write_tiles_gpkg(out, CRS.from_epsg(32633), FIELDS, _features(5, fail_at=3), {})
    assert not out.exists() and not list(tmp_path.iterdir())
    write_tiles_gpkg(out, CRS.from_epsg(32633), FIELDS, _features(2), {"run": 1})
    with pytest.raises(RuntimeError):
        write_tiles_gpkg(out, CRS.from_epsg(32633), FIELDS, _features(5, fail_at=1), {"run": 2})
    assert read_run_table(out) == [{"run": 1, "layer": "tiles"}]
    assert [p.name for p in tmp_path.iterdir()] == ["r.gpkg"]


@pytest.mark.parametrize("name, message", [
    ("missing/out.gpkg", "folder does not exist"),
    ("out.shp", "must be a .gpkg"),
])
def test_bad_output_paths(tmp_path, name, message):
    with pytest.raises(ValueError, match=message):
        check_output_path(tmp_path / name)
