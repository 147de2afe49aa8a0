"""Processing algorithms of the ``tileprompt`` provider: classify (with optional few-shot examples and
context-aware refinement), build an index, find similar, text search, change between two dates.

Each runs in three steps, as Processing schedules them:
``prepareAlgorithm`` (UI thread): reads layers, exports a layer the backend cannot open, finds the backend;
``processAlgorithm`` (worker thread): submits the job(s) and polls them with the feedback's progress and cancel;
``postProcessAlgorithm`` (UI thread): makes the loaded output the right GeoPackage layer, styled.
They work in the toolbox, in batch mode, in models and from ``processing.run`` (tests/e2e).
"""

from __future__ import annotations

import json
from dataclasses import replace

from qgis.core import (
    QgsFeatureRequest,
    QgsGeometry,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputFolder,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsProcessingParameterVectorLayer,
)
from qgis.PyQt.QtGui import QIcon

from . import compat
from .bands import validate_band_map
from .client import BackendError
from .i18n import tr
from .corrections import read_run, run_classes
from .jobs import JobCancelled, JobFailed, JobSucceeded, describe_status, fraction_done, job_warnings, run_jobs
from .parameters import Area, AreaMode, ChangeParameters, ClassifyParameters, CrossModal, Extent, Fuse, Query, \
    SearchParameters, parse_offset
from .prompts import PromptError, parse_prompts, prompts_to_request
from .results import CHANGE_LAYER, SIMILAR_LAYER, TILES_LAYER, class_counts, style_categorized, style_class_map, \
    style_graduated, style_pseudocolor
from .runs import plan_search, prepare_raster, raster_input_from_layer
from .settings import ICON_PATH, Key

LEVELS = [None, "L1C", "L2A"]
FUSES = [Fuse.MEAN, Fuse.MAX]

# Post-processors must outlive the algorithm run that registers them (QGIS keeps a raw pointer).
_KEEP_ALIVE: list = []


class _Styler(QgsProcessingLayerPostProcessorInterface):
    def __init__(self, style, *args):
        super().__init__()
        self.style, self.args = style, args

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 (QGIS API)
        self.style(layer, *self.args)


def _styler(style, *args) -> _Styler:
    styler = _Styler(style, *args)
    _KEEP_ALIVE.append(styler)
    del _KEEP_ALIVE[:-64]
    return styler


