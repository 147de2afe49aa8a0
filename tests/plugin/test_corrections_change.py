"""Few-shot corrections, context-aware classification and change between dates on the plugin side (real QGIS,
fake backend): the requests the dock and Processing send, the Correct tab's edits, the Change tab's layers."""

import json
import shutil

import pytest
from qgis.core import (QgsCategorizedSymbolRenderer, QgsGraduatedSymbolRenderer, QgsProcessingException, QgsProject,
                       QgsRasterLayer, QgsSingleBandPseudoColorRenderer, QgsVectorLayer)

from conftest import connect, wait_until, write_raster, write_tiles_gpkg
from test_parameters import FIELDS, RASTER
from test_processing import Errors
from tileprompt_plugin.plugin.corrections import example_counts, read_run, set_examples
from tileprompt_plugin.plugin.parameters import ChangeParameters, ClassifyParameters, correction_request

RUN = {"raster": "/data/IMG_DATA", "band_map": None, "level": "L1C", "model": "tiny-aligned-s2", "tile_px": 64,
       "stride": 32, "aoi": "POLYGON ((0 0, 1 0, 1 1, 0 0))", "mode": "single-label", "threshold": None,
       "templates_source": "templates/satellite.txt",
       "prompts": [{"class": "forest", "phrases": ["forest", "woodland"], "column": "s_forest"},
                   {"class": "water", "phrases": ["water"], "column": "s_water"},
                   {"class": "bare soil", "phrases": [], "column": "s_bare_soil"}]}


def add_run_table(path, run: dict) -> None:
    """The backend's ``tileprompt_runs`` attribute table (one row, JSON values) in a result GeoPackage."""
    from osgeo import ogr

    ds = ogr.Open(str(path), 1)
    table = ds.CreateLayer("tileprompt_runs", geom_type=ogr.wkbNone)
    for key in run:
        table.CreateField(ogr.FieldDefn(key, ogr.OFTString))
    feature = ogr.Feature(table.GetLayerDefn())
    for key, value in run.items():
        feature.SetField(key, value if isinstance(value, str) else json.dumps(value))
    table.CreateFeature(feature)
    ds = None


@pytest.fixture()
def result_gpkg(tmp_path, qgis_app, sample_files):
    path = write_tiles_gpkg(tmp_path / "classified.gpkg")
    add_run_table(path, {**RUN, "raster": str(sample_files["s2"])})
    return path


def test_the_correction_request_redoes_the_run_with_examples():
    request = correction_request(RUN, "/out/classified.gpkg", "/out/corrected.gpkg", context=True)
    assert set(request) <= FIELDS["ClassifyRequest"]
    assert request == {"kind": "classify", "raster": "/data/IMG_DATA", "level": "L1C", "model": "tiny-aligned-s2",
                       "prompts": "forest | woodland\nwater", "tile_px": 64, "stride": 32,
                       "aoi": "POLYGON ((0 0, 1 0, 1 1, 0 0))", "examples": "/out/classified.gpkg",
                       "out": "/out/corrected.gpkg", "context": True}
    multi = correction_request({**RUN, "mode": "multi-label", "threshold": 0.3}, "/e.gpkg", "/o.gpkg", context=True)
    assert multi["multi_label"] is True and multi["threshold"] == 0.3 and "context" not in multi
    # the baseline offset the run asked for is asked again ("auto" is the default: it finds the same)
    none = correction_request({**RUN, "offset": {"mode": "none", "applied": False}}, "/e.gpkg", "/o.gpkg")
    assert none["offset"] == "none"
    auto = correction_request({**RUN, "offset": {"mode": "auto", "applied": True}}, "/e.gpkg", "/o.gpkg")
    assert "offset" not in auto
    with pytest.raises(ValueError, match="not a TilePrompt classification"):
        correction_request({"prompts": []}, "/e.gpkg", "/o.gpkg")


def test_change_and_context_requests_hold_to_the_schema():
    params = ChangeParameters(before=RASTER, after=RASTER, model="tiny", tile_px=64, overlap_px=16,
                              prompts="water\nforest", became="flooded field", heatmap=True)
    request = params.change_request("/out/c.gpkg", "/out/c.tif")
    assert set(request) <= FIELDS["ChangeRequest"]
    assert request["before"] == {"raster": "/data/s2.tif", "band_map": ["B02", "B03", "B04"], "level": "L2A"}
    assert request["stride"] == 48 and request["became"] == "flooded field" and request["heatmap"] == "/out/c.tif"
    classify = ClassifyParameters(raster=RASTER, prompts="water", context=True, examples="/e.gpkg")
    request = classify.classify_request("/out/x.gpkg")
    assert set(request) <= FIELDS["ClassifyRequest"] and request["context"] is True and request["examples"] == "/e.gpkg"


