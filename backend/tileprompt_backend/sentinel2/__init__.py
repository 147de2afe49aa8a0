"""Sentinel-2 support: the band catalogue, product readers and the model-input conversions (scaling, RGB composite)."""

from .bands import (
    BAND_GSD,
    BANDS,
    EUROSAT_ORDER,
    FILLABLE_BANDS,
    L2A_BANDS,
    RGB_BANDS,
    normalize_band_name,
    try_band_name,
)
from .composite import RGB_DIVISORS, rgb_composite, scale_reflectance
from .readers import RGB_NAMES, RasterInfo, RasterSource, describe_bands, open_raster

__all__ = [
    "BAND_GSD",
    "BANDS",
    "EUROSAT_ORDER",
    "FILLABLE_BANDS",
    "L2A_BANDS",
    "RGB_BANDS",
    "RGB_DIVISORS",
    "RGB_NAMES",
    "RasterInfo",
    "RasterSource",
    "describe_bands",
    "normalize_band_name",
    "open_raster",
    "rgb_composite",
    "scale_reflectance",
    "try_band_name",
]
