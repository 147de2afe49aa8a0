"""The dock's "Correct" tab: mark tiles of a classified layer as examples of a class, then re-classify with them.

The panel edits the chosen layer's ``example`` field (corrections.py) and emits ``correctRequested`` with a
:class:`~.parameters.CorrectParameters`; the plugin turns that into a classify job built from the layer's run.
"""

from __future__ import annotations

from qgis.core import QgsProject, QgsVectorLayer
from qgis.gui import QgsMapLayerComboBox
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import QCheckBox, QComboBox, QHBoxLayout, QLabel, QPushButton, QWidget

from . import compat
from .corrections import example_counts, read_run, result_path, run_classes, save_pending_edits, set_examples
from .forms import narrow, wrapping_form
from .i18n import tr
from .parameters import CorrectParameters


class CorrectPanel(QWidget):
    correctRequested = pyqtSignal(object)  # noqa: N815  CorrectParameters
    error = pyqtSignal(str)
    message = pyqtSignal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        form = wrapping_form(self)
        self.layer_combo = narrow(QgsMapLayerComboBox(self))
        self.layer_combo.setFilters(compat.POLYGON_LAYER_FILTER)
        self.layer_combo.setAllowEmptyLayer(True)
        self.layer_combo.setToolTip(tr("A layer of classified tiles written by TilePrompt"))
        self.layer_combo.layerChanged.connect(self.refresh)
        form.addRow(tr("Classified layer"), self.layer_combo)
        class_row = QHBoxLayout()
        self.class_combo = narrow(QComboBox(self))
        self.class_combo.setEditable(True)
        self.class_combo.setToolTip(tr("A class of the layer, or type a new one"))
        self.set_button = QPushButton(tr("Set for selected"), self)
        self.set_button.setToolTip(tr("The selected tiles of the layer become examples of this class"))
        self.set_button.clicked.connect(self.set_selected)
        class_row.addWidget(self.class_combo, 1)
        class_row.addWidget(self.set_button)
        form.addRow(tr("Class"), class_row)
        self.clear_button = QPushButton(tr("Clear selected"), self)
        self.clear_button.setToolTip(tr("The selected tiles of the layer are no longer examples"))
        self.clear_button.clicked.connect(self.clear_selected)
        form.addRow("", self.clear_button)
        self.summary_label = QLabel(self)
        self.summary_label.setWordWrap(True)
        form.addRow(tr("Examples"), self.summary_label)
        self.context_check = QCheckBox(tr("context-aware (uses the layer's tiles)"), self)
        self.context_check.setToolTip(tr("Transductive zero-shot: similar neighbouring tiles and the layer's class "
                                         "structure refine each tile's probabilities (single label; slower)"))
        form.addRow("", self.context_check)
        self.apply_button = QPushButton(tr("Apply corrections"), self)
        self.apply_button.setToolTip(tr("Re-classify every tile of the layer's raster with these examples "
                                        "(a new layer; the model is not retrained)"))
        self.apply_button.clicked.connect(self.request_correction)
        form.addRow(self.apply_button)
        self.refresh()

    # -------------------------------------------------------------------------------------------------- state
    def layer(self) -> QgsVectorLayer | None:
        layer = self.layer_combo.currentLayer()
        return layer if isinstance(layer, QgsVectorLayer) and result_path(layer) else None

    def set_layer(self, layer) -> None:
        self.layer_combo.setLayer(layer)
        self.refresh()

    def refresh(self, *_args) -> None:
        layer = self.layer()
        current = self.class_combo.currentText()
        self.class_combo.clear()
        if layer is None:
            self.summary_label.setText(tr("Choose a layer that TilePrompt classified."))
            return
        self.class_combo.addItems(run_classes(read_run(result_path(layer))))
        if current:
            self.class_combo.setCurrentText(current)
        counts = example_counts(layer)
        self.summary_label.setText(", ".join(f"{name} {n}" for name, n in sorted(counts.items())) if counts else
                                   tr("none yet: select tiles on the map, choose their class, press Set."))

    def action_buttons(self) -> list:
        return [self.set_button, self.clear_button, self.apply_button]

    # ------------------------------------------------------------------------------------------------ actions
    def _edit(self, value: str | None) -> int:
        layer = self.layer()
        if layer is None:
            self.error.emit(tr("Choose a layer that TilePrompt classified."))
            return 0
        try:
            changed = set_examples(layer, layer.selectedFeatureIds(), value)
        except ValueError as exc:
            self.error.emit(str(exc))
            return 0
        self.refresh()
        return changed

    def set_selected(self) -> int:
        """The selected tiles of the layer are examples of the chosen (or typed) class."""
        value = self.class_combo.currentText()
        changed = self._edit(value)
        if changed:
            self.message.emit(tr("{n} tiles marked as {cls}.").format(n=changed, cls=value.strip()))
        return changed

    def clear_selected(self) -> int:
        return self._edit(None)

    def correction_parameters(self) -> CorrectParameters:
        layer = self.layer()
        if layer is None:
            raise ValueError(tr("Choose a layer that TilePrompt classified."))
        if save_pending_edits(layer):
            self.message.emit(tr("Saved the edits of layer {layer}.").format(layer=layer.name()))
        if not example_counts(layer) and not _edited_classes(layer):
            raise ValueError(tr("Mark some tiles first: select them, choose their class, press Set."))
        return CorrectParameters(layer.id(), layer.name(), result_path(layer), self.context_check.isChecked())

    def request_correction(self) -> CorrectParameters | None:
        try:
            parameters = self.correction_parameters()
        except ValueError as exc:
            self.error.emit(str(exc))
            return None
        self.correctRequested.emit(parameters)
        return parameters


def _edited_classes(layer: QgsVectorLayer) -> bool:
    """Whether the backend will find edits: leave the decision to it when the layer has score columns."""
    return any(name.startswith("s_") for name in layer.fields().names())


def layer_by_id(layer_id: str):
    return QgsProject.instance().mapLayer(layer_id)
