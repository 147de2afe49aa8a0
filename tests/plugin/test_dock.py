"""The dock turns its widgets' state into one typed parameters object (and refuses to when it cannot)."""

import pytest
from qgis.core import (QgsCoordinateReferenceSystem, QgsFeature, QgsGeometry, QgsProject, QgsRasterLayer, QgsRectangle,
                       QgsVectorLayer)

from conftest import S2_BAND_NAMES, write_raster
from tileprompt_plugin.plugin.dock import TilePromptDock, model_summary
from tileprompt_plugin.plugin.parameters import AreaMode, ClassifyParameters, Fuse, InputKind, SearchParameters
from tileprompt_plugin.plugin.settings import Key, ProjectState, Settings

MODELS = __import__("fake_backend").MODELS


@pytest.fixture()
def dock(qgis_iface, isolated, qgis_new_project):
    widget = TilePromptDock(qgis_iface)
    widget.set_models(MODELS)
    yield widget
    widget.deleteLater()


def add_raster(path, name="s2"):
    layer = QgsRasterLayer(str(path), name)
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    return layer


def capture(signal):
    got = []
    signal.connect(got.append)
    return got


def test_widgets_make_one_classify_parameters_object(dock, sample_files, tmp_path):
    layer = add_raster(sample_files["s2"])
    dock.layer_combo.setLayer(layer)
    dock.model_combo.setCurrentIndex(dock.model_combo.findData("tiny-aligned-s2"))
    dock.prompt_edit.setPlainText("# comment\nforest | woodland\nwater\n")
    dock.template_combo.setCurrentIndex(1)
    dock.tile_spin.setValue(64)
    dock.overlap_spin.setValue(16)
    dock.label_mode_combo.setCurrentIndex(1)
    dock.threshold_spin.setValue(0.35)
    dock.level_combo.setCurrentIndex(dock.level_combo.findData("L1C"))
    dock.output_widget.setFilePath(str(tmp_path / "out"))
    emitted = capture(dock.classifyRequested)

    dock.run_button.click()

    assert len(emitted) == 1
    params = emitted[0]
    assert isinstance(params, ClassifyParameters)
    assert params.raster.kind is InputKind.FILE and params.raster.path == str(sample_files["s2"])
    assert params.raster.band_map == tuple(S2_BAND_NAMES)  # from the band descriptions
    assert params.raster.layer_id == layer.id() and params.raster.level == "L1C"
    assert params.model == "tiny-aligned-s2"
    assert params.prompts == "forest | woodland\nwater"
    assert params.templates.endswith("resources/templates/satellite.txt")
    assert params.area.mode is AreaMode.WHOLE_LAYER and params.area.wkt is None
    assert (params.tile_px, params.overlap_px, params.multi_label, params.threshold) == (64, 16, True, 0.35)
    assert params.output == str(tmp_path / "out.gpkg")
    assert params.classify_request(params.output)["stride"] == 48


def test_defaults_mean_the_models_choices(dock, sample_files):
    dock.layer_combo.setLayer(add_raster(sample_files["s2"]))
    dock.prompt_edit.setPlainText("a\nb")
    params = dock.classify_parameters()
    assert (params.tile_px, params.overlap_px, params.multi_label, params.templates, params.output) == \
        (None, 0, False, None, None)


def test_invalid_state_emits_nothing_and_says_why(dock, qgis_iface, sample_files):
    emitted = capture(dock.classifyRequested)
    dock.prompt_edit.setPlainText("forest\nforest")
    dock.request_classify()
    dock.prompt_edit.setPlainText("forest\nwater")
    QgsProject.instance().removeAllMapLayers()
    dock.request_classify()
    assert emitted == []
    warnings = qgis_iface.messageBar().get_messages(__import__("qgis.core").core.Qgis.MessageLevel.Warning)
    assert any("appears twice" in m for m in warnings) and any("raster layer" in m for m in warnings)


def test_band_mapping_is_detected_and_editable(dock, sample_files, tmp_path):
    plain = add_raster(sample_files["plain"], "plain")  # 3 bands without descriptions
    dock.layer_combo.setLayer(plain)
    dock.prompt_edit.setPlainText("a\nb")
    assert dock.band_table.rowCount() == 3 and dock.band_map() is None  # the backend detects
    dock.set_band_names(["b04", "B03", "B02"])
    assert dock.classify_parameters().raster.band_map == ("B04", "B03", "B02")
    dock.set_band_names(["B04", "NIR", "B02"])
    with pytest.raises(ValueError, match="unknown"):
        dock.classify_parameters()
    dock.set_band_names(["B04", "", "B02"])
    with pytest.raises(ValueError, match="every band"):
        dock.classify_parameters()


