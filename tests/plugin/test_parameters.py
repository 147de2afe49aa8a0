"""The typed parameters and the backend requests built from them, held to the backend's schemas."""

import ast
import json

import pytest

from conftest import PLUGIN_DIR
from tileprompt_plugin.plugin.parameters import (Area, AreaMode, ClassifyParameters, CrossModal, Extent, Fuse, InputKind,
                                                 Query, RasterInput, SearchParameters)

SCHEMAS = PLUGIN_DIR / "backend" / "tileprompt_backend" / "schemas.py"


def schema_fields():
    """Field names of each pydantic class in schemas.py, with inherited ones (read with ast: no pydantic here)."""
    tree = ast.parse(SCHEMAS.read_text(encoding="utf-8"))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}

    def fields(name):
        node = classes[name]
        found = set()
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                found |= fields(base.id)
        found |= {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                  and s.target.id != "model_config"}
        return found

    return {name: fields(name) for name in classes}


FIELDS = schema_fields()
RASTER = RasterInput("layer1", "S2", InputKind.FILE, "/data/s2.tif", ("B02", "B03", "B04"), "L2A")
FOLDER = RasterInput("layer2", "B04", InputKind.PRODUCT_FOLDER, "/data/IMG_DATA", None, None)


def test_the_schema_reader_sees_the_request_classes():
    assert {"raster", "band_map", "level", "model", "tile_px", "stride", "prompts", "out", "kind"} <= \
        FIELDS["ClassifyRequest"]
    assert {"rasters", "index"} <= FIELDS["IndexRequest"]
    assert {"index", "like", "like_crs", "text", "k", "out", "heatmap", "fuse", "scene"} <= FIELDS["SearchRequest"]


def test_classify_request_has_only_schema_fields():
    params = ClassifyParameters(
        raster=RASTER, prompts="forest | woodland\nwater", model="tiny", templates="/t.txt",
        area=Area(AreaMode.DRAWN, "POLYGON ((0 0, 1 0, 1 1, 0 0))", "EPSG:32633"), tile_px=64, overlap_px=16,
        multi_label=True, threshold=0.4)
    request = params.classify_request("/out/x.gpkg")
    assert set(request) <= FIELDS["ClassifyRequest"]
    assert request == {
        "kind": "classify", "raster": "/data/s2.tif", "band_map": ["B02", "B03", "B04"], "level": "L2A",
        "prompts": "forest | woodland\nwater", "out": "/out/x.gpkg", "model": "tiny", "tile_px": 64, "stride": 48,
        "templates": "/t.txt", "aoi": "POLYGON ((0 0, 1 0, 1 1, 0 0))", "aoi_crs": "EPSG:32633",
        "multi_label": True, "threshold": 0.4}
    json.dumps(request)


def test_classify_defaults_leave_choices_to_the_backend():
    request = ClassifyParameters(raster=FOLDER, prompts="a\nb").classify_request("/o.gpkg")
    assert request == {"kind": "classify", "raster": "/data/IMG_DATA", "prompts": "a\nb", "out": "/o.gpkg"}


def test_overlap_uses_the_models_tile_when_none_is_given():
    request = ClassifyParameters(raster=FOLDER, prompts="a", overlap_px=8).classify_request("/o.gpkg", 32)
    assert (request["tile_px"], request["stride"]) == (32, 24)
    with pytest.raises(ValueError, match="overlap"):
        ClassifyParameters(raster=FOLDER, prompts="a", overlap_px=8).classify_request("/o.gpkg", None)
    with pytest.raises(ValueError, match="smaller"):
        ClassifyParameters(raster=FOLDER, prompts="a", tile_px=16, overlap_px=16).classify_request("/o.gpkg")


