"""train cmid: each loss on hand-computed cases, masking and mean fill, EMA and its schedule, the local matching
geometry under crops and flips (and the reference's crop-placement bug), the views, the scene stream, a 2-process
CPU DDP run with one enqueue per step, resume after Ctrl-C, refusals, and a tiny end-to-end run whose export
loads into the models package and `tileprompt index` (and `train align` where that command exists)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import SSL4EO, _require
from test_training_data import synthetic_dataset
from tileprompt_backend.cli import main as cli_main
from tileprompt_backend.models import load_model, read_card
from tileprompt_backend.models.tiny import TINY_TIMM_KWARGS, write_tiny
from tileprompt_backend.models.weights import read_weights
from tileprompt_backend.sentinel2 import BANDS
from tileprompt_backend.training.augment import Crop, apply_crop
from tileprompt_backend.training.checkpoints import latest_checkpoint
from tileprompt_backend.training.cmid import losses as L
from tileprompt_backend.training.cmid.geometry import cell_centres, crop_row, match_positions
from tileprompt_backend.training.cmid.masking import block_mask, mean_fill, pixel_mask
from tileprompt_backend.training.cmid.model import CMIDConfig, CMIDNet, vit_tokens
from tileprompt_backend.training.cmid.views import SpectralAug, ViewMaker, apply_spectral, draw_spectral, gaussian_blur
from tileprompt_backend.training.data.samples import Sample
from tileprompt_backend.training.data.scenes import SceneStream, find_scenes, share
from tileprompt_backend.training.data.stream import batches
from tileprompt_backend.training.inputs import model_input
from tileprompt_backend.training.runlog import read_metrics

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: see conftest

REPO = Path(__file__).resolve().parents[2]
#: A tiny student and heads: 2-layer 32-wide ViT with 8 px patches at 32 px (4 x 4 tokens).
TINY = ["--image-size", "32", "--timm-kwargs", json.dumps(TINY_TIMM_KWARGS), "--mask-block", "16",
        "--global-hidden", "32", "--global-dim", "16", "--queue-size", "64", "--local-hidden", "32",
        "--local-bottleneck", "16", "--prototypes", "32", "--batch-size", "8", "--workers", "0", "--quiet",
        "--log-every", "1", "--tile", "64"]
SMALL_CONFIG = CMIDConfig(global_hidden=32, global_dim=16, queue_size=64, local_hidden=32, local_bottleneck=16,
                          prototypes=32, local_pairs=6)


def _train(*argv: str) -> int:
    return cli_main(["train", "cmid", *argv])


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, in_chans=13, num_classes=0, img_size=32,
                             **TINY_TIMM_KWARGS)


@pytest.fixture(scope="module")
def ssl4eo() -> Path:
    """Four SSL4EO-S12 scenes (two L1C, two L2A dates of one place): 64 usable 64 px tiles."""
    return _require(SSL4EO)


@pytest.fixture(scope="module")
def text_card(tmp_path_factory) -> Path:
    return write_tiny("clip", tmp_path_factory.mktemp("text") / "tiny-clip").path


# --- losses on hand-computed cases ---------------------------------------------------------------------------------

def test_focal_l1_by_hand():
    pred = torch.tensor([[[[1.0, 2.0], [0.0, 5.0]]]])  # one band, 2 x 2
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])  # the top row is masked
    # l = e (2 sigmoid(0.2 e) - 1) = e tanh(0.1 e) on the masked errors 1 and 2, mean over 2 masked pixels
    expected = (1 * math.tanh(0.1) + 2 * math.tanh(0.2)) / (2 + 1e-5)
    assert float(L.focal_l1_loss(pred, target, mask)) == pytest.approx(expected)
    assert float(L.focal_l1_loss(pred, target, mask, gamma=0.0)) == pytest.approx(3 / (2 + 1e-5))  # plain L1
    two = torch.cat([pred, 3 * pred], dim=1)  # two bands: mean over masked pixel-channels
    assert float(L.focal_l1_loss(two, torch.zeros_like(two), mask, gamma=0.0)) == pytest.approx(12 / (2 + 1e-5) / 2)


def test_focal_frequency_loss_by_hand_and_against_numpy():
    target = torch.zeros(1, 1, 2, 2)
    pred = torch.full((1, 1, 2, 2), 0.5)  # a constant offset: only the DC term differs, by 0.5 x sqrt(4) = 1
    assert float(L.focal_frequency_loss(pred, target)) == pytest.approx(1.0 / 4)  # weight 1 there, 0 elsewhere
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=(3, 2, 4, 4)), rng.normal(size=(3, 2, 4, 4))
    fp = np.fft.fft2(p, norm="ortho").mean(axis=0)
    ft = np.fft.fft2(t, norm="ortho").mean(axis=0)
    d = np.abs(fp - ft) ** 2
    w = np.log(np.sqrt(d) + 1)
    expected = np.mean(w / w.max() * d)
    got = L.focal_frequency_loss(torch.from_numpy(p).float(), torch.from_numpy(t).float())
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_frequency_input_mixes_only_unmasked_pixels():
    pred, target = torch.full((1, 1, 1, 2), 2.0), torch.zeros(1, 1, 1, 2)
    mask = torch.tensor([[[[1.0, 0.0]]]])
    out = L.frequency_input(pred, target, mask, unmask_weight=0.001)
    # masked: the prediction; unmasked: 0.001 x 2 + 0.999 x (0.5 x 2 + 0.5 x 0)
    torch.testing.assert_close(out, torch.tensor([[[[2.0, 0.002 + 0.999]]]]))


def test_moco_infonce_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # logits / 0.5 = [2, 0, -2], the positive first
    expected = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    assert float(L.moco_infonce(q, k, queue, 0.5)) == pytest.approx(expected)


def test_local_distillation_and_centring_by_hand():
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    # a uniform student: CE = log 2 whatever the teacher
    assert float(L.local_distillation_loss(student, teacher, torch.zeros(2), 0.1, 1.0)) == pytest.approx(math.log(2))
    # teacher softmax([1, 0] / 1) = [e/(e+1), 1/(e+1)]; student log_softmax([1, 0] / 0.5) = log_softmax([2, 0])
    t = torch.tensor([math.e, 1.0]) / (math.e + 1)
    s = torch.log_softmax(torch.tensor([2.0, 0.0]), 0)
    got = L.local_distillation_loss(torch.tensor([[1.0, 0.0]]), teacher, torch.zeros(2), 0.5, 1.0)
    assert float(got) == pytest.approx(float(-(t * s).sum()))
    # centring by the teacher itself makes the target uniform
    got = L.local_distillation_loss(torch.tensor([[1.0, 0.0]]), teacher, torch.tensor([1.0, 0.0]), 0.5, 1.0)
    assert float(got) == pytest.approx(float(-(0.5 * s).sum()))
    # two sequential updates with momentum 0.9 (the reference updates once per local term)
    c = L.updated_center(torch.zeros(1), torch.tensor([[1.0], [1.0]]), 0.9)
    assert float(c) == pytest.approx(0.19)


def test_ema_and_teacher_temperature_schedules():
    assert L.ema_momentum(0, 100) == pytest.approx(0.996)
    assert L.ema_momentum(50, 100) == pytest.approx(0.998)
    assert L.ema_momentum(100, 100) == pytest.approx(1.0)
    assert L.teacher_temperature(0, 10) == pytest.approx(0.04)
    assert L.teacher_temperature(5, 10) == pytest.approx(0.055)
    assert L.teacher_temperature(10, 10) == L.teacher_temperature(99, 10) == 0.07
    assert L.teacher_temperature(0, 0) == 0.07


# --- masking -------------------------------------------------------------------------------------------------------

def test_block_mask_ratio_and_block_structure():
    rng = np.random.default_rng(0)
    m = block_mask(rng, (14, 14), 2, 0.6)  # ViT-S/16 at 224 with 32 px blocks: 30 of 49 blocks
    assert m.shape == (14, 14) and m.sum() == 30 * 4
    blocks = m.reshape(7, 2, 7, 2)
    assert np.all(blocks.min(axis=(1, 3)) == blocks.max(axis=(1, 3)))  # each 2 x 2 block all or nothing
    odd = block_mask(rng, (7, 7), 2, 0.6)  # 4 x 4 blocks, the last row/column cut: ceil(16 x 0.6) = 10 blocks
    assert odd.shape == (7, 7)
    assert np.array_equal(block_mask(np.random.default_rng(3), (8, 8), 2, 0.5),
                          block_mask(np.random.default_rng(3), (8, 8), 2, 0.5))
    assert block_mask(rng, (4, 4), 1, 0.0).sum() == 0 and block_mask(rng, (4, 4), 1, 1.0).all()
    with pytest.raises(ValueError, match="mask ratio"):
        block_mask(rng, (4, 4), 1, 1.5)


def test_mean_fill_uses_each_images_own_band_means():
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).reshape(2, 2, 4, 4)
    tokens = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 1]]], dtype=torch.bool)  # 2 x 2 tokens of 2 px
    pix = pixel_mask(tokens, 2)
    assert pix.shape == (2, 1, 4, 4) and pix.sum() == 8
    out = mean_fill(x, pix)
    means = x.mean(dim=(2, 3))
    for i in range(2):
        for c in range(2):
            masked = pix[i, 0] > 0
            assert torch.all(out[i, c][masked] == means[i, c])
            assert torch.equal(out[i, c][~masked], x[i, c][~masked])


def test_mask_token_is_added_to_masked_patch_embeddings_only():
    vit = _tiny_vit().eval()
    x = torch.rand(2, 13, 32, 32)
    assert torch.equal(vit_tokens(vit, x), vit.forward_features(x))
    token = torch.randn(1, 1, 32)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    seen: list[torch.Tensor] = []
    hook = vit.pos_drop.register_forward_hook(lambda m, i, o: seen.append(i[0]))  # tokens + position embeddings
    with torch.no_grad():
        vit_tokens(vit, x, mask, token)
        vit._pos_embed(vit.patch_embed(x))
    hook.remove()
    diff = (seen[0] - seen[1])[:, 1:]  # after the CLS token
    torch.testing.assert_close(diff[0, 1 * 4 + 2], token.view(-1))
    assert float(diff.abs().sum()) == pytest.approx(float(token.abs().sum()), rel=1e-5)  # nowhere else


# --- geometry ------------------------------------------------------------------------------------------------------

def test_cell_centres_follow_crops_and_flips():
    crop = torch.tensor([[8.0, 16.0, 32.0, 64.0, 0.0, 0.0]])  # top 8, left 16, 32 x 64 px, 2 x 2 grid
    c = cell_centres(crop, (2, 2))[0]
    torch.testing.assert_close(c, torch.tensor([[16.0, 32.0], [16.0, 64.0], [32.0, 32.0], [32.0, 64.0]]))
    h = cell_centres(torch.tensor([[8.0, 16.0, 32.0, 64.0, 1.0, 0.0]]), (2, 2))[0]  # columns mirrored
    torch.testing.assert_close(h, c[[1, 0, 3, 2]])
    v = cell_centres(torch.tensor([[8.0, 16.0, 32.0, 64.0, 0.0, 1.0]]), (2, 2))[0]  # rows mirrored
    torch.testing.assert_close(v, c[[2, 3, 0, 1]])


def test_matched_positions_show_the_same_ground_and_the_reference_offsets_do_not():
    """Views cut from a tile whose pixels hold their own index: matched features must look at the same pixel."""
    tile = np.arange(24 * 24, dtype=np.float32).reshape(1, 24, 24)
    a, b = Crop(2, 4, 12, 12), Crop(6, 9, 12, 12, hflip=True, vflip=True)
    va, vb = apply_crop(tile, a)[0], apply_crop(tile, b)[0]
    grid = (12, 12)  # one feature per pixel: a feature's centre is its pixel's centre
    ca = cell_centres(torch.tensor([crop_row(a)]), grid)
    cb = cell_centres(torch.tensor([crop_row(b)]), grid)
    ia, ib = match_positions(ca, cb, 40)
    ia, ib = ia[0].numpy(), ib[0].numpy()
    overlap = (12 - 4) * (12 - 5)  # the crops share 8 x 7 pixels
    assert len(ia) == 40 <= overlap
    np.testing.assert_array_equal(va.reshape(-1)[ia], vb.reshape(-1)[ib])
    # the reference records albumentations' h_start/w_start (offset / free range) and uses them as pixels
    frac = lambda c: [c.top / (24 - c.height), c.left / (24 - c.width), c.height, c.width, c.hflip, c.vflip]
    ia2, ib2 = match_positions(cell_centres(torch.tensor([frac(a)]), grid), cell_centres(torch.tensor([frac(b)]),
                                                                                         grid), 40)
    wrong = va.reshape(-1)[ia2[0].numpy()] != vb.reshape(-1)[ib2[0].numpy()]
    assert wrong.mean() > 0.9


def test_match_positions_keeps_the_closest_pairs():
    ca = torch.tensor([[[0.0, 0.0], [0.0, 10.0], [0.0, 20.0]]])
    cb = torch.tensor([[[0.0, 11.0], [0.0, 30.0]]])
    ia, ib = match_positions(ca, cb, 2)
    assert ia.tolist() == [[1, 2]] and ib.tolist() == [[0, 0]]
    with pytest.raises(ValueError, match="matched pairs"):
        match_positions(ca, cb, 4)


# --- views ---------------------------------------------------------------------------------------------------------

def _spectral(x: torch.Tensor, seed: int, aug: SpectralAug, **kw) -> torch.Tensor:
    params = draw_spectral(np.random.default_rng(seed), aug, x.shape[0], x.shape[-1])
    return apply_spectral(x[None], {k: v[None] for k, v in params.items()}, **kw)[0]


def test_spectral_augmentation_per_band_gains_blur_noise_and_determinism():
    x = torch.full((13, 8, 8), 0.2)
    only_brightness = SpectralAug(p_jitter=1.0, brightness=0.4, contrast=0.0, band_spread=0.1, p_blur=0.0,
                                  p_noise=0.0)
    out = _spectral(x, 1, only_brightness)
    gains = out[:, 0, 0] / 0.2
    assert torch.all((gains > 0.6 * 0.9 - 1e-6) & (gains < 1.4 * 1.1 + 1e-6)) and gains.std() > 0  # per band
    assert torch.allclose(out, out[:, :1, :1].expand_as(out))  # a gain per band, the same over the tile
    torch.testing.assert_close(out, _spectral(x, 1, only_brightness))
    noisy = _spectral(x, 2, SpectralAug(p_jitter=0, p_blur=0, p_noise=1.0))
    assert 0.005 < float((noisy - x).std()) < 0.05 and noisy.min() >= 0
    mean, std = torch.full((13,), 0.1), torch.full((13,), 0.5)  # a card that normalises: augmented in its units
    same = _spectral((x - 0.1) / 0.5, 1, only_brightness, mean=mean, std=std)
    torch.testing.assert_close(same * 0.5 + 0.1, out)
    # the batched separable blur is torchvision's Gaussian blur, image by image (sigma 0: untouched)
    from torchvision.transforms.v2 import functional as TF

    imgs = torch.rand(3, 2, 16, 16)
    sigmas = torch.tensor([0.0, 0.7, 1.5])
    got = gaussian_blur(imgs, sigmas)
    torch.testing.assert_close(got[0], imgs[0])
    for i in (1, 2):
        k = 2 * math.ceil(3 * float(sigmas[2])) + 1
        ref = TF.gaussian_blur(imgs[i], kernel_size=[k, k], sigma=[float(sigmas[i])] * 2)
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-4)


def test_view_maker_is_deterministic_and_uses_the_cards_preprocessing(tiny_models):
    model = load_model(tiny_models["aligned-s2"], device="cpu")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 5000, (13, 48, 48)).astype(np.float32)
    sample = Sample("k1", image, BANDS, "L1C")
    maker = ViewMaker(model, (4, 4), mask_block=2, mask_ratio=0.5, aug=SpectralAug(p_jitter=1.0),
                      augment_in_worker=False)
    item = maker(sample, np.random.default_rng(7))
    again = maker(sample, np.random.default_rng(7))
    assert all(torch.equal(item[k], again[k]) for k in item)
    second = maker.augment(item["x"][1:], [item])[0]  # what the training process does to the second view (GPUs)
    assert second.shape == item["x"][1].shape and not torch.equal(second, item["x"][1])
    in_worker = ViewMaker(model, (4, 4), mask_block=2, mask_ratio=0.5, aug=SpectralAug(p_jitter=1.0))
    done = in_worker(sample, np.random.default_rng(7))  # CPUs: the worker augments, with the same result
    torch.testing.assert_close(done["x"][1], second)
    assert torch.equal(in_worker.augment(done["x"][1:], [done]), done["x"][1:])
    assert item["x"].shape == (2, 13, 32, 32) and item["mask"].shape == (2, 4, 4) and item["crops"].shape == (2, 6)
    assert int(item["mask"][0].sum()) == 4 * 2  # 2 of 4 blocks of 2 x 2 tokens
    top, left, h, w, hf, vf = item["crops"][0].tolist()
    view_a = apply_crop(image, Crop(int(top), int(left), int(h), int(w), bool(hf), bool(vf)))
    torch.testing.assert_close(item["x"][0], model_input(model, [view_a], [sample.info()])[0])  # view A: geometry only
    assert 0.5 * 48 * 48 - 1 <= h * w <= 48 * 48


# --- the network ---------------------------------------------------------------------------------------------------

def _batch(n: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = torch.rand(n, 2, 13, 32, 32)
    mask = torch.from_numpy(np.stack([[block_mask(rng, (4, 4), 2, 0.5) for _ in range(2)] for _ in range(n)]))
    crops = torch.tensor([[[0, 0, 32, 32, 0, 0], [8, 8, 24, 24, 1, 0]]] * n, dtype=torch.float32)
    return x, mask, crops


def test_network_step_teacher_ema_and_branch_switches():
    net = CMIDNet(_tiny_vit(), 13, SMALL_CONFIG).train()
    assert not net.teacher.training and net.student.training
    assert not any(p.requires_grad for p in net.teacher.parameters())
    assert "mask_token" not in dict(net.teacher.named_parameters())
    loss, parts = net(*_batch(), 0.04)
    loss.backward()
    assert set(parts) == {"mim", "mim_spatial", "mim_freq", "global", "local"} and torch.isfinite(loss)
    assert net.mask_token.grad is not None and net.mask_token.grad.abs().sum() > 0
    assert int(net.queue_ptr) == 8 and net.enqueued == 1  # 2 views x 4 keys, one enqueue
    assert float(net.center.abs().sum()) > 0
    before = {k: v.clone() for k, v in net.teacher.state_dict().items()}
    with torch.no_grad():
        for p in net.student.parameters():
            p.add_(1.0)
    net.update_teacher(0.9)
    for (name, t), s in zip(net.teacher.named_parameters(), net.student.parameters()):
        torch.testing.assert_close(t, 0.9 * before[name] + 0.1 * s)
    mim_only = CMIDNet(_tiny_vit(), 13, CMIDConfig(global_weight=0, local_weight=0))
    assert mim_only.teacher is None and not hasattr(mim_only, "queue")
    assert set(mim_only(*_batch(), 0.04)[1]) == {"mim", "mim_spatial", "mim_freq"}
    with pytest.raises(ValueError, match="every branch weight is 0"):
        CMIDNet(_tiny_vit(), 13, CMIDConfig(mim_weight=0, global_weight=0, local_weight=0))


def test_bf16_autocast_step_keeps_losses_in_float32():
    """The GPU path's precision (bf16 autocast) on the CPU: losses and prototype logits stay float32."""
    net = CMIDNet(_tiny_vit(), 13, SMALL_CONFIG).train()
    x, mask, crops = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = net(x, mask, crops, 0.04)
        logits = net.student.local_head(torch.randn(2, 3, 32))
    assert loss.dtype == torch.float32 and logits.dtype == torch.float32
    assert all(torch.isfinite(v) for v in parts.values())
    loss.backward()
    assert net.mask_token.grad is not None and net.queue.dtype == torch.float32