def test_a_band_file_of_a_product_sends_the_folder(dock, tmp_path):
    folder = tmp_path / "IMG_DATA"
    folder.mkdir()
    for band in ("B02", "B03", "B04", "B08"):
        write_raster(folder / f"T33UUU_20170216T102101_{band}.tif", bands=1)
    dock.layer_combo.setLayer(add_raster(folder / "T33UUU_20170216T102101_B04.tif", "B04"))
    dock.prompt_edit.setPlainText("a\nb")
    assert not dock.product_check.isHidden() and "product folder IMG_DATA (4 band files" in dock.input_label.text()
    params = dock.classify_parameters()
    assert params.raster.kind is InputKind.PRODUCT_FOLDER and params.raster.path == str(folder)
    assert params.raster.band_map is None
    dock.product_check.setChecked(False)  # just this file
    params = dock.classify_parameters()
    assert params.raster.kind is InputKind.FILE and params.raster.band_map == ("B04",)


def test_area_modes(dock, qgis_iface, sample_files):
    layer = add_raster(sample_files["s2"])
    dock.layer_combo.setLayer(layer)
    dock.prompt_edit.setPlainText("a\nb")
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:32633"))
    canvas.setExtent(QgsRectangle(330100, 5821200, 330500, 5821800))

    dock.set_area_mode(AreaMode.MAP_EXTENT)
    area = dock.classify_parameters().area
    assert area.mode is AreaMode.MAP_EXTENT and area.crs == "EPSG:32633"
    assert QgsGeometry.fromWkt(area.wkt).boundingBox().contains(QgsRectangle(330100, 5821200, 330500, 5821800))

    dock.set_area_mode(AreaMode.DRAWN)
    with pytest.raises(ValueError, match="Draw"):
        dock.classify_parameters()
    dock.set_drawn_area(QgsGeometry.fromRect(QgsRectangle(330000, 5821500, 330300, 5822000)),
                        QgsCoordinateReferenceSystem("EPSG:32633"))
    area = dock.classify_parameters().area
    assert area.mode is AreaMode.DRAWN and QgsGeometry.fromWkt(area.wkt).area() == pytest.approx(300 * 500)

    polygons = QgsVectorLayer("Polygon?crs=EPSG:4326", "fields", "memory")
    features = []
    for i in range(2):
        f = QgsFeature()
        f.setGeometry(QgsGeometry.fromRect(QgsRectangle(12.5 + i, 52.5, 12.6 + i, 52.6)))
        features.append(f)
    polygons.dataProvider().addFeatures(features)
    QgsProject.instance().addMapLayer(polygons)
    dock.set_area_mode(AreaMode.SELECTED)
    dock.area_layer_combo.setLayer(polygons)
    with pytest.raises(ValueError, match="Select"):
        dock.classify_parameters()
    polygons.selectAll()
    area = dock.classify_parameters().area
    assert area.mode is AreaMode.SELECTED and area.crs == "EPSG:4326"
    assert QgsGeometry.fromWkt(area.wkt).area() == pytest.approx(0.02)


def test_prompt_sets_bundled_and_per_project(dock):
    dock.choose_prompt_set("bundled:land-cover")
    assert "annual crop land" in dock.prompt_edit.toPlainText()
    dock.prompt_edit.setPlainText("lake\nriver")
    dock.save_prompt_set("Waters")
    assert ProjectState().prompt_sets() == {"Waters": "lake\nriver"}
    assert dock.prompt_set_combo.currentData() == "project:Waters" and dock.delete_set_button.isEnabled()
    dock.prompt_edit.setPlainText("")
    dock.choose_prompt_set("project:Waters")
    assert dock.prompt_edit.toPlainText() == "lake\nriver"
    dock._delete_prompt_set()
    assert ProjectState().prompt_sets() == {} and dock.prompt_set_combo.findData("project:Waters") < 0
    dock.prompt_edit.setPlainText("dup\ndup")
    with pytest.raises(ValueError):
        dock.save_prompt_set("Bad")


def pick_model(dock, model_id):
    """What a user's pick does: select, and emit activated (filling the list selects too, but is no choice)."""
    index = dock.model_combo.findData(model_id)
    dock.model_combo.setCurrentIndex(index)
    dock.model_combo.activated.emit(index)


def test_models_and_their_one_line_description(dock):
    assert dock.model_combo.count() == 3 and dock.automatic()  # "Automatic" first, then the two models
    pick_model(dock, "tiny-aligned-s2")
    text = dock.model_label.text()
    assert "S2 · 13 bands (B01..B12) · 10 m/px · tile 32 px" in text and "untrained" in text
    assert Settings().get(Key.DEFAULT_MODEL) == "tiny-aligned-s2"
    assert "untrained" not in model_summary(MODELS[1]) and "R, G, B" in model_summary(MODELS[1])
    dock.set_models(MODELS)  # a refresh keeps the choice
    assert dock.current_model() == "tiny-aligned-s2"


