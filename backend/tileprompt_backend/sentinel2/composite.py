"""Turn raw Sentinel-2 digital numbers into model inputs: scaled reflectance and CLIP's 8-bit RGB composite."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np

#: DN that maps to full brightness (255) in the RGB composite, per processing level. L2A surface reflectance is
#: darker than L1C top-of-atmosphere reflectance, hence the smaller divisor.
RGB_DIVISORS: Mapping[str, float] = MappingProxyType({"L2A": 2000.0, "L1C": 3558.0})


def scale_reflectance(
    dn: np.ndarray, divide: float = 10000.0, clip: tuple[float, float] | None = (0.0, 1.0)
) -> np.ndarray:
    """Scale raw DN to reflectance: ``dn / divide``, optionally clipped to ``clip``; returns float32."""
    if not divide:
        raise ValueError("scale_reflectance: divide must be non-zero")
    out = np.asarray(dn, dtype=np.float32) / np.float32(divide)
    if clip is not None:
        lo, hi = clip
        np.clip(out, lo, hi, out=out)
    return out


def rgb_composite(rgb_dn: np.ndarray, level: str, divisors: Mapping[str, float] = RGB_DIVISORS) -> np.ndarray:
    """8-bit RGB composite of B04, B03, B02 DN: ``clip(dn / divisor[level] * 255, 0, 255)`` as uint8.

    ``rgb_dn`` is (3, H, W) or (N, 3, H, W) in R, G, B order. Values are truncated, not rounded
    (1000 DN at L2A -> 127). Raises ValueError for a level without a divisor or a wrong shape.
    """
    key = str(level).upper()
    if key not in divisors:
        raise ValueError(f"no RGB composite divisor for level {level!r} (known: {', '.join(divisors)})")
    arr = np.asarray(rgb_dn, dtype=np.float32)
    if arr.ndim not in (3, 4) or arr.shape[-3] != 3:
        raise ValueError(f"rgb_composite expects (3, H, W) or (N, 3, H, W) in R, G, B order, got shape {arr.shape}")
    # Divide first, as in the formula: a pre-computed 255/divisor factor can land a hair below an exact
    # integer (2000 DN at L2A -> 254.99998 -> 254 after truncation).
    scaled = arr / np.float32(divisors[key]) * np.float32(255.0)
    # NaN (e.g. from a float source's no-data) would make the uint8 cast undefined; treat it as black.
    np.nan_to_num(scaled, copy=False, nan=0.0)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return scaled.astype(np.uint8)
