"""Retrieval training pieces: HarMA / RDB losses on hand-computed matrices, image-text R@K against a brute-force
reference, caption files and templated captions, the training transform."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tileprompt_backend.training.augment import RandAugment, rand_augment
from tileprompt_backend.training.data.captions import (PATTERNS, class_of, find_image, pre_caption, read_caption_files,
                                                       templated_captions)
from tileprompt_backend.training.data.samples import Sample
from tileprompt_backend.training.metrics import image_text_recall
from tileprompt_backend.training.retrieval import CaptionTransform
from tileprompt_backend.training.retrieval_losses import (adaptive_triplet, consistency_loss, cross_modal_triplet,
                                                          multi_positive_contrastive, uncertainty_weighted)

SIM = torch.tensor([[0.5, 0.6], [0.45, 0.6]])  # rows: images, columns: texts; pairs on the diagonal
EYE = torch.eye(2, dtype=torch.bool)


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: see conftest


def test_contrastive_is_clip_infonce_with_one_positive_and_averages_several():
    sim = torch.tensor([[1.0, 0.0], [0.5, 0.2]])
    lse = lambda *v: math.log(sum(math.exp(x) for x in v))  # noqa: E731
    i2t = ((lse(1, 0) - 1) + (lse(0.5, 0.2) - 0.2)) / 2
    t2i = ((lse(1, 0.5) - 1) + (lse(0, 0.2) - 0.2)) / 2
    assert float(multi_positive_contrastive(sim, EYE, 1.0)) == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    assert float(multi_positive_contrastive(sim * 2, EYE, 2.0)) == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    # items 0 and 1 show the same image: each of their rows has two positives of weight 1/2
    sim3 = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.6, 0.0], [0.2, 0.3, 0.5]])
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    logp = torch.log_softmax(sim3 / 0.5, dim=1)
    logq = torch.log_softmax(sim3.T / 0.5, dim=1)
    want = (-(0.5 * (logp[0, 0] + logp[0, 1]) + 0.5 * (logp[1, 0] + logp[1, 1]) + logp[2, 2]) / 3
            - (0.5 * (logq[0, 0] + logq[0, 1]) + 0.5 * (logq[1, 0] + logq[1, 1]) + logq[2, 2]) / 3) / 2
    assert float(multi_positive_contrastive(sim3, same, 0.5)) == pytest.approx(float(want), abs=1e-6)


def test_adaptive_triplet_eq3_and_rdb_cross_modal_triplet_eq10_by_hand():
    # hinge costs with m = 0.2: image 0 vs text 1: 0.2 + 0.6 - 0.5 = 0.3; image 1 vs text 0: 0.2 + 0.45 - 0.6 = 0.05;
    # text 1 vs image 0: 0.2 + 0.6 - 0.6 = 0.2; text 0 vs image 1: 0.2 + 0.45 - 0.5 = 0.15
    costs = [0.3, 0.05, 0.2, 0.15]
    want = sum((1 - math.exp(-c)) ** 2 * c for c in costs)
    assert float(adaptive_triplet(SIM, ~EYE, 0.2, 2.0)) == pytest.approx(want, abs=1e-6)
    assert float(adaptive_triplet(SIM, ~EYE, 0.2, 0.0)) == pytest.approx(sum(costs), abs=1e-6)  # gamma 0: VSE sum
    assert float(cross_modal_triplet(SIM, ~EYE, 0.2)) == pytest.approx(((0.3 + 0.15) + (0.05 + 0.2)) / 2, abs=1e-6)
    assert float(cross_modal_triplet(SIM, ~EYE, 0.2, "sum")) == pytest.approx(0.7, abs=1e-6)
    assert float(cross_modal_triplet(SIM, torch.zeros(2, 2, dtype=torch.bool), 0.2)) == 0.0  # no negatives
    # the focal weights are not detached: the gradient is d/dc [(1 - e^-c)^2 c] = (1 - e^-c)^2 + 2c(1 - e^-c)e^-c
    s = SIM.clone().requires_grad_(True)
    adaptive_triplet(s, ~EYE, 0.2, 2.0).backward()
    g = lambda c: (1 - math.exp(-c)) ** 2 + 2 * c * (1 - math.exp(-c)) * math.exp(-c)  # noqa: E731
    assert float(s.grad[0, 1]) == pytest.approx(g(0.3) + g(0.2), abs=1e-6)  # s_01 is in two costs
    assert float(s.grad[0, 0]) == pytest.approx(-g(0.3) - g(0.15), abs=1e-6)


def test_consistency_and_uncertainty_weighting_by_hand():
    student = torch.tensor([[1.0, 0.0], [0.6, 0.8]], requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0], [0.6, 0.0]], requires_grad=True)
    loss = consistency_loss(student, teacher)
    assert float(loss.detach()) == pytest.approx((1.0 + 0.64) / 2)
    loss.backward()
    assert teacher.grad is None  # the teacher side carries no gradient
    s = torch.tensor([0.0, math.log(2.0)], requires_grad=True)
    total = uncertainty_weighted([torch.tensor(1.0), torch.tensor(2.0)], s)
    assert float(total.detach()) == pytest.approx(0.5 + math.log(2) + 0.5 + math.log(3), abs=1e-6)
    # each weight's optimum for a fixed loss: sigma^2 = (L + sqrt(L^2 + 8L)) / 4 (zero gradient there)
    for value in (0.3, 2.0, 7.0):
        v = (value + math.sqrt(value ** 2 + 8 * value)) / 4
        s = torch.tensor([math.log(v)], requires_grad=True)
        uncertainty_weighted([torch.tensor(value)], s).backward()
        assert abs(float(s.grad)) < 1e-5


def _brute_force_recall(img: np.ndarray, txt: np.ndarray, owner: np.ndarray, k: int) -> tuple[float, float]:
    sims = img @ txt.T
    i2t = [min(int(np.where(np.argsort(-sims[i]) == j)[0][0]) for j in np.where(owner == i)[0]) < k
           for i in range(len(img))]
    t2i = [int(np.where(np.argsort(-sims[:, j]) == owner[j])[0][0]) < k for j in range(len(txt))]
    return float(np.mean(i2t)), float(np.mean(t2i))


def test_image_text_recall_matches_brute_force():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(23, 8)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    owner = np.concatenate([np.arange(23), rng.integers(0, 23, 60)])  # every image has a caption, some several
    txt = img[owner] + rng.normal(scale=0.9, size=(len(owner), 8)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    r = image_text_recall(img, txt, owner)
    for k in (1, 5, 10):
        want_i2t, want_t2i = _brute_force_recall(img, txt, owner, k)
        assert r["i2t"][k] == pytest.approx(want_i2t) and r["t2i"][k] == pytest.approx(want_t2i)
    assert r["mR"] == pytest.approx(np.mean([*r["i2t"].values(), *r["t2i"].values()]))
    assert (r["images"], r["captions"]) == (23, 83)
    perfect = image_text_recall(np.eye(3), np.eye(3)[[0, 0, 1, 2]], [0, 0, 1, 2])
    assert perfect["mR"] == 1.0
    with pytest.raises(ValueError, match="at least one caption"):
        image_text_recall(np.eye(3), np.eye(3)[:2], [0, 1])


def test_image_text_recall_breaks_ties_at_random():
    """Identical captions of different images tie exactly: R@K is the expectation over tie orders."""
    img = np.eye(3, dtype=np.float32)
    txt = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=np.float32)  # images 0 and 1 share one caption text
    r = image_text_recall(img, txt, [0, 1, 2])
    assert r["i2t"][1] == pytest.approx(2 / 3) and r["t2i"][1] == pytest.approx(2 / 3)  # a coin flip for 0 and 1
    assert r["i2t"][5] == 1.0 and r["t2i"][5] == 1.0
    # many duplicates: against the mean of rankings with ties put in random orders
    rng = np.random.default_rng(3)
    img = rng.normal(size=(12, 4))
    templates = rng.normal(size=(4, 4))
    owner = np.repeat(np.arange(12), 2)
    txt = templates[rng.integers(0, 4, len(owner))]  # every caption is one of 4 texts
    r = image_text_recall(img, txt, owner, ks=(1, 3))
    sims = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    sims = np.round(sims, 6)
    hits = {"i2t": np.zeros(2), "t2i": np.zeros(2)}
    for _ in range(400):
        noise = rng.random(sims.shape)
        order_t = np.lexsort((noise, -sims), axis=1)  # captions of each image, best first, ties in random order
        order_i = np.lexsort((noise.T, -sims.T), axis=1)
        for n, k in enumerate((1, 3)):
            hits["i2t"][n] += np.mean([np.isin(order_t[i, :k], np.where(owner == i)[0]).any() for i in range(12)])
            hits["t2i"][n] += np.mean([owner[j] in order_i[j, :k] for j in range(len(owner))])
    for direction in ("i2t", "t2i"):
        assert [r[direction][1], r[direction][3]] == pytest.approx(hits[direction] / 400, abs=0.03)


def test_caption_cleaning_and_classes_from_file_names():
    assert pre_caption("Many  buildings, some green-trees/lawns are near a Playground.") == \
        "many buildings some green trees lawns are near a playground"
    assert pre_caption(" ".join(["word"] * 40)).count("word") == 30
    assert class_of("bridge_942.tif") == "bridge" and class_of("denseresidential_23.jpg") == "denseresidential"
    assert class_of("00123.jpg") is None and class_of("forest.png") == "forest"


def _write_images(folder, names):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / name)


def test_caption_files_of_both_layouts(tmp_path):
    train = [{"image": "bridge_1.png", "caption": "a bridge over a river.", "image_id": 0, "label": 0},
             {"image": "bridge_1.png", "caption": "a long bridge.", "image_id": 0, "label": 0},
             {"image": "00017.png", "caption": "some buildings.", "image_id": 1}]
    test = [{"image": "port_3.png", "caption": ["boats in a port.", "a port with ships."]}]
    (tmp_path / "rsitmd_train.json").write_text(json.dumps(train))
    (tmp_path / "rsitmd_test.json").write_text(json.dumps(test))
    splits = read_caption_files([tmp_path / "rsitmd_train.json", tmp_path / "rsitmd_test.json"])
    assert {s: dict(v) for s, v in splits.items()} == {
        "train": {"bridge_1.png": ["a bridge over a river.", "a long bridge."], "00017.png": ["some buildings."]},
        "test": {"port_3.png": ["boats in a port.", "a port with ships."]}}
    karpathy = {"images": [{"filename": "bridge_1.png", "split": "train", "sentences": [{"raw": "a bridge."}]},
                           {"filename": "port_3.png", "split": "val", "sentences": [{"raw": "a port."},
                                                                                    {"raw": "ships."}]}]}
    (tmp_path / "dataset_rsitmd.json").write_text(json.dumps(karpathy))
    assert {s: dict(v) for s, v in read_caption_files([tmp_path / "dataset_rsitmd.json"]).items()} == {
        "train": {"bridge_1.png": ["a bridge."]}, "val": {"port_3.png": ["a port.", "ships."]}}
    (tmp_path / "captions.json").write_text(json.dumps(train))
    with pytest.raises(ValueError, match="cannot tell its split from its name"):
        read_caption_files([tmp_path / "captions.json"])
    (tmp_path / "x_val.json").write_text(json.dumps(train[:1]))
    with pytest.raises(ValueError, match="in both the train and the val split"):
        read_caption_files([tmp_path / "rsitmd_train.json", tmp_path / "x_val.json"])
    (tmp_path / "bad_test.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_caption_files([tmp_path / "bad_test.json"])
    _write_images(tmp_path / "images", ["bridge_1.png"])
    assert find_image(tmp_path / "images", "train/bridge_1.png").name == "bridge_1.png"  # by base name
    with pytest.raises(ValueError, match="escapes the images folder"):
        find_image(tmp_path / "images", "../rsitmd_train.json")


def test_prepare_data_captions_source(tmp_path):
    from tileprompt_backend.training.data.shards import open_dataset
    from tileprompt_backend.training.data.stream import eval_samples
    from tileprompt_backend.training.prepare import main as prepare_main

    train = [{"image": f"{c}_{i}.png", "caption": f"a {c} number {i} {j}."} for c in ("bridge", "port")
             for i in range(3) for j in range(2)] + [{"image": "00017.png", "caption": "something."}]
    test = [{"image": "port_9.png", "caption": ["a port.", "boats."]}]
    (tmp_path / "rsitmd_train.json").write_text(json.dumps(train))
    (tmp_path / "rsitmd_test.json").write_text(json.dumps(test))
    _write_images(tmp_path / "images", sorted({e["image"] for e in train + test}))
    out = tmp_path / "rsitmd"
    assert prepare_main(["captions", str(tmp_path / "rsitmd_train.json"), str(tmp_path / "rsitmd_test.json"),
                         "--images", str(tmp_path / "images"), "--out", str(out), "--quiet"]) == 0
    spec = open_dataset(out)
    assert spec.classes == ["bridge", "port"] and spec.task == "multi-class"
    assert spec.manifest["captions"]["source"] == "rsitmd" and not spec.manifest["captions"]["templated"]
    assert spec.manifest["captions"]["per_split"]["train"] == {"images": 7, "captions": 13}
    assert spec.manifest["splits"]["train"]["unlabelled"] == 1
    samples = [s for _, s in eval_samples(spec, "train")]
    assert samples[0].meta["captions"] == ["a bridge number 0 0.", "a bridge number 0 1."] and samples[0].target == 0
    assert samples[0].image.shape == (3, 24, 24) and samples[0].bands == ("R", "G", "B")
    assert prepare_main(["captions", str(tmp_path / "rsitmd_train.json"), "--out", str(tmp_path / "x")]) == 2


def test_templated_captions_say_what_covers_the_tile():
    caps = templated_captions({"forest": 0.62, "water": 0.3, "farm": 0.02})
    assert len(caps) == len(PATTERNS) == 5
    assert caps == ["a satellite image of forest and water.", "mostly forest with partly water.",
                    "about 60 % forest, about 30 % water.", "an area of forest next to water.",
                    "forest covers about 60 % of this tile, water about 30 %."]
    assert templated_captions({"farm": 0.95})[0] == "a satellite image of farm."
    assert templated_captions({"farm": 0.01}) == []


def test_caption_transform_composites_augments_and_draws_a_caption():
    dn = np.random.default_rng(0).integers(0, 4000, (13, 32, 32)).astype(np.uint16)
    from tileprompt_backend.sentinel2.bands import BANDS

    sample = Sample("k1", dn, BANDS, "L1C", target=2, meta={"captions": ["Mostly Forest.", "Water, mostly!"]})
    plain = CaptionTransform(rgb_card=True, composite={"L1C": 3558.0, "L2A": 2000.0}, augment="none")
    item = plain(sample, np.random.default_rng(0))
    want = np.clip(dn[[3, 2, 1]].astype(np.float32) / 3558 * 255, 0, 255).astype(np.uint8)
    assert np.array_equal(item.image, want) and item.info.kind == "rgb" and item.label == 2
    assert item.caption in ("mostly forest", "water mostly")
    drawn = {plain(sample, np.random.default_rng(s)).caption for s in range(20)}
    assert drawn == {"mostly forest", "water mostly"}
    ref = CaptionTransform(rgb_card=True, composite={"L1C": 3558.0}, augment="reference")
    a, b = ref(sample, np.random.default_rng(5)), ref(sample, np.random.default_rng(5))
    assert np.array_equal(a.image, b.image) and a.image.dtype == np.uint8 and a.image.shape[0] == 3
    ms = CaptionTransform(rgb_card=False, composite={}, augment="reference")(sample, np.random.default_rng(1))
    assert ms.image.shape[0] == 13 and ms.info.kind == "s2"  # multispectral cards: crop and flip only
    rgb = np.random.default_rng(2).integers(0, 255, (3, 20, 20), dtype=np.uint8)
    outs = [rand_augment(rgb, np.random.default_rng(s), RandAugment()) for s in range(12)]
    assert all(o.shape == rgb.shape and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, rgb) for o in outs) and any(np.array_equal(o, rgb) for o in outs)


def test_harma_and_rdb_schedules_and_weight_decay_groups(tmp_path):
    """HarMA's code: 10 % linear warm-up then linear decay to 0, AdamW (0.9, 0.98), no decay on biases and norms;
    RDB: lr x 0.7 every 20 epochs (a step decay, no warm-up)."""
    from tileprompt_backend.training import harma
    from tileprompt_backend.training.distributed import Dist
    from tileprompt_backend.training.loop import LoopConfig, Trainer, linear_with_warmup, step_decay

    assert [linear_with_warmup(s, 2, 10) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert [step_decay(s, 0, 4, 0.7) for s in (0, 3, 4, 9)] == pytest.approx([1.0, 1.0, 0.7, 0.49])
    args = harma.build_parser("t").parse_args(["--data", "-", "--out", "-", "--lr", "0.1"])
    config = harma.loop_config(args, total=20, per_epoch=4)
    assert (config.schedule, config.warmup_steps, tuple(config.betas)) == ("linear", 2, (0.9, 0.98))
    module = torch.nn.ModuleDict({"proj": torch.nn.Linear(3, 4), "norm": torch.nn.LayerNorm(4)})
    trainer = Trainer(module, config, Dist(), tmp_path, {}, samples_per_step=1, desc="t", quiet=True,
                      no_decay=harma.no_decay)
    groups = trainer.optimizer.param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, args.weight_decay), (3, 0.0)]
    assert groups[0]["params"][0] is module["proj"].weight and groups[0]["betas"] == (0.9, 0.98)
    lrs = []
    for _ in range(4):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1 * 17 / 18])
    steps = LoopConfig(total_steps=10, lr=1.0, weight_decay=0.0, warmup_steps=0, schedule="step", step_every=4,
                       step_gamma=0.7)
    rdb_trainer = Trainer(torch.nn.Linear(2, 2), steps, Dist(), tmp_path / "rdb", {}, 1, "t", quiet=True)
    seen = []
    for _ in range(9):
        seen.append(rdb_trainer.optimizer.param_groups[0]["lr"])
        rdb_trainer.optimizer.step()
        rdb_trainer.scheduler.step()
    assert seen == pytest.approx([1.0] * 4 + [0.7] * 4 + [0.49])
