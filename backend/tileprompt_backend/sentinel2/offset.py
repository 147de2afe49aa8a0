"""The processing-baseline offset of Sentinel-2 products, found once per product and removed on every read.

Since processing baseline 04.00 (products processed from 25 January 2022 on, and the reprocessed collection)
L1C and L2A reflectance is stored with an offset: ``reflectance = (DN + ADD_OFFSET) / 10000`` with
``RADIO_ADD_OFFSET`` (L1C) / ``BOA_ADD_OFFSET`` (L2A) = -1000 in every band so far. The public models were trained
on the earlier scale, so the readers subtract the offset from the DN (clipping at 0) before any card's scaling.

What applies to a product (:func:`detect_offset`), first match wins:

1. ``mode`` ``"none"`` or a number of DN: the user says (``--offset``), like ``--level``;
2. the product's metadata XML (``MTD_MSIL1C.xml`` / ``MTD_MSIL2A.xml`` of a SAFE, found in the folder or up to
   four folders above): its ``PROCESSING_BASELINE`` and per-band offsets;
3. the baseline in the product name (``..._N0400_...``, the nearest path component first; Major-TOM keeps the
   product name as a folder) or in an SSL4EO-style ``metadata.json`` (``PRODUCT_ID``);
4. nothing found: no offset, and the run records that the baseline was unknown.

Metadata parsing is kept apart from reading: readers call :func:`subtract_offset` on what they read.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import validation
from .bands import BANDS, try_band_name

#: The first processing baseline whose products carry the offset.
OFFSET_BASELINE = (4, 0)
#: The offset ESA has used in every band since baseline 04.00 (the metadata's ADD_OFFSET is its negative).
ESA_OFFSET_DN = 1000.0
#: Product-level metadata files of a SAFE product (the granule's MTD_TL.xml carries no offsets).
METADATA_FILES = ("MTD_MSIL2A.xml", "MTD_MSIL1C.xml")

# "N0400" as a token of a product name: S2A_MSIL2A_20220706T085611_N0400_R007_T33NZA_20220706T153419
_BASELINE_RE = re.compile(r"(?:^|_)N(\d{2})(\d{2})(?=_|$|\.)")
# N9999 marks products not made by an ESA processing baseline (e.g. Major-TOM's re-processed cell 199U,
# whose data carry no offset); it says nothing about the offset.
_NOT_A_BASELINE = {(99, 99)}
_METADATA_SEARCH_UP = 4


@dataclass(frozen=True)
class Offset:
    """The DN subtracted per band from a product's pixels, and how that was decided."""

    dn: Mapping[str, float] = field(default_factory=dict)  # band -> DN to subtract (1000.0 for baseline >= 04.00)
    source: str = "not a Sentinel-2 product"  # one line: where the decision came from
    baseline: str | None = None  # "04.00" when known
    mode: str = "auto"  # what was asked: "auto", "none" or the number given

    @property
    def applied(self) -> bool:
        return any(v for v in self.dn.values())

    def to_json(self) -> dict[str, Any]:
        """What run metadata and index records keep."""
        return {"mode": self.mode, "applied": self.applied, "dn": {b: self.dn[b] for b in sorted(self.dn)},
                "baseline": self.baseline, "source": self.source}

    def describe(self) -> str:
        if not self.applied:
            return f"no offset: {self.source}"
        values = sorted(set(self.dn.values()))
        amount = f"{values[0]:g} DN" if len(values) == 1 else "per-band DN"
        return f"subtracting {amount}: {self.source}"


NO_OFFSET = Offset()


