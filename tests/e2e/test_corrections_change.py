"""Beyond prompts, on QGIS 3.22 with the real backend and a tiny model: correct a classification of the eo-box
scene with a few tiles from the dock, and find what changed between two eo-learn dates (dock and Processing)."""

import json
import os
from pathlib import Path

import pytest
from qgis.core import (Qgis, QgsCategorizedSymbolRenderer, QgsGraduatedSymbolRenderer, QgsProject, QgsRasterLayer,
                       QgsSingleBandPseudoColorRenderer)

from conftest import TINY_MODEL, wait_until
from test_real_backend import PROMPTS, band_layer, group_layers, use_tiny_model
from tileprompt_plugin.plugin.corrections import read_run

EOLEARN = Path(os.environ.get("TILEPROMPT_EO_LEARN", "/work/shared/data/eo-learn/example_data"))
BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]


@pytest.fixture(scope="module")
def eolearn_dates(tmp_path_factory):
    """Two of the eo-learn dates as 13-band GeoTIFFs (reflectance x 10000), written with QGIS's GDAL."""
    scenes = EOLEARN / "REFERENCE_SCENES.npy"
    if not scenes.is_file():
        pytest.skip(f"eo-learn sample not found at {EOLEARN} (set TILEPROMPT_EO_LEARN)")
    import numpy as np  # tests only
    from osgeo import gdal, osr

    cube = np.load(scenes)  # (5, 101, 100, 13) reflectance 0-1, row 0 = north
    ring = json.loads((EOLEARN / "TestEOPatch" / "bbox.geojson").read_text())["coordinates"][0]
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    folder = tmp_path_factory.mktemp("eolearn")
    paths = []
    for d in (0, 2):
        path = folder / f"date{d}.tif"
        ds = gdal.GetDriverByName("GTiff").Create(str(path), 100, 101, 13, gdal.GDT_UInt16)
        ds.SetGeoTransform((min(xs), (max(xs) - min(xs)) / 100, 0, max(ys), 0, -(max(ys) - min(ys)) / 101))
        srs = osr.SpatialReference()
        srs.ImportFromEPSG(32633)
        ds.SetProjection(srs.ExportToWkt())
        for b in range(13):
            band = ds.GetRasterBand(b + 1)
            band.WriteArray(np.round(np.clip(cube[d, :, :, b], 0, 6.5) * 10000).astype("uint16"))
            band.SetDescription(BANDS[b])
        ds = None
        paths.append(path)
    return paths


def test_correct_a_classification_from_the_dock(attached, eo_box, qgis_iface):
    dock = attached.dock
    dock.layer_combo.setLayer(band_layer(eo_box))
    use_tiny_model(dock)
    dock.prompt_edit.setPlainText(PROMPTS)
    dock.run_button.click()
    assert wait_until(lambda: attached.current_task is None, 120)
    (classified,) = group_layers()
    panel = dock.correct_panel
    assert panel.layer_combo.currentLayer() is classified  # the new result is ready for corrections

    ids = sorted(f.id() for f in classified.getFeatures())
    classified.selectByIds(ids[:3])
    panel.class_combo.setCurrentText("water")
    assert panel.set_selected() == 3
    classified.selectByIds(ids[100:102])
    panel.class_combo.setCurrentText("meadow")  # a class no prompt has
    assert panel.set_selected() == 2
    dock.tabs.setCurrentWidget(panel)
    panel.apply_button.click()
    assert wait_until(lambda: attached.current_task is None, 120)
    assert qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical) == []

    corrected = group_layers()[0]
    assert corrected is not classified and corrected.featureCount() == classified.featureCount() == 288
    assert isinstance(corrected.renderer(), QgsCategorizedSymbolRenderer)
    run = read_run(corrected.source().split("|")[0])
    assert run["correction"]["per_class"] == {"water": 3, "meadow": 2}
    assert run["correction"]["new_classes"] == ["meadow"]
    examples = {f["example"] for f in corrected.getFeatures() if f["example"]}
    assert examples == {"water", "meadow"}
    assert panel.layer_combo.currentLayer() is corrected and "meadow" in [
        panel.class_combo.itemText(i) for i in range(panel.class_combo.count())]


def test_what_changed_between_two_dates_from_the_dock(attached, eolearn_dates, qgis_iface):
    before, after = (QgsRasterLayer(str(p), p.stem) for p in eolearn_dates)
    QgsProject.instance().addMapLayers([before, after])
    dock = attached.dock
    use_tiny_model(dock, tile=20)
    dock.change_panel.set_layers(before, after)
    dock.change_panel.prompts_edit.setText("forest; farmland; grassland")
    dock.change_panel.became_edit.setText("farmland")
    dock.change_panel.run_button.click()
    assert wait_until(lambda: attached.current_task is None, 120)
    assert qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical) == []
    change, heat = group_layers()
    assert change.featureCount() == 25 and isinstance(change.renderer(), QgsGraduatedSymbolRenderer)
    ranked = sorted(change.getFeatures(), key=lambda f: f["rank"])
    assert [f["rank"] for f in ranked] == list(range(1, 26))
    assert all(a["score"] >= b["score"] for a, b in zip(ranked, ranked[1:]))
    assert {f["class_after"] for f in ranked} <= {"forest", "farmland", "grassland"}
    assert isinstance(heat.renderer(), QgsSingleBandPseudoColorRenderer) and heat.crs().authid() == "EPSG:32633"


def test_change_and_context_through_processing(attached, eolearn_dates, qgis_processing, tmp_path):
    import processing

    before, after = (QgsRasterLayer(str(p), p.stem) for p in eolearn_dates)
    QgsProject.instance().addMapLayers([before, after])
    result = processing.run("tileprompt:change", {
        "BEFORE": before, "AFTER": after, "MODEL": TINY_MODEL, "TILE": 20, "OUTPUT": str(tmp_path / "change.gpkg"),
        "HEATMAP": str(tmp_path / "change.tif")})
    assert result["PAIRS"] == 25 and (tmp_path / "change.tif").is_file()
    result = processing.run("tileprompt:classify", {
        "INPUT": after, "PROMPTS": "forest\nfarmland\ngrassland", "MODEL": TINY_MODEL, "TILE": 20, "CONTEXT": True,
        "OUTPUT": str(tmp_path / "context.gpkg")})
    assert result["TILES"] == 25
    assert read_run(str(tmp_path / "context.gpkg"))["transductive"]["rounds"] == 10
