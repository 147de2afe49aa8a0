"""The plugin on QGIS 3.22 with the real backend and a tiny model, on the eo-box Sentinel-2 scene.

How a user points the plugin at a multi-file product: load any band file of it (here B04.jp2) - or a VRT of
its band files, such as an RGB composite - and the plugin sends the product folder (all 13 bands).
"""

import json
import os
import signal
import time
import urllib.request

import pytest

from qgis.core import (Qgis, QgsCategorizedSymbolRenderer, QgsGraduatedSymbolRenderer, QgsPointXY, QgsProject,
                       QgsRasterLayer, QgsSingleBandPseudoColorRenderer, QgsVectorLayer)
from qgis.gui import QgsMapMouseEvent
from qgis.PyQt.QtCore import QEvent, QPoint, Qt

from conftest import TINY_MODEL, state_of, wait_until
from tileprompt_plugin.plugin.parameters import AreaMode, InputKind
from tileprompt_plugin.plugin.settings import Key

PROMPTS = "forest | woodland\nwater | lake\nfarmland | fields\nurban area | town"
EXPECTED_TILES = 288  # 1536 x 768 px at tile 64: 24 x 12


def band_layer(eo_box, band="B04"):
    layer = QgsRasterLayer(str(eo_box / f"T33UUU_20170216T102101_{band}.jp2"), f"eo-box {band}")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    return layer


def rgb_vrt(eo_box, tmp_path):
    from osgeo import gdal

    files = [str(eo_box / f"T33UUU_20170216T102101_{b}.jp2") for b in ("B04", "B03", "B02")]
    path = str(tmp_path / "eo-box-rgb.vrt")
    gdal.BuildVRT(path, files, separate=True).FlushCache()
    layer = QgsRasterLayer(path, "eo-box RGB")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    return layer


def group_layers():
    group = QgsProject.instance().layerTreeRoot().findGroup("TilePrompt")
    return [node.layer() for node in group.findLayers()] if group else []


def get_job(state_file, job_id):
    state = state_of(state_file)
    request = urllib.request.Request(f"http://{state['host']}:{state['port']}/v1/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {state['token']}"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
        return json.load(response)


def use_tiny_model(dock, tile=64):
    index = dock.model_combo.findData(TINY_MODEL)
    assert index >= 0, [dock.model_combo.itemData(i) for i in range(dock.model_combo.count())]
    dock.model_combo.setCurrentIndex(index)
    dock.tile_spin.setValue(tile)


def test_classify_the_eo_box_scene_from_the_dock(attached, eo_box, qgis_iface):
    dock = attached.dock
    assert dock.backend_state == "up" and "device cpu" in dock.backend_label.text()
    dock.layer_combo.setLayer(band_layer(eo_box))
    assert "product folder IMG_DATA (13 band files" in dock.input_label.text()
    use_tiny_model(dock)
    assert "untrained" in dock.model_label.text()
    dock.prompt_edit.setPlainText(PROMPTS)

    dock.run_button.click()
    assert wait_until(lambda: attached.current_task is None, 120)

    messages = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical)
    assert messages == []
    (layer,) = group_layers()
    assert layer.featureCount() == EXPECTED_TILES
    renderer = layer.renderer()
    assert isinstance(renderer, QgsCategorizedSymbolRenderer) and renderer.classAttribute() == "class"
    assert {c.value() for c in renderer.categories()} <= {"forest", "water", "farmland", "urban area"}
    assert sum(count for _name, count in dock.summary()) == EXPECTED_TILES
    assert [name for name, _count in dock.summary()] == ["forest", "water", "farmland", "urban area"]
    assert layer.crs().authid() == "EPSG:32633"


