"""The Sentinel-2 MSI band catalogue and the project's canonical band order."""

from __future__ import annotations

import re

#: Canonical band order used throughout the project (13 bands, as in L1C products and SSL4EO-S12).
BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12",
)
#: L2A products have no cirrus band B10.
L2A_BANDS: tuple[str, ...] = tuple(b for b in BANDS if b != "B10")
#: EuroSAT's 13-band GeoTIFFs keep B8A last.
EUROSAT_ORDER: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A",
)
#: Native ground sampling distance of each band in metres.
BAND_GSD: dict[str, int] = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20,
    "B08": 10, "B8A": 20, "B09": 60, "B10": 60, "B11": 20, "B12": 20,
}
#: The bands of CLIP's RGB composite, in R, G, B order.
RGB_BANDS: tuple[str, str, str] = ("B04", "B03", "B02")
#: Bands that may be zero-filled when a product lacks them (L2A has no B10).
FILLABLE_BANDS: frozenset[str] = frozenset({"B10"})
#: Per-band mean and standard deviation of L1C DN over 50k SSL4EO-S12 samples (Wang et al. 2022; method notes
#: §2.11). CMID standardises its reconstruction targets with them so every band weighs alike in the loss.
SSL4EO_L1C_MEAN: dict[str, float] = dict(zip(BANDS, (
    1605.57504906, 1390.78157673, 1314.8729939, 1363.52445545, 1549.44374991, 2091.74883118, 2371.7172463,
    2299.90463006, 2560.29504086, 830.06605044, 22.10351321, 2177.07172323, 1524.06546312)))
SSL4EO_L1C_STD: dict[str, float] = dict(zip(BANDS, (
    786.78685367, 850.34818441, 875.06484736, 1138.84957046, 1122.17775652, 1161.59187054, 1274.39184232,
    1248.42891965, 1345.52684884, 577.31607053, 51.15431158, 1336.09932639, 1136.53823676)))

_BAND_RE = re.compile(r"^B0*(\d{1,2})(A?)$", re.IGNORECASE)


def normalize_band_name(name: str) -> str:
    """Map the spellings found in products and datasets onto the catalogue.

    ``"B1"``, ``"b01"``, ``"B8A"``, ``"B08A"``, ``"B8a"`` -> ``"B01"``, ``"B01"``, ``"B8A"``, ``"B8A"``, ``"B8A"``.
    Raises ValueError for names that are not Sentinel-2 MSI bands.
    """
    m = _BAND_RE.match(name.strip())
    if not m:
        raise ValueError(f"not a Sentinel-2 band name: {name!r} (expected one of {', '.join(BANDS)})")
    number, a = int(m.group(1)), m.group(2).upper()
    candidate = f"B{number}A" if a else f"B{number:02d}"
    if candidate not in BAND_GSD:
        raise ValueError(f"not a Sentinel-2 band name: {name!r} (expected one of {', '.join(BANDS)})")
    return candidate


def try_band_name(name: str | None) -> str | None:
    """Like :func:`normalize_band_name` but returns None for anything that is not a band name."""
    if not name:
        return None
    try:
        return normalize_band_name(name)
    except ValueError:
        return None