def test_automatic_is_preselected_until_the_user_picks_a_model(qgis_iface, isolated):
    """The trial: the first model of the list (alphabetical) was preselected and then remembered as if chosen."""
    first = TilePromptDock(qgis_iface)
    first.set_models(MODELS)
    assert first.automatic() and Settings().get(Key.DEFAULT_MODEL) == ""  # what the backend does without a model
    pick_model(first, "tiny-aligned-s2")
    second = TilePromptDock(qgis_iface)
    second.set_models(MODELS)
    assert second.current_model() == "tiny-aligned-s2"  # the user's pick is remembered
    pick_model(second, "")  # and so is going back to Automatic
    assert Settings().get(Key.DEFAULT_MODEL) == "" and second.automatic()
    for dock in (first, second):
        dock.deleteLater()


def test_search_parameters(dock, sample_files):
    dock.layer_combo.setLayer(add_raster(sample_files["s2"]))
    emitted = capture(dock.searchRequested)
    dock.k_spin.setValue(7)
    dock.fuse_combo.setCurrentIndex(1)
    dock.heatmap_check.setChecked(False)
    assert dock.request_similar_search() is None  # no query yet
    dock.set_query([QgsGeometry.fromRect(QgsRectangle(0, 0, 10, 10))], QgsCoordinateReferenceSystem("EPSG:32633"))
    dock.search_again_button.click()
    dock.text_edit.setText("a harbour")
    dock.text_button.click()
    assert len(emitted) == 2 and all(isinstance(p, SearchParameters) for p in emitted)
    like, text = emitted
    assert like.query.crs == "EPSG:32633" and len(like.query.wkts) == 1 and not like.query.is_text
    assert (like.k, like.fuse, like.heatmap) == (7, Fuse.MAX, False)
    assert text.query.text == "a harbour" and text.raster.path == str(sample_files["s2"])


def test_cross_modal_query_from_another_layer(dock, sample_files):
    """Query polygons on another layer (an RGB image), embedded by a model of the searched model's space."""
    searched, rgb = add_raster(sample_files["s2"]), add_raster(sample_files["plain"], "orthophoto")
    dock.layer_combo.setLayer(searched)
    dock.model_combo.setCurrentIndex(dock.model_combo.findData("tiny-aligned-s2"))
    assert [dock.cross_model_combo.itemData(i) for i in range(dock.cross_model_combo.count())] == \
        ["clip-vit-b32-openai"]
    emitted = capture(dock.searchRequested)
    dock.set_query([QgsGeometry.fromRect(QgsRectangle(0, 0, 10, 10))], QgsCoordinateReferenceSystem("EPSG:32633"))
    dock.request_similar_search()
    assert emitted[-1].cross is None  # no query layer chosen: the searched layer and its model
    dock.cross_layer_combo.setLayer(rgb)
    params = dock.request_similar_search()
    assert params.cross.model == "clip-vit-b32-openai" and params.cross.raster.path == str(sample_files["plain"])
    request = params.search_request("/idx", "/o.gpkg")
    assert request["scene"] == str(sample_files["plain"]) and request["query_model"] == "clip-vit-b32-openai"
    dock.text_edit.setText("a harbour")
    assert dock.request_text_search().cross is None  # text queries use the index's own text tower
    # a model no other card shares a space with: nothing to offer, and a clear refusal
    dock.set_models([dict(m, space=f"own-{m['id']}") for m in MODELS])
    assert not dock.cross_model_combo.isEnabled()
    assert dock.request_similar_search() is None
    assert "embedding space" in dock.status_label.text()


def test_restore_state(dock):
    dock.restore_state({"prompts": "x\ny", "tile_px": 48, "overlap_px": 8, "multi_label": True, "threshold": 0.3})
    assert dock.prompt_edit.toPlainText() == "x\ny"
    assert (dock.tile_spin.value(), dock.overlap_spin.value(), dock.label_mode_combo.currentData(),
            round(dock.threshold_spin.value(), 2)) == (48, 8, True, 0.3)


# --- what the trial in the real QGIS desktop found ----------------------------------------------------------------
@pytest.fixture()
def desktop(qgis_iface, monkeypatch, plugin_package, ui, isolated, qgis_new_project):
    """The plugin in a 1600 x 1000 main window with a central widget (the map, in QGIS), as in the trial."""
    from qgis.PyQt.QtWidgets import QMainWindow, QWidget

    window = QMainWindow()
    window.setCentralWidget(QWidget(window))
    window.resize(1600, 1000)
    window.show()
    for name, value in (("mainWindow", lambda: window), ("addDockWidget", window.addDockWidget),
                        ("removeDockWidget", window.removeDockWidget)):
        monkeypatch.setattr(qgis_iface, name, value, raising=False)
    instance = plugin_package.classFactory(qgis_iface)
    instance.initGui()
    yield instance, window
    instance.unload()
    window.close()
    window.deleteLater()


