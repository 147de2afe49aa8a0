"""The embedding index on real Sentinel-2 scenes: store format, reuse, crash and cancel safety, classify reuse,
torchrun sharding, CLI. Tiny untrained models; the SSL4EO pair (264 x 264 px, EPSG:4326) as scenes."""

from __future__ import annotations

import importlib
import json
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import fiona
import numpy as np
import pytest
import shapely
from conftest import SSL4EO, _require

from tileprompt_backend.cli import main
from tileprompt_backend.engine import Cancelled, classify
from tileprompt_backend.index import IndexStore, build_index, default_index_dir, model_key
from tileprompt_backend.index.store import CATALOG_FILE, EMBEDDINGS_FILE, META_FILE, SCENES_DIR
from tileprompt_backend.outputs import host_name
from tileprompt_backend.models import resolve_card
from tileprompt_backend.paths import cache_dir
from tileprompt_backend.sentinel2 import open_raster
from tileprompt_backend.tiling import make_grid

CLASSIFY_MODULE = importlib.import_module("tileprompt_backend.engine.classify")  # the package exports a function
TILE = 32  # 264 px scenes: a 9 x 9 grid, the last row and column are 3/4 nodata -> 64 tiles embedded
PROMPTS = "cropland; river; village"


@pytest.fixture(scope="module")
def dates() -> list[str]:
    return [str(p) for p in sorted(_require(SSL4EO / "s2c" / "0000200").iterdir()) if p.is_dir()]


@pytest.fixture
def s2_model(tiny_models) -> str:
    return str(tiny_models["aligned-s2"])


def _build(rasters, model, index, **kw):
    return build_index(rasters, model=model, tile_px=TILE, index=index, runner="torch", **kw)


def _embeddings(index) -> dict[str, np.ndarray]:
    store = IndexStore.open(index)
    return {s.raster: np.array(store.embeddings(s)) for s in store.scenes()}  # copies, not memory maps


def test_index_format_and_reuse(dates, s2_model, tmp_path):
    idx = tmp_path / "idx"
    first = _build([dates[0]], s2_model, idx)
    assert (first.scenes, first.tiles, first.computed, first.reused, first.skipped_nodata) == (1, 64, 64, 0, 17)
    assert first.search_method == "numpy-exact" and first.index == idx.resolve()

    again = _build([dates[0]], s2_model, idx)
    assert (again.computed, again.reused, again.tiles) == (0, 64, 64)  # nothing computed the second time

    both = _build(dates, s2_model, idx)  # a second scene joins the same index (an archive)
    assert (both.scenes, both.computed, both.reused, both.index_scenes, both.index_tiles) == (2, 64, 64, 2, 128)

    meta = json.loads((idx / META_FILE).read_text())
    card = resolve_card(s2_model)
    assert meta["model"] == card.id and meta["card_hash"] == card.card_hash()
    assert (meta["tile_px"], meta["stride"], meta["embed_dim"]) == (TILE, TILE, 32)
    store = IndexStore.open(idx)
    scenes = store.scenes()
    assert [s.raster for s in scenes] == [str(Path(d).resolve()) for d in dates]
    for scene in scenes:
        emb = np.load(idx / SCENES_DIR / scene.key / EMBEDDINGS_FILE)
        assert emb.dtype == np.float16 and emb.shape == (64, 32)
        np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
        with open_raster(scene.raster) as src:
            grid = make_grid(src.info, TILE)
        assert (scene.n_rows, scene.n_cols) == (grid.n_rows, grid.n_cols) == (9, 9)
        assert "4326" in scene.crs or "WGS 84" in scene.crs
        ids = store.tile_ids(scene)
        assert list(ids) == [t.id for t in grid.tiles if t.row < 8 and t.col < 8]
        rows = store.tile_rows(scene, ids[:3])
        for tid in ids[:3]:
            row, col, col_off, row_off, w, h, wkb = rows[int(tid)]
            tile = grid.tiles[int(tid)]
            assert (row, col, col_off, row_off, w, h) == (tile.row, tile.col, tile.window.col_off,
                                                         tile.window.row_off, TILE, TILE)
            assert shapely.from_wkb(wkb).equals_exact(tile.polygon, 1e-12)


