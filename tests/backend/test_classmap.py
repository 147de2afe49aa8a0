"""The class-map GeoTIFF: one pixel per tile's centre cell, class index and scaled scores, colours and names."""

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import rasterio
from affine import Affine

from tileprompt_backend.classmap import (NODATA, SCORE_SCALE, class_map_transform, palette, qml_path,
                                         write_class_map)
from tileprompt_backend.paths import resources_dir

ORIGIN = Affine(10.0, 0.0, 330000.0, 0.0, -10.0, 5822040.0)


def test_pixels_are_the_tiles_centre_cells():
    # tile 64 px every 48 px: tile (0, 0) covers pixels 0..63, its centre cell 8..55
    t = class_map_transform(ORIGIN, 64, 48)
    assert t * (0, 0) == (330000.0 + 80.0, 5822040.0 - 80.0) and t.a == 480.0 and t.e == -480.0
    assert t * (1, 1) == ORIGIN * (8 + 48, 8 + 48)  # tile (1, 1)'s cell starts 48 px further
    assert class_map_transform(ORIGIN, 64, 64) == ORIGIN * Affine.scale(64)  # no overlap: pixel = tile


def test_class_index_scores_colours_and_names(tmp_path):
    names = ["forest", "water", "urban area"]
    scores = np.array([[0.7, 0.2, 0.1], [0.1, 0.85, 0.05], [0.2, 0.3, 0.5], [0.33334, 0.33333, 0.33333]])
    rows, cols = np.array([0, 0, 1, 2]), np.array([0, 2, 1, 3])  # grid 3 x 4, eight tiles left out (nodata)
    out = write_class_map(tmp_path / "c.tif", "EPSG:32633", ORIGIN, 64, 48, (3, 4), rows, cols, scores, names,
                          ["s_forest", "s_water", "s_urban_area"], {"TILEPROMPT_RUN": "abc"})
    with rasterio.open(out) as src:
        assert (src.count, src.height, src.width, src.dtypes[0], src.nodata) == (5, 3, 4, "uint16", NODATA)
        assert src.crs.to_epsg() == 32633 and src.transform == class_map_transform(ORIGIN, 64, 48)
        assert src.descriptions == ("class", "score", "s_forest", "s_water", "s_urban_area")
        assert src.scales == (1.0,) + (SCORE_SCALE,) * 4
        classes = src.read(1)
        assert classes[0, 0] == 1 and classes[0, 2] == 2 and classes[1, 1] == 3 and classes[2, 3] == 1
        assert (classes == NODATA).sum() == 8
        best = src.read(2, masked=True) * SCORE_SCALE
        assert best[0, 0] == pytest.approx(0.7) and best[1, 1] == pytest.approx(0.5) and best.mask.sum() == 8
        water = src.read(4, masked=True).astype(float) * SCORE_SCALE
        assert water[0, 2] == pytest.approx(0.85, abs=SCORE_SCALE / 2)
        colors = palette()
        assert json.loads(src.tags()["TILEPROMPT_CLASSES"]) == names and src.tags()["TILEPROMPT_RUN"] == "abc"
        assert json.loads(src.tags()["TILEPROMPT_COLORS"]) == colors[:3]
    entries = ET.parse(qml_path(out)).getroot().findall(".//paletteEntry")
    assert [(e.get("value"), e.get("color"), e.get("label")) for e in entries] == \
        [("1", colors[0], "forest"), ("2", colors[1], "water"), ("3", colors[2], "urban area")]
    assert not list(tmp_path.glob(".*partial*"))  # written atomically, nothing left behind


def test_the_palette_is_the_plugins():
    colors = palette()
    assert len(colors) == 256 and colors[:3] == ["#e41a1c", "#377eb8", "#4daf4a"]
    assert (resources_dir() / "styles" / "palette.json").is_file()


def test_an_installed_environment_finds_its_resources(monkeypatch, tmp_path):
    """The installer copies resources/ into <env>/share/tileprompt/resources: without a checkout beside the
    package, that is where the backend looks."""
    from tileprompt_backend import paths

    monkeypatch.delenv("TILEPROMPT_RESOURCES", raising=False)
    (tmp_path / "share" / "tileprompt" / "resources").mkdir(parents=True)
    monkeypatch.setattr(paths.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(paths, "__file__", str(tmp_path / "lib" / "python3.11" / "site-packages" /
                                                "tileprompt_backend" / "paths.py"))
    assert paths.resources_dir() == tmp_path / "share" / "tileprompt" / "resources"
