"""The ``tileprompt`` Processing provider: algorithms, parameters, outputs, cancel, errors (fake backend)."""

import threading

import pytest
from qgis.core import (QgsCategorizedSymbolRenderer, QgsFeature, QgsGeometry, QgsGraduatedSymbolRenderer,
                       QgsProcessingException, QgsProcessingFeedback, QgsProject, QgsRasterLayer, QgsRectangle,
                       QgsSingleBandPseudoColorRenderer, QgsVectorLayer)

from conftest import connect


@pytest.fixture()
def processing(qgis_processing, plugin):
    import processing as qgis_processing_module

    return qgis_processing_module


@pytest.fixture()
def scene(sample_files):
    layer = QgsRasterLayer(str(sample_files["s2"]), "S2 scene")
    QgsProject.instance().addMapLayer(layer)
    return layer


def query_layer():
    layer = QgsVectorLayer("Polygon?crs=EPSG:32633", "query", "memory")
    f = QgsFeature()
    f.setGeometry(QgsGeometry.fromRect(QgsRectangle(330000, 5821700, 330320, 5822040)))
    layer.dataProvider().addFeatures([f])
    QgsProject.instance().addMapLayer(layer)
    return layer


def test_provider_and_algorithms(plugin):
    from qgis.core import QgsApplication

    from tileprompt_plugin.plugin import compat

    provider = QgsApplication.processingRegistry().providerById("tileprompt")
    assert provider.name() == "TilePrompt" and not provider.icon().isNull()
    assert provider.supportedOutputVectorLayerExtensions() == ["gpkg"]
    for algorithm in provider.algorithms():
        assert algorithm.flags() & compat.ALG_FLAG_SUPPORTS_BATCH and algorithm.flags() & compat.ALG_FLAG_CAN_CANCEL
        assert algorithm.shortHelpString() and algorithm.displayName()
        names = {p.name() for p in algorithm.parameterDefinitions()}
        assert {"MODEL", "TILE", "OVERLAP", "OUTPUT" if algorithm.name() != "buildindex" else "INDEX"} <= names
        if algorithm.name() != "change":  # one raster; change reads two (BEFORE, AFTER)
            assert {"INPUT", "BAND_MAP", "LEVEL", "USE_PRODUCT", "RESOLUTION"} <= names
    classify = provider.algorithm("classify")
    assert {"PROMPTS", "EXTENT", "AOI", "MULTI_LABEL", "THRESHOLD", "TEMPLATES", "OUTPUT"} <= \
        {p.name() for p in classify.parameterDefinitions()}
    assert {o.name() for o in classify.outputDefinitions()} >= {"OUTPUT", "TILES", "CLASS_COUNTS"}


def test_classify_through_processing_run(processing, plugin, fake_backend, isolated, scene, tmp_path):
    connect(plugin, fake_backend, isolated)
    out = str(tmp_path / "classes.gpkg")
    result = processing.run("tileprompt:classify", {
        "INPUT": scene, "PROMPTS": "forest\nwater\nfarmland", "MODEL": "tiny-aligned-s2", "TILE": 64, "OVERLAP": 0,
        "MULTI_LABEL": True, "THRESHOLD": 0.4, "OUTPUT": out})
    assert result["OUTPUT"] == f"{out}|layername=tiles"
    assert result["TILES"] == 12 and '"forest": 4' in result["CLASS_COUNTS"]
    request = fake_backend.requests[-1]
    assert request["raster"] == scene.source() and request["band_map"][0] == "B01"
    assert (request["tile_px"], request["multi_label"], request["threshold"]) == (64, True, 0.4)
    assert "offset" not in request  # auto: the backend reads the product's baseline
    assert QgsVectorLayer(result["OUTPUT"], "x", "ogr").featureCount() == 12
    processing.run("tileprompt:classify", {"INPUT": scene, "PROMPTS": "a\nb", "OFFSET": "1000",
                                           "OUTPUT": str(tmp_path / "o.gpkg")})
    assert fake_backend.requests[-1]["offset"] == 1000.0
    errors = run_failing(processing, {"INPUT": scene, "PROMPTS": "a\nb", "OFFSET": "20000",
                                      "OUTPUT": str(tmp_path / "p.gpkg")})
    assert "offset must be 'auto', 'none' or a number of DN between 0 and 10000" in errors


