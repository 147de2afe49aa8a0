"""Dock -> plugin -> (fake) backend -> styled layers: classify, similar and text search, failures, cancel, down."""

import time

import pytest
from qgis.core import (Qgis, QgsCategorizedSymbolRenderer, QgsCoordinateReferenceSystem, QgsGeometry,
                       QgsGraduatedSymbolRenderer, QgsProject, QgsRasterLayer, QgsRectangle,
                       QgsSingleBandPseudoColorRenderer)

from conftest import connect, wait_until


def messages(iface, level):
    return iface.messageBar().get_messages(level)


@pytest.fixture()
def ready(plugin, fake_backend, isolated, sample_files):
    connect(plugin, fake_backend, isolated)
    layer = QgsRasterLayer(str(sample_files["s2"]), "S2 scene")
    QgsProject.instance().addMapLayer(layer)
    plugin.dock.layer_combo.setLayer(layer)
    plugin.dock.model_combo.setCurrentIndex(plugin.dock.model_combo.findData("tiny-aligned-s2"))
    plugin.dock.prompt_edit.setPlainText("forest | woodland\nwater\nfarmland\nurban")
    return plugin


def group_layers():
    group = QgsProject.instance().layerTreeRoot().findGroup("TilePrompt")
    return [node.layer() for node in group.findLayers()] if group else []


def test_backend_panel_shows_version_and_device(ready):
    dock = ready.dock
    assert dock.backend_state == "up"
    assert "0.0-fake" in dock.backend_label.text() and "cpu" in dock.backend_label.text()
    assert not dock.start_button.isEnabled() and not dock.stop_button.isEnabled()  # attached, not started here


def test_classify_adds_a_categorized_layer_and_a_summary(ready, fake_backend, qgis_iface):
    ready.dock.run_button.click()
    assert ready.current_task is not None and ready.dock.cancel_button.isEnabled()
    assert wait_until(lambda: ready.current_task is None, 15)

    request = fake_backend.requests[-1]
    assert request["model"] == "tiny-aligned-s2" and request["prompts"].startswith("forest | woodland")
    layers = group_layers()
    assert len(layers) == 1 and layers[0].featureCount() == 12
    renderer = layers[0].renderer()
    assert isinstance(renderer, QgsCategorizedSymbolRenderer) and renderer.classAttribute() == "class"
    assert [c.value() for c in renderer.categories()] == ["forest", "water", "farmland"]
    colors = {c.symbol().color().name() for c in renderer.categories()}
    assert len(colors) == 3
    assert ready.dock.summary() == [("forest", 4), ("water", 4), ("farmland", 4), ("urban", 0)]
    assert ready.dock.progress.value() == 100 and not ready.dock.cancel_button.isEnabled()
    assert any("12 tiles classified" in m for m in messages(qgis_iface, Qgis.MessageLevel.Success))
    # the run is remembered in the project
    from tileprompt_plugin.plugin.settings import ProjectState
    assert ProjectState().dock_state()["model"] == "tiny-aligned-s2"


def test_a_failed_job_shows_the_backends_error(ready, fake_backend, qgis_iface):
    fake_backend.fail_with = "the raster has 3 bands; the model needs B01..B12"
    ready.dock.run_button.click()
    assert wait_until(lambda: ready.current_task is None, 15)
    assert group_layers() == []
    assert any("model needs B01..B12" in m for m in messages(qgis_iface, Qgis.MessageLevel.Critical))
    assert ready.dock.run_button.isEnabled()


def test_cancel_button_cancels_the_backend_job(ready, fake_backend, qgis_iface):
    fake_backend.hang = True
    ready.dock.run_button.click()
    assert wait_until(lambda: any(j["state"] == "running" for j in fake_backend.jobs.values()), 10)
    ready.dock.cancel_button.click()
    assert wait_until(lambda: ready.current_task is None, 10)
    assert [j["state"] for j in fake_backend.jobs.values()] == ["cancelled"]
    assert group_layers() == []
    assert any("cancelled" in m for m in messages(qgis_iface, Qgis.MessageLevel.Info))
    assert ready.dock.status_label.text() == "Cancelled."


