"""Sentinel-2 support: the band catalogue, product readers, the processing-baseline offset and the model-input
conversions (scaling, RGB composite).

Names are imported on first use (PEP 562), so the band catalogue (``sentinel2.bands``) is importable without
importing rasterio through the readers.
"""

from importlib import import_module

_EXPORTS = {
    **{name: "bands" for name in ("BAND_GSD", "BANDS", "EUROSAT_ORDER", "FILLABLE_BANDS", "L2A_BANDS", "RGB_BANDS",
                                  "normalize_band_name", "try_band_name")},
    **{name: "composite" for name in ("RGB_DIVISORS", "rgb_composite", "scale_reflectance")},
    **{name: "offset" for name in ("NO_OFFSET", "Offset", "detect_offset", "subtract_offset")},
    **{name: "readers" for name in ("RGB_NAMES", "RasterInfo", "RasterSource", "describe_bands", "open_raster")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
