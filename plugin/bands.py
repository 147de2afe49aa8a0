"""Which Sentinel-2 band each band of a layer holds, and whether a file belongs to a multi-file product.

Pure Python (no QGIS objects), so it is tested on names alone. The backend reads:

* a multiband file (GeoTIFF, VRT ...) with an optional ``band_map`` = band names in file order;
* a folder of per-band files (SAFE ``IMG_DATA`` with ``T33UUU_20170216T102101_B04.jp2``, L2A's ``R10m/R20m/R60m``
  sub-folders, BigEarthNet ``<patch>_B01.tif``, Major-TOM ``B01.tif``) given by the folder path.

A user points the plugin at a multi-file product by loading any one band file of it (or a VRT built from its
band files, e.g. an RGB composite): :func:`find_product_folder` recognises the product and the job sends the
folder, so every band the model needs is read, not just the one on the map.
"""

from __future__ import annotations

import re
# Parses local VRT files the user loaded into QGIS, not remote input.
import xml.etree.ElementTree as ET  # nosec B405
from dataclasses import dataclass
from pathlib import Path

S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
RGB_BANDS = ("R", "G", "B")
KNOWN_BANDS = frozenset(S2_BANDS) | frozenset(RGB_BANDS)
BAND_FILE_SUFFIXES = frozenset({".tif", ".tiff", ".jp2"})
#: A folder is a product when it holds at least this many band files of one prefix.
MIN_PRODUCT_BANDS = 3

# A band token: B4, B04, B8A, b12 - not preceded by a letter or digit, optionally followed by an L2A "_10m".
_BAND_PATTERN = r"(?<![A-Za-z0-9])B0?(8A|1[0-2]|[1-9])(?![A-Za-z0-9])"
_BAND_RE = re.compile(_BAND_PATTERN, re.IGNORECASE)
_STEM_RE = re.compile(r"^(?P<prefix>.*?)" + r"B0?(?P<band>8A|1[0-2]|[1-9])" + r"(?:_(?P<res>\d+)m)?$", re.IGNORECASE)
_QGIS_BAND_PREFIX_RE = re.compile(r"^Band \d+\s*:?\s*")
_RGB_WORDS = {"red": "R", "r": "R", "green": "G", "g": "G", "blue": "B", "b": "B"}
_RES_DIR_RE = re.compile(r"^R\d+m$", re.IGNORECASE)


def canonical(number: str) -> str:
    """'4' -> 'B04', '8a' -> 'B8A', '12' -> 'B12'."""
    number = number.upper()
    return "B8A" if number == "8A" else f"B{int(number):02d}"


def band_from_description(text: str | None) -> str | None:
    """Band name from a band description or QGIS band name ('Band 2: B04 (red)' -> 'B04'; 'Red' -> 'R')."""
    if not text:
        return None
    text = _QGIS_BAND_PREFIX_RE.sub("", str(text)).strip()
    if not text:
        return None
    match = _BAND_RE.search(text)
    if match:
        return canonical(match.group(1))
    return _RGB_WORDS.get(text.lower())


def band_from_filename(path: str | Path) -> str | None:
    """Band name from a band file's name ('T33UUU_20170216T102101_B8A.jp2' -> 'B8A', 'B4.tif' -> 'B04')."""
    stem = Path(path).stem
    match = _STEM_RE.match(stem)
    if not match:
        return None
    prefix = match.group("prefix")
    if prefix and prefix[-1].isalnum():
        return None  # "SUB04" is not band 4
    return canonical(match.group("band"))


def _product_prefix(path: Path) -> str | None:
    match = _STEM_RE.match(path.stem)
    if not match or (match.group("prefix") and match.group("prefix")[-1].isalnum()):
        return None
    return match.group("prefix")


@dataclass(frozen=True)
class ProductFolder:
    """A folder of per-band files the backend reads as one raster."""

    folder: Path
    bands: dict  # band name -> file path

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(b for b in S2_BANDS if b in self.bands)