def test_backend_down_gives_a_clear_message_and_no_freeze(ready, fake_backend, qgis_iface):
    fake_backend.stop()  # the backend died after we attached
    start = time.monotonic()
    ready.dock.run_button.click()
    assert time.monotonic() - start < 1  # the click returns at once: the job runs in a task
    assert wait_until(lambda: ready.current_task is None, 15)
    assert time.monotonic() - start < 5
    critical = messages(qgis_iface, Qgis.MessageLevel.Critical)
    assert any("does not answer" in m and "Start" in m for m in critical)
    # the periodic health check notices too, and the light turns red
    ready.session.refresh_health()
    assert wait_until(lambda: ready.dock.backend_state == "error", 10)


def test_running_without_a_backend_says_how_to_start_one(plugin, qgis_iface, sample_files):
    layer = QgsRasterLayer(str(sample_files["s2"]), "S2")
    QgsProject.instance().addMapLayer(layer)
    plugin.dock.layer_combo.setLayer(layer)
    plugin.dock.prompt_edit.setPlainText("a\nb")
    plugin.dock.run_button.click()
    assert plugin.current_task is None
    critical = messages(qgis_iface, Qgis.MessageLevel.Critical)
    assert any("no backend is connected" in m and "Start" in m for m in critical)


def test_similar_tiles_from_a_drawn_rectangle(ready, fake_backend, qgis_iface):
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:32633"))
    ready.dock.k_spin.setValue(5)
    ready.start_drawing("query", "rectangle")
    assert canvas.mapTool() is ready.rectangle_tool
    ready.rectangle_tool.drawn.emit(QgsGeometry.fromRect(QgsRectangle(330000, 5821700, 330320, 5822040)),
                                    canvas.mapSettings().destinationCrs())
    assert wait_until(lambda: ready.current_task is None and len(group_layers()) == 2, 15)

    index, search = fake_backend.requests[-2:]
    assert index["kind"] == "index" and index["model"] == "tiny-aligned-s2" and "index" not in index
    assert search["kind"] == "search" and search["k"] == 5 and search["like_crs"] == "EPSG:32633"
    assert search["index"] == fake_backend.jobs[next(iter(fake_backend.jobs))]["result"]["index"]
    similar, heat = group_layers()
    assert similar.featureCount() == 5 and isinstance(similar.renderer(), QgsGraduatedSymbolRenderer)
    assert similar.renderer().classAttribute() == "similarity" and len(similar.renderer().ranges()) == 5
    assert isinstance(heat, QgsRasterLayer) and isinstance(heat.renderer(), QgsSingleBandPseudoColorRenderer)
    table = ready.dock.results_table
    assert table.rowCount() == 5 and table.item(0, 0).text() == "1"
    assert "query" in ready.sketches.bands

    # clicking a result zooms to it
    canvas.setExtent(QgsRectangle(0, 0, 10, 10))
    ready.dock.results_table.cellClicked.emit(2, 0)
    feature = similar.getFeature(ready.dock._result_rows[2][1])
    assert canvas.extent().contains(feature.geometry().boundingBox())
    assert similar.selectedFeatureIds() == [feature.id()]


def test_text_search_gives_a_ranked_layer(ready, fake_backend):
    ready.dock.heatmap_check.setChecked(False)
    ready.dock.text_edit.setText("a solar farm")
    ready.dock.text_button.click()
    assert wait_until(lambda: ready.current_task is None and group_layers(), 15)
    assert fake_backend.requests[-1]["text"] == "a solar farm" and "heatmap" not in fake_backend.requests[-1]
    (layer,) = group_layers()
    assert "a solar farm" in layer.name() and isinstance(layer.renderer(), QgsGraduatedSymbolRenderer)


def test_drawn_area_goes_into_the_request(ready, fake_backend, qgis_iface):
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:32633"))
    ready.start_drawing("area", "rectangle")
    ready.rectangle_tool.drawn.emit(QgsGeometry.fromRect(QgsRectangle(330000, 5821500, 330500, 5822000)),
                                    canvas.mapSettings().destinationCrs())
    assert ready.dock.area_mode().value == "drawn" and "area" in ready.sketches.bands
    ready.dock.run_button.click()
    assert wait_until(lambda: ready.current_task is None, 15)
    request = fake_backend.requests[-1]
    assert request["aoi_crs"] == "EPSG:32633"
    assert QgsGeometry.fromWkt(request["aoi"]).area() == pytest.approx(500 * 500)


def test_only_one_job_at_a_time(ready, fake_backend, qgis_iface):
    fake_backend.hang = True
    ready.dock.request_classify()
    ready.run_classify(ready.dock.classify_parameters())
    assert any("A job is running" in m for m in messages(qgis_iface, Qgis.MessageLevel.Warning))
    ready.cancel()
    assert wait_until(lambda: ready.current_task is None, 10)