def test_run_and_load_results_styles_the_layer(processing, plugin, fake_backend, isolated, scene, tmp_path):
    connect(plugin, fake_backend, isolated)
    result = processing.runAndLoadResults("tileprompt:classify", {
        "INPUT": scene, "PROMPTS": "forest\nwater\nfarmland", "OUTPUT": str(tmp_path / "c.gpkg")})
    assert result["TILES"] == 12
    layer = next(lyr for lyr in QgsProject.instance().mapLayers().values() if lyr.source().endswith("layername=tiles"))
    assert isinstance(layer.renderer(), QgsCategorizedSymbolRenderer)
    assert [c.value() for c in layer.renderer().categories()] == ["forest", "water", "farmland"]


def test_classify_also_writes_a_class_map(processing, plugin, fake_backend, isolated, scene, tmp_path):
    connect(plugin, fake_backend, isolated)
    result = processing.runAndLoadResults("tileprompt:classify", {
        "INPUT": scene, "PROMPTS": "forest\nwater\nfarmland", "OUTPUT": str(tmp_path / "c.gpkg"),
        "CLASS_MAP": str(tmp_path / "c.tif")})
    assert fake_backend.requests[-1]["class_map"] == str(tmp_path / "c.tif") == result["CLASS_MAP"]
    assert any(lyr.source() == str(tmp_path / "c.tif") for lyr in QgsProject.instance().mapLayers().values())
    processing.run("tileprompt:classify", {"INPUT": scene, "PROMPTS": "a\nb", "OUTPUT": str(tmp_path / "d.gpkg")})
    assert "class_map" not in fake_backend.requests[-1]  # only when asked for


def test_processing_finds_a_backend_started_elsewhere(processing, plugin, fake_backend, isolated, scene, tmp_path):
    fake_backend.write_state_file(isolated / "home" / "server.json")  # the default state file; the dock never attached
    assert plugin.session.connection is None
    result = processing.run("tileprompt:classify", {"INPUT": scene, "PROMPTS": "a\nb", "AOI": query_layer(),
                                                    "OUTPUT": str(tmp_path / "c.gpkg")})
    assert result["TILES"] == 12
    request = fake_backend.requests[-1]
    assert request["aoi_crs"] == "EPSG:32633" and QgsGeometry.fromWkt(request["aoi"]).area() > 0


def test_find_similar_and_text_search(processing, plugin, fake_backend, isolated, scene, tmp_path):
    connect(plugin, fake_backend, isolated)
    result = processing.runAndLoadResults("tileprompt:findsimilar", {
        "INPUT": scene, "QUERY": query_layer(), "K": 5, "FUSE": 1, "OUTPUT": str(tmp_path / "s.gpkg"),
        "HEATMAP": str(tmp_path / "heat.tif")})
    index, search = fake_backend.requests[-2:]
    assert index["kind"] == "index" and search["fuse"] == "max" and search["k"] == 5
    assert search["heatmap"] == str(tmp_path / "heat.tif")
    layers = list(QgsProject.instance().mapLayers().values())
    similar = next(l for l in layers if l.source().endswith("layername=similar"))
    heat = next(l for l in layers if l.source() == str(tmp_path / "heat.tif"))
    assert isinstance(similar.renderer(), QgsGraduatedSymbolRenderer)
    assert isinstance(heat.renderer(), QgsSingleBandPseudoColorRenderer)
    assert result["HEATMAP"] == str(tmp_path / "heat.tif")

    result = processing.run("tileprompt:textsearch", {"INPUT": scene, "TEXT": "a harbour", "K": 3,
                                                      "OUTPUT": str(tmp_path / "t.gpkg")})
    assert fake_backend.requests[-1]["text"] == "a harbour" and "heatmap" not in fake_backend.requests[-1]
    assert QgsVectorLayer(result["OUTPUT"], "t", "ogr").featureCount() == 5  # what the fake returns


