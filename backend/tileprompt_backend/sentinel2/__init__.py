"""Sentinel-2 support: the band catalogue, product readers, the baseline offset and the model-input conversions."""

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
from .offset import NO_OFFSET, Offset, detect_offset, parse_offset_mode, subtract_offset
from .readers import RGB_NAMES, RasterInfo, RasterSource, describe_bands, open_raster

__all__ = [
    "BAND_GSD",
    "BANDS",
    "EUROSAT_ORDER",
    "FILLABLE_BANDS",
    "L2A_BANDS",
    "NO_OFFSET",
    "Offset",
    "RGB_BANDS",
    "RGB_DIVISORS",
    "RGB_NAMES",
    "RasterInfo",
    "RasterSource",
    "describe_bands",
    "detect_offset",
    "normalize_band_name",
    "open_raster",
    "parse_offset_mode",
    "rgb_composite",
    "scale_reflectance",
    "subtract_offset",
    "try_band_name",
]