def baseline_from_name(text: str) -> tuple[int, int] | None:
    """(major, minor) of the ``_N0400_`` token in a product name or path component, else None."""
    m = _BASELINE_RE.search(text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _baseline_text(baseline: tuple[int, int]) -> str:
    return f"{baseline[0]:02d}.{baseline[1]:02d}"


def _parse_baseline(text: str | None) -> tuple[int, int] | None:
    m = re.fullmatch(r"\s*(\d{1,2})\.(\d{1,2})\s*", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_metadata_xml(path: Path) -> Path | None:
    """The SAFE product's MTD_MSIL1C.xml / MTD_MSIL2A.xml in ``path`` (a folder) or up to four folders above."""
    folder = path if path.is_dir() else path.parent
    for candidate in [folder, *list(folder.absolute().parents)[:_METADATA_SEARCH_UP]]:
        for name in METADATA_FILES:
            f = candidate / name
            if f.is_file():
                return f
    return None


#: A product's MTD XML is a few hundred kB; a larger file is not one.
MAX_METADATA_BYTES = 16 << 20


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def read_metadata_xml(xml_path: Path) -> tuple[tuple[int, int] | None, dict[str, float]]:
    """(processing baseline, {band: DN to subtract}) from a product's MTD XML; a bad file is a ValueError.

    Offsets are ``RADIO_ADD_OFFSET`` (L1C) or ``BOA_ADD_OFFSET`` (L2A) elements with a ``band_id`` (0..12 in
    ESA's band order, named by ``Spectral_Information`` when present); the values are negative in the file.
    """
    try:
        with open(xml_path, "rb") as f:
            data = f.read(MAX_METADATA_BYTES + 1)
        if len(data) > MAX_METADATA_BYTES or b"<!DOCTYPE" in data or b"<!ENTITY" in data:
            raise ET.ParseError("too large, or has a document type or entities")
        # ESA's metadata has no DTD; refusing one above leaves no entity for the parser to expand (bandit B314).
        root = ET.fromstring(data)  # nosec B314
    except (ET.ParseError, OSError) as e:
        raise ValueError(f"cannot read the product metadata {xml_path} ({type(e).__name__})") from None
    baseline, band_names, raw = None, {}, {}
    for element in root.iter():
        tag = _local(element.tag)
        if tag == "PROCESSING_BASELINE" and baseline is None:
            baseline = _parse_baseline(element.text)
        elif tag == "Spectral_Information":
            name = try_band_name(element.get("physicalBand") or "")
            if name and (element.get("bandId") or "").isdigit():
                band_names[int(element.get("bandId"))] = name
        elif tag in ("RADIO_ADD_OFFSET", "BOA_ADD_OFFSET"):
            band_id = element.get("band_id") or ""
            try:
                raw[int(band_id)] = float(element.text or "")
            except ValueError:
                raise ValueError(f"product metadata {xml_path}: unreadable {tag} for band_id {band_id!r}") from None
    offsets = {}
    for band_id, value in raw.items():
        name = band_names.get(band_id) or (BANDS[band_id] if 0 <= band_id < len(BANDS) else None)
        if name is None:
            raise ValueError(f"product metadata {xml_path}: offset for unknown band_id {band_id}")
        offsets[name] = -value
    return baseline, offsets


def _names_in_path(path: Path) -> list[str]:
    """Product names that may carry the baseline: path components (nearest first), then metadata.json."""
    names = list(reversed(path.absolute().parts))
    folder = path if path.is_dir() else path.parent
    meta = folder / "metadata.json"
    if meta.is_file():
        try:
            product_id = json.loads(meta.read_text(encoding="utf-8")).get("PRODUCT_ID")
        except (OSError, ValueError, AttributeError):
            product_id = None
        if isinstance(product_id, str):
            names.append(product_id)
    return names


def _for_bands(bands: Sequence[str], dn: float) -> dict[str, float]:
    return {b: float(dn) for b in bands}


def detect_offset(path: str | Path, bands: Sequence[str], mode: str | float | None = "auto") -> Offset:
    """What to subtract from the DN of each of ``bands`` of the Sentinel-2 product at ``path`` (see module doc)."""
    mode = validation.offset(mode)
    path = Path(path)
    if mode == "none":
        return Offset({}, "--offset none", None, "none")
    if not isinstance(mode, str):
        return Offset(_for_bands(bands, mode), f"--offset {mode:g}", None, f"{mode:g}")
    xml = find_metadata_xml(path)
    if xml is not None:
        baseline, per_band = read_metadata_xml(xml)
        text = _baseline_text(baseline) if baseline else None
        if per_band:
            dn = {b: per_band.get(b, 0.0) for b in bands}
            return Offset(dn, f"{xml.name} offsets" + (f", baseline {text}" if text else ""), text, mode)
        if baseline is not None:
            if baseline >= OFFSET_BASELINE:  # the XML names the baseline but lists no offsets: ESA's value
                return Offset(_for_bands(bands, ESA_OFFSET_DN), f"{xml.name} baseline {text} (no offset list; "
                              f"ESA's {ESA_OFFSET_DN:g} DN)", text, mode)
            return Offset({}, f"{xml.name} baseline {text} (before 04.00)", text, mode)
    for name in _names_in_path(path):
        baseline = baseline_from_name(name)
        if baseline is None:
            continue
        token = f"N{baseline[0]:02d}{baseline[1]:02d}"
        if baseline in _NOT_A_BASELINE:
            return Offset({}, f"product name {token} is not an ESA processing baseline; baseline unknown, no "
                              "offset (pass --offset 1000 if the product has one)", None, mode)
        text = _baseline_text(baseline)
        if baseline >= OFFSET_BASELINE:
            return Offset(_for_bands(bands, ESA_OFFSET_DN), f"product name {token}", text, mode)
        return Offset({}, f"product name {token} (before 04.00)", text, mode)
    return Offset({}, "processing baseline unknown (no metadata XML or _Nxxxx_ product name); no offset "
                      "(pass --offset 1000 for a product of baseline 04.00 or later)", None, mode)


def subtract_offset(data: np.ndarray, bands: Sequence[str | None], offset: Offset, nodata: float) -> None:
    """Subtract ``offset`` in place from (len(bands), h, w) DN, clipping at 0; ``nodata`` pixels stay as they are.

    A band named None (zero-filled, e.g. B10 of L2A) is left alone.
    """
    if not offset.applied:
        return
    for i, band in enumerate(bands):
        dn = offset.dn.get(band, 0.0) if band is not None else 0.0
        if not dn:
            continue
        row = data[i]
        valid = row != nodata
        row[valid] = np.maximum(row[valid] - np.float32(dn), np.float32(0.0))