def test_find_similar_cross_modal(processing, plugin, fake_backend, isolated, scene, sample_files, tmp_path):
    """Query polygons on an RGB layer, embedded by a model of the searched model's embedding space."""
    connect(plugin, fake_backend, isolated)
    rgb = QgsRasterLayer(str(sample_files["plain"]), "orthophoto")
    QgsProject.instance().addMapLayer(rgb)
    processing.run("tileprompt:findsimilar", {
        "INPUT": scene, "MODEL": "tiny-aligned-s2", "QUERY": query_layer(), "QUERY_RASTER": rgb,
        "QUERY_MODEL": "clip-vit-b32-openai", "K": 5, "OUTPUT": str(tmp_path / "x.gpkg")})
    index, search = fake_backend.requests[-2:]
    assert index["model"] == "tiny-aligned-s2" and index["rasters"][0]["raster"] == str(sample_files["s2"])
    assert search["query_model"] == "clip-vit-b32-openai" and search["scene"] == str(sample_files["plain"])
    errors = run_failing(processing, {"INPUT": scene, "QUERY": query_layer(), "QUERY_RASTER": rgb,
                                      "OUTPUT": str(tmp_path / "y.gpkg")}, "tileprompt:findsimilar")
    assert "Name the model of the query layer" in errors


def test_build_index(processing, plugin, fake_backend, isolated, scene, tmp_path):
    connect(plugin, fake_backend, isolated)
    result = processing.run("tileprompt:buildindex", {"INPUT": scene, "TILE": 32, "OVERLAP": 8})
    request = fake_backend.requests[-1]
    assert request["kind"] == "index" and (request["tile_px"], request["stride"]) == (32, 24)
    assert result["INDEX"] and "index" not in request
    result = processing.run("tileprompt:buildindex", {"INPUT": scene, "INDEX": str(tmp_path / "idx")})
    assert fake_backend.requests[-1]["index"] == str(tmp_path / "idx") == result["INDEX"]


class Errors(QgsProcessingFeedback):
    """processing.run raises a generic 'There were errors'; the algorithm's message goes to the feedback."""

    def __init__(self):
        super().__init__()
        self.errors = []

    def reportError(self, error, fatalError=False):  # noqa: N802, N803
        self.errors.append(error)


def run_failing(processing, parameters, algorithm="tileprompt:classify"):
    feedback = Errors()
    with pytest.raises(QgsProcessingException) as info:
        processing.run(algorithm, parameters, feedback=feedback)
    return " ".join(feedback.errors + [str(info.value)])


def test_backend_down_is_a_clear_processing_error(processing, plugin, isolated, scene, tmp_path):
    errors = run_failing(processing, {"INPUT": scene, "PROMPTS": "a\nb", "OUTPUT": str(tmp_path / "c.gpkg")})
    assert "No running backend" in errors and "Start the backend from the TilePrompt dock" in errors


def test_bad_parameters_are_processing_errors(processing, plugin, fake_backend, isolated, scene, tmp_path):
    connect(plugin, fake_backend, isolated)
    out = str(tmp_path / "c.gpkg")
    assert "appears twice" in run_failing(processing, {"INPUT": scene, "PROMPTS": "a\na", "OUTPUT": out})
    assert "unknown band" in run_failing(processing, {"INPUT": scene, "PROMPTS": "a\nb", "BAND_MAP": "B04,NIR",
                                                      "OUTPUT": out})
    fake_backend.fail_with = "out of memory"
    assert "out of memory" in run_failing(processing, {"INPUT": scene, "PROMPTS": "a\nb", "OUTPUT": out})


def test_cancel_from_the_feedback_cancels_the_job(processing, plugin, fake_backend, isolated, scene, tmp_path):
    connect(plugin, fake_backend, isolated)
    fake_backend.hang = True
    feedback = QgsProcessingFeedback()
    threading.Timer(0.3, feedback.cancel).start()
    result = processing.run("tileprompt:classify", {"INPUT": scene, "PROMPTS": "a\nb",
                                                    "OUTPUT": str(tmp_path / "c.gpkg")}, feedback=feedback)
    assert result.get("TILES") is None
    assert [j["state"] for j in fake_backend.jobs.values()] == ["cancelled"]


@pytest.fixture()
def dialogs(qgis_iface, monkeypatch):
    """What the toolbox dialog asks of iface beyond pytest-qgis's stub: a real browser model."""
    from qgis.gui import QgsBrowserGuiModel

    model = QgsBrowserGuiModel()
    monkeypatch.setattr(qgis_iface, "browserModel", lambda: model, raising=False)
    return model


