"""Full-size scenes made from small real samples, for benchmarks and memory tests (nothing here is shipped data).

    write_scene(sample, out, layout="multiband", size=10980)

mirror-tiles every band of a real Sentinel-2 sample (e.g. the eo-box IMG_DATA folder, 1536 x 768 px) to a
``size`` x ``size`` scene of the same CRS and pixel size, with a diagonal no-data wedge on the right like the
edge of a real orbit swath. Layouts:

- ``multiband``: one 13-band uint16 GeoTIFF at 10 m (band descriptions B01..B12), deflate + horizontal
  predictor, 512 px blocks, pixel-interleaved: the form a user's exported or cloud-optimised scene takes;
- ``band-files``: one uint16 GeoTIFF per band at its native 10/20/60 m (``B01.tif`` ... as in Major-TOM, deflate,
  512 px blocks): a product's own resolutions, which the reader resamples onto the 10 m grid.

Written in strips of one block row, so memory stays at one strip whatever ``size`` is.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from .bands import BAND_GSD, BANDS
from .readers import open_raster

LAYOUTS = ("multiband", "band-files")
#: GeoTIFF block size of the written files (GDAL's usual COG block).
BLOCK = 512
#: The no-data wedge runs from this share of the width at the top row to the second share at the bottom row.
WEDGE = (0.92, 0.78)


def mirror_index(n: int, period: int, start: int = 0) -> np.ndarray:
    """Indices ``start .. start + n - 1`` folded into ``0 .. period - 1`` by mirroring (0 1 2 2 1 0 0 1 ...)."""
    i = np.arange(start, start + n) % (2 * period)
    return np.where(i < period, i, 2 * period - 1 - i)


def nodata_mask(rows: np.ndarray, n_cols: int, size: int, factor: int = 1) -> np.ndarray:
    """True where the swath-edge wedge covers a pixel, for pixels of ``factor`` x 10 m (rows in that grid)."""
    y = (rows[:, None] + 0.5) * factor / size
    x = (np.arange(n_cols)[None, :] + 0.5) * factor / size
    return x > WEDGE[0] + (WEDGE[1] - WEDGE[0]) * y


def write_scene(sample: str | os.PathLike, out: str | os.PathLike, layout: str = "multiband",
                size: int = 10980) -> Path:
    """Write a ``size`` x ``size`` scene mirror-tiled from the real ``sample`` (any layout ``open_raster`` reads
    with all 13 bands); returns the file (multiband) or folder (band-files) to open."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (valid: {', '.join(LAYOUTS)})")
    if layout == "band-files" and size % 6:
        raise ValueError(f"band files need a size that 20 and 60 m pixels divide (a multiple of 6), got {size}")
    out = Path(out)
    with open_raster(sample) as src:
        info = src.info
        missing = [b for b in BANDS if b not in info.bands]
        if missing:
            raise ValueError(f"the sample lacks {', '.join(missing)}; give a 13-band L1C sample: {sample}")
        origin = (info.transform.c, info.transform.f)
        res = info.res[0]
        if layout == "multiband":
            cube = np.rint(src.read(Window(0, 0, info.width, info.height), BANDS)).astype(np.uint16)
            _write_multiband(out, cube, size, info.crs, Affine(res, 0, origin[0], 0, -res, origin[1]))
            return out
        files = dict(info.files)
    out.mkdir(parents=True, exist_ok=True)
    for band in BANDS:
        factor = BAND_GSD[band] // 10
        with rasterio.open(files[band]) as ds:
            native = ds.read(1)
        n = size // factor
        transform = Affine(res * factor, 0, origin[0], 0, -res * factor, origin[1])
        _write_band(out / f"{band}.tif", native, n, factor, size, info.crs, transform)
    return out


def _profile(width: int, height: int, count: int, crs, transform) -> dict:
    return {"driver": "GTiff", "dtype": "uint16", "width": width, "height": height, "count": count, "crs": crs,
            "transform": transform, "nodata": 0, "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK,
            "compress": "deflate", "predictor": 2, "interleave": "pixel", "BIGTIFF": "IF_SAFER", "NUM_THREADS": "ALL_CPUS"}


def _write_multiband(path: Path, cube: np.ndarray, size: int, crs, transform) -> None:
    _, h, w = cube.shape
    cols = mirror_index(size, w)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.tif")
    with rasterio.open(tmp, "w", **_profile(size, size, len(BANDS), crs, transform)) as dst:
        for i, band in enumerate(BANDS, start=1):
            dst.set_band_description(i, band)
        for r0 in range(0, size, BLOCK):
            n = min(BLOCK, size - r0)
            strip = cube[:, mirror_index(n, h, r0)][:, :, cols]
            strip[:, nodata_mask(np.arange(r0, r0 + n), size, size)] = 0
            dst.write(strip, window=Window(0, r0, size, n))
    tmp.replace(path)


def _write_band(path: Path, native: np.ndarray, n: int, factor: int, size: int, crs, transform) -> None:
    h, w = native.shape
    cols = mirror_index(n, w)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.tif")
    with rasterio.open(tmp, "w", **_profile(n, n, 1, crs, transform)) as dst:
        for r0 in range(0, n, BLOCK):
            rows = min(BLOCK, n - r0)
            strip = native[mirror_index(rows, h, r0)][:, cols]
            strip[nodata_mask(np.arange(r0, r0 + rows), n, size, factor)] = 0
            dst.write(strip, 1, window=Window(0, r0, n, rows))
    tmp.replace(path)
