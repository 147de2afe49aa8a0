"""Result layers: load the backend's GeoPackages and GeoTIFFs, style them, put them in the TilePrompt group.

UI thread only (it touches the project). Classification: layer ``tiles`` with a categorized renderer on
``class`` (one colour per class, stable across runs: the colour follows the class's position in the prompt list)
and a per-class count. Similar tiles: layer ``similar`` graduated on ``similarity``; the heat map GeoTIFF with a
pseudocolor renderer. Change between dates: layer ``change`` graduated on ``score``, its heat map likewise.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsColorRampShader,
    QgsFeatureRequest,
    QgsFillSymbol,
    QgsGeometryGeneratorSymbolLayer,
    QgsGradientColorRamp,
    QgsGraduatedSymbolRenderer,
    QgsProject,
    QgsRasterBandStats,
    QgsRasterLayer,
    QgsRasterShader,
    QgsRendererCategory,
    QgsRendererRange,
    QgsSingleBandPseudoColorRenderer,
    QgsStyle,
    QgsSymbol,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

from . import compat
from .i18n import tr
from .settings import PLUGIN_DIR

GROUP_NAME = "TilePrompt"
TILES_LAYER = "tiles"
SIMILAR_LAYER = "similar"
CHANGE_LAYER = "change"
#: Class colours by class index, shared with the backend's class-map GeoTIFF (its QML and metadata).
PALETTE_FILE = PLUGIN_DIR / "resources" / "styles" / "palette.json"
NAME_CHARS = 48
GRADUATED_CLASSES = 5


@lru_cache(maxsize=1)
def palette() -> tuple[str, ...]:
    return tuple(json.loads(PALETTE_FILE.read_text(encoding="utf-8"))["colors"])


def class_color(index: int) -> QColor:
    colors = palette()
    return QColor(colors[index % len(colors)])


def result_name(what: str, extra: str = "") -> str:
    """A result layer's name: what was asked (the class prompts, the query), and when: 'forest, water · 14:32:05'.
    Every run gets its own name, so several results in the Layers panel can be told apart."""
    what = what if len(what) <= NAME_CHARS else what[:NAME_CHARS - 1].rstrip(" ,") + "…"
    return " · ".join(part for part in (what, extra, time.strftime("%H:%M:%S")) if part)


def _fill_symbol(color: QColor, opacity: float = 0.55) -> QgsFillSymbol:
    symbol = QgsFillSymbol.createSimple({
        "color": f"{color.red()},{color.green()},{color.blue()},255",
        "outline_color": f"{color.darker(150).red()},{color.darker(150).green()},{color.darker(150).blue()},255",
        "outline_width": "0.15",
    })
    symbol.setOpacity(opacity)
    return symbol


def centre_cell_expression(tile_px: int, stride_px: int) -> str:
    """A tile's centre cell (stride x stride pixels): the tile shrunk by (tile - stride) / 2 pixels on each side.
    Overlapping tiles drawn this way tile the area without covering each other. The pixel size is the tile's
    width in map units over its width in pixels (attribute ``width``), so edge tiles shrink by the same amount."""
    return f'buffer($geometry, -(bounds_width($geometry) / "width") * {(tile_px - stride_px) / 2!r})'


def _centre_cell_symbol(color: QColor, expression: str) -> QgsFillSymbol:
    generator = QgsGeometryGeneratorSymbolLayer.create({})
    generator.setSymbolType(QgsSymbol.SymbolType.Fill)
    generator.setGeometryExpression(expression)
    generator.setSubSymbol(_fill_symbol(color, 1.0))
    symbol = QgsFillSymbol()
    symbol.changeSymbolLayer(0, generator)  # takes ownership (a QgsFillSymbol([generator]) left it to Python)
    symbol.setOpacity(0.55)
    return symbol


def load_vector(gpkg: str, layer_name: str, title: str) -> QgsVectorLayer:
    layer = QgsVectorLayer(f"{gpkg}|layername={layer_name}", title, "ogr")
    if not layer.isValid():
        raise ValueError(tr("Cannot open layer {layer} of {path}").format(layer=layer_name, path=gpkg))
    return layer


def class_counts(layer: QgsVectorLayer, field: str = "class") -> Counter:
    index = layer.fields().indexOf(field)
    if index < 0:
        return Counter()
    request = QgsFeatureRequest().setFlags(compat.NO_GEOMETRY).setSubsetOfAttributes([index])
    return Counter(str(f.attribute(index)) for f in layer.getFeatures(request))


def style_categorized(layer: QgsVectorLayer, class_order: list[str] | None = None, field: str = "class",
                      centre_cells: tuple[int, int] | None = None) -> Counter:
    """One category per class found (ordered as the prompts, then the rest); returns the per-class counts.

    ``centre_cells`` = (tile, stride) in pixels, for a grid whose tiles overlap: each tile is drawn as its centre
    cell (:func:`centre_cell_expression`), the features keep the whole tile."""
    counts = class_counts(layer, field)
    prompt_order = list(class_order or [])
    palette_order = prompt_order + sorted(c for c in counts if c not in prompt_order)
    expression = centre_cell_expression(*centre_cells) if centre_cells and centre_cells[1] < centre_cells[0] \
        else None
    categories = []
    for c in palette_order:
        if c in counts:
            color = class_color(palette_order.index(c))
            symbol = _centre_cell_symbol(color, expression) if expression else _fill_symbol(color)
            categories.append(QgsRendererCategory(c, symbol, f"{c} ({counts[c]})"))
    layer.setRenderer(QgsCategorizedSymbolRenderer(field, categories))
    layer.triggerRepaint()
    return counts


def label_precision(values: list[float], least: int = 3, most: int = 8) -> int:
    """The fewest decimals (at least ``least``) at which consecutive distinct ``values`` print differently; close
    similarities (0.99991, 0.99994 ...) otherwise all read '1.000'."""
    distinct = sorted(set(values))
    for digits in range(least, most + 1):
        if len({f"{v:.{digits}f}" for v in distinct}) == len(distinct):
            return digits
    return most


def quantile_ranges(values: list[float], classes: int) -> list[tuple[float, float]]:
    """(low, high) of up to ``classes`` classes holding about equally many of the distinct ``values``: close
    similarities still get classes of their own, and no two classes share a value."""
    distinct = sorted(set(values))
    count = min(classes, len(distinct))
    ranges = []
    for i in range(count):
        chunk = distinct[i * len(distinct) // count:(i + 1) * len(distinct) // count]
        ranges.append((chunk[0], chunk[-1]))
    return ranges


def style_graduated(layer: QgsVectorLayer, field: str = "similarity", classes: int = GRADUATED_CLASSES) -> None:
    """Quantile classes of ``field`` from dark to bright (Viridis, brightest = most similar), labelled with as many
    decimals as it takes to tell the limits apart (the trial's legend read '1.000 - 1.000' five times)."""
    index = layer.fields().indexOf(field)
    values = []
    if index >= 0:
        request = QgsFeatureRequest().setFlags(compat.NO_GEOMETRY).setSubsetOfAttributes([index])
        values = [float(f.attribute(index)) for f in layer.getFeatures(request)
                  if isinstance(f.attribute(index), (int, float))]
    limits = quantile_ranges(values, classes)
    digits = label_precision([v for pair in limits for v in pair])
    ramp = _ramp("Viridis")
    ranges = []
    for i, (lo, hi) in enumerate(limits):
        color = ramp.color(i / max(len(limits) - 1, 1))
        label = f"{lo:.{digits}f}" if lo == hi else f"{lo:.{digits}f} - {hi:.{digits}f}"
        ranges.append(QgsRendererRange(lo, hi, _fill_symbol(color, 0.7), label))
    layer.setRenderer(QgsGraduatedSymbolRenderer(field, ranges))
    layer.triggerRepaint()


def _ramp(name: str):
    ramp = QgsStyle.defaultStyle().colorRamp(name)
    return ramp if ramp is not None else QgsGradientColorRamp(QColor("#440154"), QColor("#fde725"))


def load_heatmap(path: str, title: str) -> QgsRasterLayer:
    layer = QgsRasterLayer(path, title, "gdal")
    if not layer.isValid():
        raise ValueError(tr("Cannot open the heat map {path}").format(path=path))
    style_pseudocolor(layer)
    return layer


def style_pseudocolor(layer: QgsRasterLayer, band: int = 1) -> None:
    provider = layer.dataProvider()
    stats = provider.bandStatistics(band, QgsRasterBandStats.Stats.Min | QgsRasterBandStats.Stats.Max)
    lo, hi = stats.minimumValue, stats.maximumValue
    if not hi > lo:
        hi = lo + 1e-6
    ramp_shader = QgsColorRampShader(lo, hi)
    ramp_shader.setSourceColorRamp(_ramp("Magma"))
    ramp_shader.setColorRampType(QgsColorRampShader.Type.Interpolated)
    ramp = _ramp("Magma")
    values = [lo + (hi - lo) * i / 4 for i in range(5)]
    digits = label_precision(values)
    items = [QgsColorRampShader.ColorRampItem(v, ramp.color(i / 4), f"{v:.{digits}f}") for i, v in enumerate(values)]
    ramp_shader.setColorRampItemList(items)
    shader = QgsRasterShader()
    shader.setRasterShaderFunction(ramp_shader)
    renderer = QgsSingleBandPseudoColorRenderer(provider, band, shader)
    renderer.setClassificationMin(lo)
    renderer.setClassificationMax(hi)
    layer.setRenderer(renderer)
    layer.setOpacity(0.75)
    layer.triggerRepaint()


def load_class_map(path: str, title: str) -> QgsRasterLayer:
    """The class-map GeoTIFF, styled by the QML the backend wrote beside it (class names, the vector colours)."""
    layer = QgsRasterLayer(path, title, "gdal")
    if not layer.isValid():
        raise ValueError(tr("Cannot open the class map {path}").format(path=path))
    style_class_map(layer)
    return layer


def style_class_map(layer: QgsRasterLayer) -> None:
    """Apply the class map's QML (a paletted renderer on the class band); Processing loads layers without their
    default style."""
    qml = Path(layer.source()).with_suffix(".qml")
    if qml.is_file():
        layer.loadNamedStyle(str(qml))
        layer.triggerRepaint()


def result_group(project: QgsProject | None = None):
    """The layer tree group all results go into (created on top of the tree when missing)."""
    project = project or QgsProject.instance()
    root = project.layerTreeRoot()
    group = root.findGroup(GROUP_NAME)
    if group is None:
        group = root.insertGroup(0, GROUP_NAME)
    group.setExpanded(True)
    return group


def add_to_group(layers: list, project: QgsProject | None = None) -> None:
    """Add layers to the project inside the TilePrompt group, the first one on top."""
    project = project or QgsProject.instance()
    group = result_group(project)
    for layer in reversed(layers):
        project.addMapLayer(layer, False)
        group.insertLayer(0, layer)


def summary_rows(counts: Counter, class_order: list[str] | None = None) -> list[tuple[str, int, float]]:
    """(class, count, percent) for every prompt class in prompt order (0 when no tile has it), then any other."""
    total = sum(counts.values()) or 1
    order = list(class_order or []) + sorted(c for c in counts if c not in (class_order or []))
    return [(c, counts.get(c, 0), 100.0 * counts.get(c, 0) / total) for c in order]


def output_stem(name: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name).strip("_")
    return keep[:40] or "layer"


def gpkg_path(path: str | Path) -> str:
    path = str(path)
    return path if path.lower().endswith(".gpkg") else path + ".gpkg"
