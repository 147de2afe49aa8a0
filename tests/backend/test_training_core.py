"""Shared training pieces: closed forms of the schedule, losses and metrics, the preprocessing path, checkpoints,
the loop's resume and interrupt, and atomic card writing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tileprompt_backend.models import load_model, read_card
from tileprompt_backend.models.identity import space_of, weights_hash
from tileprompt_backend.sentinel2 import BANDS, L2A_BANDS, RGB_BANDS
from tileprompt_backend.training.augment import ColorAug, Crop, apply_crop, color_augment, random_resized_crop
from tileprompt_backend.training.cards import TRAINER, write_trained_card
from tileprompt_backend.training.checkpoints import (latest_checkpoint, list_checkpoints, load_checkpoint,
                                                     save_checkpoint)
from tileprompt_backend.training.data.samples import Sample
from tileprompt_backend.training.distributed import Dist
from tileprompt_backend.training.inputs import model_input
from tileprompt_backend.training.loop import LoopConfig, Trainer, cosine_with_warmup
from tileprompt_backend.training.losses import alignment_loss, classification_loss, zero_shot_logits
from tileprompt_backend.training.metrics import (chance_recall, cross_modal_recall, mean_average_precision,
                                                  recall_at_k, top1_accuracy)
from tileprompt_backend.training.runlog import read_metrics

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: see conftest


# --- schedule and losses -------------------------------------------------------------------------------------------

def test_cosine_with_warmup_closed_form():
    assert [cosine_with_warmup(s, 4, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine_with_warmup(4, 4, 12) == 1.0
    assert cosine_with_warmup(8, 4, 12) == pytest.approx(0.5)  # half way through the cosine
    assert cosine_with_warmup(12, 4, 12) == pytest.approx(0.0)
    assert cosine_with_warmup(6, 4, 12) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))


def test_zero_shot_logits_and_classification_losses_by_hand():
    head = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    emb = torch.tensor([[3.0, 4.0]])  # cos = 0.6, 0.8
    logits = zero_shot_logits(emb, head, 100.0)
    torch.testing.assert_close(logits, torch.tensor([[60.0, 80.0]]))
    z = torch.tensor([[0.0, 2.0]])
    bce = -(math.log(0.5) + math.log(1 / (1 + math.exp(-2.0)))) / 2  # targets [0, 1]: -log(1-0.5), -log(s(2))
    assert float(classification_loss(z, torch.tensor([[0.0, 1.0]]), "multi-label")) == pytest.approx(bce)
    ce = -math.log(math.exp(2.0) / (1 + math.exp(2.0)))
    assert float(classification_loss(z, torch.tensor([1]), "multi-class")) == pytest.approx(ce)
    none = classification_loss(z, torch.tensor([1]), "multi-class", labelled=torch.tensor([False]))
    assert float(none) == 0.0


def test_alignment_loss_eq1_by_hand():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    mse = (1 + 0 + 1 + 1) / 4
    loss, parts = alignment_loss(s, t)
    assert float(loss) == pytest.approx(mse) and float(parts["cls"]) == 0.0
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss, parts = alignment_loss(s, t, logits, targets, "multi-label", lam=0.05)
    assert float(parts["cls"]) == pytest.approx(math.log(2))
    assert float(loss) == pytest.approx(mse + 0.05 * math.log(2))


# --- metrics -------------------------------------------------------------------------------------------------------

def _ap_brute_force(scores: np.ndarray, positives: np.ndarray) -> float:
    """Mean over positives of the precision among the items scored at least as high (no ties here)."""
    order = np.argsort(-scores)
    hits = positives[order]
    precisions = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precisions[hits == 1].mean())


def test_map_matches_brute_force_and_ignores_classes_without_positives():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(60, 5))
    targets = (rng.random((60, 5)) < 0.3).astype(int)
    targets[:, 3] = 0  # no positives
    result = mean_average_precision(scores, targets)
    expected = [_ap_brute_force(scores[:, c], targets[:, c]) for c in (0, 1, 2, 4)]
    assert result.per_class[3] is None and result.ignored == 1
    np.testing.assert_allclose([result.per_class[c] for c in (0, 1, 2, 4)], expected, rtol=1e-5)
    assert result.value == pytest.approx(np.mean(expected), rel=1e-5)
    assert result.support == targets.sum(axis=0).tolist()
    # constant scores: AP of each class = its prevalence (the paper's alpha = 0 signature)
    const = mean_average_precision(np.zeros((60, 5)), targets)
    assert const.value == pytest.approx(np.mean([targets[:, c].mean() for c in (0, 1, 2, 4)]), rel=1e-5)
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(scores, np.zeros_like(targets))


def test_top1_accuracy_and_per_class():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    r = top1_accuracy(scores, [0, 1, 1, 2])
    assert r.value == 0.75 and r.per_class == [1.0, 0.5, 1.0] and r.support == [1, 2, 1]
    assert top1_accuracy(scores, [0, 0, 0, 0], n_classes=4).per_class[3] is None


def test_recall_at_k_matches_brute_force_both_directions():
    rng = np.random.default_rng(1)
    ms, rgb = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    rgb[:10] = ms[:10] + 0.01 * rng.normal(size=(10, 8))  # ten easy pairs
    msn = ms / np.linalg.norm(ms, axis=1, keepdims=True)
    rgbn = rgb / np.linalg.norm(rgb, axis=1, keepdims=True)

    def brute(q, g, k):
        sims = q @ g.T
        return float(np.mean([i in np.argsort(-sims[i])[:k] for i in range(len(q))]))

    got = cross_modal_recall(ms, rgb, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert got["ms_to_rgb"][k] == pytest.approx(brute(msn, rgbn, k))
        assert got["rgb_to_ms"][k] == pytest.approx(brute(rgbn, msn, k))
    assert got["ms_to_rgb"][1] >= 0.2
    assert recall_at_k(ms, ms, ks=(1,))[1] == 1.0
    assert chance_recall(50, (1, 5, 100)) == {1: 0.02, 5: 0.1, 100: 1.0}


# --- the preprocessing path ----------------------------------------------------------------------------------------

def test_model_input_is_the_engines_preprocessing(tiny_models):
    clip = load_model(tiny_models["clip"], device="cpu")
    s2 = load_model(tiny_models["aligned-s2"], device="cpu")
    rng = np.random.default_rng(0)
    l2a = Sample("a", rng.integers(0, 3000, (12, 20, 20)).astype(np.float32), L2A_BANDS, "L2A")
    l1c = Sample("b", rng.integers(0, 3000, (13, 24, 24)).astype(np.float32), BANDS, "L1C")
    x = model_input(clip, [l2a.image, l1c.image], [l2a.info(), l1c.info()])
    # CLIP gets the RGB composite of B04, B03, B02 with the level's divisor, as classification does
    rgb_idx = [L2A_BANDS.index(b) for b in RGB_BANDS]
    np.testing.assert_array_equal(x[0].numpy(), clip.preprocess(l2a.image[None, rgb_idx], l2a.info())[0])
    assert x.shape == (2, 3, 32, 32)
    y = model_input(s2, [l2a.image], [l2a.info()])
    full = np.insert(l2a.image, BANDS.index("B10"), 0.0, axis=0)  # L2A lacks B10: zero-filled
    np.testing.assert_array_equal(y[0].numpy(), s2.preprocess(full[None], l2a.info())[0])


def test_crops_and_color_augmentation():
    rng = np.random.default_rng(0)
    for _ in range(50):
        c = random_resized_crop(120, 120, rng, scale=(0.9, 1.0))
        assert 0 <= c.top and c.top + c.height <= 120 and 0 <= c.left and c.left + c.width <= 120
        assert 0.9 * 120 * 120 * 0.97 <= c.height * c.width <= 120 * 120
    image = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    out = apply_crop(image, Crop(1, 2, 2, 3, hflip=True))
    np.testing.assert_array_equal(out, image[:, 1:3, 2:5][:, :, ::-1])
    rgb = np.random.default_rng(1).uniform(0, 3000, (3, 8, 8)).astype(np.float32)
    off = ColorAug(p_jitter=0, p_gray=0, p_blur=0)
    np.testing.assert_allclose(color_augment(rgb, 3558.0, rng, off), np.clip(rgb, 0, 3558), rtol=1e-6)
    gray = color_augment(rgb, 3558.0, rng, ColorAug(p_jitter=0, p_gray=1, p_blur=0))
    np.testing.assert_allclose(gray[0], gray[1]) and np.testing.assert_allclose(gray[1], gray[2])
    a = color_augment(rgb, 3558.0, np.random.default_rng(5))
    np.testing.assert_array_equal(a, color_augment(rgb, 3558.0, np.random.default_rng(5)))


# --- checkpoints and the loop --------------------------------------------------------------------------------------

def test_checkpoints_atomic_keep_and_weights_only(tmp_path):
    w = {"a": torch.arange(3.0)}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, w, {"optimizer": {"lr": 0.1}, "note": "x"}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    (tmp_path / "checkpoints" / ".step-00000009.host-1.partial").mkdir()  # an interrupted save
    (tmp_path / "checkpoints" / "step-00000010").mkdir()  # a folder without its files
    weights, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 3 and torch.equal(weights["a"], w["a"])
    torch.save({"x": Path("/")}, latest_checkpoint(tmp_path) / "state.pt")  # a pickle of a foreign object
    with pytest.raises(ValueError, match="not a readable training state"):
        load_checkpoint(latest_checkpoint(tmp_path))


def _linear_run(run_dir: Path, total: int, interrupt_at: int | None = None, resume: bool = True,
                key: str = "a") -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    module = nn.Linear(4, 2)
    cfg = LoopConfig(total_steps=total, lr=0.1, weight_decay=0.01, warmup_steps=2, log_every=1, checkpoint_every=100)
    trainer = Trainer(module, cfg, Dist(), run_dir, {"key": key}, samples_per_step=8, desc="test", quiet=True)
    start = trainer.start(resume)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 4, generator=gen) for _ in range(total)]

    def batches():
        for step in range(start, total):
            yield data[step]

    def loss_fn(model, x):
        if interrupt_at is not None and trainer.step == interrupt_at:
            raise KeyboardInterrupt
        return F.mse_loss(model(x), x[:, :2]), {}

    trainer.fit(batches(), loss_fn, steps_per_epoch=3)
    return module, start


def test_resume_after_interrupt_continues_at_the_same_step(tmp_path):
    straight, _ = _linear_run(tmp_path / "a", 7)
    with pytest.raises(KeyboardInterrupt):
        _linear_run(tmp_path / "b", 7, interrupt_at=4)
    assert latest_checkpoint(tmp_path / "b").name == "step-00000004"
    resumed, start = _linear_run(tmp_path / "b", 7)
    assert start == 4
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    rows = [r for r in read_metrics(tmp_path / "b") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 8)) and all("samples_per_s" in r and "lr" in r for r in rows)
    with pytest.raises(ValueError, match="other settings"):
        _linear_run(tmp_path / "b", 7, key="b")
    _, start = _linear_run(tmp_path / "b", 7, resume=False, key="b")
    assert start == 0


def test_non_finite_loss_is_a_clear_error(tmp_path):
    module = nn.Linear(2, 1)
    cfg = LoopConfig(total_steps=3, lr=0.1, weight_decay=0.0, warmup_steps=1, log_every=1)
    trainer = Trainer(module, cfg, Dist(), tmp_path, {}, samples_per_step=1, desc="t", quiet=True)
    trainer.start(False)
    with pytest.raises(ValueError, match="not finite at step 1"):
        trainer.fit(iter([torch.ones(1, 2)] * 3), lambda m, x: (m(x).sum() * float("nan"), {}), 3)


# --- cards ---------------------------------------------------------------------------------------------------------

def test_trained_card_written_atomically_with_its_own_space(tiny_models, tmp_path):
    src = read_card(tiny_models["clip"])
    data = src.to_json()
    data.update(id="patched", title="patched", trained=True)
    sd = load_model(src, device="cpu")._text.state_dict()
    card = write_trained_card(tmp_path / "patched", data, {"model.safetensors": sd}, own_space=True)
    assert card.space == f"patched@{weights_hash(card)}" == space_of(card)
    assert card.provenance["software"].startswith(TRAINER)
    assert not list(tmp_path.glob(".patched*"))
    load_model(card, device="cpu")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.json").write_text(json.dumps(dict(data, provenance={})))
    for out, overwrite, message in ((foreign, True, "is not one TilePrompt wrote"),
                                    (tmp_path / "patched", False, "pass --overwrite")):
        with pytest.raises(ValueError, match=message):
            write_trained_card(out, data, {"model.safetensors": sd})
    again = write_trained_card(tmp_path / "patched", dict(data, title="again"), {"model.safetensors": sd},
                               overwrite=True)
    assert again.title == "again"