def _band_files(folder: Path, prefix: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return found
    for entry in entries:
        if entry.suffix.lower() not in BAND_FILE_SUFFIXES or not entry.is_file():
            continue
        if _product_prefix(entry) != prefix:
            continue
        band = band_from_filename(entry)
        if band and band not in found:
            found[band] = entry
    return found


def find_product_folder(files: list[str | Path]) -> ProductFolder | None:
    """The product folder that ``files`` (a band file, or the sources of a VRT) belong to, if they are band files.

    Every file must be a band file with the same prefix in the same folder (or in L2A's ``R10m``-style sibling
    folders); the folder must hold at least ``MIN_PRODUCT_BANDS`` bands of that prefix.
    """
    paths = [Path(f) for f in files]
    if not paths:
        return None
    prefixes = {_product_prefix(p) for p in paths}
    if None in prefixes or len(prefixes) != 1:
        return None
    prefix = prefixes.pop()
    folders = {p.parent for p in paths}
    # L2A: .../IMG_DATA/R10m/T.._B02_10m.jp2 -> the product is IMG_DATA with its resolution sub-folders.
    if all(_RES_DIR_RE.match(f.name) for f in folders):
        roots = {f.parent for f in folders}
        if len(roots) != 1:
            return None
        root = roots.pop()
        bands: dict[str, Path] = {}
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and _RES_DIR_RE.match(p.name)):
            for band, path in _band_files(sub, prefix).items():
                bands.setdefault(band, path)
        return ProductFolder(root, bands) if len(bands) >= MIN_PRODUCT_BANDS else None
    if len(folders) != 1:
        return None
    folder = folders.pop()
    bands = _band_files(folder, prefix)
    return ProductFolder(folder, bands) if len(bands) >= MIN_PRODUCT_BANDS else None


def vrt_sources(vrt_path: str | Path) -> list[list[str]]:
    """Source file names of each band of a VRT (band order), resolved against the VRT's folder when relative."""
    vrt_path = Path(vrt_path)
    try:
        root = ET.parse(vrt_path).getroot()  # nosec B314
    except (ET.ParseError, OSError):
        return []
    bands = []
    for band in root.iter("VRTRasterBand"):
        files = []
        for source in band.iter("SourceFilename"):
            name = (source.text or "").strip()
            if not name:
                continue
            if source.get("relativeToVRT") == "1":
                name = str((vrt_path.parent / name).resolve())
            files.append(name)
        bands.append(files)
    return bands


def band_map_from_vrt(vrt_path: str | Path) -> list[str | None]:
    """Band names of a VRT whose bands each come from one band file (None where a band cannot be named)."""
    names: list[str | None] = []
    for files in vrt_sources(vrt_path):
        found = {band_from_filename(f) for f in files}
        names.append(found.pop() if len(found) == 1 else None)
    return names


#: The band-map entry for a band to ignore (the backend's validation.SKIP).
SKIP = "-"


def band_map_dates(names: list[str]) -> int:
    """How many dates a band map describes: the most times one band name occurs (a stack of several dates)."""
    named = [n for n in names if n != SKIP]
    return max((named.count(n) for n in set(named)), default=0)


def validate_band_map(names: list[str], date: int | None = None) -> str | None:
    """An error message when a user-edited band map cannot be read, else None. ``-`` skips a band; repeated
    names describe several dates, and then ``date`` (1-based) says which one (the backend checks the same)."""
    unknown = [n for n in names if n not in KNOWN_BANDS and n != SKIP]
    if unknown:
        return "unknown band name(s): " + ", ".join(repr(n) for n in unknown) + \
            f" (use B01..B12, B8A, or R, G, B for plain RGB; {SKIP} skips a band)"
    if all(n == SKIP for n in names):
        return f"every band is skipped ({SKIP}): name at least one"
    dates = band_map_dates(names)
    if dates > 1 and not date:
        return f"the band names repeat: a stack of {dates} dates; choose the date to read (1..{dates})"
    if date and not 1 <= date <= max(dates, 1):
        return f"date {date} is not in the band map (it names {dates} date(s))"
    return None
