"""The TilePrompt dock: backend panel, model and layer pickers; Classify, Similar tiles, Correct, Change tabs.

The dock only turns its widgets into typed parameter objects (parameters.py) and shows what the plugin tells
it; it starts no job, process or network call itself. Signals out: ``classifyRequested(ClassifyParameters)``,
``searchRequested(SearchParameters)``, ``correctRequested(CorrectParameters)`` (the Correct tab,
correct_panel.py), ``changeRequested(ChangeParameters)`` (the Change tab, change_panel.py), ``cancelRequested``,
``drawRequested(purpose, shape)``, ``clearSketchRequested(purpose)`` and the backend buttons. Building parameters
raises :class:`ParameterError` with a message for the user.

Layout: everything but the run panel scrolls; the run panel (progress bar, Cancel, status line) stays at the
bottom of the dock, visible whatever the dock's height. Combo boxes do not widen the dock to their longest item
and long form rows wrap, so the content needs about 380 px (``preferred_width``), the width the plugin opens the
dock at.
"""

from __future__ import annotations

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsGeometry,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.gui import QgsCollapsibleGroupBox, QgsDockWidget, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QInputDialog,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from . import compat
from .bands import band_map_dates, validate_band_map
from .change_panel import ChangePanel
from .correct_panel import CorrectPanel
from .forms import narrow, wrapping_form
from .i18n import tr
from .install_panel import InstallPanel
from .parameters import (
    Area,
    AreaMode,
    ClassifyParameters,
    CrossModal,
    Extent,
    Fuse,
    InputKind,
    Query,
    RasterInput,
    SearchParameters,
    parse_offset,
)
from .prompts import (
    PromptError,
    bundled_prompt_sets,
    parse_prompts,
    project_prompt_sets,
    prompts_to_request,
    template_files,
)
from .results import class_color
from .settings import Key, ProjectState, Settings
from .sources import LayerSource, inspect_layer

MAX_K = 10_000
AUTO_MODEL = ""  # the model combo's data for "Automatic (best model for the layer)"
OFFSET_CHOICES = (("auto", "detect from the product's metadata XML or _Nxxxx_ name (baseline 04.00 and later: "
                           "1000 DN)"),
                  ("none", "subtract nothing"),
                  ("1000", "subtract 1000 DN from every band (products of baseline 04.00 and later, 2022 on)"))
LIGHT_COLORS = {"down": "#9e9e9e", "starting": "#f0ad00", "up": "#2e9d3a", "error": "#d9302c"}


class ParameterError(ValueError):
    """The dock's state cannot make a run; the message tells the user what to change."""


def model_summary(model: dict) -> str:
    """One line about a model: modality, bands, GSD, tile, and a warning for untrained weights."""
    bands = model.get("bands") or []
    if len(bands) > 4:
        band_text = tr("{n} bands ({first}..{last})").format(n=len(bands), first=bands[0], last=bands[-1])
    else:
        band_text = ", ".join(bands) or tr("no bands listed")
    text = tr("{modality} · {bands} · {gsd:g} m/px · tile {tile} px").format(
        modality=str(model.get("modality", "?")).upper(), bands=band_text, gsd=float(model.get("gsd_m") or 0),
        tile=model.get("tile_px", "?"))
    if not model.get("trained", True):
        text += " · " + tr("⚠ untrained (random weights): results are meaningless")
    return text


def weights_summary(model: dict) -> str:
    """'weights: about 605 MB to download · licence: CC-BY-4.0' (downloaded models say so)."""
    text = tr("weights: {state}").format(state=model.get("weights") or tr("downloaded"))
    if model.get("license"):
        text += " · " + tr("licence: {licence}").format(licence=model["license"])
    return text


def needs_download(model: dict) -> bool:
    """A listed model whose weights are not on the backend's machine (it must not run until downloaded)."""
    return bool(model) and model.get("downloaded", True) is False


def editor_text(text: str) -> str:
    """A prompt set file without its header comments (title and description), as the editor shows it."""
    lines = text.splitlines()
    while lines and (lines[0].lstrip().startswith("#") or not lines[0].strip()):
        lines.pop(0)
    return "\n".join(lines)


def geometry_wkt(geometry: QgsGeometry) -> str:
    return geometry.asWkt(9)


