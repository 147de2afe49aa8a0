"""Turning typed parameters into backend requests: inputs made readable, outputs named, indexes re-used.

Shared by the dock's runs (plugin.py) and the Processing algorithms (algorithms.py). UI thread only where it
exports a layer (``prepare_raster``); the rest is plain Python.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from qgis.core import QgsProject, QgsRasterLayer

from . import compat
from .i18n import tr
from .parameters import Extent, InputKind, RasterInput, SearchParameters
from .session import BackendSession
from .sources import export_layer, inspect_layer

#: Resolution of an export when neither the user nor the model says one (Sentinel-2's finest bands).
FALLBACK_GSD_M = 10.0


def prepare_raster(raster: RasterInput, gsd_m: float | None, exports_dir: Path,
                   layer: QgsRasterLayer | None = None) -> RasterInput:
    """``raster`` readable by path: exports layers the backend cannot open (UI thread)."""
    if raster.kind is not InputKind.EXPORT:
        return raster
    layer = layer or QgsProject.instance().mapLayer(raster.layer_id)
    if not isinstance(layer, QgsRasterLayer):
        raise ValueError(tr("Layer {name} is no longer in the project.").format(name=raster.layer_name))
    source = inspect_layer(layer)
    path = export_layer(layer, raster.export_extent, float(gsd_m or FALLBACK_GSD_M), exports_dir, web=source.web,
                        rendered=source.rendered)
    # Rendered web tiles become plain RGB(A) bytes, which the backend recognises without a band map.
    return raster.with_path(str(path), None if source.rendered else raster.band_map)


def new_output(folder: Path, stem: str, suffix: str = ".gpkg") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem)[:40].strip("_") or "result"
    base = folder / f"{safe}_{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = Path(f"{base}{suffix}"), 1
    while path.exists():
        n += 1
        path = Path(f"{base}_{n}{suffix}")
    return str(path)


def class_map_path(gpkg: str) -> str:
    """The class-map GeoTIFF written beside a classification GeoPackage (same name, ``.tif``)."""
    return str(Path(gpkg).with_suffix(".tif"))


@dataclass(frozen=True)
class SearchPlan:
    requests: list  # the index request, then a function of its status giving the search request
    out: str
    heatmap: str | None


def plan_search(params: SearchParameters, session: BackendSession, out: str, heatmap: str | None,
                index_dir: str | None = None) -> SearchPlan:
    """Index, then search the index the index job reports.

    The index job is always sent: the backend re-uses every embedding it already has (from an earlier index or
    classification of the same raster, model and grid), so a repeated search costs only a check.
    """
    model_tile = session.model_info(params.model).get("tile_px")
    if index_dir:
        Path(index_dir).parent.mkdir(parents=True, exist_ok=True)
    index_request = params.index_request(index_dir, model_tile)
    params.search_request(index_dir or "-", out, heatmap)  # raises now (UI thread) if the query is unusable

    def search_request(statuses: list) -> dict:
        folder = index_dir or (statuses[-1].get("result") or {}).get("index")
        if not folder:
            raise ValueError(tr("the index job did not say where the index is"))
        return params.search_request(folder, out, heatmap)

    return SearchPlan([index_request, search_request], out, heatmap)


def raster_input_from_layer(layer: QgsRasterLayer, use_product: bool = True, band_map: tuple | None = None,
                            level: str | None = None, export_extent=None, offset: str | float = "auto") -> RasterInput:
    """A RasterInput for ``layer`` without the dock (Processing): detected band names unless ``band_map``."""
    source = inspect_layer(layer)
    detected = tuple(source.file_bands) if source.file_bands and all(source.file_bands) else None
    if source.needs_export:
        if export_extent is None:
            if source.web:
                raise ValueError(tr("Layer {name} is a web map: give an extent to export.").format(name=layer.name()))
            rect = layer.extent()
            export_extent = Extent(rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum(),
                                   compat.crs_to_string(layer.crs()))
        return RasterInput(layer.id(), layer.name(), InputKind.EXPORT, "", band_map or detected, level, export_extent,
                           offset=offset)
    if source.product is not None and use_product:
        return RasterInput(layer.id(), layer.name(), InputKind.PRODUCT_FOLDER, str(source.product.folder), None, level,
                           offset=offset)
    return RasterInput(layer.id(), layer.name(), InputKind.FILE, source.path, band_map or detected, level,
                       offset=offset)