def test_setting_the_class_of_selected_tiles_writes_the_example_field(result_gpkg):
    layer = QgsVectorLayer(f"{result_gpkg}|layername=tiles", "classified", "ogr")
    assert layer.fields().indexOf("example") < 0  # a result written before the field existed
    ids = [f.id() for f in layer.getFeatures()][:3]
    assert set_examples(layer, ids[:2], "water") == 2 and set_examples(layer, ids[2:], "bare soil") == 1
    reread = QgsVectorLayer(f"{result_gpkg}|layername=tiles", "again", "ogr")
    assert example_counts(reread) == {"water": 2, "bare soil": 1}
    assert set_examples(layer, ids[:1], None) == 1 and example_counts(layer) == {"water": 1, "bare soil": 1}
    # in the user's own edit session the change stays in the buffer, for them to save or undo
    layer.startEditing()
    set_examples(layer, ids[:1], "forest")
    assert layer.isModified() and example_counts(QgsVectorLayer(f"{result_gpkg}|layername=tiles", "f", "ogr")) == \
        {"water": 1, "bare soil": 1}
    layer.rollBack()
    with pytest.raises(ValueError, match="Select one or more tiles"):
        set_examples(layer, [], "water")
    with pytest.raises(ValueError, match="class of the selected tiles"):
        set_examples(layer, ids[:1], "  ")
    assert read_run(str(result_gpkg))["tile_px"] == 64


@pytest.fixture()
def ready(plugin, fake_backend, isolated, sample_files, tmp_path):
    connect(plugin, fake_backend, isolated)
    change = write_change_gpkg(tmp_path / "change-sample.gpkg", sample_files["tiles"])
    fake_backend.files["change"] = change
    return plugin


def write_change_gpkg(path, tiles_gpkg):
    """A change layer like the backend's: the sample tiles with rank and score."""
    from osgeo import ogr

    shutil.copy(tiles_gpkg, path)
    ds = ogr.Open(str(path), 1)
    ds.ExecuteSQL("ALTER TABLE tiles RENAME TO change")
    ds = None
    ds = ogr.Open(str(path), 1)
    layer = ds.GetLayerByName("change")
    layer.CreateField(ogr.FieldDefn("rank", ogr.OFTInteger))  # "score" is there already
    for n, feature in enumerate(layer):
        feature.SetField("rank", n + 1)
        feature.SetField("score", 1.0 - n * 0.05)
        layer.SetFeature(feature)
    ds = None
    return path


def group_layers():
    group = QgsProject.instance().layerTreeRoot().findGroup("TilePrompt")
    return [node.layer() for node in group.findLayers()] if group else []


def test_the_correct_tab_marks_tiles_and_applies_the_corrections(ready, fake_backend, result_gpkg):
    layer = QgsVectorLayer(f"{result_gpkg}|layername=tiles", "classified", "ogr")
    QgsProject.instance().addMapLayer(layer)
    panel = ready.dock.correct_panel
    panel.set_layer(layer)
    assert [panel.class_combo.itemText(i) for i in range(panel.class_combo.count())] == ["forest", "water",
                                                                                          "bare soil"]
    layer.selectByIds([f.id() for f in layer.getFeatures()][:2])
    panel.class_combo.setCurrentText("water")
    assert panel.set_selected() == 2 and "water 2" in panel.summary_label.text()
    panel.context_check.setChecked(True)

    panel.apply_button.click()
    assert wait_until(lambda: ready.current_task is None, 15)
    request = fake_backend.requests[-1]
    assert request["kind"] == "classify" and request["examples"] == str(result_gpkg)
    assert request["raster"] == read_run(str(result_gpkg))["raster"]
    assert request["prompts"] == "forest | woodland\nwater"
    assert request["context"] is True and request["out"] != str(result_gpkg)
    (corrected,) = group_layers()
    assert isinstance(corrected.renderer(), QgsCategorizedSymbolRenderer) and "corrected" in corrected.name()
    assert panel.layer_combo.currentLayer() is corrected  # further corrections continue on the new layer


def test_the_correct_tab_needs_a_classified_layer(ready, fake_backend, sample_files, qgis_iface):
    panel = ready.dock.correct_panel
    panel.set_layer(None)
    assert panel.request_correction() is None and fake_backend.requests == []
    assert "Choose a layer that TilePrompt classified" in ready.dock.status_label.text()


