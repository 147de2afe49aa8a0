"""How the backend gets at a layer's pixels: a file path, a product folder, or a GeoTIFF exported here first.

The backend reads rasters with its own GDAL, by path. A layer QGIS reads from a local file (GeoTIFF, JP2, VRT)
is sent as that path; a band file of a multi-file Sentinel-2 product (or a VRT of such band files) is sent as
the product folder; anything else - WMS/XYZ tiles, in-memory and virtual rasters, ``/vsi`` paths - is exported
on the UI thread to a temporary GeoTIFF of the requested extent at the model's ground sampling distance
(``QgsRasterFileWriter`` + ``QgsRasterPipe``) before the job. Web tiles are written as rendered RGB(A).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterFileWriter,
    QgsRasterLayer,
    QgsRasterPipe,
    QgsRasterProjector,
    QgsRectangle,
)

from . import compat
from .bands import ProductFolder, band_from_description, band_from_filename, band_map_from_vrt, \
    find_product_folder, vrt_sources
from .i18n import tr
from .parameters import Extent

#: Largest export, in pixels per side, before the user is asked for a smaller area.
MAX_EXPORT_PX = 12000
WEB_PROVIDERS = ("wms", "xyz", "arcgismapserver", "wcs")


@dataclass
class LayerSource:
    """What the dock shows about a raster layer and offers as the job's input."""

    layer_id: str
    band_count: int
    path: str = ""  # local file QGIS reads, "" when there is none
    product: ProductFolder | None = None  # the multi-file product the file belongs to
    file_bands: list = field(default_factory=list)  # detected band name (or None) per band of the file
    needs_export: bool = False
    web: bool = False  # WMS/XYZ: export the map extent, never "the whole layer"
    rendered: bool = False  # ARGB web tiles: exported as rendered RGBA

    def describe(self, use_product: bool = True) -> str:
        if self.needs_export:
            kind = tr("web map tiles") if self.web else tr("a layer without a local file")
            return tr("{kind}: exported to a GeoTIFF at the model's resolution before each job").format(kind=kind)
        if self.product is not None and use_product:
            return tr("product folder {folder} ({n} band files: {bands})").format(
                folder=self.product.folder.name, n=len(self.product.bands), bands=", ".join(self.product.band_names))
        return tr("file {name} ({n} bands)").format(name=Path(self.path).name, n=self.band_count)


def local_path(layer: QgsRasterLayer) -> str:
    """The local file or folder behind a GDAL layer, '' when there is none (or it is a /vsi path)."""
    if layer.providerType() != "gdal":
        return ""
    path = QgsProviderRegistry.instance().decodeUri("gdal", layer.source()).get("path") or ""
    if not path or path.startswith("/vsi") or "://" in path:
        return ""
    return path if Path(path).exists() else ""


def inspect_layer(layer: QgsRasterLayer) -> LayerSource:
    provider = layer.dataProvider()
    count = layer.bandCount()
    source = LayerSource(layer.id(), count)
    path = local_path(layer)
    if not path:
        source.needs_export = True
        source.web = layer.providerType() in WEB_PROVIDERS
        source.rendered = provider is not None and provider.dataType(1) in compat.ARGB_DATA_TYPES
        source.file_bands = [band_from_description(layer.bandName(i)) for i in range(1, count + 1)]
        return source
    source.path = path
    files = [path]
    vrt_names: list = []
    if path.lower().endswith(".vrt"):
        files = [f for band in vrt_sources(path) for f in band]
        vrt_names = band_map_from_vrt(path)
    source.product = find_product_folder(files)
    names = []
    for i in range(1, count + 1):
        name = band_from_description(layer.bandName(i))
        if name is None and i <= len(vrt_names):
            name = vrt_names[i - 1]
        if name is None and count == 1:
            name = band_from_filename(path)
        names.append(name)
    source.file_bands = names
    return source


def _is_metric(crs: QgsCoordinateReferenceSystem) -> bool:
    return (not crs.isGeographic() and crs.mapUnits() == compat.METERS
            and crs.authid() not in ("EPSG:3857", "EPSG:900913", "EPSG:3395"))


def utm_crs(lon: float, lat: float) -> QgsCoordinateReferenceSystem:
    zone = min(60, max(1, int(math.floor((lon + 180) / 6)) + 1))
    return QgsCoordinateReferenceSystem(f"EPSG:{32600 + zone if lat >= 0 else 32700 + zone}")


