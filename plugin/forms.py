"""Form helpers the dock and its panels share, so that no widget widens the dock beyond what its content needs."""

from __future__ import annotations

from qgis.PyQt.QtWidgets import QComboBox, QFormLayout, QSizePolicy

#: Characters a combo box shows at its minimum width (longer items are elided, and listed in full when open).
COMBO_MIN_CHARS = 10


def narrow(combo: QComboBox) -> QComboBox:
    """A combo box whose minimum width does not follow its longest item (a layer or prompt-set title)."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(COMBO_MIN_CHARS)
    combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    return combo


def wrapping_form(parent) -> QFormLayout:
    """A form whose long rows put the field under its label instead of widening the form."""
    form = QFormLayout(parent)
    form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
    form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    return form