def test_diagnostics_are_copied_to_the_clipboard(ready):
    from qgis.PyQt.QtWidgets import QApplication

    text = ready.copy_diagnostics()
    assert QApplication.clipboard().text() == text
    for expected in ("plugin: 0.1.0", "QGIS: 3.", "Python 3.", "backend version: 0.0-fake", "device: cpu (Fake CPU)",
                     "CPUExecutionProvider", "tiny-aligned-s2 (s2, untrained)", "--- last 40 lines",
                     "installer: folder ", "last error: -"):
        assert expected in text, expected


def _add_zoo_model(plugin, fake_backend):
    from fake_backend import ZOO_MODEL

    fake_backend.models.append(dict(ZOO_MODEL))
    plugin.session.refresh_models()
    assert wait_until(lambda: plugin.dock.model_combo.findData(ZOO_MODEL["id"]) >= 0, 10)
    plugin.dock.model_combo.setCurrentIndex(plugin.dock.model_combo.findData(ZOO_MODEL["id"]))
    return ZOO_MODEL["id"]


def test_a_model_without_weights_is_never_run_blindly(ready, fake_backend, qgis_iface):
    model = _add_zoo_model(ready, fake_backend)
    dock = ready.dock
    assert not dock.download_button.isHidden()
    assert "about 605 MB to download" in dock.model_label.text() and "CC-BY-4.0" in dock.model_label.text()
    n = len(fake_backend.requests)
    dock.run_button.click()
    assert ready.current_task is None and len(fake_backend.requests) == n  # nothing was sent
    warnings = messages(qgis_iface, Qgis.MessageLevel.Warning)
    assert any(f"weights of {model} are not downloaded" in m and "Download" in m for m in warnings)


def test_download_shows_progress_and_cancels(ready, fake_backend, qgis_iface):
    model = _add_zoo_model(ready, fake_backend)
    dock = ready.dock
    fake_backend.hang = True
    dock.download_button.click()
    assert ready.current_task is not None and dock.cancel_button.isEnabled()
    assert wait_until(lambda: "downloading weights" in dock.status_label.text() and dock.progress.value() > 0, 10)
    assert "/ 605 MB" in dock.status_label.text() and "s left" in dock.status_label.text()
    assert ("POST", f"/v1/models/{model}/fetch") in fake_backend.calls
    dock.cancel_button.click()
    assert wait_until(lambda: ready.current_task is None, 10)
    assert [j["state"] for j in fake_backend.jobs.values() if j["kind"] == "fetch"] == ["cancelled"]
    assert "Download again continues" in dock.status_label.text()
    assert not dock.download_button.isHidden()

    fake_backend.hang = False
    dock.download_button.click()
    assert wait_until(lambda: ready.current_task is None, 10)
    assert any(f"{model} downloaded" in m for m in messages(qgis_iface, Qgis.MessageLevel.Success))
    assert wait_until(lambda: dock.download_button.isHidden(), 10)  # the list was refreshed: downloaded now
    assert "weights: downloaded" in dock.model_label.text()
    dock.run_button.click()
    assert wait_until(lambda: ready.current_task is None, 15)
    assert fake_backend.requests[-1]["kind"] == "classify" and fake_backend.requests[-1]["model"] == model


def test_automatic_model_shows_and_runs_the_backends_choice(ready, fake_backend):
    dock = ready.dock
    dock.model_combo.setCurrentIndex(0)
    assert dock.automatic()
    assert wait_until(lambda: dock.auto_choice is not None, 10)
    assert "Automatic: tiny-aligned-s2: best multispectral model" in dock.model_label.text()
    asked = [path for method, path in fake_backend.calls if path.startswith("/v1/models/default?")]
    assert asked and "raster=" in asked[-1]
    dock.offset_combo.setEditText("none")  # the raster changed: the choice is asked for again
    assert dock.auto_choice is None
    assert wait_until(lambda: dock.auto_choice is not None, 10)
    assert any("offset=none" in path for _method, path in fake_backend.calls)
    dock.run_button.click()
    assert wait_until(lambda: ready.current_task is None, 15)
    request = fake_backend.requests[-1]
    assert request["model"] == "tiny-aligned-s2" and request["offset"] == "none"
    dock.offset_combo.setEditText("lots")
    dock.run_button.click()
    assert ready.current_task is None and "offset must be 'auto', 'none' or a number" in dock.status_label.text()


