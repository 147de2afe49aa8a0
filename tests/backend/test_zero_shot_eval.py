"""benchmarks/zero_shot_eval.py runs end to end (tiny card, the three real EuroSAT samples) and its metrics are
the closed-form ones. The real evaluation needs the published weights and the full EuroSAT: not run here."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from conftest import EUROSAT_MS, EUROSAT_RGB, REPO, _require


@pytest.fixture(scope="module")
def zero_shot_eval():
    spec = importlib.util.spec_from_file_location("zero_shot_eval", REPO / "benchmarks" / "zero_shot_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_metrics_closed_form(zero_shot_eval):
    scores = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]], dtype=np.float32)
    labels = np.array([0, 1, 1, 2])
    m = zero_shot_eval.metrics(scores, labels)
    assert m["accuracy"] == pytest.approx(0.75)  # image 1 is wrong
    # AP per class: ranks of the positives among the class's scores
    # class 0: positive (0.7) first -> 1; class 1: positives 0.5 (rank 1) and 0.3 (rank 2) -> 1;
    # class 2: positive 0.8 first -> 1
    assert m["macro_map"] == pytest.approx(1.0)
    m = zero_shot_eval.metrics(scores[:, [1, 0, 2]], labels)  # classes 0 and 1 swapped: worse
    # class 0 (scores .2 .3 .5 .1, positive .2 at rank 3): AP 1/3; class 1 (.7 .5 .2 .1, positives .5 rank 2 and
    # .2 rank 3): (1/2 + 2/3) / 2; class 2: 1
    assert m["macro_map"] == pytest.approx((1 / 3 + (1 / 2 + 2 / 3) / 2 + 1) / 3)


def test_runs_on_real_eurosat_samples(zero_shot_eval, tiny_models, tmp_path):
    ms, rgb = _require(EUROSAT_MS), _require(EUROSAT_RGB)
    out = tmp_path / "zero-shot.json"
    models = f"{tiny_models['aligned-s2']},{tiny_models['clip']}"
    assert zero_shot_eval.main(["--data", str(ms), "--data-rgb", str(rgb), "--models", models, "--batch", "2",
                                "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["templates"] == zero_shot_eval.EUROSAT_TEMPLATES and record["git_commit"]
    s2, clip = record["results"]
    assert s2["model"] == "tiny-aligned-s2" and s2["images"] == 3 and s2["data"] == str(ms)
    assert clip["modality"] == "rgb" and clip["data"] == str(rgb)  # RGB cards read the RGB JPEGs
    for r in (s2, clip):
        assert min(abs(r["accuracy"] - k / 3) for k in range(4)) < 1e-6 and 0 < r["macro_map"] <= 1
        assert set(r["per_class_ap"]) == {"0", "5", "9"}  # AnnualCrop, Pasture, SeaLake


def test_few_shot_measurement_on_the_same_embeddings(zero_shot_eval, tiny_models, tmp_path):
    """--few-shot adds docs/corrections.md's measurement (bench_fewshot_change.fewshot_eval) to each card."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 16))
    labels = np.repeat(np.arange(3), 6)
    emb = centres[labels] + 0.3 * rng.standard_normal((18, 16))
    head = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    r = zero_shot_eval.few_shot(emb.astype(np.float32), labels, head.astype(np.float32), 10.0, draws=2)
    assert r["test_tiles"] == 9 and r["pool_tiles"] == 9  # every other image of a class is the pool
    assert set(r["few_shot"]) == {1, 5, 10} and set(r["few_shot"][5]) == {"prototype", "probe"}
    assert 0.0 <= r["zero_shot"]["acc"] <= 1.0
    # the three real samples are one image per class: nothing to test on, said so
    out = tmp_path / "zero-shot.json"
    assert zero_shot_eval.main(["--data", str(_require(EUROSAT_MS)), "--models", str(tiny_models["aligned-s2"]),
                                "--batch", "2", "--device", "cpu", "--few-shot", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["few_shot"]["skipped"].startswith("needs at least 2 images")