def run_in_dialog(processing, algorithm, parameters):
    """Run ``algorithm`` the way the toolbox dialog's Run button does (QgsProcessingAlgRunnerTask, worker thread)
    and wait until the dialog has loaded its results."""
    from conftest import wait_until
    from processing.core.ProcessingConfig import ProcessingConfig

    ProcessingConfig.setSettingValue(ProcessingConfig.KEEP_DIALOG_OPEN, True)
    dialog = processing.createAlgorithmDialog(algorithm, parameters)
    finished = []
    dialog.algorithmFinished.connect(lambda ok, results: finished.append((ok, results)))
    dialog.runAlgorithm()
    assert wait_until(lambda: finished, 30), "the dialog's task did not finish"
    dialog.close()
    return finished[0]


def test_the_toolbox_dialog_loads_its_layers(processing, dialogs, plugin, fake_backend, isolated, scene, tmp_path):
    """QGIS 3.22's dialog runs the algorithm in a worker thread with a temporary context: a layer registered only
    in prepareAlgorithm was dropped when the run's context replaced the dialog's (no layer, no error)."""
    connect(plugin, fake_backend, isolated)
    ok, results = run_in_dialog(processing, "tileprompt:classify", {
        "INPUT": scene, "PROMPTS": "forest\nwater\nfarmland", "OUTPUT": str(tmp_path / "dialog.gpkg")})
    assert ok and results["TILES"] == 12
    layers = [lyr for lyr in QgsProject.instance().mapLayers().values()
              if lyr.source() == f"{tmp_path / 'dialog.gpkg'}|layername=tiles"]
    assert len(layers) == 1 and isinstance(layers[0].renderer(), QgsCategorizedSymbolRenderer)

    ok, results = run_in_dialog(processing, "tileprompt:findsimilar", {
        "INPUT": scene, "QUERY": query_layer(), "K": 5, "OUTPUT": str(tmp_path / "sim.gpkg"),
        "HEATMAP": str(tmp_path / "sim.tif")})
    sources = [lyr.source() for lyr in QgsProject.instance().mapLayers().values()]
    assert ok and f"{tmp_path / 'sim.gpkg'}|layername=similar" in sources and str(tmp_path / "sim.tif") in sources


def test_refusals_carry_the_processing_remedy_and_overwrite_agrees(processing, plugin, fake_backend, isolated,
                                                                  scene, tmp_path):
    """The backend refuses a foreign output; Processing names its own parameter, and OVERWRITE sends the consent."""
    connect(plugin, fake_backend, isolated)
    out = str(tmp_path / "c.gpkg")
    fake_backend.refuse_unless = ("overwrite", {
        "detail": f"the output {out} exists and was not written by TilePrompt; send \"overwrite\": true to replace "
                  "it, or choose another name", "code": "output_exists",
        "fixes": {"http": "send \"overwrite\": true to replace it, or choose another name",
                  "processing": "tick \"Replace an existing output\", or choose another name"}})
    errors = run_failing(processing, {"INPUT": scene, "PROMPTS": "a\nb", "OUTPUT": out})
    assert errors.endswith("tick \"Replace an existing output\", or choose another name") and "\"overwrite\"" not in errors
    result = processing.run("tileprompt:classify", {"INPUT": scene, "PROMPTS": "a\nb", "OUTPUT": out,
                                                    "OVERWRITE": True})
    assert result["TILES"] == 12 and fake_backend.requests[-1]["overwrite"] is True


def test_band_names_skip_token_and_date(processing, plugin, fake_backend, isolated, scene, tmp_path):
    connect(plugin, fake_backend, isolated)
    out = str(tmp_path / "c.gpkg")
    stack = ",".join(["B04", "B03", "B02", "B08"] * 2 + ["-"] * 5)  # the 13-band sample, read as 2 dates
    assert "a stack of 2 dates; choose the date" in run_failing(
        processing, {"INPUT": scene, "PROMPTS": "a\nb", "BAND_MAP": stack, "OUTPUT": out})
    assert "A date needs band names" in run_failing(
        processing, {"INPUT": scene, "PROMPTS": "a\nb", "DATE": 2, "OUTPUT": out})
    processing.run("tileprompt:classify", {"INPUT": scene, "PROMPTS": "a\nb", "BAND_MAP": stack, "DATE": 2,
                                           "PIXEL_SPACE": True, "OUTPUT": out})
    request = fake_backend.requests[-1]
    assert request["band_map"] == stack.split(",") and request["date"] == 2 and request["pixel_space"] is True
