"""The class-map GeoTIFF: a classification as a raster, one pixel per tile, for further raster analysis.

Pixel (row, col) is tile (row, col) of the grid; it covers the tile's centre cell (``stride`` x ``stride`` source
pixels in the middle of the tile), so with overlapping tiles the pixels tile the area without overlap, and
without overlap pixel and tile coincide. The raster has the source raster's CRS.

Bands, all UInt16 with nodata 65535 (one nodata value serves every band of a GeoTIFF):

1. ``class``: the class index, 1 for the first prompt class, 2 for the second ...; the QML beside the file (QGIS
   loads it with the layer) gives each class its name and the colour of the vector layer's category
   (``resources/styles/palette.json``). A TIFF colour table needs a one-band file (palette photometric), so the
   colours are not one: the metadata keeps them too (``TILEPROMPT_CLASSES``, ``TILEPROMPT_COLORS``, JSON);
2. ``score``: the best class's score, stored x 10000 with scale 0.0001 (GDAL, rasterio's ``masked``/``scales`` and
   QGIS read 0..1);
3. one ``s_<class>`` band per class, the same way.

Tiles outside the area of interest, mostly-nodata tiles and the grid's overhang are nodata. Written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import quoteattr

import numpy as np
import rasterio
from affine import Affine

from .outputs import atomic_path
from .paths import resources_dir

NODATA = 65535
SCORE_SCALE = 1e-4  # a stored value of 10000 is a score of 1.0
MAX_CLASSES = 65534  # class indices 1..65534 fit below the nodata value


def palette() -> list[str]:
    """Class colours by class index (``#rrggbb``), the ones the plugin gives the vector layer's categories."""
    return json.loads((resources_dir() / "styles" / "palette.json").read_text(encoding="utf-8"))["colors"]


def class_color(index: int) -> str:
    colors = palette()
    return colors[index % len(colors)]


def class_map_transform(transform: Affine, tile_px: int, stride: int) -> Affine:
    """The class map's geotransform: pixel (r, c) is the centre cell of tile (r, c) of the source grid."""
    offset = (tile_px - stride) / 2
    return transform * Affine.translation(offset, offset) * Affine.scale(stride)


def write_class_map(path: str | Path, crs, transform: Affine, tile_px: int, stride: int, shape: tuple[int, int],
                    rows: np.ndarray, cols: np.ndarray, scores: np.ndarray, class_names: Sequence[str],
                    score_columns: Sequence[str], tags: dict | None = None) -> Path:
    """Write the class map of tiles (``rows``, ``cols``) with their (N, C) ``scores`` and its QML, atomically.

    ``shape`` is the grid's (n_rows, n_cols); ``transform`` the source raster's geotransform.
    """
    path = Path(path)
    scores = np.asarray(scores, dtype=np.float64).reshape(len(rows), len(class_names))
    if len(class_names) > MAX_CLASSES:
        raise ValueError(f"a class map holds at most {MAX_CLASSES} classes, not {len(class_names)}")
    n_rows, n_cols = shape
    count = 2 + len(class_names)
    bands = np.full((count, n_rows, n_cols), NODATA, dtype=np.uint16)
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    if len(rows):
        best = np.argmax(scores, axis=1)
        bands[0, rows, cols] = best + 1
        bands[1, rows, cols] = _stored(scores[np.arange(len(rows)), best])
        for c in range(len(class_names)):
            bands[2 + c, rows, cols] = _stored(scores[:, c])
    profile = {
        "driver": "GTiff", "dtype": "uint16", "count": count, "width": n_cols, "height": n_rows, "crs": crs,
        "transform": class_map_transform(transform, tile_px, stride), "nodata": NODATA, "compress": "deflate",
        "predictor": 2, "interleave": "band",
    }
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(bands)
            dst.scales = (1.0, *([SCORE_SCALE] * (count - 1)))
            dst.offsets = (0.0,) * count
            for band, description in enumerate(("class", "score", *score_columns), start=1):
                dst.set_band_description(band, description)
            dst.update_tags(TILEPROMPT_CLASSES=json.dumps(list(class_names)),
                            TILEPROMPT_COLORS=json.dumps([class_color(i) for i in range(len(class_names))]),
                            **{k: str(v) for k, v in (tags or {}).items()})
    _write_text_atomically(qml_path(path), class_map_qml(class_names))
    return path


def qml_path(path: str | Path) -> Path:
    """Where QGIS looks for a layer's default style: the file name with ``.qml``."""
    return Path(path).with_suffix(".qml")


def class_map_qml(class_names: Sequence[str]) -> str:
    """A QGIS style (paletted renderer on band 1) naming every class in its vector-layer colour."""
    entries = "\n".join(
        f'        <paletteEntry value="{i + 1}" color="{class_color(i)}" alpha="255" label={quoteattr(name)}/>'
        for i, name in enumerate(class_names))
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.22.0" styleCategories="Symbology">
  <pipe>
    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">
      <rasterTransparency/>
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>
    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>
    <huesaturation saturation="0" grayscaleMode="0" colorizeOn="0" colorizeRed="255" colorizeGreen="128"
                   colorizeBlue="128" colorizeStrength="100"/>
    <rasterresampler maxOversampling="2"/>
  </pipe>
  <blendMode>0</blendMode>
</qgis>
"""


def _stored(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(values, dtype=np.float64) / SCORE_SCALE), 0, 10000).astype(np.uint16)


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