def test_a_model_list_that_failed_is_asked_for_again(plugin, fake_backend, isolated):
    """A backend busy importing its models may not answer the first list in time: the next health check asks again."""
    fake_backend.models_errors = 1
    plugin.attach_backend(fake_backend.write_state_file(isolated / "home" / "server.json"))
    assert wait_until(lambda: plugin.session.connected, 10)
    assert wait_until(lambda: ("GET", "/v1/models") in fake_backend.calls and not plugin.session._models_pending, 10)
    assert plugin.session.models == []
    plugin.session.refresh_health()  # what the 5 s timer does
    assert wait_until(lambda: len(plugin.session.models) == 2, 10)
    assert plugin.dock.model_combo.count() == 3
def test_diagnostics_name_the_installation_its_log_and_the_last_error(ready, fake_backend, monkeypatch, tmp_path):
    from tileprompt_plugin.plugin import settings as settings_module
    from tileprompt_plugin.plugin.installer import locations, record

    monkeypatch.setattr(settings_module, "PLUGIN_DIR", tmp_path / "release")  # as installed from the zip
    layout = ready.settings.install_layout()
    env = locations.venv_tileprompt(layout.env("20261128-101500"))
    env.parent.mkdir(parents=True)
    env.write_text("")
    layout.logs.mkdir(parents=True)
    log = layout.logs / "install-20261128-101500.log"
    log.write_text("== Installing the backend and its packages\n$ uv pip install --index-url https://ana:pw@m/simple\n")
    record.write(layout, record.Installation(
        env="20261128-101500", version="0.1.0", source="x", compute="cuda", python="/usr/bin/python3.11",
        python_version="3.11.2", torch="2.14.1+cu130", cuda=True, device="NVIDIA RTX A2000", installed="2026-11-28",
        log=str(log)))
    fake_backend.fail_with = "the raster has 3 bands; the model needs 13"
    ready.dock.run_button.click()
    assert wait_until(lambda: ready.current_task is None, 15)
    text = ready.copy_diagnostics()
    assert "installer: folder " in text and "; outdated" in text  # another source than this plugin's
    assert "installed backend: 0.1.0 (cuda)" in text and "PyTorch 2.14.1+cu130 on NVIDIA RTX A2000" in text
    assert "install-20261128-101500.log ---" in text and "https://***@m/simple" in text and "pw@" not in text
    assert "last error: " in text and "the model needs 13" in text


# --- what the trial in the real QGIS desktop found ----------------------------------------------------------------
def test_result_layers_are_named_after_the_prompts_or_query_and_the_time(ready, fake_backend):
    import re

    ready.dock.run_button.click()
    assert wait_until(lambda: ready.current_task is None, 15)
    ready.dock.text_edit.setText("a solar farm")
    ready.dock.text_button.click()
    assert wait_until(lambda: ready.current_task is None and len(group_layers()) == 3, 15)
    names = [layer.name() for layer in group_layers()]
    time_ = r"\d\d:\d\d:\d\d"
    assert re.fullmatch(f"“a solar farm” · top 20 · {time_}", names[0]), names
    assert re.fullmatch(f"“a solar farm” · top 20 · {time_}, heat map", names[1]), names
    assert re.fullmatch(f"forest, water, farmland, urban · {time_}", names[2]), names


def test_a_cancelled_run_leaves_no_summary_of_the_previous_one(ready, fake_backend, task_statuses):
    from qgis.core import QgsApplication, QgsTask

    ready.dock.run_button.click()
    assert wait_until(lambda: ready.current_task is None, 15)
    assert ready.dock.summary()  # the first run's counts
    fake_backend.hang = True
    ready.dock.run_button.click()
    task_id = QgsApplication.taskManager().taskId(ready.current_task)
    assert ready.dock.summary() == []  # cleared when the new run starts
    assert wait_until(lambda: any(j["state"] == "running" for j in fake_backend.jobs.values()), 10)
    ready.dock.cancel_button.click()
    assert wait_until(lambda: ready.current_task is None, 10)
    assert ready.dock.summary() == [] and ready.dock.status_label.text() == "Cancelled."
    # QGIS announces a Terminated task as "Task failed": a cancel the backend honoured ends Complete
    assert (task_id, QgsTask.TaskStatus.Complete) in task_statuses
    assert (task_id, QgsTask.TaskStatus.Terminated) not in task_statuses