def export_grid(layer: QgsRasterLayer, extent: Extent, gsd_m: float, web: bool):
    """(target CRS, extent in it, columns, rows) of an export of ``extent`` at ``gsd_m`` metres per pixel."""
    project = QgsProject.instance()
    extent_crs = QgsCoordinateReferenceSystem(extent.crs)
    rect = QgsRectangle(extent.xmin, extent.ymin, extent.xmax, extent.ymax)
    layer_crs = layer.crs()
    if not web:  # never ask for more than the layer has
        to_extent_crs = QgsCoordinateTransform(layer_crs, extent_crs, project)
        rect = rect.intersect(to_extent_crs.transformBoundingBox(layer.extent()))
        if rect.isEmpty():
            raise ValueError(tr("The area does not overlap layer {name}.").format(name=layer.name()))
    if _is_metric(layer_crs):
        target = layer_crs
    else:  # degrees, or web mercator (whose metres are not ground metres): the local UTM zone
        centre = QgsCoordinateTransform(extent_crs, QgsCoordinateReferenceSystem("EPSG:4326"), project) \
            .transform(rect.center())
        target = utm_crs(centre.x(), centre.y())
    target_rect = QgsCoordinateTransform(extent_crs, target, project).transformBoundingBox(rect)
    cols = max(1, int(math.ceil(target_rect.width() / gsd_m)))
    rows = max(1, int(math.ceil(target_rect.height() / gsd_m)))
    if cols > MAX_EXPORT_PX or rows > MAX_EXPORT_PX:
        raise ValueError(tr("The area is too large to export at {gsd:g} m per pixel ({cols} x {rows} pixels); "
                            "zoom in or choose a smaller area.").format(gsd=gsd_m, cols=cols, rows=rows))
    # Snap the extent to whole pixels so the written GeoTIFF has exactly gsd_m pixels.
    target_rect = QgsRectangle(target_rect.xMinimum(), target_rect.yMaximum() - rows * gsd_m,
                               target_rect.xMinimum() + cols * gsd_m, target_rect.yMaximum())
    return target, target_rect, cols, rows


def export_path(folder: Path, layer: QgsRasterLayer, extent: Extent, gsd_m: float) -> Path:
    key = hashlib.sha256(repr((layer.id(), layer.source(), extent, gsd_m)).encode()).hexdigest()[:12]
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in layer.name())[:30] or "layer"
    return folder / f"{stem}_{key}.tif"


def export_layer(layer: QgsRasterLayer, extent: Extent, gsd_m: float, folder: Path, web: bool = False,
                 rendered: bool | None = None, feedback=None) -> Path:
    """Write ``extent`` of ``layer`` to a GeoTIFF at ``gsd_m``; UI thread (providers belong to it).

    Re-uses an earlier export of the same layer, extent and resolution (so a search re-uses its index).
    """
    if gsd_m <= 0:
        raise ValueError(tr("The model does not say its ground sampling distance; cannot export."))
    out = export_path(Path(folder), layer, extent, gsd_m)
    if out.is_file() and out.stat().st_size > 0:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    target, rect, cols, rows = export_grid(layer, extent, gsd_m, web)
    provider = layer.dataProvider()
    if rendered is None:
        rendered = provider.dataType(1) in compat.ARGB_DATA_TYPES
    pipe = QgsRasterPipe()
    if not pipe.set(provider.clone()):
        raise ValueError(tr("Cannot read layer {name} for export.").format(name=layer.name()))
    if rendered:
        pipe.set(layer.renderer().clone())
    if target != layer.crs():
        projector = QgsRasterProjector()
        projector.setCrs(layer.crs(), target, QgsProject.instance().transformContext())
        pipe.set(projector)
    partial = out.with_suffix(".partial.tif")
    writer = QgsRasterFileWriter(str(partial))
    writer.setOutputFormat("GTiff")
    writer.setCreateOptions(["COMPRESS=DEFLATE", "TILED=YES"])
    error = writer.writeRaster(pipe, cols, rows, rect, target, QgsProject.instance().transformContext(), feedback)
    if error != compat.WRITER_NO_ERROR or not partial.is_file():
        raise ValueError(tr("Exporting layer {name} to {path} failed (error {code}).").format(
            name=layer.name(), path=out, code=int(error)))
    partial.replace(out)
    return out