def test_default_index_is_keyed_by_model_tile_and_stride(dates, s2_model):
    a = build_index([dates[0]], model=s2_model, tile_px=TILE, runner="torch")
    b = build_index([dates[0]], model=s2_model, tile_px=TILE, stride=16, runner="torch")
    assert a.index.parent == b.index.parent == (cache_dir() / "index").resolve()
    assert a.index != b.index and b.computed == 256  # a 16 x 16 grid at stride 16, no tile mostly nodata
    card = resolve_card(s2_model)
    assert a.index == default_index_dir(model_key(card, TILE, TILE)).resolve()


def test_cancel_mid_index_then_reindex_is_identical(dates, s2_model, tmp_path):
    reference = _embeddings(_build([dates[0]], s2_model, tmp_path / "ref", batch_size=16).index)
    idx = tmp_path / "idx"
    calls = []
    with pytest.raises(Cancelled):
        _build([dates[0]], s2_model, idx, batch_size=16, progress=lambda d, t: calls.append(d),
               cancel=lambda: len(calls) >= 2)
    assert 0 < calls[-1] < 81
    assert IndexStore.open(idx).scenes() == []  # nothing complete
    assert not [p for p in (idx / SCENES_DIR).iterdir()]  # and nothing half-written left
    redo = _build([dates[0]], s2_model, idx, batch_size=16)
    assert (redo.computed, redo.reused) == (64, 0)
    again = _embeddings(idx)
    assert again.keys() == reference.keys()
    for k in reference:
        np.testing.assert_array_equal(again[k], reference[k])


def test_crash_leftovers_are_never_read_as_complete(dates, s2_model, tmp_path):
    idx = tmp_path / "idx"
    _build(dates, s2_model, idx)
    reference = _embeddings(idx)
    store = IndexStore.open(idx)
    crashed = store.scenes()[1]
    # a crash after the folder was renamed into place but before its row committed, with a truncated file ...
    with sqlite3.connect(idx / CATALOG_FILE) as con:
        con.execute("DELETE FROM tiles WHERE scene_id = ?", (crashed.scene_id,))
        con.execute("DELETE FROM scenes WHERE scene_id = ?", (crashed.scene_id,))
    emb_file = idx / SCENES_DIR / crashed.key / EMBEDDINGS_FILE
    emb_file.write_bytes(emb_file.read_bytes()[:1000])
    # ... and a half-written temporary folder of a writer that died (pid beyond any pid_max)
    tmp = idx / SCENES_DIR / f".tmp-{crashed.key}-{host_name()}-999999999-deadbeef"
    tmp.mkdir()
    (tmp / EMBEDDINGS_FILE).write_bytes(b"\x93NUMPY half")

    assert [s.raster for s in IndexStore.open(idx).scenes()] == [dates_0 := str(Path(dates[0]).resolve())]
    with pytest.raises(ValueError, match="is not in index"):
        IndexStore.open(idx).find_scene(dates[1])

    redo = _build(dates, s2_model, idx)
    assert (redo.computed, redo.reused) == (64, 64)  # the broken scene is recomputed, the good one reused
    assert not tmp.exists()
    assert sorted(p.name for p in (idx / SCENES_DIR).iterdir()) == sorted(s.key for s in IndexStore.open(idx).scenes())
    again = _embeddings(idx)
    assert again.keys() == reference.keys() and dates_0 in again
    for k in reference:
        np.testing.assert_array_equal(again[k], reference[k])


def _features(path, layer="tiles"):
    with fiona.open(path, layer=layer) as src:
        return [(dict(f.properties), f.geometry.coordinates) for f in src]


