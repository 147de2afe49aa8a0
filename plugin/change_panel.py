"""The dock's "Change" tab: two raster layers of the same place -> what changed between them.

The panel only holds its widgets; the dock adds the model and tile settings it shares with the other tabs
(``parameters(model, tile_px, overlap_px)``) and emits the :class:`~.parameters.ChangeParameters`.
"""

from __future__ import annotations

from qgis.core import QgsRasterLayer
from qgis.gui import QgsMapLayerComboBox
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import QCheckBox, QLineEdit, QPushButton, QWidget

from . import compat
from .forms import narrow, wrapping_form
from .i18n import tr
from .parameters import ChangeParameters
from .prompts import PromptError, parse_prompts, prompts_to_request
from .runs import raster_input_from_layer


class ChangePanel(QWidget):
    changeRequested = pyqtSignal()  # noqa: N815  the dock completes and emits the parameters

    def __init__(self, parent=None):
        super().__init__(parent)
        form = wrapping_form(self)
        self.before_combo = narrow(QgsMapLayerComboBox(self))
        self.before_combo.setFilters(compat.RASTER_LAYER_FILTER)
        self.after_combo = narrow(QgsMapLayerComboBox(self))
        self.after_combo.setFilters(compat.RASTER_LAYER_FILTER)
        form.addRow(tr("Before"), self.before_combo)
        form.addRow(tr("After"), self.after_combo)
        self.prompts_edit = QLineEdit(self)
        self.prompts_edit.setPlaceholderText(tr("optional classes, e.g. water; forest; farmland"))
        form.addRow(tr("Classes"), self.prompts_edit)
        self.became_edit = QLineEdit(self)
        self.became_edit.setPlaceholderText(tr("optional: rank by what became this class, e.g. flooded field"))
        form.addRow(tr("Became"), self.became_edit)
        self.heatmap_check = QCheckBox(tr("heat map"), self)
        self.heatmap_check.setChecked(True)
        form.addRow("", self.heatmap_check)
        self.run_button = QPushButton(tr("What changed"), self)
        self.run_button.setToolTip(tr("Index both layers (once), pair their tiles by footprint and rank them by "
                                      "how much they changed"))
        self.run_button.clicked.connect(self.changeRequested)
        form.addRow(self.run_button)

    def action_buttons(self) -> list:
        return [self.run_button]

    def set_layers(self, before, after) -> None:
        self.before_combo.setLayer(before)
        self.after_combo.setLayer(after)

    def parameters(self, model: str | None, tile_px: int | None, overlap_px: int) -> ChangeParameters:
        """The change run from the widgets; ValueError with a message for the user when it cannot be made."""
        before, after = self.before_combo.currentLayer(), self.after_combo.currentLayer()
        if not isinstance(before, QgsRasterLayer) or not isinstance(after, QgsRasterLayer):
            raise ValueError(tr("Choose the raster layers of both dates."))
        if before.id() == after.id():
            raise ValueError(tr("Choose two different layers: the same place on two dates."))
        prompts, became = self.prompts_edit.text().strip(), self.became_edit.text().strip()
        try:
            prompt_text = prompts_to_request(parse_prompts(prompts)) if prompts else None
            became_classes = parse_prompts(became) if became else []
        except PromptError as exc:
            raise ValueError(str(exc)) from None
        if len(became_classes) > 1:
            raise ValueError(tr("'Became' names one class."))
        became = became_classes[0].line() if became_classes else None
        return ChangeParameters(before=raster_input_from_layer(before), after=raster_input_from_layer(after),
                                model=model, tile_px=tile_px, overlap_px=overlap_px, prompts=prompt_text,
                                became=became, heatmap=self.heatmap_check.isChecked())