def test_reconstruction_is_a_per_patch_linear_map():
    net = CMIDNet(_tiny_vit(), 13, CMIDConfig(global_weight=0, local_weight=0))
    tokens = torch.zeros(1, 16, 32)
    tokens[0, 5] = torch.randn(32)  # only token (1, 1) is non-zero
    with torch.no_grad():
        net.mim_head.bias.zero_()
        rec = net.reconstruct(tokens, (32, 32))
    assert rec.shape == (1, 13, 32, 32)
    nonzero = rec.abs().sum(dim=1)[0] > 0
    assert nonzero[8:16, 8:16].all() and nonzero.sum() == 64  # exactly that token's 8 x 8 patch


def test_queue_wraps_around():
    net = CMIDNet(_tiny_vit(), 13, CMIDConfig(queue_size=6, global_dim=2, global_hidden=8, local_weight=0))
    keys = F.normalize(torch.randn(4, 2), dim=1)
    net.enqueue(keys)
    net.enqueue(keys * -1)
    assert int(net.queue_ptr) == 2
    torch.testing.assert_close(net.queue[[4, 5, 0, 1]], -keys)
    torch.testing.assert_close(net.queue[[2, 3]], keys[2:])


# --- scenes --------------------------------------------------------------------------------------------------------

def test_find_scenes_and_stream(ssl4eo, tmp_path):
    found = find_scenes([ssl4eo], 64, check=lambda info: None)
    assert len(found.scenes) == 4 and sum(s.tiles for s in found.scenes) == 100
    assert {s.level for s in found.scenes} == {"L1C", "L2A"}
    with pytest.raises(ValueError, match="not found"):
        find_scenes([tmp_path / "nothing"], 64)
    (tmp_path / "notes.tif").write_text("not a raster")
    with pytest.raises(ValueError, match="no usable Sentinel-2 scene.*notes.tif"):
        find_scenes([tmp_path], 64)
    assert [share(10, w, 3) for w in range(3)] == [4, 3, 3] and share(0, 1, 3) == 0

    def stream(start: int = 0) -> list[str]:
        s = SceneStream(found.scenes, 64, None, lambda info: BANDS, batch=8, steps_per_epoch=4,
                        transform=lambda sample, rng: sample.key, start_step=start, seed=1, buffer=16)
        it = batches(s, 0)
        return [k for _ in range(4 - start + 2) for k in next(it)]

    keys = stream()
    assert len(set(keys[:32])) == 32 and stream(2)[:16] == keys[16:32]  # resume skips to the same tile
    assert len({k.split("-r")[0] for k in keys[:8]}) > 1  # batches mix scenes