class TilePromptAlgorithm(QgsProcessingAlgorithm):
    """Common parameters (raster, bands, model, tiles) and the job loop."""

    INPUT, USE_PRODUCT, BAND_MAP, DATE, LEVEL = "INPUT", "USE_PRODUCT", "BAND_MAP", "DATE", "LEVEL"
    OFFSET, OVERWRITE, PIXEL_SPACE = "OFFSET", "OVERWRITE", "PIXEL_SPACE"
    MODEL, TILE, OVERLAP, RESOLUTION, OUTPUT = "MODEL", "TILE", "OVERLAP", "RESOLUTION", "OUTPUT"

    def __init__(self, session):
        super().__init__()
        self.session = session
        self._raster = None
        self._client = None
        self._requests: list = []
        self._outputs: dict = {}
        self._styles: dict = {}  # output parameter -> (layer name in the GeoPackage or None, styler)
        self._to_load: dict = {}  # output file -> QgsProcessingContext.LayerDetails (from prepareAlgorithm)
        self._succeeded = False

    # --- QgsProcessingAlgorithm boilerplate --------------------------------------------------------------
    def createInstance(self):  # noqa: N802
        return type(self)(self.session)

    def group(self):
        return ""

    def groupId(self):  # noqa: N802
        return ""

    def icon(self):
        return QIcon(str(ICON_PATH))

    def flags(self):
        return super().flags() | compat.ALG_FLAG_CAN_CANCEL | compat.ALG_FLAG_SUPPORTS_BATCH

    # --- parameters ---------------------------------------------------------------------------------------
    def _add_model_parameters(self):
        self.addParameter(QgsProcessingParameterString(
            self.MODEL, tr("Model id (empty: the best model for the layer)"),
            defaultValue=self.session.settings.get(Key.DEFAULT_MODEL) or None, optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.TILE, tr("Tile size in pixels (0: the model's)"), compat.NUMBER_INTEGER, 0, False, 0, 4096))
        self.addParameter(QgsProcessingParameterNumber(
            self.OVERLAP, tr("Tile overlap in pixels"), compat.NUMBER_INTEGER, 0, False, 0, 4095))

    def _add_raster_parameters(self):
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, tr("Raster layer")))
        self._add_model_parameters()
        advanced = [
            QgsProcessingParameterBoolean(
                self.USE_PRODUCT, tr("Read the whole product folder when the layer is one band file of it"), True),
            QgsProcessingParameterString(
                self.BAND_MAP, tr("Band names in file order, comma-separated; - skips a band; names repeat per date "
                                  "in a stack of several dates (empty: detect)"), optional=True),
            QgsProcessingParameterNumber(
                self.DATE, tr("Date to read from a multi-date band map (0: a single date)"), compat.NUMBER_INTEGER,
                0, False, 0, 64),
            QgsProcessingParameterEnum(self.LEVEL, tr("Sentinel-2 processing level"),
                                       [tr("detect"), "L1C", "L2A"], defaultValue=0),
            QgsProcessingParameterString(
                self.OFFSET, tr("Sentinel-2 baseline offset to subtract: auto (from the product's metadata or name), "
                                "none, or DN (1000 for baseline 04.00+)"), defaultValue="auto", optional=True),
            QgsProcessingParameterNumber(
                self.RESOLUTION, tr("Export resolution (m/px) for layers without a local file (0: the model's)"),
                compat.NUMBER_DOUBLE, 0.0, False, 0.0),
        ]
        for parameter in advanced:
            parameter.setFlags(parameter.flags() | compat.PARAM_FLAG_ADVANCED)
            self.addParameter(parameter)

    def _add_overwrite_parameter(self):
        self.addParameter(QgsProcessingParameterBoolean(
            self.OVERWRITE, tr("Replace an existing output that TilePrompt did not write (inputs are never replaced)"),
            False))

    def _model(self, parameters, context) -> str | None:
        return self.parameterAsString(parameters, self.MODEL, context).strip() or None

    def _tiles(self, parameters, context) -> tuple[int | None, int]:
        tile = self.parameterAsInt(parameters, self.TILE, context) or None
        return tile, self.parameterAsInt(parameters, self.OVERLAP, context)

    def _raster_input(self, parameters, context, export_extent: Extent | None = None):
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None:
            raise QgsProcessingException(tr("Choose a raster layer."))
        text = self.parameterAsString(parameters, self.BAND_MAP, context).strip()
        band_map = None
        date = self.parameterAsInt(parameters, self.DATE, context) or None
        if text:
            names = [n.strip().upper() for n in text.split(",")]
            error = validate_band_map(names, date)
            if error:
                raise QgsProcessingException(tr("Band names: {error}").format(error=error))
            band_map = tuple(names)
        elif date:
            raise QgsProcessingException(tr("A date needs band names that repeat per date, e.g. "
                                            "B04,B03,B02,B08,B04,B03,B02,B08 for two dates."))
        level = LEVELS[self.parameterAsEnum(parameters, self.LEVEL, context)]
        use_product = self.parameterAsBoolean(parameters, self.USE_PRODUCT, context)
        try:
            offset = parse_offset(self.parameterAsString(parameters, self.OFFSET, context))
            raster = replace(raster_input_from_layer(layer, use_product, band_map, level, export_extent, offset),
                             date=date)
            gsd = self.parameterAsDouble(parameters, self.RESOLUTION, context) or \
                self.session.model_info(self._model(parameters, context)).get("gsd_m")
            return prepare_raster(raster, gsd, self.session.settings.cache_dir() / "exports", layer)
        except ValueError as exc:
            raise QgsProcessingException(str(exc)) from None

    def _destination(self, parameters, name, context) -> str:
        """The file of destination parameter ``name``; remembers how QGIS is to load it (see _register_layers)."""
        path = self.parameterAsOutputLayer(parameters, name, context)
        if path and context.willLoadLayerOnCompletion(path):
            details = context.layerToLoadOnCompletionDetails(path)
            copy = QgsProcessingContext.LayerDetails(details.name, details.project, details.outputName)
            copy.layerTypeHint, copy.forceName = details.layerTypeHint, details.forceName
            self._to_load[path] = copy
        return path

    def _register_layers(self, context) -> None:
        """Register the outputs to load on ``context`` too.

        The toolbox dialog runs prepareAlgorithm on its own context and processAlgorithm in a worker thread on a
        temporary one, whose layers *replace* the dialog's when the run ends (QgsProcessingContext.
        takeResultsFrom): registered only in prepareAlgorithm, the results were silently never loaded.
        processing.run/runAndLoadResults use one context throughout, where this changes nothing."""
        for path, details in self._to_load.items():
            if not context.willLoadLayerOnCompletion(path):
                context.addLayerToLoadOnCompletion(path, details)

    def _output_path(self, parameters, name, context) -> str:
        path = self._destination(parameters, name, context)
        if not path.lower().endswith(".gpkg"):
            raise QgsProcessingException(tr("Save the result as a GeoPackage (.gpkg), not {path}").format(path=path))
        return path

    def _connect(self):
        try:
            self._client = self.session.client()
        except BackendError as exc:
            raise QgsProcessingException(str(exc)) from None

    # --- running ------------------------------------------------------------------------------------------
    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (worker thread)
        self._register_layers(context)
        last = {"text": ""}

        def report(index, count, status):
            feedback.setProgress(100.0 * fraction_done(index, count, status))
            text = describe_status(status)
            if text.split(":")[0] != last["text"].split(":")[0] or status.get("state") != "running":
                feedback.pushInfo(text)
            last["text"] = text

        poll_s = self.session.settings.get(Key.POLL_INTERVAL_MS) / 1000.0
        outcome = run_jobs(self._client, self._requests, feedback.isCanceled, report, poll_s)
        if isinstance(outcome, JobFailed):
            raise QgsProcessingException(outcome.message_for("processing"))
        if isinstance(outcome, JobCancelled):
            feedback.reportError(tr("Cancelled; the backend job was cancelled too."), False)
            return {}
        self.statuses = outcome.statuses
        self._succeeded = True
        for text in job_warnings(outcome.statuses):
            getattr(feedback, "pushWarning", feedback.reportError)(text)
        return self.finish(outcome, context, feedback)

    def finish(self, outcome: JobSucceeded, context, feedback) -> dict:
        return dict(self._outputs)

    def postProcessAlgorithm(self, context, feedback):  # noqa: N802 (UI thread)
        """Point the layer QGIS loads at the right GeoPackage layer, with the right style."""
        if not self._succeeded:
            return {}
        layers = context.layersToLoadOnCompletion()
        for name, (sublayer, styler) in self._styles.items():
            path = self._outputs.get(name + "_PATH")
            if not path or path not in layers:
                continue
            details = layers.pop(path)
            uri = f"{path}|layername={sublayer}" if sublayer else path
            new = QgsProcessingContext.LayerDetails(details.name, details.project, details.outputName)
            new.setPostProcessor(styler)
            layers[uri] = new
        context.setLayersToLoadOnCompletion(layers)
        return {k: v for k, v in self._outputs.items() if not k.endswith("_PATH")}


