"""Nothing QGIS imports from this plugin may pull in the ML stack: it lives in the backend process only.

Checked statically (ast), so a forbidden import is caught even in code no test executes.
"""

import ast

import pytest

from conftest import PLUGIN_DIR

FORBIDDEN = {"torch", "torchvision", "numpy", "rasterio", "open_clip", "timm", "onnxruntime", "tileprompt_backend"}
PLUGIN_FILES = [PLUGIN_DIR / "__init__.py", *sorted((PLUGIN_DIR / "plugin").rglob("*.py"))]


def imported_top_level_names(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module", "__import__"
        ) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            yield node.args[0].value.split(".")[0]  # importlib.import_module("torch") counts too


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(PLUGIN_DIR)))
def test_no_heavy_imports(path):
    assert not FORBIDDEN & set(imported_top_level_names(path))


def test_the_check_sees_every_import_form(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import numpy as np\nfrom torch import nn\nimportlib.import_module('timm.models')\n")
    assert set(imported_top_level_names(sample)) == {"numpy", "torch", "timm"}