def test_the_dock_opens_wide_enough_for_its_content(desktop):
    """It opened 298 px wide while its content needed about 540 px: buttons were cut off."""
    from conftest import wait_until
    from qgis.PyQt.QtWidgets import QAbstractButton

    plugin, window = desktop
    dock = plugin.dock
    plugin.action.trigger()
    wait_until(lambda: False, 0.3)
    assert dock.preferred_width() <= 420  # what the content needs now
    assert dock.width() >= dock.preferred_width() - 2 and dock.width() <= 0.45 * window.width()
    assert dock.scroll.horizontalScrollBar().maximum() == 0  # nothing to scroll sideways to
    body = dock.body
    for button in body.findChildren(QAbstractButton):
        if button.isVisibleTo(body) and button.text():
            assert button.width() >= button.minimumSizeHint().width(), button.text()
            right = button.mapTo(body, button.rect().topRight()).x()
            assert right <= dock.scroll.viewport().width(), button.text()


def test_the_progress_and_status_stay_in_view(desktop):
    """On a 1600 x 1000 screen the status line (tiles, rate, time left) sat below the visible part."""
    from conftest import wait_until

    plugin, window = desktop
    dock = plugin.dock
    plugin.action.trigger()
    dock.set_busy(True, "classify: 120 / 1152 tiles, 51 tiles/s, about 20 s left")
    wait_until(lambda: False, 0.3)
    for widget in (dock.progress, dock.cancel_button, dock.status_label):
        bottom = widget.mapTo(dock, widget.rect().bottomLeft()).y()
        assert widget.isVisible() and bottom <= dock.height(), widget
        assert widget.parentWidget() is not dock.body and not dock.body.isAncestorOf(widget)  # not scrolled away
    assert dock.body.sizeHint().height() > dock.scroll.viewport().height()  # the rest does scroll
    dock.set_indeterminate(True)  # a job that runs without a tile count yet shows a moving bar, not 0 %
    assert dock.progress.maximum() == 0
    dock.set_busy(False)
    assert dock.progress.maximum() == 100


def test_the_query_and_area_sketches_can_be_cleared(plugin, qgis_iface):
    from qgis.core import QgsCoordinateReferenceSystem

    crs = QgsCoordinateReferenceSystem("EPSG:32633")
    rect = QgsGeometry.fromRect(QgsRectangle(330000, 5821700, 330320, 5822040))
    plugin._draw_purpose = "area"
    plugin._on_drawn(rect, crs)
    plugin._draw_purpose = "query"
    plugin.dock.set_busy(True)  # do not search: only the sketch matters here
    plugin.sketches.show("query", rect, crs)
    plugin.dock.set_query([rect], crs)
    dock = plugin.dock
    assert set(plugin.sketches.bands) == {"area", "query"} and dock.clear_query_button.isEnabled()
    dock.clear_query_button.click()
    assert set(plugin.sketches.bands) == {"area"} and dock.query is None and not dock.clear_query_button.isEnabled()
    assert not dock.clear_area_button.isHidden()
    dock.clear_area_button.click()
    assert plugin.sketches.bands == {} and dock.drawn_area is None
    assert "Press Draw" in dock.area_label.text() and dock.clear_area_button.isHidden()


def test_help_opens_the_documentation(plugin, monkeypatch):
    from tileprompt_plugin.plugin import plugin as plugin_module
    from tileprompt_plugin.plugin.metadata import docs_url

    opened = []
    monkeypatch.setattr(plugin_module.QDesktopServices, "openUrl", lambda url: opened.append(url.toString()) or True)
    plugin.dock.help_button.click()
    assert opened == [docs_url()] and opened[0].startswith("https://") and opened[0].endswith("docs/plugin.md")


def test_the_class_map_and_centre_cell_choices(dock, sample_files, tmp_path):
    dock.layer_combo.setLayer(add_raster(sample_files["s2"]))
    dock.prompt_edit.setPlainText("a\nb")
    assert not dock.cells_check.isEnabled()  # no overlap, nothing to draw differently
    dock.tile_spin.setValue(64)
    dock.overlap_spin.setValue(16)
    assert dock.cells_check.isEnabled() and dock.cells_check.isChecked()
    dock.class_map_check.setChecked(True)
    params = dock.classify_parameters()
    assert params.centre_cells and params.class_map
    request = params.classify_request(str(tmp_path / "c.gpkg"), class_map=str(tmp_path / "c.tif"))
    assert request["class_map"] == str(tmp_path / "c.tif")
    dock.cells_check.setChecked(False)
    assert not dock.classify_parameters().centre_cells
