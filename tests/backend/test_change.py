"""Change search between dates: footprint pairing across grids and CRSs, "became X", the layer, the heat map,
on the eo-learn dates and the SSL4EO pair with a tiny untrained model (the figures are not a model's)."""

from __future__ import annotations

import shutil
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
import shapely
from conftest import SSL4EO, _require
from rasterio.warp import Resampling, calculate_default_transform, reproject
from test_search import write_eolearn_dates

from tileprompt_backend.cli import main
from tileprompt_backend.index import IndexStore, change_search
from tileprompt_backend.index.change import became_score, pair_footprints, pair_scenes
from tileprompt_backend.index.heatmap import NODATA
from tileprompt_backend.outputs import read_run_table

PROMPTS = "forest; farmland; grassland; built-up area"


def squares(n_rows: int, n_cols: int, size: float = 1.0, x0: float = 0.0, y0: float = 0.0) -> np.ndarray:
    i, j = np.divmod(np.arange(n_rows * n_cols), n_cols)
    return shapely.box(x0 + j * size, y0 - (i + 1) * size, x0 + (j + 1) * size, y0 - i * size)


def test_pairing_of_a_half_tile_offset_grid():
    after = squares(2, 2)
    before = squares(3, 3, x0=-0.5, y0=0.5)  # shifted half a tile left and up
    p = pair_footprints(after, before)
    assert p.after.tolist() == [0, 1, 2, 3] and np.allclose(p.cover, 1.0) and p.unpaired == 0
    assert len(p.pair_after) == 16 and np.allclose(p.weight, 0.25)  # four quarters per tile
    first = sorted(p.pair_before[p.pair_after == 0].tolist())
    assert first == [0, 1, 3, 4]
    for i in range(4):
        assert p.weight[p.pair_after == i].sum() == pytest.approx(1.0)


def test_pairing_leaves_out_tiles_the_other_date_barely_covers():
    after = squares(1, 3)
    before = squares(1, 2, x0=0.6)  # covers 40 % of tile 0, tile 1 fully, 60 % of tile 2
    p = pair_footprints(after, before)
    assert p.after.tolist() == [1, 2] and p.unpaired == 1
    assert np.allclose(p.cover, [1.0, 0.6])
    # overlapping before tiles (stride = tile / 2) cover each point 4 times: cover is divided accordingly
    dense = np.array([shapely.box(x, -1 - y, x + 1, -y) for y in np.arange(-1, 1.5, 0.5)
                      for x in np.arange(-1, 3.5, 0.5)])
    p = pair_footprints(after, dense, before_overlap=4.0)
    assert np.allclose(p.cover, 1.0)