# --- the command ---------------------------------------------------------------------------------------------------

def test_refuses_bad_input_before_any_work(ssl4eo, text_card, tmp_path, capsys):
    out = ["--out", str(tmp_path / "card"), "--text-tower", str(text_card)]
    cases = [
        ([*out], "--data .* or --rasters"),
        ([*out, "--rasters", str(tmp_path / "missing")], "not found"),
        ([*out, "--rasters", str(ssl4eo), "--crop-scale", "0.5"], "--crop-scale must be two numbers"),
        ([*out, "--rasters", str(ssl4eo), "--tile", "0"], "tile size must be between 1 and 4096 pixels"),
        ([*out, "--rasters", str(ssl4eo), "--band-map", "B04,red"], "unknown band name 'red'"),
        ([*out, "--rasters", str(ssl4eo), "--mask-ratio", "2"], "--mask-ratio must be in"),
        ([*out, "--rasters", str(ssl4eo), *TINY, "--mask-block", "12"], "not a whole number of 8 px patches"),
        ([*out, "--rasters", str(ssl4eo), "--text-tower", "no-such-model"], "no-such-model"),
        ([*out, "--rasters", str(ssl4eo), *TINY, "--batch-size", "500"], "fewer than one batch"),
    ]
    for argv, message in cases:
        assert _train(*argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err), (argv, err)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    assert _train("--out", str(foreign), "--rasters", str(ssl4eo), "--text-tower", str(text_card)) == 2
    assert "exists and is not one TilePrompt wrote" in capsys.readouterr().err
    # an output inside an input would be read as a scene next time (and could replace it): refused
    assert _train("--out", str(ssl4eo / "card"), "--rasters", str(ssl4eo), "--text-tower", str(text_card)) == 2
    assert "lies inside an input of this job" in capsys.readouterr().err and not (ssl4eo / "card").exists()
    assert not (tmp_path / "card").exists()