def test_a_failed_job_is_a_failed_task(ready, fake_backend, task_statuses):
    from qgis.core import QgsApplication, QgsTask

    fake_backend.fail_with = "no such band"
    ready.dock.run_button.click()
    task_id = QgsApplication.taskManager().taskId(ready.current_task)
    assert wait_until(lambda: ready.current_task is None, 15)
    assert (task_id, QgsTask.TaskStatus.Terminated) in task_statuses


def test_overlapping_tiles_are_drawn_as_centre_cells(ready, fake_backend):
    from qgis.core import QgsExpression, QgsExpressionContext, QgsExpressionContextUtils, QgsGeometryGeneratorSymbolLayer

    ready.dock.tile_spin.setValue(32)
    ready.dock.overlap_spin.setValue(8)  # stride 24: each tile shows its 24 x 24 px centre
    ready.dock.run_button.click()
    assert wait_until(lambda: ready.current_task is None, 15)
    assert fake_backend.requests[-1]["stride"] == 24
    (layer,) = group_layers()
    categories = layer.renderer().categories()  # keep the copies alive while their symbols are used
    generator = categories[0].symbol().symbolLayer(0)
    assert isinstance(generator, QgsGeometryGeneratorSymbolLayer)
    feature = next(layer.getFeatures())  # a 320 m tile of 32 px: 10 m pixels
    context = QgsExpressionContext(QgsExpressionContextUtils.globalProjectLayerScopes(layer))
    context.setFeature(feature)
    cell = QgsExpression(generator.geometryExpression()).evaluate(context)
    assert cell.area() == pytest.approx(240.0 ** 2) and cell.centroid().equals(feature.geometry().centroid())
    ready.dock.cells_check.setChecked(False)  # whole tiles, as the user chooses
    ready.dock.run_button.click()
    assert wait_until(lambda: ready.current_task is None and len(group_layers()) == 2, 15)
    categories = group_layers()[0].renderer().categories()
    assert not isinstance(categories[0].symbol().symbolLayer(0), QgsGeometryGeneratorSymbolLayer)


def test_the_similarity_legend_tells_close_values_apart():
    from qgis.core import QgsFeature, QgsField, QgsVectorLayer
    from qgis.PyQt.QtCore import QVariant

    from tileprompt_plugin.plugin.results import label_precision, quantile_ranges, style_graduated

    layer = QgsVectorLayer("Polygon?crs=EPSG:32633", "similar", "memory")
    layer.dataProvider().addAttributes([QgsField("similarity", QVariant.Double)])
    layer.updateFields()
    values = [0.999912, 0.999915, 0.999931, 0.999947, 0.999950, 0.999968, 0.999981, 0.999990, 0.999994, 0.999999]
    features = []
    for v in values:
        f = QgsFeature(layer.fields())
        f.setAttributes([v])
        features.append(f)
    layer.dataProvider().addFeatures(features)
    style_graduated(layer)
    ranges = layer.renderer().ranges()
    labels = [r.label() for r in ranges]
    assert len(ranges) == 5 and len(set(labels)) == 5, labels  # the trial: five times "1.000 - 1.000"
    assert labels[0] == "0.999912 - 0.999915" and labels[-1] == "0.999994 - 0.999999"
    assert all(any(r.lowerValue() <= v <= r.upperValue() for r in ranges) for v in values)
    assert quantile_ranges([0.5, 0.5, 0.5], 5) == [(0.5, 0.5)] and label_precision([0.1, 0.2]) == 3


def test_classification_also_as_a_class_map_raster(ready, fake_backend):
    ready.dock.class_map_check.setChecked(True)
    ready.dock.run_button.click()
    assert wait_until(lambda: ready.current_task is None and len(group_layers()) == 2, 15)
    request = fake_backend.requests[-1]
    assert request["class_map"] == request["out"][:-len(".gpkg")] + ".tif"
    tiles, raster = group_layers()
    assert isinstance(raster, QgsRasterLayer) and raster.source() == request["class_map"]
    assert raster.name() == tiles.name() + " (raster)"