def test_became_is_the_increase_of_the_class_probability():
    p_before = np.array([[0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    p_after = np.array([[0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    assert np.allclose(became_score(p_before, p_after, 1), [0.6, 0.0, -0.5])


@pytest.fixture(scope="module")
def eolearn_dates(tmp_path_factory):
    return write_eolearn_dates(tmp_path_factory.mktemp("eolearn-change"))


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("change-index") / "idx"


def test_change_between_two_eo_learn_dates(eolearn_dates, tiny_models, index_dir, tmp_path):
    out, heat = tmp_path / "change.gpkg", tmp_path / "change.tif"
    result = change_search(eolearn_dates[0], eolearn_dates[2], out=out, heatmap=heat, tile_px=20, index=index_dir,
                           model=str(tiny_models["aligned-s2"]), runner="torch", prompts=PROMPTS, became="farmland")
    assert result.pairs == 25 and result.unpaired == 0 and result.became == "farmland" and result.computed == 50
    with fiona.open(out, layer="change") as src:
        rows = sorted((dict(f["properties"]) for f in src), key=lambda r: r["rank"])
        assert src.crs.to_epsg() == 32633
    assert [r["rank"] for r in rows] == list(range(1, 26))
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True) and all(r["score"] == r["became"] for r in rows)
    assert all(0.0 <= r["change"] <= 2.0 and r["cover"] == 1.0 and r["before_tiles"] == str(r["id"]) for r in rows)
    assert {r["class_before"] for r in rows} <= {"forest", "farmland", "grassland", "built-up area"}
    run = read_run_table(out)[-1]
    assert run["kind"] == "change" and run["same_grid"] is True and run["score"] == "became"
    with rasterio.open(heat) as ds, rasterio.open(eolearn_dates[2]) as src:
        assert ds.crs == src.crs and ds.transform == src.transform and ds.shape == src.shape
        data = ds.read(1)
    top = rows[0]
    window = data[top["row_off"]:top["row_off"] + 20, top["col_off"]:top["col_off"] + 20]
    assert np.allclose(window[window != NODATA], top["score"], atol=1e-6)


def test_the_same_place_twice_has_no_change(eolearn_dates, tiny_models, index_dir, tmp_path):
    copy = tmp_path / "date0-copy.tif"
    shutil.copy(eolearn_dates[0], copy)
    result = change_search(eolearn_dates[0], copy, out=tmp_path / "none.gpkg", tile_px=20, index=index_dir,
                           model=str(tiny_models["aligned-s2"]), runner="torch", prompts=PROMPTS, became="forest")
    with fiona.open(result.out, layer="change") as src:
        rows = [dict(f["properties"]) for f in src]
    assert len(rows) == 25
    assert all(abs(r["change"]) < 1e-6 and abs(r["became"]) < 1e-6 and r["class_before"] == r["class_after"]
               for r in rows)


def warp_to(src_path, dst_path, crs: str, shift_m: float = 0.0) -> None:
    """A date re-gridded into another CRS (nearest neighbour), its origin moved by ``shift_m`` metres."""
    with rasterio.open(src_path) as src:
        transform, width, height = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds,
                                                               resolution=10.0)
        transform = transform @ rasterio.Affine.translation(shift_m / 10.0, 0)
        profile = dict(src.profile, crs=crs, transform=transform, width=width, height=height, driver="GTiff")
        with rasterio.open(dst_path, "w", **profile) as dst:
            for b in range(1, src.count + 1):
                reproject(rasterio.band(src, b), rasterio.band(dst, b), resampling=Resampling.nearest)
                dst.set_band_description(b, src.descriptions[b - 1])


def test_pairing_across_crs_and_offset_on_the_ssl4eo_pair(tiny_models, tmp_path):
    dates = [p for p in sorted(_require(SSL4EO / "s2c" / "0000200").iterdir()) if p.is_dir()]
    utm = tmp_path / "later-utm.tif"
    tif = tmp_path / "later.tif"
    from tileprompt_backend.sentinel2 import open_raster

    with open_raster(dates[1]) as source:  # a band-file folder: write it as one 13-band GeoTIFF first
        info = source.info
        cube = source.read(rasterio.windows.Window(0, 0, info.width, info.height), info.bands)
        with rasterio.open(tif, "w", driver="GTiff", width=info.width, height=info.height, count=cube.shape[0],
                           dtype="uint16", crs=info.crs, transform=info.transform) as dst:
            dst.write(np.clip(cube, 0, 65535).astype(np.uint16))
            for i, band in enumerate(info.bands, start=1):
                dst.set_band_description(i, band)
    warp_to(tif, utm, "EPSG:32643", shift_m=45.0)  # UTM 43N, and a 4.5 px offset
    idx = tmp_path / "idx"
    result = change_search(dates[0], utm, out=tmp_path / "ssl.gpkg", tile_px=32, index=idx,
                           model=str(tiny_models["aligned-s2"]), runner="torch")
    store = IndexStore.open(idx)
    before, after = (store.find_scene(str(p)) for p in (dates[0], utm))
    pairing = pair_scenes(store, before, after)
    assert len(pairing.after) == result.pairs >= 40 and (pairing.cover >= 0.5).all()
    meets = np.bincount(pairing.pair_after)
    assert (meets >= 2).mean() > 0.9  # other CRS, other offset: nearly every tile meets several before tiles
    assert np.allclose(np.bincount(pairing.pair_after, weights=pairing.weight), 1.0)
    run = read_run_table(result.out)[-1]
    assert run["same_grid"] is False and run["score"] == "change"


def test_cli_change_and_its_refusals(eolearn_dates, tiny_models, index_dir, tmp_path, capsys):
    model = str(tiny_models["aligned-s2"])
    out = tmp_path / "cli.gpkg"
    code = main(["change", eolearn_dates[0], eolearn_dates[1], "--model", model, "--tile", "20", "--index",
                 str(index_dir), "-k", "5", "--out", str(out), "--quiet"])
    assert code == 0 and "5 tiles ranked by embedding change" in capsys.readouterr().out
    with fiona.open(out, layer="change") as src:
        assert len(src) == 5

    def refused(args, message):
        assert main(["change", *args, "--model", model, "--tile", "20", "--index", str(index_dir), "--quiet"]) == 2
        assert message in capsys.readouterr().err

    refused([eolearn_dates[0], eolearn_dates[0], "--out", str(tmp_path / "a.gpkg")], "the same raster")
    refused([eolearn_dates[0], eolearn_dates[1], "--became", "flooded", "--out", str(tmp_path / "b.gpkg")],
            "give the other classes")
    refused([eolearn_dates[0], eolearn_dates[1], "-k", "0", "--out", str(tmp_path / "c.gpkg")],
            "k (number of results) must be between 1 and 10000, got 0")
    refused([eolearn_dates[0], eolearn_dates[1], "--out", str(tmp_path / "d.gpkg"), "--heatmap",
             str(tmp_path / "d.gpkg")], "must be a .tif or .tiff file")
    # the output guard: never an input, never a file TilePrompt did not write unless --overwrite
    before = Path(eolearn_dates[0]).read_bytes()
    refused([eolearn_dates[0], eolearn_dates[1], "--out", str(tmp_path / "e.gpkg"), "--heatmap", eolearn_dates[0],
             "--overwrite"], "is an input of this job")
    assert Path(eolearn_dates[0]).read_bytes() == before
    foreign = tmp_path / "foreign.gpkg"
    foreign.write_bytes(b"not ours")
    refused([eolearn_dates[0], eolearn_dates[1], "--out", str(foreign)], "was not written by TilePrompt; pass "
            "--overwrite")
    assert foreign.read_bytes() == b"not ours"
    assert not any((tmp_path / n).exists() for n in ("a.gpkg", "b.gpkg", "c.gpkg", "e.gpkg"))
    # --layer adds the change layer to a result TilePrompt wrote, keeping its other layers and runs
    assert main(["change", eolearn_dates[0], eolearn_dates[1], "--model", model, "--tile", "20", "--index",
                 str(index_dir), "-k", "3", "--out", str(out), "--layer", "top3", "--quiet"]) == 0
    assert set(fiona.listlayers(out)) >= {"change", "top3"}
    assert [r["layer"] for r in read_run_table(out)] == ["change", "top3"]