class ClassifyAlgorithm(TilePromptAlgorithm):
    PROMPTS, TEMPLATES, EXTENT, AOI = "PROMPTS", "TEMPLATES", "EXTENT", "AOI"
    MULTI_LABEL, THRESHOLD, TILES, COUNTS = "MULTI_LABEL", "THRESHOLD", "TILES", "CLASS_COUNTS"
    EXAMPLES, CONTEXT, CLASS_MAP = "EXAMPLES", "CONTEXT", "CLASS_MAP"

    def name(self):
        return "classify"

    def displayName(self):  # noqa: N802
        return tr("Classify tiles by prompts")

    def shortHelpString(self):  # noqa: N802
        return tr("Cuts the raster into tiles and gives every tile the class prompt it matches best (or, in "
                  "multi-label mode, every class whose score reaches the threshold). Prompts: one class per line, "
                  "synonyms after |. Needs a running TilePrompt backend (start it from the TilePrompt dock). "
                  "Output: a GeoPackage layer 'tiles' with class, score, runner-up, margin and one score per class; "
                  "optionally a class-map GeoTIFF (one pixel per tile: class index, score and per-class score "
                  "bands, coloured like the layer). Examples (optional) correct the classification with a few tiles: "
                  "a TilePrompt result whose tiles you re-classed (its 'example' or 'class' field), or polygons with "
                  "a 'class' field. Context-aware refines each tile with the layer's own tiles (single label).")

    def initAlgorithm(self, config=None):  # noqa: N802
        self._add_raster_parameters()
        self.addParameter(QgsProcessingParameterString(
            self.PROMPTS, tr("Class prompts (one per line, synonyms after |)"), multiLine=True))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, tr("Area (extent)"), optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.AOI, tr("Area (polygons; use 'Selected features only' for a selection)"),
            [compat.SOURCE_VECTOR_POLYGON], optional=True))
        self.addParameter(QgsProcessingParameterBoolean(self.MULTI_LABEL, tr("Multi-label"), False))
        # 0 and 1 are refused by the backend's own check (exclusive bounds), as from the CLI and HTTP
        self.addParameter(QgsProcessingParameterNumber(
            self.THRESHOLD, tr("Multi-label threshold (between 0 and 1)"), compat.NUMBER_DOUBLE, 0.5, False, 0.0, 1.0))
        self.addParameter(QgsProcessingParameterVectorLayer(
            self.EXAMPLES, tr("Examples: a corrected TilePrompt result, or polygons with a 'class' field"),
            [compat.SOURCE_VECTOR_POLYGON], optional=True))
        self.addParameter(QgsProcessingParameterBoolean(
            self.CONTEXT, tr("Context-aware (refine with the layer's own tiles)"), False))
        templates = QgsProcessingParameterFile(self.TEMPLATES, tr("Templates file (empty: the model's)"),
                                               compat.FILE_BEHAVIOR_FILE, "txt", optional=True)
        templates.setFlags(templates.flags() | compat.PARAM_FLAG_ADVANCED)
        self.addParameter(templates)
        self.addParameter(QgsProcessingParameterVectorDestination(self.OUTPUT, tr("Classified tiles")))
        self.addParameter(QgsProcessingParameterRasterDestination(
            self.CLASS_MAP, tr("Class map (GeoTIFF, one pixel per tile)"), optional=True, createByDefault=False))
        self._add_overwrite_parameter()
        pixel_space = QgsProcessingParameterBoolean(
            self.PIXEL_SPACE, tr("Classify a raster without georeference in pixel coordinates"), False)
        pixel_space.setFlags(pixel_space.flags() | compat.PARAM_FLAG_ADVANCED)
        self.addParameter(pixel_space)
        self.addOutput(QgsProcessingOutputNumber(self.TILES, tr("Number of tiles")))
        self.addOutput(QgsProcessingOutputString(self.COUNTS, tr("Tiles per class (JSON)")))

    def _area(self, parameters, context) -> Area:
        source = self.parameterAsSource(parameters, self.AOI, context)
        if source is not None:
            geometries = [f.geometry() for f in source.getFeatures(QgsFeatureRequest()) if f.hasGeometry()]
            if not geometries:
                raise QgsProcessingException(tr("The area layer has no (selected) features."))
            return Area(AreaMode.SELECTED, QgsGeometry.unaryUnion(geometries).asWkt(9),
                        compat.crs_to_string(source.sourceCrs()))
        if parameters.get(self.EXTENT):
            rect = self.parameterAsExtent(parameters, self.EXTENT, context)
            crs = self.parameterAsExtentCrs(parameters, self.EXTENT, context)
            if not rect.isNull() and not rect.isEmpty():
                e = Extent(rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum(),
                           compat.crs_to_string(crs))
                return Area(AreaMode.DRAWN, e.to_wkt(), e.crs)
        return Area()

    def prepareAlgorithm(self, parameters, context, feedback):  # noqa: N802 (UI thread)
        try:
            classes = parse_prompts(self.parameterAsString(parameters, self.PROMPTS, context))
        except PromptError as exc:
            raise QgsProcessingException(tr("Prompts: {error}").format(error=exc)) from None
        self.class_order = [c.name for c in classes]
        examples = self._examples(parameters, context)
        area = self._area(parameters, context)
        export_extent = None
        if area.wkt:
            rect = QgsGeometry.fromWkt(area.wkt).boundingBox()
            export_extent = Extent(rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum(), area.crs)
        raster = self._raster_input(parameters, context, export_extent)
        tile, overlap = self._tiles(parameters, context)
        self.params = ClassifyParameters(
            raster=raster, prompts=prompts_to_request(classes), model=self._model(parameters, context),
            templates=self.parameterAsFile(parameters, self.TEMPLATES, context) or None, area=area, tile_px=tile,
            overlap_px=overlap, multi_label=self.parameterAsBoolean(parameters, self.MULTI_LABEL, context),
            threshold=self.parameterAsDouble(parameters, self.THRESHOLD, context),
            overwrite=self.parameterAsBoolean(parameters, self.OVERWRITE, context),
            pixel_space=self.parameterAsBoolean(parameters, self.PIXEL_SPACE, context),
            context=self.parameterAsBoolean(parameters, self.CONTEXT, context), examples=examples)
        out = self._output_path(parameters, self.OUTPUT, context)
        class_map = self._destination(parameters, self.CLASS_MAP, context) or None
        model_tile = self.session.model_info(self.params.model).get("tile_px")
        self._connect()
        try:
            self._requests = [self.params.classify_request(out, model_tile, class_map)]
        except ValueError as exc:
            raise QgsProcessingException(str(exc)) from None
        self._outputs = {self.OUTPUT: f"{out}|layername={TILES_LAYER}", self.OUTPUT + "_PATH": out}
        self._styles = {self.OUTPUT: (TILES_LAYER, _styler(style_categorized, self.class_order))}
        if class_map:
            self._outputs[self.CLASS_MAP] = self._outputs[self.CLASS_MAP + "_PATH"] = class_map
            self._styles[self.CLASS_MAP] = (None, _styler(style_class_map))
        return True

    def _examples(self, parameters, context) -> str | None:
        """The examples layer's file (the backend reads files); a layer without one is refused."""
        layer = self.parameterAsVectorLayer(parameters, self.EXAMPLES, context)
        if layer is None:
            return None
        path = layer.source().split("|", 1)[0]
        if layer.providerType() != "ogr" or not path:
            raise QgsProcessingException(tr("Save the examples layer {layer} to a file (GeoPackage) first.").format(
                layer=layer.name()))
        if layer.isEditable() and layer.isModified():
            raise QgsProcessingException(tr("Save the edits of the examples layer {layer} first.").format(
                layer=layer.name()))
        self.class_order += [c for c in run_classes(read_run(path)) if c not in self.class_order]
        return path

    def finish(self, outcome, context, feedback):
        from qgis.core import QgsVectorLayer

        out = self._outputs[self.OUTPUT + "_PATH"]
        layer = QgsVectorLayer(f"{out}|layername={TILES_LAYER}", "tiles", "ogr")
        counts = class_counts(layer) if layer.isValid() else {}
        self._outputs[self.TILES] = sum(counts.values())
        self._outputs[self.COUNTS] = json.dumps(dict(counts), sort_keys=True)
        feedback.pushInfo(tr("{n} tiles: {counts}").format(n=sum(counts.values()), counts=dict(counts)))
        result = outcome.status.get("result") or {}
        if result.get("correction"):
            feedback.pushInfo(tr("Corrected with {n} examples: {per_class}").format(
                n=result["correction"].get("examples"), per_class=result["correction"].get("per_class")))
        if result.get("transductive"):
            feedback.pushInfo(tr("Context-aware: {n} tiles changed class, {s:.2f} s.").format(
                n=result["transductive"].get("changed"), s=result["transductive"].get("seconds", 0.0)))
        return {k: v for k, v in self._outputs.items() if not k.endswith("_PATH")}


