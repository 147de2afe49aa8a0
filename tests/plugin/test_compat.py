"""Written for QGIS 3.22 and kept working on Qt6 / QGIS 4: every enum is reached through its enum type.

``Qt.AlignLeft`` works on PyQt5 only; ``Qt.AlignmentFlag.AlignLeft`` works on both. The check imports each
plugin module and looks at every ``Name.attr`` in its source: when ``Name`` is a class and ``attr`` an enum
*member* of it (not the enum type), the access is unqualified.
"""

import ast
import importlib

import pytest
from qgis.PyQt.QtCore import Qt

from conftest import PLUGIN_DIR
from tileprompt_plugin.plugin import compat

ENUM_TYPE = type(Qt.AlignmentFlag)  # sip.enumtype: the type of every PyQt5/PyQGIS enum type
MODULES = sorted(p.stem for p in (PLUGIN_DIR / "plugin").glob("*.py") if p.stem != "__init__")


def unqualified_enums(module_name):
    module = importlib.import_module(f"tileprompt_plugin.plugin.{module_name}")
    tree = ast.parse((PLUGIN_DIR / "plugin" / f"{module_name}.py").read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
            continue
        owner = getattr(module, node.value.id, None)
        if not isinstance(owner, type):
            continue
        value = getattr(owner, node.attr, None)
        if value is not None and isinstance(type(value), ENUM_TYPE):
            found.append(f"{module_name}.py:{node.lineno}: {node.value.id}.{node.attr} "
                         f"-> {node.value.id}.{type(value).__name__}.{node.attr}")
    return found


@pytest.mark.parametrize("module_name", MODULES)
def test_enums_are_fully_qualified(module_name):
    assert unqualified_enums(module_name) == []


def test_the_check_finds_an_unqualified_enum():
    sample = PLUGIN_DIR / "plugin" / "_enum_sample.py"
    sample.write_text("from qgis.PyQt.QtCore import Qt\nA = Qt.AlignLeft\nB = Qt.AlignmentFlag.AlignLeft\n")
    try:
        assert unqualified_enums("_enum_sample") == [
            "_enum_sample.py:2: Qt.AlignLeft -> Qt.AlignmentFlag.AlignLeft"]
    finally:
        sample.unlink()
    assert Qt.AlignmentFlag.AlignLeft == Qt.AlignLeft


def test_compat_names_resolve_on_this_qgis():
    from qgis.core import Qgis, QgsCoordinateReferenceSystem

    for name in ("RASTER_LAYER_FILTER", "POLYGON_LAYER_FILTER", "RASTER_LAYER_TYPE", "POLYGON_GEOMETRY",
                 "SOURCE_VECTOR_POLYGON", "ALG_FLAG_CAN_CANCEL", "ALG_FLAG_SUPPORTS_BATCH", "NUMBER_INTEGER",
                 "NUMBER_DOUBLE", "FILE_BEHAVIOR_FILE", "FILE_BEHAVIOR_FOLDER", "PARAM_FLAG_ADVANCED", "NO_GEOMETRY",
                 "WRITER_NO_ERROR", "METERS", "WKT_PREFERRED"):
        assert getattr(compat, name) is not None
    assert Qgis.DataType.ARGB32 in compat.ARGB_DATA_TYPES
    assert compat.crs_to_string(QgsCoordinateReferenceSystem("EPSG:32633")) == "EPSG:32633"
    custom = QgsCoordinateReferenceSystem.fromProj("+proj=tmerc +lat_0=0 +lon_0=14.3 +k=1 +x_0=0 +y_0=0 +datum=WGS84 +units=m")
    assert compat.crs_to_string(custom).startswith(("PROJCRS", "PROJCS"))
    with pytest.raises(AttributeError):
        compat._first((Qgis, "NoSuchEnum.Value"))