def test_trains_from_shards_with_avg_pooling_and_a_multi_label_probe(text_card, tmp_path):
    data = synthetic_dataset(tmp_path / "shards", n=20, task="none", size=48)
    probe_data = synthetic_dataset(tmp_path / "ml", n=24, task="multi-label", n_classes=3, size=48)
    out = tmp_path / "card"
    assert _train("--data", str(data), *TINY, "--max-steps", "2", "--global-pool", "avg", "--probe-data",
                  str(probe_data), "--text-tower", str(text_card), "--out", str(out)) == 0
    card = read_card(out)
    assert card.image_tower["timm_kwargs"] == {**TINY_TIMM_KWARGS, "global_pool": "avg", "fc_norm": False}
    assert card.provenance["data"]["kind"] == "shards" and card.provenance["data"]["samples"] == 16
    assert card.provenance["probes"]["final"]["backbone"]["metric"] == "mAP"
    backbone = load_model(out, device="cpu").image_tower.backbone
    assert backbone.global_pool == "avg" and set(read_weights(out / "backbone.safetensors")) == set(
        backbone.state_dict())


def test_resume_after_interrupt_continues_to_the_same_weights(ssl4eo, text_card, tmp_path, monkeypatch):
    common = ["--rasters", str(ssl4eo), *TINY, "--max-steps", "4", "--checkpoint-every", "100",
              "--text-tower", str(text_card)]
    assert _train(*common, "--out", str(tmp_path / "straight")) == 0
    real = L.teacher_temperature
    calls = {"n": 0}

    def interrupt(step, *a, **k):  # Ctrl-C during the third step's forward pass
        calls["n"] += 1
        if step == 2 and calls["n"] == 3:
            raise KeyboardInterrupt
        return real(step, *a, **k)

    monkeypatch.setattr("tileprompt_backend.training.cmid.train.teacher_temperature", interrupt)
    assert _train(*common, "--out", str(tmp_path / "resumed")) == 130
    assert latest_checkpoint(tmp_path / "resumed.run").name == "step-00000002"
    assert not (tmp_path / "resumed").exists()
    monkeypatch.setattr("tileprompt_backend.training.cmid.train.teacher_temperature", real)
    assert _train(*common, "--out", str(tmp_path / "resumed")) == 0
    a = read_weights(tmp_path / "straight" / "backbone.safetensors")
    b = read_weights(tmp_path / "resumed" / "backbone.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed.run") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert _train(*common, "--out", str(tmp_path / "resumed"), "--overwrite", "--lr", "0.5") == 2  # other settings


