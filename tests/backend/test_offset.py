"""sentinel2.offset: the processing-baseline offset (04.00+), from metadata XML, product name or the user."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from conftest import MAJOR_TOM, SSL4EO, _require
from tileprompt_backend import validation
from tileprompt_backend.sentinel2 import BANDS, open_raster
from tileprompt_backend.sentinel2.offset import (
    ESA_OFFSET_DN,
    Offset,
    baseline_from_name,
    detect_offset,
    read_metadata_xml,
    subtract_offset,
)

WINDOW = Window(100, 200, 64, 48)
L2A_NAME = "S2B_MSIL2A_20230115T101309_N0509_R022_T32TQM_20230115T113504"


def _cell(row: str) -> Path:
    return _require(next(iter(sorted((MAJOR_TOM / row).iterdir()))))


def _write_band(path: Path, value: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=value.shape[1], height=value.shape[0], count=1,
                       dtype="uint16", crs="EPSG:32632", transform=Affine(10, 0, 600000, 0, -10, 5000000)) as ds:
        ds.write(value[None].astype(np.uint16))


def _mtd(kind: str, baseline: str, offsets: dict[int, float] | None, spectral: bool = True) -> str:
    tag = "BOA_ADD_OFFSET" if kind == "L2A" else "RADIO_ADD_OFFSET"
    names = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
    spectral_xml = "".join(f'<Spectral_Information bandId="{i}" physicalBand="{n}"/>' for i, n in enumerate(names))
    offsets_xml = "".join(f'<{tag} band_id="{i}">{v:g}</{tag}>' for i, v in (offsets or {}).items())
    return (f'<?xml version="1.0" encoding="UTF-8"?><n1:Level-{kind[1:]}_User_Product xmlns:n1="urn:test">'
            f"<n1:General_Info><Product_Info><PROCESSING_BASELINE>{baseline}</PROCESSING_BASELINE></Product_Info>"
            f"<Product_Image_Characteristics><OFFSET_LIST>{offsets_xml}</OFFSET_LIST>"
            f"{'<Spectral_Information_List>' + spectral_xml + '</Spectral_Information_List>' if spectral else ''}"
            f"</Product_Image_Characteristics></n1:General_Info></n1:Level-{kind[1:]}_User_Product>")


def _safe(tmp_path: Path, name: str, kind: str = "L2A", mtd: str | None = None) -> tuple[Path, dict[str, np.ndarray]]:
    """A SAFE product with four 10 m bands (values 0..1999 and a nodata corner) and an optional MTD XML."""
    root = tmp_path / f"{name}.SAFE"
    rng = np.random.default_rng(0)
    values = {}
    for band in ("B02", "B03", "B04", "B08"):
        v = rng.integers(1, 2000, size=(40, 50)).astype(np.uint16)
        v[:5, :5] = 0  # nodata
        values[band] = v
        if kind == "L2A":
            f = root / "GRANULE" / "L2A_T32TQM" / "IMG_DATA" / "R10m" / f"T32TQM_20230115T101309_{band}_10m.tif"
        else:
            f = root / "GRANULE" / "L1C_T32TQM" / "IMG_DATA" / f"T32TQM_20230115T101309_{band}.tif"
        _write_band(f, v)
    if mtd is not None:
        (root / f"MTD_MSI{kind}.xml").write_text(mtd, encoding="utf-8")
    return root, values


# ------------------------------------------------------------------------------------------------ real data


def test_major_tom_n0400_has_the_offset_removed():
    cell = _cell("0U/0U_199R")  # S2A_MSIL2A_20220706T..._N0400_...
    with open_raster(cell) as src:
        offset = src.info.offset
        shifted = src.read(WINDOW, ["B02", "B8A", "B12"])
    with open_raster(cell, offset="none") as src:
        raw = src.read(WINDOW, ["B02", "B8A", "B12"])
    assert offset.applied and offset.baseline == "04.00" and "N0400" in offset.source
    assert offset.dn == {b: ESA_OFFSET_DN for b in BANDS if b != "B10"}
    assert raw.min() > ESA_OFFSET_DN  # the data really carry the offset (darkest B12 pixel of the cell: 1500)
    np.testing.assert_array_equal(raw - shifted, np.full_like(raw, ESA_OFFSET_DN))


def test_major_tom_n9999_and_pre_2022_products_keep_their_values():
    cell = _cell("199U/199U_1099R")  # ..._N9999_... : reprocessed, no offset in the data (darkest B12 pixel: 2 DN)
    with open_raster(cell) as src:
        assert not src.info.offset.applied and "N9999" in src.info.offset.source
        assert src.read(WINDOW, ["B12"]).min() < ESA_OFFSET_DN
    for date in sorted(_require(SSL4EO / "s2a" / "0000200").iterdir()):  # metadata.json PRODUCT_ID ..._N0214_...
        with open_raster(date) as src:
            assert not src.info.offset.applied and src.info.offset.baseline == "02.14"


def test_run_metadata_records_the_offset(tmp_path, tiny_models):
    from tileprompt_backend.engine import classify

    cell = _cell("0U/0U_199R")
    with open_raster(cell) as src:
        left, bottom, _, top = src.info.bounds
    aoi = f"POLYGON(({left} {top - 1280}, {left + 1280} {top - 1280}, {left + 1280} {top}, {left} {top}, " \
          f"{left} {top - 1280}))"
    result = classify(cell, "water; forest", tmp_path / "out.gpkg", model=str(tiny_models["aligned-s2"]), aoi=aoi,
                      tile_px=64, cache=False, device="cpu", runner="torch")
    assert result.run["offset"]["applied"] and result.run["offset"]["dn"]["B02"] == ESA_OFFSET_DN
    assert "N0400" in result.run["offset"]["source"]
    explicit = classify(cell, "water; forest", tmp_path / "none.gpkg", model=str(tiny_models["aligned-s2"]),
                        aoi=aoi, tile_px=64, cache=False, device="cpu", offset="none", runner="torch")
    assert explicit.run["offset"] == {"mode": "none", "applied": False, "dn": {}, "baseline": None,
                                      "source": "--offset none"}


# ------------------------------------------------------------------------------------------------ metadata XML


def test_metadata_xml_per_band_offsets_win_over_the_product_name(tmp_path):
    # The name says baseline 02.04; the XML's per-band offsets are what the product really carries.
    xml = _mtd("L2A", "05.09", {1: -1000, 2: -1100, 3: -900, 7: -1000})
    root, values = _safe(tmp_path, L2A_NAME.replace("N0509", "N0204"), "L2A", xml)
    with open_raster(root) as src:
        offset = src.info.offset
        cube = src.read(Window(0, 0, 50, 40), ["B02", "B03", "B04", "B08"])
    assert offset.dn == {"B02": 1000.0, "B03": 1100.0, "B04": 900.0, "B08": 1000.0}
    assert offset.baseline == "05.09" and offset.source.startswith("MTD_MSIL2A.xml")
    for i, (band, dn) in enumerate(offset.dn.items()):
        raw = values[band].astype(np.float32)
        expected = np.where(raw == 0, 0, np.maximum(raw - dn, 0))
        np.testing.assert_array_equal(cube[i], expected)
    assert (cube[:, :5, :5] == 0).all()  # nodata stays nodata


def test_l1c_radio_offsets_and_band_ids_without_spectral_information(tmp_path):
    xml = _mtd("L1C", "04.00", {i: -1000 for i in range(13)}, spectral=False)
    xml_path = tmp_path / "MTD_MSIL1C.xml"
    xml_path.write_text(xml)
    baseline, offsets = read_metadata_xml(xml_path)
    assert baseline == (4, 0) and offsets == {b: 1000.0 for b in BANDS}
    root, _ = _safe(tmp_path, L2A_NAME.replace("MSIL2A", "MSIL1C"), "L1C", xml)
    with open_raster(root) as src:
        assert src.info.level == "L1C" and src.info.offset.dn == {b: 1000.0 for b in ("B02", "B03", "B04", "B08")}


def test_metadata_xml_without_offset_list(tmp_path):
    old, _ = _safe(tmp_path / "a", L2A_NAME, "L2A", _mtd("L2A", "02.14", None))
    with open_raster(old) as src:
        assert not src.info.offset.applied and "02.14" in src.info.offset.source
    new, _ = _safe(tmp_path / "b", L2A_NAME.replace("N0509", "N0204"), "L2A", _mtd("L2A", "04.00", None))
    with open_raster(new) as src:
        assert src.info.offset.dn["B02"] == ESA_OFFSET_DN and src.info.offset.baseline == "04.00"


def test_broken_metadata_xml_is_a_clear_error(tmp_path):
    root, _ = _safe(tmp_path, L2A_NAME, "L2A", "<not xml")
    with pytest.raises(ValueError, match="cannot read the product metadata .*MTD_MSIL2A.xml"):
        open_raster(root)
    with open_raster(root, offset="none") as src:  # the user's explicit choice needs no metadata
        assert not src.info.offset.applied
    entities = '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaa">]><d>&a;&a;</d>'
    root, _ = _safe(tmp_path / "dtd", L2A_NAME, "L2A", entities)  # entity expansion is never attempted
    with pytest.raises(ValueError, match="cannot read the product metadata"):
        open_raster(root)


# ------------------------------------------------------------------------------------------------ names and modes


def test_product_names_decide_without_metadata(tmp_path):
    new, values = _safe(tmp_path / "a", L2A_NAME)
    old, _ = _safe(tmp_path / "b", L2A_NAME.replace("N0509", "N0204"))
    with open_raster(new) as src:
        assert src.info.offset.dn["B04"] == ESA_OFFSET_DN and src.info.offset.source == "product name N0509"
    with open_raster(old) as src:
        assert not src.info.offset.applied and src.info.offset.baseline == "02.04"
    assert baseline_from_name(L2A_NAME) == (5, 9)
    assert baseline_from_name("T33UUU_20170216T102101_B01.jp2") is None
    assert baseline_from_name("S2A_MSIL2A_20170613T101031_87_48") is None
    assert baseline_from_name("S2A_MSIL1C_20220101T000000_N0400_R1.SAFE") == (4, 0)


def test_explicit_modes_override_detection(tmp_path):
    root, values = _safe(tmp_path, L2A_NAME.replace("N0509", "N0204"))
    with open_raster(root, offset=250) as src:
        assert src.info.offset.dn["B02"] == 250.0 and src.info.offset.source == "--offset 250"
        cube = src.read(Window(10, 10, 5, 5), ["B02"])
    raw = values["B02"][10:15, 10:15].astype(np.float32)
    np.testing.assert_array_equal(cube[0], np.maximum(raw - 250, 0))
    new, _ = _safe(tmp_path / "n", L2A_NAME)
    with open_raster(new, offset="none") as src:
        assert not src.info.offset.applied


def test_offset_mode_validation(tmp_path):
    assert validation.offset(None) == "auto" and validation.offset(" NONE ") == "none"
    assert validation.offset("1000") == 1000.0 and validation.offset(0) == 0.0
    for bad in ("-5", "abc", 20000, float("nan"), True, "1e9"):
        with pytest.raises(ValueError, match="offset must be"):
            validation.offset(bad)
    rgb = tmp_path / "rgb.tif"
    with rasterio.open(rgb, "w", driver="GTiff", width=8, height=8, count=3, dtype="uint8") as ds:
        ds.write(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="applies to Sentinel-2 products"):
        open_raster(rgb, offset=1000)
    with open_raster(rgb) as src:
        assert not src.info.offset.applied


def test_subtract_offset_closed_form():
    data = np.array([[[0, 500, 1000, 2500]], [[0, 500, 1000, 2500]]], dtype=np.float32)
    subtract_offset(data, ["B02", None], Offset({"B02": 1000.0}, "test"), nodata=0.0)
    np.testing.assert_array_equal(data[0, 0], [0, 0, 0, 1500])  # nodata kept, clipped at 0
    np.testing.assert_array_equal(data[1, 0], [0, 500, 1000, 2500])  # a zero-filled band is left alone
    assert detect_offset(Path("/nonexistent/x_N0400_y"), ["B02"]).dn == {"B02": 1000.0}
