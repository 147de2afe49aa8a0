"""Similarity heat maps: one float32 value per tile footprint on the raster's own grid, as a GeoTIFF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from ..outputs import atomic_path

#: Value of pixels no tile with a similarity covers (nodata tiles, query tiles, the grid's overhang).
NODATA = -9999.0
#: Pixel rows written per block (memory stays at BLOCK_ROWS x width x 4 bytes).
BLOCK_ROWS = 512


def write_heatmap(path: str | Path, scene, windows: np.ndarray, values: np.ndarray,
                  tags: dict[str, Any] | None = None, description: str = "cosine similarity to the query") -> Path:
    """Write ``values`` (one per tile) over the tiles' pixel ``windows`` ((n, 4): col_off, row_off, width,
    height) of ``scene`` (a :class:`~.store.SceneRecord`: CRS, transform, size), atomically.

    Where tiles overlap (stride < tile) a pixel takes the largest value; pixels under no tile are
    :data:`NODATA`. The file has the scene's CRS, transform, width and height.
    """
    path = Path(path)
    windows = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    if len(windows) != len(values):
        raise ValueError(f"heat map: {len(values)} values for {len(windows)} tiles")
    width, height = int(scene.width), int(scene.height)
    profile = {
        "driver": "GTiff", "dtype": "float32", "count": 1, "width": width, "height": height,
        "crs": scene.rasterio_crs(), "transform": scene.affine, "nodata": NODATA, "compress": "deflate",
        "predictor": 3, "tiled": True, "blockxsize": 256, "blockysize": 256, "BIGTIFF": "IF_SAFER",
    }
    col0, row0 = windows[:, 0], windows[:, 1]
    col1, row1 = np.minimum(col0 + windows[:, 2], width), np.minimum(row0 + windows[:, 3], height)
    col0, row0 = np.maximum(col0, 0), np.maximum(row0, 0)
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.set_band_description(1, description)
            if tags:
                dst.update_tags(**{k: str(v) for k, v in tags.items()})
            for r0 in range(0, height, BLOCK_ROWS):
                r1 = min(height, r0 + BLOCK_ROWS)
                block = np.full((r1 - r0, width), -np.inf, dtype=np.float32)
                for i in np.flatnonzero((row0 < r1) & (row1 > r0) & (col1 > col0)):
                    a, b = max(row0[i], r0) - r0, min(row1[i], r1) - r0
                    view = block[a:b, col0[i]:col1[i]]
                    np.maximum(view, values[i], out=view)
                block[~np.isfinite(block)] = NODATA
                dst.write(block, 1, window=Window(0, r0, width, r1 - r0))
    return path