def test_the_change_tab_sends_both_layers_and_loads_the_ranked_layer(ready, fake_backend, sample_files, tmp_path):
    before = QgsRasterLayer(str(sample_files["s2"]), "June")
    after = QgsRasterLayer(str(write_raster(tmp_path / "august.tif", descriptions=None)), "August")
    QgsProject.instance().addMapLayers([before, after])
    dock = ready.dock
    dock.model_combo.setCurrentIndex(dock.model_combo.findData("tiny-aligned-s2"))
    dock.tile_spin.setValue(32)
    dock.change_panel.set_layers(before, after)
    dock.change_panel.prompts_edit.setText("water; forest; farmland")
    dock.change_panel.became_edit.setText("flooded field | flood")
    dock.change_panel.run_button.click()
    assert wait_until(lambda: ready.current_task is None, 15)
    request = fake_backend.requests[-1]
    assert request["kind"] == "change" and set(request) <= FIELDS["ChangeRequest"]
    assert request["before"]["raster"] == str(sample_files["s2"]) and request["after"]["raster"].endswith("august.tif")
    assert request["prompts"] == "water\nforest\nfarmland" and request["became"] == "flooded field | flood"
    assert request["tile_px"] == 32 and request["heatmap"].endswith(".tif")
    change, heat = group_layers()
    assert isinstance(change.renderer(), QgsGraduatedSymbolRenderer) and change.renderer().classAttribute() == "score"
    assert isinstance(heat.renderer(), QgsSingleBandPseudoColorRenderer)
    assert "became flooded field" in change.name()

    dock.change_panel.set_layers(before, before)
    assert dock.request_change() is None and "two different layers" in dock.status_label.text()


def test_context_aware_is_a_single_label_option_of_the_classify_tab(ready, fake_backend, sample_files):
    dock = ready.dock
    layer = QgsRasterLayer(str(sample_files["s2"]), "S2 scene")
    QgsProject.instance().addMapLayer(layer)
    dock.layer_combo.setLayer(layer)
    dock.prompt_edit.setPlainText("forest\nwater")
    assert not dock.context_check.isChecked()  # off by default
    dock.context_check.setChecked(True)
    assert dock.classify_parameters().context is True
    dock.label_mode_combo.setCurrentIndex(1)  # multi-label: no context
    assert not dock.context_check.isEnabled() and dock.classify_parameters().context is False


def test_processing_change_and_classify_with_examples(ready, fake_backend, sample_files, result_gpkg, tmp_path,
                                                      qgis_processing):
    import processing

    scene = QgsRasterLayer(str(sample_files["s2"]), "S2 scene")
    other = QgsRasterLayer(str(write_raster(tmp_path / "later.tif", descriptions=None)), "later")
    QgsProject.instance().addMapLayers([scene, other])
    result = processing.run("tileprompt:change", {
        "BEFORE": scene, "AFTER": other, "MODEL": "tiny-aligned-s2", "TILE": 32, "PROMPTS": "water\nforest",
        "BECAME": "water", "OUTPUT": str(tmp_path / "change.gpkg"), "HEATMAP": str(tmp_path / "change.tif")})
    assert result["PAIRS"] == 12 and result["OUTPUT"].endswith("layername=change")
    request = fake_backend.requests[-1]
    assert request["kind"] == "change" and request["became"] == "water" and request["heatmap"].endswith("change.tif")

    examples = QgsVectorLayer(f"{result_gpkg}|layername=tiles", "classified", "ogr")
    QgsProject.instance().addMapLayer(examples)  # the project owns it (a loose layer crashed QGIS at exit)
    result = processing.run("tileprompt:classify", {
        "INPUT": scene, "PROMPTS": "forest\nwater", "MODEL": "tiny-aligned-s2", "TILE": 32, "EXAMPLES": examples,
        "CONTEXT": True, "OUTPUT": str(tmp_path / "corrected.gpkg")})
    request = fake_backend.requests[-1]
    assert request["examples"] == str(result_gpkg) and request["context"] is True
    errors = Errors()
    with pytest.raises(QgsProcessingException):
        processing.run("tileprompt:change", {"BEFORE": scene, "AFTER": other, "BECAME": "water; forest",
                                             "OUTPUT": str(tmp_path / "bad.gpkg")}, feedback=errors)
    assert any("'Became' names one class" in e for e in errors.errors)