def test_classify_through_processing(attached, eo_box, qgis_processing, tmp_path):
    import processing

    layer = rgb_vrt(eo_box, tmp_path)  # an RGB composite of the product: the whole product is read
    result = processing.runAndLoadResults("tileprompt:classify", {
        "INPUT": layer, "PROMPTS": PROMPTS, "MODEL": TINY_MODEL, "TILE": 64, "OUTPUT": str(tmp_path / "c.gpkg")})
    assert result["TILES"] == EXPECTED_TILES
    assert sum(json.loads(result["CLASS_COUNTS"]).values()) == EXPECTED_TILES
    loaded = [lyr for lyr in QgsProject.instance().mapLayers().values()
              if lyr.source() == f"{tmp_path / 'c.gpkg'}|layername=tiles"]
    assert len(loaded) == 1 and isinstance(loaded[0].renderer(), QgsCategorizedSymbolRenderer)

    # plain processing.run, an area of interest, and multi-label
    result = processing.run("tileprompt:classify", {
        "INPUT": layer, "PROMPTS": PROMPTS, "MODEL": TINY_MODEL, "TILE": 64, "MULTI_LABEL": True,
        "EXTENT": "330000,337680,5814360,5822040 [EPSG:32633]", "OUTPUT": str(tmp_path / "aoi.gpkg")})
    tiles = QgsVectorLayer(result["OUTPUT"], "aoi", "ogr")
    assert tiles.featureCount() == result["TILES"] == 12 * 12  # the western half
    assert "labels" in tiles.fields().names()


def test_similar_tiles_from_a_drawn_rectangle(attached, eo_box, qgis_iface):
    dock = attached.dock
    layer = band_layer(eo_box)
    dock.layer_combo.setLayer(layer)
    use_tiny_model(dock)
    dock.k_spin.setValue(7)
    canvas = qgis_iface.mapCanvas()
    canvas.resize(600, 600)
    canvas.setDestinationCrs(layer.crs())
    canvas.setExtent(layer.extent())
    canvas.refresh()

    dock.draw_rect_button.click()
    tool = attached.rectangle_tool
    assert canvas.mapTool() is tool
    to_pixels = canvas.getCoordinateTransform()  # drag over a 1 km x 1 km square of the scene
    top_left = to_pixels.transform(QgsPointXY(331000, 5821000))
    bottom_right = to_pixels.transform(QgsPointXY(332000, 5820000))
    (x0, y0), (x1, y1) = (round(top_left.x()), round(top_left.y())), (round(bottom_right.x()), round(bottom_right.y()))
    for kind, x, y in ((QEvent.Type.MouseButtonPress, x0, y0), (QEvent.Type.MouseMove, x1, y1),
                       (QEvent.Type.MouseButtonRelease, x1, y1)):
        event = QgsMapMouseEvent(canvas, kind, QPoint(x, y), Qt.MouseButton.LeftButton, Qt.MouseButton.LeftButton,
                                 Qt.KeyboardModifier.NoModifier)
        {QEvent.Type.MouseButtonPress: tool.canvasPressEvent, QEvent.Type.MouseMove: tool.canvasMoveEvent,
         QEvent.Type.MouseButtonRelease: tool.canvasReleaseEvent}[kind](event)
    assert attached.current_task is not None  # drawing started the search
    assert wait_until(lambda: attached.current_task is None, 120)

    assert qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical) == []
    similar, heat = group_layers()
    assert similar.featureCount() == 7
    assert sorted(f["rank"] for f in similar.getFeatures()) == list(range(1, 8))
    assert isinstance(similar.renderer(), QgsGraduatedSymbolRenderer)
    assert isinstance(heat, QgsRasterLayer) and isinstance(heat.renderer(), QgsSingleBandPseudoColorRenderer)
    assert heat.extent().intersects(layer.extent())
    assert dock.results_table.rowCount() == 7
    assert dock.zoom_to_result(0) and canvas.extent().width() < layer.extent().width()

    # then a text search on the same (now indexed) scene
    dock.heatmap_check.setChecked(False)
    dock.text_edit.setText("a lake")
    dock.text_button.click()
    assert wait_until(lambda: attached.current_task is None, 60)
    text_layer = group_layers()[0]
    assert "a lake" in text_layer.name() and text_layer.featureCount() == 7