def test_classify_reuses_an_index_and_skips_the_image_encoder(dates, s2_model, tmp_path, monkeypatch):
    plain = classify(dates[0], PROMPTS, tmp_path / "plain.gpkg", model=s2_model, tile_px=TILE, runner="torch",
                     cache=False)
    assert not plain.run["embeddings_reused"] and plain.run["embeddings_index"] is None
    aoi = "POLYGON((74.99 30.62, 75.0 30.62, 75.0 30.63, 74.99 30.63, 74.99 30.62))"
    with open_raster(dates[0]) as src:  # an AOI inside the scene, whatever its exact position
        l, b, r, t = src.info.bounds
    aoi = shapely.box(l + 0.2 * (r - l), b + 0.3 * (t - b), l + 0.6 * (r - l), b + 0.7 * (t - b)).wkt
    plain_aoi = classify(dates[0], PROMPTS, tmp_path / "plain-aoi.gpkg", model=s2_model, tile_px=TILE,
                         runner="torch", aoi=aoi, cache=False)
    idx = tmp_path / "idx"
    _build([dates[0]], s2_model, idx)

    def no_encoder(*a, **k):
        raise AssertionError("the image encoder must not run for an indexed scene")

    monkeypatch.setattr(CLASSIFY_MODULE, "cached_runner", no_encoder)
    reused = classify(dates[0], PROMPTS, tmp_path / "reused.gpkg", model=s2_model, tile_px=TILE, index=idx)
    assert reused.run["embeddings_reused"] and reused.runner == "index (torch-cpu-fp32)"
    assert (reused.tiles, reused.skipped_nodata, reused.counts) == (plain.tiles, plain.skipped_nodata, plain.counts)
    assert _features(tmp_path / "reused.gpkg") == _features(tmp_path / "plain.gpkg")  # the same result
    classify(dates[0], PROMPTS, tmp_path / "reused-aoi.gpkg", model=s2_model, tile_px=TILE, index=idx, aoi=aoi)
    assert _features(tmp_path / "reused-aoi.gpkg") == _features(tmp_path / "plain-aoi.gpkg")
    assert plain_aoi.tiles < plain.tiles

    # another model, tile size or stride than the index holds is an error, not a silent recompute
    with pytest.raises(ValueError, match="was built with model"):
        classify(dates[0], PROMPTS, tmp_path / "other.gpkg", model=s2_model, tile_px=TILE, stride=16, index=idx)


def test_classify_fills_the_default_index_and_reuses_it(dates, s2_model, tmp_path, monkeypatch):
    first = classify(dates[1], PROMPTS, tmp_path / "first.gpkg", model=s2_model, tile_px=TILE, runner="torch")
    assert not first.run["embeddings_reused"]
    assert Path(first.run["embeddings_index"]).parent == (cache_dir() / "index").resolve()
    monkeypatch.setattr(CLASSIFY_MODULE, "cached_runner", lambda *a, **k: pytest.fail("the image encoder ran"))
    second = classify(dates[1], "water; built-up area", tmp_path / "second.gpkg", model=s2_model, tile_px=TILE)
    assert second.run["embeddings_reused"] and second.run["embeddings_index"] == first.run["embeddings_index"]
    # the same prompts again: their sentences are cached too, so no model loads at all
    monkeypatch.setattr(CLASSIFY_MODULE, "cached_model", lambda *a, **k: pytest.fail("the model loaded"))
    third = classify(dates[1], PROMPTS, tmp_path / "third.gpkg", model=s2_model, tile_px=TILE)
    assert third.run["text_cached"] == "30 of 30 sentences"  # 3 classes x the 10 templates of the bundled set
    assert _features(tmp_path / "third.gpkg") == _features(tmp_path / "first.gpkg")
    # the default index is an ordinary index: search reads it
    assert build_index([dates[1]], model=s2_model, tile_px=TILE).computed == 0


def test_build_index_bad_inputs(dates, s2_model, tiny_models, tmp_path):
    with pytest.raises(ValueError, match="no rasters"):
        build_index([], model=s2_model, index=tmp_path / "a")
    with pytest.raises(ValueError, match="raster not found"):
        build_index([str(tmp_path / "nope.tif")], model=s2_model, index=tmp_path / "a")
    with pytest.raises(ValueError, match="unknown model"):
        build_index(dates, model="no-such-model", index=tmp_path / "a")
    with pytest.raises(ValueError, match="unknown raster field"):
        build_index([{"raster": dates[0], "bands": "x"}], model=s2_model, index=tmp_path / "a")
    (tmp_path / "notindex").mkdir()
    (tmp_path / "notindex" / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="not a TilePrompt index"):
        build_index(dates, model=s2_model, index=tmp_path / "notindex")
    _build([dates[0]], s2_model, tmp_path / "idx")
    with pytest.raises(ValueError, match="was built with model 'tiny-aligned-s2'"):
        build_index([dates[0]], model=str(tiny_models["clip"]), tile_px=TILE, index=tmp_path / "idx")
    with pytest.raises(ValueError, match="tile 32 px"):
        build_index([dates[0]], model=s2_model, tile_px=16, index=tmp_path / "idx")
    # every raster is checked before any is embedded: a bad second raster leaves the first uncomputed
    with pytest.raises(ValueError, match="raster not found"):
        _build([dates[1], str(tmp_path / "missing")], s2_model, tmp_path / "idx")
    assert len(IndexStore.open(tmp_path / "idx").scenes()) == 1