def test_a_layer_to_export_cannot_be_sent_as_is():
    raster = RasterInput("l", "WMS", InputKind.EXPORT, "", None, None, Extent(0, 0, 1, 1, "EPSG:3857"))
    with pytest.raises(ValueError, match="exported"):
        ClassifyParameters(raster=raster, prompts="a").classify_request("/o.gpkg")
    exported = raster.with_path("/tmp/e.tif", ("R", "G", "B"))
    assert exported.kind is InputKind.FILE and exported.export_extent is None
    assert ClassifyParameters(raster=exported, prompts="a").classify_request("/o.gpkg")["band_map"] == ["R", "G", "B"]


def test_search_requests_have_only_schema_fields():
    like = SearchParameters(raster=RASTER, query=Query(("POLYGON ((0 0, 1 0, 1 1, 0 0))",), "EPSG:4326"),
                            model="tiny", tile_px=64, k=7, fuse=Fuse.MAX)
    index = like.index_request(None, 32)
    assert set(index) <= FIELDS["IndexRequest"]
    assert set(index["rasters"][0]) <= FIELDS["RasterInput"]
    assert "index" not in index  # the backend's cache: shared with classification
    assert like.index_request("/idx")["index"] == "/idx"
    search = like.search_request("/idx", "/o.gpkg", "/h.tif")
    assert set(search) <= FIELDS["SearchRequest"]
    assert search == {"kind": "search", "index": "/idx", "k": 7, "out": "/o.gpkg", "scene": "/data/s2.tif",
                      "like": ["POLYGON ((0 0, 1 0, 1 1, 0 0))"], "like_crs": "EPSG:4326", "fuse": "max",
                      "heatmap": "/h.tif"}
    cross = SearchParameters(raster=RASTER, query=like.query, cross=CrossModal(
        RasterInput("l2", "ortho", InputKind.FILE, "/data/ortho.tif"), "clip")).search_request("/idx", "/o.gpkg")
    assert set(cross) <= FIELDS["SearchRequest"]
    assert cross["scene"] == "/data/ortho.tif" and cross["query_model"] == "clip"
    text = SearchParameters(raster=RASTER, query=Query(text="a lake")).search_request("/idx", "/o.gpkg")
    assert text["text"] == "a lake" and "like" not in text and "heatmap" not in text
    with pytest.raises(ValueError, match="draw"):
        SearchParameters(raster=RASTER, query=Query()).search_request("/idx", "/o.gpkg")


def test_parameters_are_frozen_and_their_state_is_json():
    params = ClassifyParameters(raster=RASTER, prompts="a\nb", area=Area(AreaMode.MAP_EXTENT, "POLYGON EMPTY", "X"))
    with pytest.raises(Exception):
        params.prompts = "c"  # noqa
    state = params.to_state()
    assert state["area"]["mode"] == "extent" and state["raster"]["kind"] == "file"
    assert json.loads(json.dumps(state)) == state


def test_extent_wkt_is_a_closed_ring():
    wkt = Extent(1, 2, 3, 4, "EPSG:3857").to_wkt()
    from qgis.core import QgsGeometry
    geometry = QgsGeometry.fromWkt(wkt)
    assert geometry.isGeosValid() and geometry.area() == 4


def test_the_offset_option_follows_the_backends_rule():
    from tileprompt_plugin.plugin import parameters

    tree = ast.parse((PLUGIN_DIR / "backend" / "tileprompt_backend" / "validation.py").read_text())
    constants = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name) and t.id in ("MAX_OFFSET_DN", "OFFSET_MODES")}
    assert constants == {"MAX_OFFSET_DN": parameters.MAX_OFFSET_DN, "OFFSET_MODES": parameters.OFFSET_MODES}
    assert parameters.parse_offset("") == "auto" and parameters.parse_offset(" None") == "none"
    assert parameters.parse_offset("1000") == 1000.0
    for bad in ("-1", "10001", "x"):
        with pytest.raises(ValueError, match="offset must be"):
            parameters.parse_offset(bad)
    raster = RasterInput("l", "S2", InputKind.FILE, "/d/s2.tif", offset=1000.0)
    assert raster.request_fields()["offset"] == 1000.0 and "offset" not in RASTER.request_fields()
    assert raster.with_path("/d/x.tif").offset == 1000.0
    assert "offset" in FIELDS["RasterInput"]