@pytest.mark.timeout(600)  # the fixture trains the student first
def test_cross_modal_search_from_an_rgb_layer(attached, eo_box, cross_modal_models, qgis_iface, tmp_path):
    """Sentinel-2 tiles (aligned student's index) like a region of an 8-bit RGB image, embedded by the teacher."""
    from osgeo import gdal

    teacher, student = cross_modal_models
    dock = attached.dock
    attached.session.refresh_models()
    assert wait_until(lambda: student in dock.models and teacher in dock.models, 30)
    dock.layer_combo.setLayer(band_layer(eo_box))
    dock.model_combo.setCurrentIndex(dock.model_combo.findData(student))
    dock.tile_spin.setValue(64)
    rgb_path = str(tmp_path / "rgb8.tif")  # an RGB picture of the scene, as an orthophoto would be
    vrt = rgb_vrt(eo_box, tmp_path)
    gdal.Translate(rgb_path, vrt.source(), outputType=gdal.GDT_Byte, scaleParams=[[0, 3558, 0, 255]]).FlushCache()
    rgb = QgsRasterLayer(rgb_path, "RGB picture")
    assert rgb.isValid()
    QgsProject.instance().addMapLayer(rgb)
    dock.cross_layer_combo.setLayer(rgb)
    assert dock.cross_model_combo.currentData() == teacher
    dock.k_spin.setValue(6)
    dock.heatmap_check.setChecked(False)
    from qgis.core import QgsCoordinateReferenceSystem, QgsGeometry, QgsRectangle

    dock.set_query([QgsGeometry.fromRect(QgsRectangle(331000, 5820000, 332000, 5821000))],
                   QgsCoordinateReferenceSystem("EPSG:32633"))
    params = dock.request_similar_search()
    assert params.cross.model == teacher
    assert wait_until(lambda: attached.current_task is None, 120)
    assert qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical) == []
    similar = group_layers()[0]
    assert similar.featureCount() == 6
    runs = QgsVectorLayer(similar.source().split("|")[0] + "|layername=tileprompt_runs", "runs", "ogr")
    run = next(runs.getFeatures())
    assert json.loads(run["query_model"]) == teacher if run["query_model"].startswith('"') else run["query_model"] == teacher
    assert run["query_raster"] == rgb_path and run["query_kind"] == "like-cross-modal"


def test_cancel_stops_the_backend_job(attached, eo_box, real_backend, qgis_iface):
    dock = attached.dock
    dock.layer_combo.setLayer(band_layer(eo_box))
    use_tiny_model(dock, tile=8)  # 18432 tiles: long enough to cancel in the middle
    dock.prompt_edit.setPlainText(PROMPTS)
    dock.run_button.click()
    task = attached.current_task
    assert wait_until(lambda: "tiles" in dock.status_label.text() and dock.progress.value() > 0, 60), \
        dock.status_label.text()
    start = time.monotonic()
    dock.cancel_button.click()
    assert wait_until(lambda: attached.current_task is None, 30)
    assert time.monotonic() - start < 20
    outcome = task.outcome
    assert type(outcome).__name__ == "JobCancelled" and outcome.status["state"] == "cancelled"
    assert get_job(real_backend, outcome.status["id"])["state"] == "cancelled"
    assert group_layers() == []
    assert dock.status_label.text() == "Cancelled."


def test_start_stop_and_backend_down(plugin, eo_box, backend_home, qgis_iface, isolated):
    """Start the bundled backend from the dock, lose it, get a clear message without a freeze, stop."""
    home, env = backend_home
    from conftest import backend_executable

    plugin.settings.set(Key.BACKEND_VENV, str(backend_executable().parent.parent))
    plugin.dock.start_button.click()
    assert plugin.dock.backend_state == "starting"
    assert wait_until(lambda: plugin.dock.backend_state == "up", 120), plugin.dock.backend_label.text()
    assert "backend 0." in plugin.dock.backend_label.text() and plugin.launcher.running
    diagnostics = plugin.copy_diagnostics()
    assert "device: cpu" in diagnostics and "started by this QGIS" in diagnostics
    assert "logs/server.log ---" in diagnostics  # the service's own log tail too

    os.kill(plugin.launcher.process.pid, signal.SIGKILL)  # the backend dies
    plugin.launcher.process.wait(10)
    layer = band_layer(eo_box)
    plugin.dock.layer_combo.setLayer(layer)
    plugin.dock.prompt_edit.setPlainText(PROMPTS)
    start = time.monotonic()
    plugin.dock.run_button.click()
    assert time.monotonic() - start < 2  # the UI thread never waits on the network
    assert wait_until(lambda: plugin.current_task is None, 30)
    critical = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical)
    assert any("does not answer" in m for m in critical), critical
    plugin.session.refresh_health()
    assert wait_until(lambda: plugin.dock.backend_state == "error", 30)

    plugin.stop_backend()
    assert plugin.dock.backend_state == "down" and not plugin.launcher.running


