"""Result layers: load the backend's GeoPackages and GeoTIFFs, style them, put them in the TilePrompt group.

UI thread only (it touches the project). Classification: layer ``tiles`` with a categorized renderer on
``class`` (one colour per class, stable across runs: the colour follows the class's position in the prompt list)
and a per-class count. Similar tiles: layer ``similar`` graduated on ``similarity``; the heat map GeoTIFF with a
pseudocolor renderer. Change between dates: layer ``change`` graduated on ``score``, its heat map likewise.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsColorRampShader,
    QgsFeatureRequest,
    QgsFillSymbol,
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
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

from . import compat
from .i18n import tr

GROUP_NAME = "TilePrompt"
TILES_LAYER = "tiles"
SIMILAR_LAYER = "similar"
CHANGE_LAYER = "change"

# A qualitative palette (ColorBrewer Set1/Paired-like, readable on imagery); classes beyond it get hues spread
# around the colour wheel.
PALETTE = ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#ffff33", "#a65628", "#f781bf",
           "#1b9e77", "#66a61e", "#e6ab02", "#7570b3", "#17becf", "#bcbd22", "#8c564b", "#999999"]


def class_color(index: int) -> QColor:
    if index < len(PALETTE):
        return QColor(PALETTE[index])
    return QColor.fromHsv(int((index * 137.508) % 360), 200, 230)


def _fill_symbol(color: QColor, opacity: float = 0.55) -> QgsFillSymbol:
    symbol = QgsFillSymbol.createSimple({
        "color": f"{color.red()},{color.green()},{color.blue()},255",
        "outline_color": f"{color.darker(150).red()},{color.darker(150).green()},{color.darker(150).blue()},255",
        "outline_width": "0.15",
    })
    symbol.setOpacity(opacity)
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


def style_categorized(layer: QgsVectorLayer, class_order: list[str] | None = None, field: str = "class") -> Counter:
    """One category per class found (ordered as the prompts, then the rest); returns the per-class counts."""
    counts = class_counts(layer, field)
    prompt_order = list(class_order or [])
    palette_order = prompt_order + sorted(c for c in counts if c not in prompt_order)
    categories = []
    for c in palette_order:
        if c in counts:
            symbol = _fill_symbol(class_color(palette_order.index(c)))
            categories.append(QgsRendererCategory(c, symbol, f"{c} ({counts[c]})"))
    layer.setRenderer(QgsCategorizedSymbolRenderer(field, categories))
    layer.triggerRepaint()
    return counts


def _field_range(layer: QgsVectorLayer, field: str) -> tuple[float, float]:
    index = layer.fields().indexOf(field)
    lo, hi = layer.minimumValue(index), layer.maximumValue(index)
    try:
        return float(lo), float(hi)
    except (TypeError, ValueError):
        return 0.0, 1.0


def style_graduated(layer: QgsVectorLayer, field: str = "similarity", classes: int = 5) -> None:
    """Equal-interval classes of ``field`` from pale to strong (a Viridis-like ramp, strongest = most similar)."""
    lo, hi = _field_range(layer, field)
    if hi <= lo:
        hi = lo + 1e-6
    ramp = _ramp("Viridis")
    ranges = []
    for i in range(classes):
        a = lo + (hi - lo) * i / classes
        b = lo + (hi - lo) * (i + 1) / classes
        color = ramp.color(i / max(classes - 1, 1))
        ranges.append(QgsRendererRange(a, b, _fill_symbol(color, 0.7), f"{a:.3f} - {b:.3f}"))
    renderer = QgsGraduatedSymbolRenderer(field, ranges)
    layer.setRenderer(renderer)
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
    items = []
    for i in range(5):
        value = lo + (hi - lo) * i / 4
        items.append(QgsColorRampShader.ColorRampItem(value, ramp.color(i / 4), f"{value:.3f}"))
    ramp_shader.setColorRampItemList(items)
    shader = QgsRasterShader()
    shader.setRasterShaderFunction(ramp_shader)
    renderer = QgsSingleBandPseudoColorRenderer(provider, band, shader)
    renderer.setClassificationMin(lo)
    renderer.setClassificationMax(hi)
    layer.setRenderer(renderer)
    layer.setOpacity(0.75)
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