class _SearchBase(TilePromptAlgorithm):
    K, INDEX, HEATMAP = "K", "INDEX", "HEATMAP"

    def _add_search_outputs(self):
        self.addParameter(QgsProcessingParameterNumber(self.K, tr("Number of tiles to return (top K)"),
                                                       compat.NUMBER_INTEGER, 20, False, 1, 10000))
        index = QgsProcessingParameterFile(self.INDEX, tr("Index folder (empty: the backend's cache; embeddings "
                                                          "are computed once and re-used)"), compat.FILE_BEHAVIOR_FOLDER,
                                           optional=True)
        index.setFlags(index.flags() | compat.PARAM_FLAG_ADVANCED)
        self.addParameter(index)
        self.addParameter(QgsProcessingParameterVectorDestination(self.OUTPUT, tr("Similar tiles")))
        self.addParameter(QgsProcessingParameterRasterDestination(
            self.HEATMAP, tr("Similarity heat map"), optional=True, createByDefault=False))
        self._add_overwrite_parameter()

    def _prepare_search(self, parameters, context, query: Query, cross: CrossModal | None = None):
        raster = self._raster_input(parameters, context)
        tile, overlap = self._tiles(parameters, context)
        fuse = Fuse.MEAN
        if self.parameterDefinition("FUSE") is not None:
            fuse = FUSES[self.parameterAsEnum(parameters, "FUSE", context)]
        self.params = SearchParameters(raster=raster, query=query, model=self._model(parameters, context),
                                       tile_px=tile, overlap_px=overlap,
                                       k=self.parameterAsInt(parameters, self.K, context), fuse=fuse,
                                       overwrite=self.parameterAsBoolean(parameters, self.OVERWRITE, context),
                                       cross=cross)
        out = self._output_path(parameters, self.OUTPUT, context)
        heatmap = self._destination(parameters, self.HEATMAP, context) or None
        index_dir = self.parameterAsFile(parameters, self.INDEX, context) or None
        self._connect()
        try:
            self.plan = plan_search(self.params, self.session, out, heatmap, index_dir)
        except ValueError as exc:
            raise QgsProcessingException(str(exc)) from None
        self._requests = self.plan.requests
        self._outputs = {self.OUTPUT: f"{out}|layername={SIMILAR_LAYER}", self.OUTPUT + "_PATH": out}
        self._styles = {self.OUTPUT: (SIMILAR_LAYER, _styler(style_graduated))}
        if heatmap:
            self._outputs[self.HEATMAP] = heatmap
            self._outputs[self.HEATMAP + "_PATH"] = heatmap
            self._styles[self.HEATMAP] = (None, _styler(style_pseudocolor))
        return True

    def finish(self, outcome, context, feedback):
        result = outcome.status.get("result") or {}
        feedback.pushInfo(tr("{n} tiles found.").format(n=result.get("hits", "?")))
        return {k: v for k, v in self._outputs.items() if not k.endswith("_PATH")}