def test_requests_match_the_openapi_schema(attached, eo_box, real_backend, tmp_path):
    """The plugin's requests only use fields of the backend's published schema."""
    state = state_of(real_backend)
    request = urllib.request.Request(f"http://{state['host']}:{state['port']}/v1/openapi.json",
                                     headers={"Authorization": f"Bearer {state['token']}"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
        schemas = json.load(response)["components"]["schemas"]
    dock = attached.dock
    dock.layer_combo.setLayer(band_layer(eo_box))
    use_tiny_model(dock)
    dock.prompt_edit.setPlainText(PROMPTS)
    dock.overlap_spin.setValue(16)
    dock.set_area_mode(AreaMode.MAP_EXTENT)
    dock.label_mode_combo.setCurrentIndex(1)
    params = dock.classify_parameters()
    assert params.raster.kind is InputKind.PRODUCT_FOLDER
    classify = params.classify_request(str(tmp_path / "x.gpkg"), 32)
    assert set(classify) <= set(schemas["ClassifyRequest"]["properties"])
    from tileprompt_plugin.plugin.parameters import Query, SearchParameters
    search = SearchParameters(raster=params.raster, query=Query(("POLYGON ((0 0, 1 0, 1 1, 0 0))",), "EPSG:32633"))
    assert set(search.index_request(None, 32)) <= set(schemas["IndexRequest"]["properties"])
    assert set(search.search_request("/i", "/o.gpkg", "/h.tif")) <= set(schemas["SearchRequest"]["properties"])
    assert {"id", "state", "done", "total", "result", "error"} <= set(schemas["JobStatus"]["properties"])
    assert {"id", "modality", "bands", "gsd_m", "tile_px", "trained"} <= set(schemas["ModelInfo"]["properties"])


def test_download_progress_and_cancel_from_the_dock(attached, backend_home, real_backend, eo_box):
    """A model whose weights are not here: the dock refuses to run it, downloads it with progress through a real
    backend job, cancels mid-way, and a second Download continues where the first stopped."""
    from fileserver import FileServer

    home, _env = backend_home
    tiny = home / "models" / "tiny-s2"
    text_weights = (tiny / "text_tower.safetensors").read_bytes()
    with FileServer() as files:
        files.faults.chunk, files.faults.throttle_s = 64 * 1024, 0.05  # ~6 MB in ~5 s
        card = home / "models" / "remote-s2"
        card.mkdir()
        (card / "image_tower.safetensors").write_bytes((tiny / "image_tower.safetensors").read_bytes())
        spec = json.loads((tiny / "model.json").read_text())
        spec.update(id="remote-s2", sources={"text_tower.safetensors": {
            "url": files.add("/text.safetensors", text_weights), "convert": "safetensors", "size": len(text_weights)}})
        (card / "model.json").write_text(json.dumps(spec))
        dock = attached.dock
        dock.layer_combo.setLayer(band_layer(eo_box))
        attached.session.refresh_models()
        assert wait_until(lambda: dock.model_combo.findData("remote-s2") >= 0, 30)
        dock.model_combo.setCurrentIndex(dock.model_combo.findData("remote-s2"))
        assert not dock.download_button.isHidden() and " MB to download" in dock.model_label.text()
        dock.prompt_edit.setPlainText(PROMPTS)
        dock.run_button.click()
        assert attached.current_task is None  # never run blindly

        dock.download_button.click()
        task = attached.current_task
        assert wait_until(lambda: "downloading weights" in dock.status_label.text() and dock.progress.value() > 0,
                          60), dock.status_label.text()
        dock.cancel_button.click()
        assert wait_until(lambda: attached.current_task is None, 30)
        assert task.outcome.status["state"] == "cancelled"
        assert get_job(real_backend, task.outcome.status["id"])["state"] == "cancelled"
        assert not (card / "text_tower.safetensors").exists() and not dock.download_button.isHidden()
        assert list((home / "cache" / "downloads").glob("text.safetensors-*.part"))  # kept for the next try

        files.faults.throttle_s = 0.0
        dock.download_button.click()
        assert wait_until(lambda: attached.current_task is None, 60)
        assert files.gets("/text.safetensors")[-1].range.startswith("bytes=")  # continued
        assert wait_until(lambda: dock.download_button.isHidden(), 30)
        assert (card / "text_tower.safetensors").read_bytes() == text_weights
def test_picture_without_georeference_overlays_its_result_in_qgis(attached, qgis_processing, tmp_path):
    """A plain RGB TIFF (no CRS, no geotransform) opened in QGIS beside its result layer: refused until the user
    ticks pixel coordinates, then every tile lies on the image as QGIS draws it (x 0..W, y -H..0)."""
    import processing
    import numpy as np
    from osgeo import gdal
    from qgis.core import QgsProcessingException, QgsRasterLayer, QgsVectorLayer

    width, height = 160, 96
    path = tmp_path / "aerial.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(path), width, height, 3, gdal.GDT_Byte)
    for b in range(3):
        ds.GetRasterBand(b + 1).WriteArray(np.random.default_rng(b).integers(0, 255, (height, width), np.uint8))
    ds = None
    before = path.read_bytes()
    photo = QgsRasterLayer(str(path), "aerial")
    assert photo.isValid() and not photo.crs().isValid()
    QgsProject.instance().addMapLayer(photo)
    extent = photo.extent()
    assert (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()) == (0, -height, width, 0)

    params = {"INPUT": photo, "PROMPTS": "roof\ntree", "MODEL": "tiny-clip", "TILE": 32,
              "OUTPUT": str(tmp_path / "aerial.gpkg")}
    with pytest.raises(QgsProcessingException) as refused:
        processing.run("tileprompt:classify", params)
    assert "the raster has no georeference" in str(refused.value)
    assert str(refused.value).endswith('tick "Classify a raster without georeference in pixel coordinates"')

    feedback = _warnings_feedback()
    result = processing.run("tileprompt:classify", {**params, "PIXEL_SPACE": True}, feedback=feedback)
    assert any("no georeference: tiles are in pixel coordinates" in w for w in feedback.warnings), feedback.warnings
    tiles = QgsVectorLayer(result["OUTPUT"], "aerial tiles", "ogr")
    assert tiles.isValid() and tiles.featureCount() == result["TILES"] == 5 * 3
    QgsProject.instance().addMapLayer(tiles)
    assert not tiles.crs().isGeographic()  # GDAL's "Undefined SRS": QGIS draws it without any transform
    assert tiles.extent() == extent  # 5 x 3 tiles of 32 px cover the 160 x 96 picture exactly
    first = next(f for f in tiles.getFeatures() if f["row"] == 0 and f["col"] == 0)
    box = first.geometry().boundingBox()
    assert (box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum()) == (0, -32, 32, 0)
    # drawn as the canvas draws the picture (its extent, one screen pixel per image pixel): the tile edges fall
    # on image pixels 32, 64, ... in both directions
    cols, rows = _outline_pixels(tiles, extent, width, height, photo.crs())
    assert {31, 32, 63, 64, 95, 96, 127, 128} <= set(cols) <= {0, 31, 32, 63, 64, 95, 96, 127, 128, 159}, cols
    assert {31, 32, 63, 64} <= set(rows) <= {0, 31, 32, 63, 64, 95}, rows
    assert path.read_bytes() == before


def _outline_pixels(layer, extent, width: int, height: int, crs) -> tuple[list[int], list[int]]:
    """Columns and rows of a one-pixel-per-unit rendering of ``layer``'s red outlines that are mostly red."""
    from qgis.core import QgsFillSymbol, QgsMapRendererSequentialJob, QgsMapSettings, QgsSingleSymbolRenderer
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    layer.setRenderer(QgsSingleSymbolRenderer(QgsFillSymbol.createSimple(
        {"color": "0,0,0,0", "outline_color": "255,0,0", "outline_width": "1", "outline_width_unit": "Pixel"})))
    settings = QgsMapSettings()
    settings.setLayers([layer])
    settings.setExtent(extent)
    settings.setOutputSize(QSize(width, height))
    settings.setBackgroundColor(QColor(255, 255, 255))
    settings.setDestinationCrs(crs)
    job = QgsMapRendererSequentialJob(settings)
    job.start()
    job.waitForFinished()
    image = job.renderedImage()
    red = [[QColor(image.pixel(x, y)).green() < 100 for x in range(width)] for y in range(height)]
    cols = [x for x in range(width) if sum(red[y][x] for y in range(height)) > 0.8 * height]
    rows = [y for y in range(height) if sum(red[y]) > 0.8 * width]
    return cols, rows


def _warnings_feedback():
    from qgis.core import QgsProcessingFeedback

    class Warnings(QgsProcessingFeedback):
        def __init__(self):
            super().__init__()
            self.warnings = []

        def pushWarning(self, text):  # noqa: N802 (QGIS API)
            self.warnings.append(text)

    return Warnings()