def test_a_backend_too_busy_to_answer_once_shows_as_up_again(plugin, fake_backend, isolated, qgis_iface):
    """A health check that timed out (a heavy job on a loaded machine) stopped the checks for good: the dock said
    "not answering" while the backend worked on."""
    from conftest import connect
    from tileprompt_plugin.plugin.settings import Key

    plugin.settings.set(Key.REQUEST_TIMEOUT_S, 0.5)
    connect(plugin, fake_backend, isolated)
    fake_backend.answer_delay_s = 1.5
    plugin.session.refresh_health()
    assert wait_until(lambda: plugin.dock.backend_state == "error", 10)
    assert plugin.session._timer.isActive()  # still checking
    from qgis.core import Qgis

    # the fake backend's state file names no pid: nothing says it still runs, so it is an error
    assert any("does not answer" in m for m in qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical))
    fake_backend.answer_delay_s = 0
    assert wait_until(lambda: plugin.dock.backend_state == "up", 15)


def test_a_busy_backend_whose_process_runs_is_a_warning_not_an_error(plugin, fake_backend, isolated, qgis_iface):
    import os

    from qgis.core import Qgis

    from tileprompt_plugin.plugin.settings import Key

    plugin.settings.set(Key.REQUEST_TIMEOUT_S, 0.5)
    state = fake_backend.write_state_file(isolated / "home" / "server.json", pid=os.getpid())  # a live process
    plugin.attach_backend(state)
    assert wait_until(lambda: plugin.session.connected, 10)
    fake_backend.answer_delay_s = 1.5
    plugin.session.refresh_health()
    assert wait_until(lambda: plugin.dock.backend_state == "error", 10)
    bar = qgis_iface.messageBar()
    assert any("slow to answer" in m for m in bar.get_messages(Qgis.MessageLevel.Warning))
    assert not any("does not answer" in m for m in bar.get_messages(Qgis.MessageLevel.Critical))
    fake_backend.answer_delay_s = 0


# --- refusals the dock turns into a question (issue 8) ---------------------------------------------------------

OUTPUT_EXISTS = {
    "detail": "the output /x/landuse.gpkg exists and was not written by TilePrompt; send \"overwrite\": true to "
              "replace it, or choose another name",
    "code": "output_exists",
    "fixes": {"cli": "pass --overwrite to replace it, or choose another name",
              "http": "send \"overwrite\": true to replace it, or choose another name",
              "processing": "tick \"Replace an existing output\", or choose another name",
              "dock": "confirm replacing it, or choose another name"},
}


@pytest.mark.parametrize("answer", [True, False])
def test_a_foreign_output_is_replaced_only_when_the_user_agrees(ready, fake_backend, qgis_iface, tmp_path, answer,
                                                                monkeypatch):
    questions = []
    monkeypatch.setattr(ready, "ask", lambda title, text: questions.append((title, text)) or answer)
    out = tmp_path / "landuse.gpkg"
    ready.dock.output_widget.setFilePath(str(out))
    fake_backend.refuse_unless = ("overwrite", OUTPUT_EXISTS)
    ready.dock.run_button.click()
    assert wait_until(lambda: ready.current_task is None and len(fake_backend.requests) >= 1 + answer, 15)
    assert wait_until(lambda: ready.current_task is None, 15)
    assert questions == [("Replace the file?", f"{out} exists and was not written by TilePrompt. Replace it with "
                                                "the result?")]
    first = fake_backend.requests[0]
    assert "overwrite" not in first and first["out"] == str(out)
    if answer:
        assert fake_backend.requests[1]["overwrite"] is True and len(group_layers()) == 1
    else:
        assert len(fake_backend.requests) == 1 and group_layers() == []
        critical = messages(qgis_iface, Qgis.MessageLevel.Critical)
        assert any(m.endswith("confirm replacing it, or choose another name") for m in critical), critical


def test_band_table_takes_skips_and_dates(ready, sample_files):
    dock = ready.dock
    rows = dock.band_table.rowCount()
    names = (["B04", "B03", "B02", "B08"] * 2 + ["-"] * rows)[:rows]
    dock.set_band_names(names)
    if rows >= 8:
        assert dock.date_spin.isVisibleTo(dock) and dock.date_spin.maximum() == 2
        with pytest.raises(Exception, match="a stack of 2 dates; choose the date"):
            dock.band_map()
        dock.date_spin.setValue(2)
        assert dock.raster_input().date == 2 and dock.raster_input().request_fields()["date"] == 2
    dock.set_band_names((["B04", "B03", "B02"] + ["-"] * rows)[:rows])
    assert not dock.date_spin.isVisibleTo(dock)
    assert dock.band_map()[:4] == ("B04", "B03", "B02", "-")
