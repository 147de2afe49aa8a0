"""Few-shot corrections on a classified layer: read its run, mark tiles as examples of a class (UI thread).

The backend writes every classification with an ``example`` field (empty) and a ``tileprompt_runs`` table. The
analyst selects tiles and sets their class here (or types it into ``example`` or ``class`` in the attribute
table); "Apply corrections" sends the GeoPackage as the examples file of a new classify job built from the run
(``parameters.correction_request``). Edits go through the layer's edit buffer, so they are undoable and, when
the user is already editing, left for them to save.
"""

from __future__ import annotations

import json
from collections import Counter

from qgis.core import QgsField, QgsVectorLayer
from qgis.PyQt.QtCore import QVariant

from .i18n import tr

EXAMPLE_FIELD = "example"
RUNS_TABLE = "tileprompt_runs"


def result_path(layer) -> str | None:
    """The GeoPackage a TilePrompt result layer reads (``path|layername=tiles``), or None for other layers."""
    if not isinstance(layer, QgsVectorLayer) or layer.providerType() != "ogr":
        return None
    path = layer.source().split("|", 1)[0]
    return path if path.lower().endswith(".gpkg") else None


def read_run(path: str) -> dict:
    """The last row of a result's ``tileprompt_runs`` table, JSON values decoded ({} when there is none)."""
    table = QgsVectorLayer(f"{path}|layername={RUNS_TABLE}", "runs", "ogr")
    if not table.isValid():
        return {}
    row: dict = {}
    for feature in table.getFeatures():
        row = {}
        for name, value in zip(table.fields().names(), feature.attributes()):
            try:
                row[name] = json.loads(value) if isinstance(value, str) else value
            except ValueError:
                row[name] = value
    return row


def is_classification(layer) -> bool:
    path = result_path(layer)
    return bool(path) and layer.fields().indexOf("class") >= 0 and bool(read_run(path).get("prompts"))


def run_classes(run: dict) -> list[str]:
    """The classes of a run (its prompts, then classes its examples added), in order."""
    return [c["class"] for c in run.get("prompts") or [] if isinstance(c, dict) and c.get("class")]


def _ensure_example_field(layer: QgsVectorLayer) -> int:
    """The index of the ``example`` field, added to the GeoPackage first for results written before it existed."""
    index = layer.fields().indexOf(EXAMPLE_FIELD)
    if index >= 0:
        return index
    if not layer.dataProvider().addAttributes([QgsField(EXAMPLE_FIELD, QVariant.Type.String)]):
        raise ValueError(tr("Cannot add the field '{field}' to layer {layer}.").format(field=EXAMPLE_FIELD,
                                                                                     layer=layer.name()))
    layer.updateFields()
    return layer.fields().indexOf(EXAMPLE_FIELD)


def set_examples(layer: QgsVectorLayer, feature_ids, value: str | None) -> int:
    """Set (or clear, ``value`` None) the example class of features; returns how many changed.

    In the user's own edit session the change stays in the edit buffer; otherwise it is saved at once."""
    ids = list(feature_ids)
    if not ids:
        raise ValueError(tr("Select one or more tiles of layer {layer} first.").format(layer=layer.name()))
    if value is not None:
        value = value.strip()
        if not value or not any(ch.isalnum() for ch in value):
            raise ValueError(tr("Type or choose the class of the selected tiles."))
    index = _ensure_example_field(layer)
    own_session = not layer.isEditable()
    if own_session and not layer.startEditing():
        raise ValueError(tr("Layer {layer} cannot be edited.").format(layer=layer.name()))
    layer.beginEditCommand(tr("TilePrompt: set the class of {n} tiles").format(n=len(ids)))
    changed = sum(bool(layer.changeAttributeValue(fid, index, value)) for fid in ids)
    layer.endEditCommand()
    if own_session and not layer.commitChanges():
        errors = "; ".join(layer.commitErrors())
        layer.rollBack()
        raise ValueError(tr("Cannot save the examples in layer {layer}: {errors}").format(layer=layer.name(),
                                                                                         errors=errors))
    return changed


def example_counts(layer: QgsVectorLayer) -> Counter:
    """Tiles per example class (the ``example`` field, edit buffer included)."""
    index = layer.fields().indexOf(EXAMPLE_FIELD)
    if index < 0:
        return Counter()
    values = (f.attribute(index) for f in layer.getFeatures())
    return Counter(str(v) for v in values if v not in (None, "") and not (hasattr(v, "isNull") and v.isNull()))


def save_pending_edits(layer: QgsVectorLayer) -> bool:
    """Save the user's unsaved edits (the backend reads the file); True when something had to be saved."""
    if not layer.isEditable() or not layer.isModified():
        return False
    if not layer.commitChanges(False):  # keep the user's edit session open
        raise ValueError(tr("Cannot save the edits of layer {layer}: {errors}").format(
            layer=layer.name(), errors="; ".join(layer.commitErrors())))
    return True