class FindSimilarAlgorithm(_SearchBase):
    QUERY, FUSE, QUERY_RASTER, QUERY_MODEL = "QUERY", "FUSE", "QUERY_RASTER", "QUERY_MODEL"

    def name(self):
        return "findsimilar"

    def displayName(self):  # noqa: N802
        return tr("Find similar tiles")

    def shortHelpString(self):  # noqa: N802
        return tr("Finds the K tiles of the raster that look most like the query polygons (for example a drawn "
                  "rectangle, or the selected features of a layer). Builds the embedding index of the raster first "
                  "when there is none yet. Output: layer 'similar' (rank, similarity) and an optional heat map.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self._add_raster_parameters()
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.QUERY, tr("Query polygons (tiles like these)"), [compat.SOURCE_VECTOR_POLYGON]))
        self.addParameter(QgsProcessingParameterEnum(
            self.FUSE, tr("Several query tiles"), [tr("mean of the query tiles"), tr("best match of any query tile")],
            defaultValue=0))
        for parameter in (
                QgsProcessingParameterRasterLayer(self.QUERY_RASTER, tr("Cross-modal: the query polygons lie on this "
                                                                        "layer (e.g. an RGB orthophoto)"),
                                                  optional=True),
                QgsProcessingParameterString(self.QUERY_MODEL, tr("Cross-modal: model of that layer (same embedding "
                                                                  "space as the model above)"), optional=True)):
            parameter.setFlags(parameter.flags() | compat.PARAM_FLAG_ADVANCED)
            self.addParameter(parameter)
        self._add_search_outputs()

    def _cross_modal(self, parameters, context) -> CrossModal | None:
        layer = self.parameterAsRasterLayer(parameters, self.QUERY_RASTER, context)
        model = self.parameterAsString(parameters, self.QUERY_MODEL, context).strip()
        if layer is None:
            if model:
                raise QgsProcessingException(tr("A query model needs the layer the query polygons lie on."))
            return None
        if not model:
            raise QgsProcessingException(tr("Name the model of the query layer (one of the same embedding space)."))
        try:
            raster = raster_input_from_layer(layer)
            gsd = self.session.model_info(model).get("gsd_m")
            return CrossModal(prepare_raster(raster, gsd, self.session.settings.cache_dir() / "exports", layer), model)
        except ValueError as exc:
            raise QgsProcessingException(str(exc)) from None

    def prepareAlgorithm(self, parameters, context, feedback):  # noqa: N802
        source = self.parameterAsSource(parameters, self.QUERY, context)
        if source is None:
            raise QgsProcessingException(tr("Give query polygons."))
        wkts = tuple(f.geometry().asWkt(9) for f in source.getFeatures() if f.hasGeometry())
        if not wkts:
            raise QgsProcessingException(tr("The query layer has no (selected) features."))
        query = Query(wkts, compat.crs_to_string(source.sourceCrs()))
        return self._prepare_search(parameters, context, query, self._cross_modal(parameters, context))