def test_two_process_ddp_enqueues_the_gathered_keys_once(ssl4eo, text_card, tmp_path):
    """torchrun with 2 CPU processes (gloo): 3 steps of a global batch of 8 add 3 x 2 x 8 keys to the queue."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "backend"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "tileprompt_backend.training.cmid", "--rasters", str(ssl4eo), *TINY, "--max-steps", "3",
           "--queue-size", "128", "--text-tower", str(text_card), "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = read_weights(latest_checkpoint(tmp_path / "ddp.run") / "weights.safetensors")
    assert int(weights["queue_ptr"]) == 3 * 2 * 8  # the reference's double gather would give 96
    queue = weights["queue"]
    torch.testing.assert_close(queue.norm(dim=1), torch.ones(128))
    card = read_card(tmp_path / "ddp")
    assert card.provenance["steps"] == 3


@pytest.fixture(scope="module")
def cmid_card(ssl4eo, text_card, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny CMID run on the SSL4EO scenes with a labelled probe set: (card folder, probe dataset)."""
    root = tmp_path_factory.mktemp("cmid")
    data = synthetic_dataset(root / "labelled", n=28, task="multi-class", n_classes=2, size=48)
    assert _train("--rasters", str(ssl4eo), *TINY, "--max-steps", "3", "--probe-data", str(data),
                  "--text-tower", str(text_card), "--out", str(root / "cmid")) == 0
    return root / "cmid", data