class TilePromptDock(QgsDockWidget):
    classifyRequested = pyqtSignal(object)  # noqa: N815
    searchRequested = pyqtSignal(object)  # noqa: N815
    correctRequested = pyqtSignal(object)  # noqa: N815
    changeRequested = pyqtSignal(object)  # noqa: N815
    cancelRequested = pyqtSignal()  # noqa: N815
    drawRequested = pyqtSignal(str, str)  # noqa: N815  purpose ("area"/"query"), shape ("rectangle"/"polygon")
    startBackendRequested = pyqtSignal()  # noqa: N815
    stopBackendRequested = pyqtSignal()  # noqa: N815
    attachRequested = pyqtSignal()  # noqa: N815
    diagnosticsRequested = pyqtSignal()  # noqa: N815
    refreshModelsRequested = pyqtSignal()  # noqa: N815
    downloadRequested = pyqtSignal(str)  # noqa: N815  model id whose weights to download
    autoModelRequested = pyqtSignal(object)  # noqa: N815  raster request fields (dict) to choose a model for
    settingsRequested = pyqtSignal()  # noqa: N815
    helpRequested = pyqtSignal()  # noqa: N815
    clearSketchRequested = pyqtSignal(str)  # noqa: N815  purpose ("area"/"query")

    def __init__(self, iface, parent=None):
        super().__init__(tr("TilePrompt"), parent)
        self.setObjectName("TilePromptDock")
        self.iface = iface
        self.settings = Settings()
        self.models: dict[str, dict] = {}
        self.layer_source: LayerSource | None = None
        self.drawn_area: tuple[str, str] | None = None  # (wkt, crs)
        self.query: Query | None = None
        self._result_rows: list = []  # (layer id, feature id) per row of the results table
        self._busy = False
        self.auto_choice: dict | None = None  # {"model", "reason"} the backend picked for the layer (automatic)
        self.auto_error: str = ""
        self._auto_fields: dict | None = None  # the raster the pending automatic choice is for

        container = QWidget(self)
        outer = QVBoxLayout(container)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(2)
        self.scroll = QScrollArea(container)
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        body = QWidget(self.scroll)
        self.body = body
        layout = QVBoxLayout(body)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self._backend_panel())
        layout.addWidget(self._input_panel())
        self.tabs = QTabWidget(body)
        self.tabs.addTab(self._classify_tab(), tr("Classify"))
        self.tabs.addTab(self._search_tab(), tr("Similar tiles"))
        self.correct_panel = CorrectPanel(self)
        self.correct_panel.correctRequested.connect(self.correctRequested)
        self.correct_panel.error.connect(self.show_error)
        self.correct_panel.message.connect(self.set_status)
        self.tabs.addTab(self.correct_panel, tr("Correct"))
        self.change_panel = ChangePanel(self)
        self.change_panel.changeRequested.connect(self.request_change)
        self.tabs.addTab(self.change_panel, tr("Change"))
        layout.addWidget(self.tabs)
        layout.addStretch(1)
        self.scroll.setWidget(body)
        outer.addWidget(self.scroll, 1)
        outer.addWidget(self._run_panel(container))
        self.setWidget(container)

        self.reload_prompt_sets()
        self._on_layer_changed(self.layer_combo.currentLayer())
        self._on_area_mode_changed()
        self._on_label_mode_changed()
        self._on_overlap_changed()
        self.clear_query_button.setEnabled(False)
        self.set_backend_state("down", tr("Not connected"), False)

    # ----------------------------------------------------------------------------------------------- building
    def _backend_panel(self) -> QWidget:
        box = QgsCollapsibleGroupBox(tr("Backend"), self)
        grid = QGridLayout(box)
        self.light = QLabel(box)
        self.light.setFixedSize(14, 14)
        self.backend_label = QLabel(box)
        self.backend_label.setWordWrap(True)
        self.backend_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        grid.addWidget(self.light, 0, 0)
        grid.addWidget(self.backend_label, 0, 1, 1, 3)
        self.start_button = QPushButton(tr("Start"), box)
        self.start_button.setToolTip(tr("Start the backend installed for TilePrompt"))
        self.stop_button = QPushButton(tr("Stop"), box)
        self.stop_button.setToolTip(tr("Stop the backend this QGIS started"))
        self.attach_button = QPushButton(tr("Attach"), box)
        self.attach_button.setToolTip(tr("Connect to a backend already running (its state file)"))
        self.settings_button = QPushButton(tr("Settings…"), box)
        self.settings_button.setToolTip(tr("Backend installation, environment, port and package sources"))
        self.diagnostics_button = QPushButton(tr("Diagnostics"), box)
        self.diagnostics_button.setToolTip(tr("Copy plugin, QGIS, backend, device and installer details and the "
                                              "log tails to the clipboard"))
        self.help_button = QPushButton(tr("Help"), box)
        self.help_button.setToolTip(tr("Open the TilePrompt documentation"))
        for index, button in enumerate((self.start_button, self.stop_button, self.attach_button,
                                        self.settings_button, self.diagnostics_button, self.help_button)):
            grid.addWidget(button, 1 + index // 3, 1 + index % 3 if index % 3 else 0, 1, 2 if index % 3 == 0 else 1)
        self.start_button.clicked.connect(self.startBackendRequested)
        self.stop_button.clicked.connect(self.stopBackendRequested)
        self.attach_button.clicked.connect(self.attachRequested)
        self.settings_button.clicked.connect(self.settingsRequested)
        self.diagnostics_button.clicked.connect(self.diagnosticsRequested)
        self.help_button.clicked.connect(self.helpRequested)
        self.install_panel = InstallPanel(box)
        grid.addWidget(self.install_panel, 3, 0, 1, 4)
        return box

    def _input_panel(self) -> QWidget:
        box = QgsCollapsibleGroupBox(tr("Model and layer"), self)
        form = wrapping_form(box)
        model_row = QHBoxLayout()
        self.model_combo = narrow(QComboBox(box))
        self.model_combo.currentIndexChanged.connect(self._on_model_changed)
        self.model_combo.activated.connect(self._remember_model)
        self.refresh_models_button = QToolButton(box)
        self.refresh_models_button.setText("⟳")
        self.refresh_models_button.setToolTip(tr("Reload the model list from the backend"))
        self.refresh_models_button.clicked.connect(self.refreshModelsRequested)
        self.download_button = QPushButton(tr("Download"), box)
        self.download_button.setObjectName("tilepromptDownloadButton")
        self.download_button.setToolTip(tr("Download this model's weights on the backend (progress and Cancel "
                                           "below; an interrupted download continues where it stopped)"))
        self.download_button.clicked.connect(self._request_download)
        self.download_button.setVisible(False)
        model_row.addWidget(self.model_combo)
        model_row.addWidget(self.download_button)
        model_row.addWidget(self.refresh_models_button)
        form.addRow(tr("Model"), model_row)
        self.model_label = QLabel(box)
        self.model_label.setWordWrap(True)
        form.addRow("", self.model_label)

        self.layer_combo = narrow(QgsMapLayerComboBox(box))
        self.layer_combo.setFilters(compat.RASTER_LAYER_FILTER)
        self.layer_combo.layerChanged.connect(self._on_layer_changed)
        form.addRow(tr("Raster layer"), self.layer_combo)
        self.input_label = QLabel(box)
        self.input_label.setWordWrap(True)
        form.addRow("", self.input_label)
        self.product_check = QCheckBox(tr("Read the whole product folder"), box)
        self.product_check.setToolTip(tr("The layer is one band file of a multi-file product: send the product "
                                         "folder, so that every band the model needs is read"))
        self.product_check.setChecked(True)
        self.product_check.toggled.connect(self._fill_band_table)
        self.product_check.toggled.connect(lambda _checked: self._raster_changed())
        form.addRow("", self.product_check)
        self.band_table = QTableWidget(0, 2, box)
        self.band_table.setHorizontalHeaderLabels([tr("Band"), tr("Holds (B01..B12, B8A, R/G/B; - skips it)")])
        self.band_table.setToolTip(tr("Name the Sentinel-2 band each band of the file holds; type - for a band to "
                                      "ignore. A stack of several dates names its bands once per date "
                                      "(B04, B03, B02, B08, B04, B03, B02, B08): then choose the date below."))
        self.band_table.verticalHeader().setVisible(False)
        self.band_table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.band_table.setMaximumHeight(96)
        self.band_table.verticalHeader().setDefaultSectionSize(22)
        self.band_label = QLabel(tr("Bands"), box)
        form.addRow(self.band_label, self.band_table)
        self.date_spin = QSpinBox(box)
        self.date_spin.setRange(0, 64)
        self.date_spin.setSpecialValueText(tr("one date"))
        self.date_spin.setToolTip(tr("Which date of a multi-date band map to read (the band names repeat per date)"))
        self.date_label = QLabel(tr("Date"), box)
        form.addRow(self.date_label, self.date_spin)
        self.band_table.itemChanged.connect(self._show_date)
        self.level_combo = narrow(QComboBox(box))
        self.level_combo.addItem(tr("detect"), None)
        self.level_combo.addItem("L1C", "L1C")
        self.level_combo.addItem("L2A", "L2A")
        self.level_combo.currentIndexChanged.connect(lambda _index: self._raster_changed())
        form.addRow(tr("S2 level"), self.level_combo)
        self.offset_combo = QComboBox(box)
        self.offset_combo.setEditable(True)  # another number of DN may be typed
        for value, tip in OFFSET_CHOICES:
            self.offset_combo.addItem(value)
            self.offset_combo.setItemData(self.offset_combo.count() - 1, tip, Qt.ItemDataRole.ToolTipRole)
        self.offset_combo.setToolTip(tr("Processing-baseline offset to remove from Sentinel-2 DN: auto, none, or "
                                        "a number of DN"))
        self.offset_combo.currentTextChanged.connect(lambda _text: self._raster_changed())
        form.addRow(tr("S2 offset"), self.offset_combo)
        return box

    def _classify_tab(self) -> QWidget:
        tab = QWidget(self)
        form = wrapping_form(tab)
        sets_row = QHBoxLayout()
        self.prompt_set_combo = narrow(QComboBox(tab))
        self.prompt_set_combo.activated.connect(self._on_prompt_set_chosen)
        self.save_set_button = QToolButton(tab)
        self.save_set_button.setText(tr("Save…"))
        self.save_set_button.setToolTip(tr("Save these prompts as a set in this project"))
        self.save_set_button.clicked.connect(self._ask_save_prompt_set)
        self.delete_set_button = QToolButton(tab)
        self.delete_set_button.setText(tr("Delete"))
        self.delete_set_button.setToolTip(tr("Delete the chosen project prompt set"))
        self.delete_set_button.clicked.connect(self._delete_prompt_set)
        sets_row.addWidget(self.prompt_set_combo, 1)
        sets_row.addWidget(self.save_set_button)
        sets_row.addWidget(self.delete_set_button)
        form.addRow(tr("Prompt set"), sets_row)
        self.prompt_edit = QPlainTextEdit(tab)
        self.prompt_edit.setPlaceholderText(tr("one class per line, synonyms after |\nforest | woodland\nwater\n"
                                               "farmland | fields"))
        self.prompt_edit.setMinimumHeight(90)
        self.prompt_edit.setMaximumHeight(140)
        form.addRow(tr("Classes"), self.prompt_edit)
        self.template_combo = narrow(QComboBox(tab))
        self.template_combo.addItem(tr("model default"), None)
        for path in template_files():
            self.template_combo.addItem(path.stem, str(path))
        form.addRow(tr("Templates"), self.template_combo)

        area_row = QHBoxLayout()
        self.area_combo = narrow(QComboBox(tab))
        for mode, label in ((AreaMode.WHOLE_LAYER, tr("whole layer")), (AreaMode.MAP_EXTENT, tr("current map extent")),
                            (AreaMode.DRAWN, tr("drawn rectangle")), (AreaMode.SELECTED, tr("selected features"))):
            self.area_combo.addItem(label, mode.value)
        self.area_combo.currentIndexChanged.connect(self._on_area_mode_changed)
        self.draw_area_button = QToolButton(tab)
        self.draw_area_button.setText(tr("Draw"))
        self.draw_area_button.setToolTip(tr("Drag a rectangle on the map"))
        self.draw_area_button.clicked.connect(lambda: self.drawRequested.emit("area", "rectangle"))
        self.clear_area_button = QToolButton(tab)
        self.clear_area_button.setText(tr("Clear"))
        self.clear_area_button.setToolTip(tr("Remove the drawn rectangle from the map"))
        self.clear_area_button.clicked.connect(self.clear_drawn_area)
        self.area_layer_combo = narrow(QgsMapLayerComboBox(tab))
        self.area_layer_combo.setFilters(compat.POLYGON_LAYER_FILTER)
        self.area_layer_combo.setAllowEmptyLayer(True)
        self.area_layer_combo.setToolTip(tr("The polygon layer whose selected features are the area"))
        area_row.addWidget(self.area_combo, 1)
        area_row.addWidget(self.draw_area_button)
        area_row.addWidget(self.clear_area_button)
        area_row.addWidget(self.area_layer_combo, 1)
        area_box = QVBoxLayout()
        area_box.addLayout(area_row)
        self.area_label = QLabel(tab)
        self.area_label.setWordWrap(True)
        area_box.addWidget(self.area_label)
        form.addRow(tr("Area"), area_box)

        tiles_row = QHBoxLayout()
        self.tile_spin = QSpinBox(tab)
        self.tile_spin.setRange(0, 4096)
        self.tile_spin.setSpecialValueText(tr("model's"))
        self.tile_spin.setSuffix(" px")
        self.overlap_spin = QSpinBox(tab)
        self.overlap_spin.setRange(0, 4095)
        self.overlap_spin.setSuffix(" px")
        self.overlap_spin.valueChanged.connect(self._on_overlap_changed)
        tiles_row.addWidget(QLabel(tr("size"), tab))
        tiles_row.addWidget(self.tile_spin, 1)
        tiles_row.addWidget(QLabel(tr("overlap"), tab))
        tiles_row.addWidget(self.overlap_spin, 1)
        form.addRow(tr("Tiles"), tiles_row)
        self.cells_check = QCheckBox(tr("draw each tile's centre cell"), tab)
        self.cells_check.setChecked(True)
        self.cells_check.setToolTip(tr("Overlapping tiles cover each other on the map. Drawn as centre cells "
                                       "(stride x stride, one per tile) they tile the area without overlap; the "
                                       "features keep the whole tile."))
        form.addRow("", self.cells_check)

        mode_row = QHBoxLayout()
        self.label_mode_combo = narrow(QComboBox(tab))
        self.label_mode_combo.addItem(tr("single label (best class)"), False)
        self.label_mode_combo.addItem(tr("multi-label (every class above threshold)"), True)
        self.label_mode_combo.currentIndexChanged.connect(self._on_label_mode_changed)
        self.threshold_spin = QDoubleSpinBox(tab)
        self.threshold_spin.setRange(0.01, 0.99)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setValue(0.5)
        mode_row.addWidget(self.label_mode_combo, 1)
        mode_row.addWidget(self.threshold_spin)
        form.addRow(tr("Labels"), mode_row)
        self.context_check = QCheckBox(tr("context-aware (uses the layer's tiles)"), tab)
        self.context_check.setToolTip(tr("Transductive zero-shot: similar neighbouring tiles and the layer's class "
                                         "structure refine each tile's probabilities (single label; slower, the "
                                         "cost is reported)"))
        form.addRow("", self.context_check)
        self.output_widget = QgsFileWidget(tab)
        self.output_widget.setStorageMode(QgsFileWidget.StorageMode.SaveFile)
        self.output_widget.setFilter(tr("GeoPackage (*.gpkg)"))
        self.output_widget.lineEdit().setPlaceholderText(tr("[new file in the cache folder]"))
        form.addRow(tr("Save to"), self.output_widget)
        self.class_map_check = QCheckBox(tr("also a class-map GeoTIFF"), tab)
        self.class_map_check.setToolTip(tr("One pixel per tile: class index and scores, with the layer's colours "
                                           "(for raster analysis); written beside the GeoPackage"))
        form.addRow("", self.class_map_check)
        self.run_button = QPushButton(tr("Classify tiles"), tab)
        self.run_button.setObjectName("tilepromptRunButton")
        self.run_button.clicked.connect(self.request_classify)
        form.addRow(self.run_button)
        self.summary_table = QTableWidget(0, 3, tab)
        self.summary_table.setHorizontalHeaderLabels([tr("Class"), tr("Tiles"), "%"])
        self.summary_table.verticalHeader().setVisible(False)
        self.summary_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.summary_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.summary_table.setMinimumHeight(120)
        form.addRow(self.summary_table)
        return tab

    def _search_tab(self) -> QWidget:
        tab = QWidget(self)
        form = wrapping_form(tab)
        query_row = QHBoxLayout()
        self.draw_rect_button = QPushButton(tr("Rectangle"), tab)
        self.draw_rect_button.setToolTip(tr("Drag a rectangle on the map, then find tiles like it"))
        self.draw_rect_button.clicked.connect(lambda: self.drawRequested.emit("query", "rectangle"))
        self.draw_polygon_button = QPushButton(tr("Polygon"), tab)
        self.draw_polygon_button.setToolTip(tr("Click a polygon on the map (right click closes it), then find "
                                               "tiles like it"))
        self.draw_polygon_button.clicked.connect(lambda: self.drawRequested.emit("query", "polygon"))
        self.selected_query_button = QPushButton(tr("Selected"), tab)
        self.selected_query_button.setToolTip(tr("Find tiles like the selected features of the polygon layer"))
        self.selected_query_button.clicked.connect(self._query_from_selection)
        self.clear_query_button = QToolButton(tab)
        self.clear_query_button.setText(tr("Clear"))
        self.clear_query_button.setToolTip(tr("Remove the query sketch from the map"))
        self.clear_query_button.clicked.connect(self.clear_query)
        for button in (self.draw_rect_button, self.draw_polygon_button, self.selected_query_button,
                       self.clear_query_button):
            query_row.addWidget(button)
        form.addRow(tr("Like"), query_row)
        self.query_layer_combo = narrow(QgsMapLayerComboBox(tab))
        self.query_layer_combo.setFilters(compat.POLYGON_LAYER_FILTER)
        self.query_layer_combo.setAllowEmptyLayer(True)
        form.addRow(tr("Polygons"), self.query_layer_combo)
        cross_row = QHBoxLayout()
        self.cross_layer_combo = QgsMapLayerComboBox(tab)
        self.cross_layer_combo.setFilters(compat.RASTER_LAYER_FILTER)
        self.cross_layer_combo.setAllowEmptyLayer(True)
        self.cross_layer_combo.setLayer(None)
        self.cross_layer_combo.setToolTip(tr("Cross-modal search: take the query region from this layer (for example "
                                             "an RGB orthophoto) instead of the searched layer; empty: the searched "
                                             "layer itself"))
        self.cross_model_combo = QComboBox(tab)
        self.cross_model_combo.setToolTip(tr("The model that embeds the query layer: one of the same embedding space "
                                             "as the searched layer's model (a teacher and the encoders aligned to "
                                             "it)"))
        cross_row.addWidget(self.cross_layer_combo, 1)
        cross_row.addWidget(self.cross_model_combo, 1)
        form.addRow(tr("Query from"), cross_row)
        text_row = QHBoxLayout()
        self.text_edit = QLineEdit(tab)
        self.text_edit.setPlaceholderText(tr("describe what to find, e.g. a solar farm"))
        self.text_edit.returnPressed.connect(self.request_text_search)
        self.text_button = QPushButton(tr("Search"), tab)
        self.text_button.clicked.connect(self.request_text_search)
        text_row.addWidget(self.text_edit, 1)
        text_row.addWidget(self.text_button)
        form.addRow(tr("Text"), text_row)
        options_row = QHBoxLayout()
        self.k_spin = QSpinBox(tab)
        self.k_spin.setRange(1, MAX_K)
        self.k_spin.setValue(20)
        self.fuse_combo = narrow(QComboBox(tab))
        self.fuse_combo.addItem(tr("mean of the query tiles"), Fuse.MEAN.value)
        self.fuse_combo.addItem(tr("best match of any query tile"), Fuse.MAX.value)
        self.heatmap_check = QCheckBox(tr("heat map"), tab)
        self.heatmap_check.setChecked(True)
        options_row.addWidget(QLabel(tr("top"), tab))
        options_row.addWidget(self.k_spin, 1)
        options_row.addWidget(self.heatmap_check)
        form.addRow(tr("Results"), options_row)
        form.addRow(tr("Query tiles"), self.fuse_combo)
        self.search_again_button = QPushButton(tr("Search again with the last query"), tab)
        self.search_again_button.clicked.connect(self.request_similar_search)
        form.addRow(self.search_again_button)
        self.results_table = QTableWidget(0, 4, tab)
        self.results_table.setHorizontalHeaderLabels([tr("Rank"), tr("Similarity"), tr("Row"), tr("Col")])
        self.results_table.verticalHeader().setVisible(False)
        self.results_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.results_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.results_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.results_table.setMinimumHeight(150)
        self.results_table.cellClicked.connect(lambda row, _col: self.zoom_to_result(row))
        form.addRow(self.results_table)
        return tab

    def _run_panel(self, parent) -> QWidget:
        """Progress bar, Cancel and the status line: outside the scroll area, so always in view."""
        panel = QWidget(parent)
        column = QVBoxLayout(panel)
        column.setContentsMargins(4, 0, 4, 4)
        row = QHBoxLayout()
        self.progress = QProgressBar(panel)
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.cancel_button = QPushButton(tr("Cancel"), panel)
        self.cancel_button.setObjectName("tilepromptCancelButton")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancelRequested)
        row.addWidget(self.progress, 1)
        row.addWidget(self.cancel_button)
        column.addLayout(row)
        self.status_label = QLabel(panel)
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        column.addWidget(self.status_label)
        return panel

    def preferred_width(self) -> int:
        """The dock width at which nothing is cut off and no horizontal scroll bar shows."""
        bar = self.scroll.verticalScrollBar().sizeHint().width()
        return self.body.minimumSizeHint().width() + bar + 2 * self.scroll.frameWidth() + 8

    # --------------------------------------------------------------------------------------------- backend
    def set_backend_state(self, state: str, text: str, started_here: bool) -> None:
        color = LIGHT_COLORS.get(state, LIGHT_COLORS["down"])
        self.light.setStyleSheet(f"background-color: {color}; border-radius: 7px; border: 1px solid #555;")
        self.light.setToolTip(state)
        self.backend_state = state
        self.backend_label.setText(text)
        self.start_button.setEnabled(state in ("down", "error"))
        self.stop_button.setEnabled(started_here and state in ("up", "starting"))
        self.attach_button.setEnabled(state != "starting")

    def set_models(self, models: list) -> None:
        """Fill the model picker from /v1/models, keeping a model selected: the current one, else the one the user
        last chose, else the first entry, "Automatic": the backend picks the best model for the layer (what it
        does for a request without a model)."""
        wanted = self.model_combo.currentData() if self.model_combo.count() else self.settings.get(
            Key.DEFAULT_MODEL)
        self.models = {m["id"]: m for m in models if isinstance(m, dict) and "id" in m}
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        if self.models:
            self.model_combo.addItem(tr("Automatic (best model for the layer)"), AUTO_MODEL)
        for model in models:
            state = "" if model.get("downloaded", True) else "  ⤓"
            self.model_combo.addItem(model["id"] + state, model["id"])
            tip = "\n".join(t for t in (model.get("title"), model.get("summary"), model.get("description"),
                                         weights_summary(model)) if t)
            self.model_combo.setItemData(self.model_combo.count() - 1, tip, Qt.ItemDataRole.ToolTipRole)
        index = self.model_combo.findData(wanted) if wanted is not None else -1
        self.model_combo.setCurrentIndex(max(index, 0) if self.model_combo.count() else -1)
        self.model_combo.blockSignals(False)
        self._on_model_changed()

    def automatic(self) -> bool:
        return self.model_combo.count() > 0 and self.model_combo.currentData() == AUTO_MODEL

    def current_model(self) -> str | None:
        """The model to run: the one picked, or in automatic mode the backend's choice for the layer (None while
        unknown: the backend then chooses when the job runs)."""
        if self.automatic():
            return (self.auto_choice or {}).get("model")
        data = self.model_combo.currentData()
        return str(data) if data else None

    def current_model_info(self) -> dict:
        return self.models.get(self.current_model() or "", {})

    def _fill_cross_models(self) -> None:
        """Offer the models that share the current model's embedding space (cross-modal query models)."""
        info = self.current_model_info()
        space = info.get("space") if info else None
        keep = self.cross_model_combo.currentData()
        same = [m for m in self.models.values() if space and m.get("space") == space and m["id"] != info.get("id")]
        self.cross_model_combo.clear()
        for model in same:
            self.cross_model_combo.addItem(model["id"], model["id"])
        if not same:
            self.cross_model_combo.addItem(tr("no other model of this model's embedding space"), None)
        self.cross_model_combo.setEnabled(bool(same))
        index = self.cross_model_combo.findData(keep) if keep else -1
        self.cross_model_combo.setCurrentIndex(max(index, 0))

    def cross_modal(self) -> CrossModal | None:
        """The cross-modal query source, or None (query geometries on the searched layer, its own model)."""
        layer = self.cross_layer_combo.currentLayer()
        if layer is None or layer == self.current_layer():
            return None
        model = self.cross_model_combo.currentData()
        if not model:
            raise ParameterError(tr("No model shares the embedding space of {model}: a query from another layer "
                                    "needs one (for example the CLIP an encoder was aligned to).").format(
                                        model=self.current_model() or "?"))
        from .runs import raster_input_from_layer

        try:
            return CrossModal(raster_input_from_layer(layer), model)
        except ValueError as exc:
            raise ParameterError(str(exc)) from None

    def _on_model_changed(self, *_args) -> None:
        self._request_auto_choice()
        self._show_model()

    def _show_model(self) -> None:
        self._fill_cross_models()  # the query models of the shown model's embedding space
        info = self.current_model_info()
        lines = []
        if self.automatic():
            if self.auto_choice:
                lines.append(tr("Automatic: {reason}").format(reason=self.auto_choice.get("reason", "")))
            else:
                lines.append(self.auto_error or tr("Automatic: the backend picks the best model for the layer."))
        if info:
            if info.get("title"):
                lines.append(info["title"])
            lines.append(model_summary(info))
            lines.append(weights_summary(info))
            if needs_download(info):
                lines.append(tr("⚠ Not downloaded yet: press Download before running."))
        elif not self.models:
            lines.append(tr("Start or attach a backend to list models."))
        self.model_label.setText("<br>".join(lines))
        self.model_label.setToolTip((info or {}).get("summary", ""))
        self.download_button.setVisible(needs_download(info) and bool(info.get("downloadable", True)))
        self.download_button.setEnabled(not self._busy)

    def _request_download(self) -> None:
        model = self.current_model()
        if model:
            self.downloadRequested.emit(model)

    def _request_auto_choice(self) -> None:
        """In automatic mode, ask (through the plugin) which model the backend picks for the layer."""
        self.auto_choice, self.auto_error = None, ""
        if not self.automatic() or not self.models:
            return
        try:
            raster = self.raster_input()
        except ParameterError as exc:
            self.auto_error = tr("Automatic: {error}").format(error=str(exc))
            return
        if raster.kind is InputKind.EXPORT:
            self.auto_error = tr("Automatic: the backend picks the model when the exported layer is ready.")
            return
        self._auto_fields = raster.request_fields()
        self.autoModelRequested.emit(self._auto_fields)

    def set_auto_choice(self, choice: dict | None, error: str = "", fields: dict | None = None) -> None:
        """The backend's answer to :attr:`autoModelRequested`: ``{"model", "reason"}``, or an error to show.
        An answer for another raster than the last one asked about (the layer changed since) is ignored."""
        if fields is not None and fields != self._auto_fields:
            return
        self.auto_choice = choice if isinstance(choice, dict) and choice.get("model") else None
        self.auto_error = tr("Automatic: {error}").format(error=error) if error else ""
        self._show_model()

    def check_weights(self) -> None:
        """Refuse to run a model whose weights are not on the backend's machine (never run one blindly)."""
        info = self.current_model_info()
        if needs_download(info):
            raise ParameterError(tr("The weights of {model} are not downloaded ({state}). Press Download next to "
                                    "the model, then run again.").format(model=info["id"],
                                                                         state=info.get("weights", "")))

    def _remember_model(self, *_args) -> None:
        """The user picked a model (or Automatic): preselect it next time (a model selected by filling the list is
        not a choice)."""
        if self.model_combo.count():
            self.settings.set(Key.DEFAULT_MODEL, str(self.model_combo.currentData() or AUTO_MODEL))

    # ------------------------------------------------------------------------------------------------ layer
    def current_layer(self) -> QgsRasterLayer | None:
        layer = self.layer_combo.currentLayer()
        return layer if isinstance(layer, QgsRasterLayer) else None

    def _on_layer_changed(self, layer) -> None:
        self.layer_source = inspect_layer(layer) if isinstance(layer, QgsRasterLayer) else None
        has_product = self.layer_source is not None and self.layer_source.product is not None
        self.product_check.setVisible(has_product)
        self._fill_band_table()
        self._raster_changed()

    def _raster_changed(self) -> None:
        """What the job would read changed: in automatic mode, the model may change too."""
        self._request_auto_choice()
        self._show_model()

    def _use_product(self) -> bool:
        return bool(self.layer_source and self.layer_source.product and self.product_check.isChecked())

    def _fill_band_table(self, *_args) -> None:
        source = self.layer_source
        self.band_table.setRowCount(0)
        if source is None:
            self.input_label.setText(tr("Choose a raster layer."))
            return
        self.input_label.setText(source.describe(self._use_product()))
        # A product folder's bands are named by its files (listed in the label): nothing to map.
        self.band_table.setVisible(not self._use_product())
        self.band_label.setVisible(not self._use_product())
        if self._use_product():
            self._show_date()
            return
        for number, name in enumerate(source.file_bands, start=1):
            self._add_band_row(str(number), name or "", editable=True)
        self._show_date()

    def _band_names(self) -> list[str]:
        names = [(self.band_table.item(r, 1).text() if self.band_table.item(r, 1) else "").strip().upper()
                 for r in range(self.band_table.rowCount())]
        return [{"R": "R", "G": "G", "B": "B"}.get(n, n) for n in names]

    def _show_date(self, *_args) -> None:
        """The date chooser shows while the band names repeat (a stack of several dates)."""
        dates = 0 if self._use_product() else band_map_dates(self._band_names())
        self.date_spin.setMaximum(max(dates, 1))
        self.date_spin.setVisible(dates > 1)
        self.date_label.setVisible(dates > 1)

    def _add_band_row(self, first: str, second: str, editable: bool) -> None:
        row = self.band_table.rowCount()
        self.band_table.insertRow(row)
        label = QTableWidgetItem(first)
        label.setFlags(label.flags() & ~Qt.ItemFlag.ItemIsEditable)
        value = QTableWidgetItem(second)
        if not editable:
            value.setFlags(value.flags() & ~Qt.ItemFlag.ItemIsEditable)
        self.band_table.setItem(row, 0, label)
        self.band_table.setItem(row, 1, value)

    def set_band_names(self, names: list[str]) -> None:
        """Edit the band map (what a user types in the table)."""
        for row, name in enumerate(names):
            if row < self.band_table.rowCount():
                self.band_table.item(row, 1).setText(name)

    def band_map(self) -> tuple[str, ...] | None:
        """Band names in file order, or None when no band is named (the backend then detects them)."""
        if self._use_product() or self.layer_source is None:
            return None
        names = self._band_names()
        if not any(names):
            return None
        if not all(names):
            raise ParameterError(tr("Name every band of the layer (- skips one), or none (then the backend detects "
                                    "them)."))
        error = validate_band_map(names, self.band_date())
        if error:
            raise ParameterError(tr("Band mapping: {error}").format(error=error))
        return tuple(names)

    def band_date(self) -> int | None:
        """The chosen date of a multi-date band map, or None."""
        return self.date_spin.value() or None if self.date_spin.isVisibleTo(self) else None

    def offset(self) -> str | float:
        try:
            return parse_offset(self.offset_combo.currentText())
        except ValueError as exc:
            raise ParameterError(tr("S2 offset: {error}").format(error=str(exc))) from None

    def raster_input(self, export_extent: Extent | None = None) -> RasterInput:
        layer = self.current_layer()
        if layer is None or self.layer_source is None:
            raise ParameterError(tr("Choose a raster layer."))
        level = self.level_combo.currentData()
        offset = self.offset()
        if self.layer_source.needs_export:
            if export_extent is None:
                export_extent = self._layer_extent(layer)
            return RasterInput(layer.id(), layer.name(), InputKind.EXPORT, "", self.band_map(), level, export_extent,
                               self.band_date(), offset)
        if self._use_product():
            return RasterInput(layer.id(), layer.name(), InputKind.PRODUCT_FOLDER,
                               str(self.layer_source.product.folder), None, level, offset=offset)
        return RasterInput(layer.id(), layer.name(), InputKind.FILE, self.layer_source.path, self.band_map(), level,
                           date=self.band_date(), offset=offset)

    def _canvas_extent(self) -> Extent:
        canvas = self.iface.mapCanvas()
        rect = canvas.extent()
        crs = canvas.mapSettings().destinationCrs()
        return Extent(rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum(), compat.crs_to_string(crs))

    def _layer_extent(self, layer) -> Extent:
        if self.layer_source is not None and self.layer_source.web:
            return self._canvas_extent()  # web tiles cover the world: use what is on screen
        rect = layer.extent()
        return Extent(rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum(),
                      compat.crs_to_string(layer.crs()))

    # ---------------------------------------------------------------------------------------------- prompts
    def reload_prompt_sets(self, select_key: str | None = None) -> None:
        current = select_key or self.prompt_set_combo.currentData()
        self._prompt_sets = {s.key: s for s in bundled_prompt_sets()}
        self._prompt_sets.update({s.key: s for s in project_prompt_sets(ProjectState().prompt_sets())})
        self.prompt_set_combo.blockSignals(True)
        self.prompt_set_combo.clear()
        self.prompt_set_combo.addItem(tr("(your own prompts)"), "")
        for key, prompt_set in self._prompt_sets.items():
            prefix = tr("Project: ") if prompt_set.is_project else ""
            self.prompt_set_combo.addItem(prefix + prompt_set.title, key)
            header = [line.lstrip("# ").strip() for line in prompt_set.text.splitlines()
                      if line.startswith("#") and not line.lower().startswith("# title:")]
            if header:
                self.prompt_set_combo.setItemData(self.prompt_set_combo.count() - 1, " ".join(header),
                                                  Qt.ItemDataRole.ToolTipRole)
        index = self.prompt_set_combo.findData(current) if current else 0
        self.prompt_set_combo.setCurrentIndex(max(index, 0))
        self.prompt_set_combo.blockSignals(False)
        self.delete_set_button.setEnabled(str(self.prompt_set_combo.currentData() or "").startswith("project:"))

    def _on_prompt_set_chosen(self, *_args) -> None:
        key = self.prompt_set_combo.currentData()
        self.delete_set_button.setEnabled(str(key or "").startswith("project:"))
        if key and key in self._prompt_sets:
            self.prompt_edit.setPlainText(editor_text(self._prompt_sets[key].text))

    def choose_prompt_set(self, key: str) -> None:
        index = self.prompt_set_combo.findData(key)
        if index < 0:
            raise KeyError(key)
        self.prompt_set_combo.setCurrentIndex(index)
        self._on_prompt_set_chosen()

    def save_prompt_set(self, name: str) -> None:
        name = name.strip()
        if not name:
            raise ParameterError(tr("A prompt set needs a name."))
        parse_prompts(self.prompt_edit.toPlainText())  # only valid prompts are saved
        ProjectState().save_prompt_set(name, self.prompt_edit.toPlainText())
        self.reload_prompt_sets(select_key=f"project:{name}")

    def _ask_save_prompt_set(self) -> None:
        name, ok = QInputDialog.getText(self, tr("Save prompt set"), tr("Name of the set in this project:"))
        if ok:
            try:
                self.save_prompt_set(name)
            except (ParameterError, PromptError) as exc:
                self.show_error(str(exc))

    def _delete_prompt_set(self) -> None:
        key = str(self.prompt_set_combo.currentData() or "")
        if key.startswith("project:"):
            ProjectState().delete_prompt_set(key.split(":", 1)[1])
            self.reload_prompt_sets(select_key="")

    def prompt_classes(self) -> list[str]:
        try:
            return [c.name for c in parse_prompts(self.prompt_edit.toPlainText())]
        except PromptError:
            return []

    # ------------------------------------------------------------------------------------------------- area
    def area_mode(self) -> AreaMode:
        return AreaMode(self.area_combo.currentData())

    def set_area_mode(self, mode: AreaMode) -> None:
        self.area_combo.setCurrentIndex(self.area_combo.findData(mode.value))

    def _on_area_mode_changed(self, *_args) -> None:
        mode = self.area_mode()
        self.draw_area_button.setVisible(mode is AreaMode.DRAWN)
        self.clear_area_button.setVisible(mode is AreaMode.DRAWN and self.drawn_area is not None)
        self.area_layer_combo.setVisible(mode is AreaMode.SELECTED)
        if mode is AreaMode.DRAWN and self.drawn_area is None:
            self.area_label.setText(tr("Press Draw and drag a rectangle on the map."))
        elif mode is AreaMode.DRAWN:
            self.area_label.setText(tr("Drawn rectangle set."))
        elif mode is AreaMode.SELECTED:
            self.area_label.setText(tr("The selected features of the polygon layer."))
        else:
            self.area_label.setText("")
        self.area_label.setVisible(bool(self.area_label.text()))

    def set_drawn_area(self, geometry: QgsGeometry, crs: QgsCoordinateReferenceSystem) -> None:
        self.drawn_area = (geometry_wkt(geometry), compat.crs_to_string(crs))
        self.set_area_mode(AreaMode.DRAWN)
        self._on_area_mode_changed()

    def clear_drawn_area(self) -> None:
        """Forget the drawn rectangle and ask for its sketch to be removed from the map."""
        self.drawn_area = None
        self._on_area_mode_changed()
        self.clearSketchRequested.emit("area")

    def _selected_geometries(self, layer) -> list[QgsGeometry]:
        if not isinstance(layer, QgsVectorLayer) or layer.geometryType() != compat.POLYGON_GEOMETRY:
            raise ParameterError(tr("Choose a polygon layer."))
        geometries = [f.geometry() for f in layer.selectedFeatures() if f.hasGeometry()]
        if not geometries:
            raise ParameterError(tr("Select one or more features of layer {name} first.").format(name=layer.name()))
        return geometries

    def area(self) -> Area:
        mode = self.area_mode()
        if mode is AreaMode.WHOLE_LAYER:
            return Area(mode)
        if mode is AreaMode.MAP_EXTENT:
            extent = self._canvas_extent()
            return Area(mode, extent.to_wkt(), extent.crs)
        if mode is AreaMode.DRAWN:
            if self.drawn_area is None:
                raise ParameterError(tr("Draw a rectangle first (Area: Draw)."))
            return Area(mode, *self.drawn_area)
        layer = self.area_layer_combo.currentLayer()
        geometries = self._selected_geometries(layer)
        union = QgsGeometry.unaryUnion(geometries)
        return Area(mode, geometry_wkt(union), compat.crs_to_string(layer.crs()))

    def _area_extent(self, area: Area) -> Extent | None:
        if area.wkt is None:
            return None
        rect = QgsGeometry.fromWkt(area.wkt).boundingBox()
        return Extent(rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum(), area.crs or "")

    # ---------------------------------------------------------------------------------------------- classify
    def _on_label_mode_changed(self, *_args) -> None:
        multi = bool(self.label_mode_combo.currentData())
        self.threshold_spin.setEnabled(multi)
        self.context_check.setEnabled(not multi)

    def _on_overlap_changed(self, *_args) -> None:
        self.cells_check.setEnabled(self.overlap_spin.value() > 0)

    def classify_parameters(self) -> ClassifyParameters:
        """The one object a classification run needs, from the widgets; ParameterError/PromptError if invalid."""
        classes = parse_prompts(self.prompt_edit.toPlainText())
        self.check_weights()
        area = self.area()
        raster = self.raster_input(self._area_extent(area))
        output = self.output_widget.filePath().strip() or None
        if output and not output.lower().endswith(".gpkg"):
            output += ".gpkg"
        tile = self.tile_spin.value() or None
        overlap = self.overlap_spin.value()
        model_tile = self.current_model_info().get("tile_px")
        if overlap and overlap >= (tile or model_tile or overlap + 1):
            raise ParameterError(tr("The overlap must be smaller than the tile size."))
        return ClassifyParameters(
            raster=raster, prompts=prompts_to_request(classes), model=self.current_model(),
            prompt_set=str(self.prompt_set_combo.currentData() or ""), templates=self.template_combo.currentData(),
            area=area, tile_px=tile, overlap_px=overlap, multi_label=bool(self.label_mode_combo.currentData()),
            threshold=round(self.threshold_spin.value(), 4), output=output,
            context=self.context_check.isChecked() and not self.label_mode_combo.currentData(),
            centre_cells=bool(overlap) and self.cells_check.isChecked(), class_map=self.class_map_check.isChecked())

    def request_classify(self) -> ClassifyParameters | None:
        try:
            parameters = self.classify_parameters()
        except (ParameterError, PromptError) as exc:
            self.show_error(str(exc))
            return None
        self.classifyRequested.emit(parameters)
        return parameters

    def show_summary(self, rows: list[tuple[str, int, float]], class_order: list[str] | None = None) -> None:
        self.summary_table.setRowCount(0)
        palette = list(class_order or []) + [r[0] for r in rows if r[0] not in (class_order or [])]
        for name, count, percent in rows:
            row = self.summary_table.rowCount()
            self.summary_table.insertRow(row)
            item = QTableWidgetItem(name)
            color = class_color(palette.index(name)) if name in palette else QColor("#999999")
            item.setData(Qt.ItemDataRole.DecorationRole, color)
            self.summary_table.setItem(row, 0, item)
            self.summary_table.setItem(row, 1, QTableWidgetItem(str(count)))
            self.summary_table.setItem(row, 2, QTableWidgetItem(f"{percent:.1f}"))

    def clear_summary(self) -> None:
        """A new classification starts: the table must not show the previous run's counts meanwhile (or after a
        cancel or failure)."""
        self.summary_table.setRowCount(0)

    def summary(self) -> list[tuple[str, int]]:
        return [(self.summary_table.item(r, 0).text(), int(self.summary_table.item(r, 1).text()))
                for r in range(self.summary_table.rowCount())]

    # ------------------------------------------------------------------------------------------------ search
    def _search_parameters(self, query: Query) -> SearchParameters:
        # A layer without a file is exported whole (web tiles: the map extent, see _layer_extent): the index
        # covers the scene, the query selects in it.
        self.check_weights()
        return SearchParameters(
            raster=self.raster_input(), query=query, model=self.current_model(),
            tile_px=self.tile_spin.value() or None, overlap_px=self.overlap_spin.value(), k=self.k_spin.value(),
            fuse=Fuse(self.fuse_combo.currentData()), heatmap=self.heatmap_check.isChecked(),
            cross=None if query.is_text else self.cross_modal())

    def set_query(self, geometries: list[QgsGeometry], crs: QgsCoordinateReferenceSystem) -> None:
        self.query = Query(tuple(geometry_wkt(g) for g in geometries), compat.crs_to_string(crs))
        self.clear_query_button.setEnabled(True)

    def clear_query(self) -> None:
        """Forget the query geometry and ask for its sketch to be removed from the map."""
        self.query = None
        self.clear_query_button.setEnabled(False)
        self.clearSketchRequested.emit("query")

    def request_similar_search(self) -> SearchParameters | None:
        if self.query is None:
            self.show_error(tr("Draw a rectangle or polygon, or use the selected features, to search tiles like it."))
            return None
        return self._emit_search(self.query)

    def request_text_search(self) -> SearchParameters | None:
        text = self.text_edit.text().strip()
        if not text:
            self.show_error(tr("Type a description to search for."))
            return None
        return self._emit_search(Query(text=text))

    def _emit_search(self, query: Query) -> SearchParameters | None:
        try:
            parameters = self._search_parameters(query)
        except ParameterError as exc:
            self.show_error(str(exc))
            return None
        self.searchRequested.emit(parameters)
        return parameters

    def _query_from_selection(self) -> None:
        layer = self.query_layer_combo.currentLayer()
        try:
            geometries = self._selected_geometries(layer)
        except ParameterError as exc:
            self.show_error(str(exc))
            return
        self.set_query(geometries, layer.crs())
        self.request_similar_search()

    def clear_search_results(self) -> None:
        self.results_table.setRowCount(0)
        self._result_rows = []

    def show_search_results(self, layer: QgsVectorLayer) -> None:
        """List the ranked tiles of a ``similar`` layer; clicking a row zooms to the tile."""
        self.clear_search_results()
        fields = layer.fields()
        features = sorted(layer.getFeatures(), key=lambda f: f.attribute("rank") if fields.indexOf("rank") >= 0
                          else f.id())
        for feature in features:
            row = self.results_table.rowCount()
            self.results_table.insertRow(row)
            values = [feature.attribute(name) if fields.indexOf(name) >= 0 else "" for name in
                      ("rank", "similarity", "row", "col")]
            if isinstance(values[1], float):
                values[1] = f"{values[1]:.4f}"
            for column, value in enumerate(values):
                self.results_table.setItem(row, column, QTableWidgetItem(str(value)))
            self._result_rows.append((layer.id(), feature.id()))
        self.tabs.setCurrentIndex(1)

    def zoom_to_result(self, row: int) -> bool:
        if not 0 <= row < len(self._result_rows):
            return False
        layer_id, fid = self._result_rows[row]
        layer = QgsProject.instance().mapLayer(layer_id)
        if layer is None:
            return False
        feature = layer.getFeature(fid)
        if not feature.hasGeometry():
            return False
        canvas = self.iface.mapCanvas()
        transform = QgsCoordinateTransform(layer.crs(), canvas.mapSettings().destinationCrs(), QgsProject.instance())
        rect = transform.transformBoundingBox(feature.geometry().boundingBox())
        grow = max(rect.width(), rect.height()) * 2
        canvas.setExtent(QgsRectangle(rect.xMinimum() - grow, rect.yMinimum() - grow,
                                      rect.xMaximum() + grow, rect.yMaximum() + grow))
        canvas.refresh()
        canvas.flashGeometries([feature.geometry()], layer.crs())
        layer.selectByIds([fid])
        return True

    # ------------------------------------------------------------------------------------------------ change
    def request_change(self):
        """The Change tab's run, with this dock's model and tiles; ChangeParameters or None (error shown)."""
        try:
            parameters = self.change_panel.parameters(self.current_model(), self.tile_spin.value() or None,
                                                      self.overlap_spin.value())
        except ValueError as exc:
            self.show_error(str(exc))
            return None
        self.changeRequested.emit(parameters)
        return parameters

    # ------------------------------------------------------------------------------------------- run state
    def set_busy(self, busy: bool, text: str = "") -> None:
        self._busy = busy
        for button in (self.run_button, self.draw_rect_button, self.draw_polygon_button, self.selected_query_button,
                       self.text_button, self.search_again_button, self.download_button,
                       *self.correct_panel.action_buttons(), *self.change_panel.action_buttons()):
            button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        self.set_indeterminate(False)
        if busy:
            self.progress.setValue(0)
        self.status_label.setText(text)

    @property
    def busy(self) -> bool:
        return self._busy

    def set_progress(self, percent: float) -> None:
        self.progress.setValue(int(round(percent)))

    def set_indeterminate(self, busy: bool) -> None:
        """A moving bar while the job runs without a tile count yet (loading the model can take a minute)."""
        self.progress.setRange(0, 0 if busy else 100)

    def set_status(self, text: str) -> None:
        self.status_label.setText(text)

    def show_error(self, text: str) -> None:
        self.status_label.setText(text)
        self.iface.messageBar().pushMessage(tr("TilePrompt"), text, level=Qgis.MessageLevel.Warning,
                                            duration=8)

    # ----------------------------------------------------------------------------------------- project state
    def restore_state(self, state: dict) -> None:
        """Put a project's last run back into the widgets (dock state saved by the plugin on each run)."""
        if not state:
            return
        if state.get("prompts"):
            self.prompt_edit.setPlainText(state["prompts"])
        key = state.get("prompt_set") or ""
        index = self.prompt_set_combo.findData(key)
        if index >= 0:
            self.prompt_set_combo.setCurrentIndex(index)
        self.tile_spin.setValue(int(state.get("tile_px") or 0))
        self.overlap_spin.setValue(int(state.get("overlap_px") or 0))
        self.label_mode_combo.setCurrentIndex(1 if state.get("multi_label") else 0)
        self.threshold_spin.setValue(float(state.get("threshold") or 0.5))
        self.context_check.setChecked(bool(state.get("context")))
        self.cells_check.setChecked(bool(state.get("centre_cells", True)) or not state.get("overlap_px"))
        self.class_map_check.setChecked(bool(state.get("class_map")))
        index = self.template_combo.findData(state.get("templates"))
        self.template_combo.setCurrentIndex(max(index, 0))