class TextSearchAlgorithm(_SearchBase):
    TEXT = "TEXT"

    def name(self):
        return "textsearch"

    def displayName(self):  # noqa: N802
        return tr("Text search")

    def shortHelpString(self):  # noqa: N802
        return tr("Finds the K tiles of the raster that best match a description ('a solar farm', 'flooded fields'). "
                  "Builds the embedding index first when there is none yet. Output: layer 'similar' (rank, "
                  "similarity) and an optional heat map.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self._add_raster_parameters()
        self.addParameter(QgsProcessingParameterString(self.TEXT, tr("Description")))
        self._add_search_outputs()

    def prepareAlgorithm(self, parameters, context, feedback):  # noqa: N802
        text = self.parameterAsString(parameters, self.TEXT, context).strip()
        if not text:
            raise QgsProcessingException(tr("Type a description to search for."))
        return self._prepare_search(parameters, context, Query(text=text))


class BuildIndexAlgorithm(TilePromptAlgorithm):
    INDEX = "INDEX"

    def name(self):
        return "buildindex"

    def displayName(self):  # noqa: N802
        return tr("Build embedding index")

    def shortHelpString(self):  # noqa: N802
        return tr("Embeds every tile of the raster once and stores the embeddings in an index folder, so later "
                  "similar-tile and text searches are instant. Empty folder: the backend's cache, keyed by model, tile "
                  "size and stride (what the dock, classification and the search algorithms re-use).")

    def initAlgorithm(self, config=None):  # noqa: N802
        self._add_raster_parameters()
        self.addParameter(QgsProcessingParameterFile(
            self.INDEX, tr("Index folder (empty: the backend's cache)"), compat.FILE_BEHAVIOR_FOLDER,
            optional=True))
        self.addOutput(QgsProcessingOutputFolder(self.INDEX, tr("Index folder")))

    def prepareAlgorithm(self, parameters, context, feedback):  # noqa: N802
        raster = self._raster_input(parameters, context)
        tile, overlap = self._tiles(parameters, context)
        params = SearchParameters(raster=raster, query=Query(), model=self._model(parameters, context),
                                  tile_px=tile, overlap_px=overlap)
        model_tile = self.session.model_info(params.model).get("tile_px")
        index_dir = self.parameterAsFile(parameters, self.INDEX, context) or None
        self._connect()
        try:
            self._requests = [params.index_request(index_dir, model_tile)]
        except ValueError as exc:
            raise QgsProcessingException(str(exc)) from None
        self._outputs = {}
        return True

    def finish(self, outcome, context, feedback):
        result = outcome.status.get("result") or {}
        feedback.pushInfo(tr("Index {index}: {tiles} tiles ({computed} computed, {reused} re-used).").format(
            index=result.get("index"), tiles=result.get("tiles"), computed=result.get("computed"),
            reused=result.get("reused")))
        self._outputs = {self.INDEX: result.get("index", "")}
        return dict(self._outputs)


class ChangeAlgorithm(TilePromptAlgorithm):
    BEFORE, AFTER, PROMPTS, BECAME, HEATMAP, PAIRS = "BEFORE", "AFTER", "PROMPTS", "BECAME", "HEATMAP", "PAIRS"

    def name(self):
        return "change"

    def displayName(self):  # noqa: N802
        return tr("What changed between two dates")

    def shortHelpString(self):  # noqa: N802
        return tr("Indexes two rasters of the same place (once), pairs their tiles by footprint (other CRS or offset "
                  "grids are matched by overlap) and ranks the after raster's tiles by embedding change (1 - cosine), "
                  "or by the increase of a class ('became': e.g. flooded field). Classes (optional) give each tile its "
                  "class before and after. Output: layer 'change' (rank, score, change, became, class before/after) "
                  "and an optional heat map.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.BEFORE, tr("Before (earlier date)")))
        self.addParameter(QgsProcessingParameterRasterLayer(self.AFTER, tr("After (later date)")))
        self._add_model_parameters()
        self.addParameter(QgsProcessingParameterString(
            self.PROMPTS, tr("Classes for class before/after (optional, one per line)"), multiLine=True,
            optional=True))
        self.addParameter(QgsProcessingParameterString(
            self.BECAME, tr("Rank by what became this class (optional)"), optional=True))
        self.addParameter(QgsProcessingParameterVectorDestination(self.OUTPUT, tr("Change")))
        self.addParameter(QgsProcessingParameterRasterDestination(
            self.HEATMAP, tr("Change heat map"), optional=True, createByDefault=False))
        self._add_overwrite_parameter()
        self.addOutput(QgsProcessingOutputNumber(self.PAIRS, tr("Number of tiles ranked")))

    def prepareAlgorithm(self, parameters, context, feedback):  # noqa: N802 (UI thread)
        layers = [self.parameterAsRasterLayer(parameters, name, context) for name in (self.BEFORE, self.AFTER)]
        if any(layer is None for layer in layers):
            raise QgsProcessingException(tr("Choose the raster layers of both dates."))
        tile, overlap = self._tiles(parameters, context)
        prompts = self.parameterAsString(parameters, self.PROMPTS, context).strip()
        became = self.parameterAsString(parameters, self.BECAME, context).strip()
        try:
            prompt_text = prompts_to_request(parse_prompts(prompts)) if prompts else None
            became_classes = parse_prompts(became) if became else []
        except PromptError as exc:
            raise QgsProcessingException(tr("Classes: {error}").format(error=exc)) from None
        if len(became_classes) > 1:
            raise QgsProcessingException(tr("'Became' names one class."))
        model = self._model(parameters, context)
        gsd = self.session.model_info(model).get("gsd_m")
        try:
            before, after = (prepare_raster(raster_input_from_layer(layer), gsd,
                                            self.session.settings.cache_dir() / "exports", layer) for layer in layers)
        except ValueError as exc:
            raise QgsProcessingException(str(exc)) from None
        params = ChangeParameters(before=before, after=after, model=model, tile_px=tile, overlap_px=overlap,
                                  prompts=prompt_text, became=became_classes[0].line() if became_classes else None,
                                  overwrite=self.parameterAsBoolean(parameters, self.OVERWRITE, context))
        out = self._output_path(parameters, self.OUTPUT, context)
        heatmap = self._destination(parameters, self.HEATMAP, context) or None
        self._connect()
        try:
            self._requests = [params.change_request(out, heatmap, self.session.model_info(model).get("tile_px"))]
        except ValueError as exc:
            raise QgsProcessingException(str(exc)) from None
        self._outputs = {self.OUTPUT: f"{out}|layername={CHANGE_LAYER}", self.OUTPUT + "_PATH": out}
        self._styles = {self.OUTPUT: (CHANGE_LAYER, _styler(style_graduated, "score"))}
        if heatmap:
            self._outputs[self.HEATMAP] = heatmap
            self._outputs[self.HEATMAP + "_PATH"] = heatmap
            self._styles[self.HEATMAP] = (None, _styler(style_pseudocolor))
        return True

    def finish(self, outcome, context, feedback):
        result = outcome.status.get("result") or {}
        self._outputs[self.PAIRS] = int(result.get("pairs") or 0)
        feedback.pushInfo(tr("{n} tiles ranked ({unpaired} without the other date under them).").format(
            n=result.get("pairs", "?"), unpaired=result.get("unpaired", 0)))
        return {k: v for k, v in self._outputs.items() if not k.endswith("_PATH")}


ALGORITHMS = (ClassifyAlgorithm, BuildIndexAlgorithm, FindSimilarAlgorithm, TextSearchAlgorithm, ChangeAlgorithm)