def test_export_is_a_backbone_file_and_a_card_that_search_uses(cmid_card, ssl4eo, tmp_path, capsys):
    out, _ = cmid_card
    card = read_card(out)
    assert card.family == "aligned-s2" and not card.trained and "untrained" in card.title
    assert card.image_tower["backbone_weights"] == "backbone.safetensors"
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["arch"] == "timm:vit_small_patch16_224" and meta["timm_kwargs"] == TINY_TIMM_KWARGS
    assert meta["bands"] == list(BANDS) and meta["scale"]["divide"] == 10000.0 and meta["image_size"] == 32
    probes = card.provenance["probes"]
    assert set(probes) == {"init", "final"} and set(probes["init"]) == {"backbone", "band_stats"}
    assert 0.0 <= probes["final"]["backbone"]["knn"] <= 1.0 and probes["final"]["backbone"]["test"] == 4
    # the models package alone builds it, with exactly the trained backbone
    model = load_model(out, device="cpu")
    backbone = read_weights(out / "backbone.safetensors")
    for k, v in model.image_tower.backbone.state_dict().items():
        torch.testing.assert_close(v, backbone[k])
    # a plain timm model rebuilt from backbone.json loads the file strictly
    vit = timm.create_model(meta["arch"].split(":")[1], pretrained=False, in_chans=meta["in_chans"], num_classes=0,
                            img_size=meta["image_size"], **meta["timm_kwargs"])
    vit.load_state_dict(backbone, strict=True)
    # similar-tile search through the CLI
    scene = next(s for s in sorted((ssl4eo / "s2c").rglob("*T43RCP")) if s.is_dir())
    index = tmp_path / "index"
    assert cli_main(["index", str(scene), "--model", str(out), "--tile", "64", "--index", str(index),
                     "--runner", "torch"]) == 0
    hits = tmp_path / "hits.gpkg"
    assert cli_main(["search", str(index), "--tile-ids", "0", "-k", "3", "--out", str(hits)]) == 0
    assert hits.exists()


@pytest.mark.parametrize("start", ["card", "backbone file"])
def test_export_feeds_alignment(cmid_card, tmp_path, start):
    out, data = cmid_card
    teacher = write_tiny("clip", tmp_path / "teacher").path
    # the backbone file alone: align reads arch and timm arguments from the backbone.json beside it (its own
    # default, a full-size ViT-S, would not take these tiny weights)
    student_from = out if start == "card" else out / "backbone.safetensors"
    assert cli_main(["train", "align", "--data", str(data), "--teacher", str(teacher), "--student-from",
                     str(student_from), "--image-size", "32", "--batch-size", "8", "--max-steps", "1", "--workers",
                     "0", "--quiet", "--out", str(tmp_path / "aligned")]) == 0
    aligned = load_model(tmp_path / "aligned", device="cpu")
    backbone = aligned.image_tower.backbone.state_dict()
    assert backbone["cls_token"].shape == (1, 1, TINY_TIMM_KWARGS["embed_dim"])
    if start == "backbone file":  # the training's first step moved the weights; the shapes came from the file
        exported = read_weights(out / "backbone.safetensors")
        assert exported.keys() == backbone.keys()