def test_inputs_as_dicts_and_schema_objects(dates, s2_model, tmp_path):
    from tileprompt_backend.schemas import RasterInput

    r = _build([{"raster": dates[0]}, RasterInput(raster=dates[1], level="L1C"), dates[0]], s2_model, tmp_path / "i")
    assert (r.scenes, r.computed) == (2, 128)


def test_cli_index(dates, s2_model, tmp_path, capsys):
    idx = tmp_path / "idx"
    rc = main(["index", *dates, "--model", s2_model, "--tile", str(TILE), "--index", str(idx), "--runner", "torch",
               "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "indexed 2 scene(s), 128 tiles" in out and "128 computed, 0 reused" in out
    assert "search: numpy-exact" in out
    lst = tmp_path / "scenes.txt"
    lst.write_text(f"# my archive\n{dates[0]}\n\n{dates[1]}\n")
    rc = main(["index", "--scene-list", str(lst), "--model", s2_model, "--tile", str(TILE), "--index", str(idx),
               "--quiet"])
    assert rc == 0 and "0 computed, 128 reused" in capsys.readouterr().out
    rc = main(["index", str(tmp_path / "missing.tif"), "--model", s2_model, "--index", str(idx), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("tileprompt: error: raster not found")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_shard_and_merge(dates, s2_model, tmp_path):
    idx = tmp_path / "idx"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "tileprompt_backend.index.build", *dates,
           "--model", s2_model, "--tile", str(TILE), "--index", str(idx), "--runner", "torch", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**__import__("os").environ,
                                                                             "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "indexed 2 scene(s), 128 tiles" in r.stdout and "on 2 ranks" in r.stdout
    assert "merged 2 scene(s) from 2 shard(s)" in r.stdout
    assert not (idx / "shards").exists()
    merged = _embeddings(idx)
    single = _embeddings(_build(dates, s2_model, tmp_path / "single").index)
    assert merged.keys() == single.keys()
    for k in single:
        np.testing.assert_allclose(merged[k].astype(np.float32), single[k].astype(np.float32), atol=2e-3)
    # the merged index is complete: indexing again computes nothing
    assert _build(dates, s2_model, idx).computed == 0


def test_resume_after_a_kill_mid_archive_reuses_the_finished_scenes(dates, s2_model, tmp_path):
    """``tileprompt index`` over an archive, killed (SIGKILL) once the first scene is complete: the next run reuses
    the finished scenes untouched (same embeddings files, not rewritten), computes only the rest, and leaves no
    leftovers. (That an index built scene by scene equals one built at once: test_vectors.py.)"""
    import os
    import signal
    import time

    archive = dates + [str(p) for p in sorted(_require(SSL4EO / "s2a" / "0000200").iterdir()) if p.is_dir()]
    scene_list = tmp_path / "scenes.txt"
    scene_list.write_text("\n".join(archive) + "\n")
    idx = tmp_path / "idx"
    # batch size 1 and one thread: slow enough to be killed between scenes; the batch size is not part of the key
    cmd = [sys.executable, "-m", "tileprompt_backend.cli", "index", "--scene-list", str(scene_list), "--model",
           s2_model, "--tile", str(TILE), "--index", str(idx), "--runner", "torch", "--batch-size", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if (idx / CATALOG_FILE).is_file():
            try:
                with sqlite3.connect(idx / CATALOG_FILE, timeout=1) as con:
                    done = con.execute("SELECT COUNT(*) FROM scenes").fetchone()[0]
            except sqlite3.Error:
                done = 0
            if done >= 1:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.002)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed mid-archive"
    store = IndexStore.open(idx)
    finished = {s.key: s.tiles for s in store.scenes()}
    assert 1 <= len(finished) < len(archive)
    files = {k: idx / SCENES_DIR / k / EMBEDDINGS_FILE for k in finished}
    before = {k: (f.stat().st_mtime_ns, f.read_bytes()) for k, f in files.items()}

    resumed = _build(archive, s2_model, idx)
    assert resumed.reused == sum(finished.values()) and resumed.computed == resumed.tiles - resumed.reused > 0
    assert len(IndexStore.open(idx).scenes()) == len(archive)
    assert {k: (f.stat().st_mtime_ns, f.read_bytes()) for k, f in files.items()} == before  # reused, not rewritten
    assert not [p for p in (idx / SCENES_DIR).iterdir() if p.name.startswith(".")]  # the killed run's leftovers
    assert _build(archive, s2_model, idx).computed == 0
