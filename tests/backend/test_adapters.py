"""HarMA and RDB adapters on open_clip towers (models/adapters): identity at start, the attention mechanisms, padding,
parameter counts, and adapted cards loaded by the engine's own loader."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import open_clip
import pytest
import torch

from tileprompt_backend.models import load_model, read_card, resolve_card
from tileprompt_backend.models.adapters import (adapter_config, adapter_state_dict, attach_adapters, parameter_counts,
                                                text_sees_padding)
from tileprompt_backend.models.adapters.common import TokenContext
from tileprompt_backend.models.adapters.differential import (DifferentialAttention, lambda_init_schedule,
                                                             reparameterised_lambda)
from tileprompt_backend.models.adapters.hierarchical import HierarchicalAttention, caption_segments, masked_softmax
from tileprompt_backend.models.clip import create_open_clip, open_clip_spec, set_patch_embed_channels
from tileprompt_backend.models.loading import encode_text_trimmed
from tileprompt_backend.models.tiny import TINY_OPEN_CLIP
from tileprompt_backend.models.weights import write_weights

TINY = {"harma": {"bottleneck": 16, "heads": 2, "mini_bottleneck": 8, "mini_heads": 2},
        "rdb": {"bottleneck": 16, "da_heads": 2}}
VARIANTS = [("harma", {}), ("harma", {"shared": "text", "text_padding": "attend"}), ("harma", {"shared": "none"}),
            ("rdb", {}), ("rdb", {"shared": "mini-adapter", "lambda_init": 0.5, "da_norm": False,
                                  "tsa_output": "vector"}), ("rdb", {"shared": "none"})]
CAPTIONS = ["a forest next to a river.", "water", "many buildings and some green trees are around a playground."]


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: see conftest


def _tiny_clip(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_open_clip(TINY_OPEN_CLIP, quick_gelu=False).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return open_clip.SimpleTokenizer(context_length=16)(CAPTIONS)


@pytest.mark.parametrize("method,extra", VARIANTS)
def test_adapters_start_as_identity_and_never_see_padding(method, extra, tokens):
    """At start both embeddings are the base model's (<= 1e-6); once trained (weights moved off zero), a text
    embedding does not depend on what follows the end-of-text token (except in HarMA's released-code mode)."""
    model = _tiny_clip()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.encode_image(x), model.encode_text(tokens)
        attach_adapters(model, method, {**TINY[method], **extra})
        after = model.encode_image(x), model.encode_text(tokens)
    for a, b in zip(before, after):
        assert (a - b).abs().max() <= 1e-6
    assert adapter_state_dict(model) and all(".mlp.adapter." in k or k.startswith("adapters_shared.")
                                             for k in adapter_state_dict(model))

    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    garbage = tokens.clone()
    after_eot = torch.arange(16)[None, :] > tokens.argmax(dim=-1)[:, None]
    garbage[after_eot] = torch.randint(1, 40000, (int(after_eot.sum()),), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, noisy, trimmed = model.encode_text(tokens), model.encode_text(garbage), encode_text_trimmed(model, tokens)
        assert (model.encode_image(x) - after[0]).abs().max() > 1e-3  # the image adapters act too
    if extra.get("text_padding") == "attend":  # the released code's mode: padding is attended, so it matters
        assert text_sees_padding(model) and (full - noisy).abs().max() > 1e-4
        assert torch.equal(trimmed, full)  # the engine then encodes at full context (open_clip's own path)
    else:
        assert not text_sees_padding(model)
        assert (full - noisy).abs().max() <= 1e-5
        assert (full - trimmed).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["harma", "rdb"])
def test_towers_of_unequal_depth_share_by_relative_depth(method, tokens):
    """ViT-L/14 cards (RemoteCLIP, SkyCLIP) have 24 image and 12 text blocks: image blocks 2j and 2j + 1 use text
    block j's shared module; the model still starts as its base model."""
    torch.manual_seed(0)
    model = create_open_clip({**TINY_OPEN_CLIP, "vision_cfg": {**TINY_OPEN_CLIP["vision_cfg"], "layers": 4}},
                             quick_gelu=False).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.encode_image(x), model.encode_text(tokens)
        attach_adapters(model, method, TINY[method])
        after = model.encode_image(x), model.encode_text(tokens)
    for a, b in zip(before, after):
        assert (a - b).abs().max() <= 1e-6
    shared = list(model.adapters_shared)
    used = lambda blocks: [shared.index(b.mlp.adapter.adapter._shared[0]) for b in blocks]  # noqa: E731
    assert len(shared) == 2
    assert used(model.visual.transformer.resblocks) == [0, 0, 1, 1] and used(model.transformer.resblocks) == [0, 1]


def test_token_context_is_per_thread_and_not_copied():
    import copy
    import threading

    ctx = TokenContext()
    emb = torch.nn.Embedding(10, 2)
    ctx.attach(emb)
    emb(torch.tensor([[1, 9, 0]]))
    seen = {}

    def other():
        emb(torch.tensor([[1, 2, 9, 0, 0]]))
        seen["valid"] = ctx.valid()

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert ctx.valid().tolist() == [[True, True, False]]
    assert seen["valid"].tolist() == [[True, True, True, False, False]]
    with pytest.raises(RuntimeError, match="before the token embedding"):
        copy.deepcopy(ctx).tokens


def test_differential_attention_lambda_and_shapes():
    torch.manual_seed(0)
    da = DifferentialAttention(dim=16, heads=2, lambda_init=lambda_init_schedule(3))
    assert da.head_dim == 4 and da.lambda_q1.shape == (4,)
    assert lambda_init_schedule(0) == pytest.approx(0.2)
    assert lambda_init_schedule(3) == pytest.approx(0.8 - 0.6 * math.exp(-0.9))
    q1, k1, q2, k2 = (torch.tensor(v) for v in ([0.5, 1.0], [2.0, 0.0], [1.0, 1.0], [0.25, 0.25]))
    assert float(reparameterised_lambda(q1, k1, q2, k2, 0.3)) == pytest.approx(math.exp(1.0) - math.exp(0.5) + 0.3)
    with torch.no_grad():
        for p in (da.lambda_q1, da.lambda_k1, da.lambda_q2, da.lambda_k2):
            p.zero_()
    assert float(da.lam().detach()) == pytest.approx(da.lambda_init)  # exp(0) - exp(0) + lambda_init

    x = torch.randn(3, 5, 16)
    maps = da.attention_maps(x)
    assert maps.shape == (3, 2, 2, 5, 5) and torch.allclose(maps.sum(-1), torch.ones(3, 2, 2, 5))
    out = da(x)
    assert out.shape == (3, 5, 16)
    # by hand for sample 0: per head (softmax(Q1 K1^T s) - lambda softmax(Q2 K2^T s)) V, RMSNorm, x (1 - lambda_init)
    q = (x[0] @ da.q.weight.T).view(5, 4, 4)  # (L, 2 heads, head_dim): the halves of head h are 2h and 2h + 1
    k = (x[0] @ da.k.weight.T).view(5, 4, 4)
    v = (x[0] @ da.v.weight.T).view(5, 2, 8)
    ref = torch.empty(5, 16)
    for h in range(2):
        b1 = torch.softmax(q[:, 2 * h] @ k[:, 2 * h].T / 2.0, dim=-1)
        b2 = torch.softmax(q[:, 2 * h + 1] @ k[:, 2 * h + 1].T / 2.0, dim=-1)
        o = (b1 - da.lambda_init * b2) @ v[:, h]
        ref[:, 8 * h:8 * h + 8] = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * (1 - da.lambda_init)
    assert torch.allclose(out[0], ref @ da.out.weight.T, atol=1e-5)
    with pytest.raises(ValueError, match="lambda_init"):
        DifferentialAttention(16, 2, lambda_init=1.0)
    with pytest.raises(ValueError, match="multiple"):
        DifferentialAttention(18, 4, lambda_init=0.5)


def test_hierarchical_attention_ignores_padding_and_weights_real_tokens():
    torch.manual_seed(0)
    ha = HierarchicalAttention(dim=8, hidden=4, attn_dim=8).eval()
    lengths = [5, 2, 7]
    valid = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    tokens = torch.where(valid, torch.full((3, 7), 5), torch.zeros(3, 7, dtype=torch.long))
    segments = caption_segments(tokens, valid)
    x = torch.randn(3, 7, 8)
    noisy = x.clone()
    noisy[~valid] = torch.randn(int((~valid).sum()), 8) * 100
    out, out_noisy = ha(x, segments), ha(noisy, segments)
    assert out.shape == (3, 7, 8)
    assert torch.allclose(out[valid], out_noisy[valid], atol=1e-6)
    weights = ha.last["word_weights"]  # (sentences, T): one sentence per caption here
    assert torch.allclose(weights.sum(-1), torch.ones(3))
    assert torch.all(weights[0, 5:] == 0) and torch.all(weights[1, 2:] == 0)
    assert torch.allclose(ha.last["sentence_weights"], torch.ones(3, 1))
    # a caption alone gives what it gives in the batch (no cross-sample mixing, no dependence on the batch's length)
    alone = ha(x[1:2, :2], segments[1:2, :2])
    assert torch.allclose(alone[0], out[1, :2], atol=1e-6)
    assert torch.equal(masked_softmax(torch.tensor([[1.0, 2.0]]), torch.tensor([[False, False]])), torch.zeros(1, 2))


def test_caption_segments_split_at_sentence_ends():
    # SOT=5, '.'=7, EOT=9 (the highest id), padding 0
    tokens = torch.tensor([[5, 1, 2, 7, 3, 7, 9, 0], [5, 1, 7, 9, 0, 0, 0, 0]])
    valid = torch.arange(8)[None, :] <= tokens.argmax(-1)[:, None]
    assert caption_segments(tokens, valid).tolist() == [[0] * 7 + [-1], [0] * 4 + [-1] * 4]
    # the final '.' before the end-of-text token starts no new sentence
    assert caption_segments(tokens, valid, (7,)).tolist() == [[0, 0, 0, 0, 1, 1, 1, -1], [0, 0, 0, 0] + [-1] * 4]
    ha = HierarchicalAttention(dim=4, hidden=2, attn_dim=4)
    out = ha(torch.randn(2, 8, 4), caption_segments(tokens, valid, (7,)))
    assert out.shape == (2, 8, 4)
    assert torch.allclose(ha.last["sentence_weights"].sum(-1), torch.ones(2))
    assert ha.last["sentence_weights"][1, 1] == 0  # the second caption has one sentence


def test_vit_b32_trainable_parameter_counts_match_the_documented_figures():
    """HarMA's code on ViT-B/32 (method notes §3.4): image MGA 263,553 per block, text MGA 197,761, MMS-Adapter
    33,217, plus 24 block gates; ~5.93 M with the temperature (trained beside the model). Built on the meta
    device: nothing is allocated."""
    config = open_clip.get_model_config("ViT-B-32")
    counts = {}
    for method, extra in (("harma", {}), ("harma", {"shared": "text"}), ("rdb", {})):
        with torch.device("meta"):
            model = create_open_clip(config, quick_gelu=True)
            attach_adapters(model, method, extra)
        counts[(method, extra.get("shared"))] = parameter_counts(model)
    harma = counts[("harma", None)]
    assert harma["image"] == 12 * 263_553 + 12 and harma["text"] == 12 * 197_761 + 12
    assert harma["shared"] == 12 * 33_217
    assert harma["adapters"] + 1 == 5_934_397  # + HarMA's temperature
    assert harma["per_depth"] == 263_554 + 197_762 + 33_217  # ~0.50 M: the paper's "single adapter module"
    assert counts[("harma", "text")]["adapters"] == harma["adapters"]  # placement moves, count stays
    assert harma["base"] == 151_277_313
    rdb = counts[("rdb", None)]
    assert rdb["base"] == harma["base"] and rdb["shared"] == 12 * (128 * 128 + 128)


ZOO_CLIP = ("clip-vit-b32-openai", "clip-vit-b16-openai", "georsclip-vit-b32", "remoteclip-vit-b32",
            "remoteclip-vit-l14", "skyclip-vit-l14", "llama3-ms-clip-base")


@pytest.mark.parametrize("card_id", ZOO_CLIP)
def test_adapters_fit_every_clip_card_of_the_zoo(card_id):
    """Both methods' default adapters attach to every block of both towers of each bundled clip card's full-size
    architecture (ViT-B/32, B/16, L/14, the 10-band Llama3-MS-CLIP), leaving the base parameters as they are.
    Built on the meta device: nothing is allocated."""
    card = resolve_card(card_id)
    name, config = open_clip_spec(card.image_tower, card.id)
    for method in ("harma", "rdb"):
        with torch.device("meta"):
            model = create_open_clip(config, quick_gelu=bool(name and name.endswith("-quickgelu")))
            if card.input.modality == "s2":
                set_patch_embed_channels(model.visual, len(card.input.bands), card.id)
            base = sum(p.numel() for p in model.parameters())
            attach_adapters(model, method, {})
        counts = parameter_counts(model)
        assert counts["base"] == base and counts["image"] > 0 and counts["text"] > 0
        blocks = [*model.visual.transformer.resblocks, *model.transformer.resblocks]
        assert all(hasattr(b.mlp, "adapter") for b in blocks)
        assert len(model.adapters_shared) == min(len(model.visual.transformer.resblocks),
                                                 len(model.transformer.resblocks))


def test_adapter_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown adapter method 'lora'"):
        adapter_config("lora", {})
    with pytest.raises(ValueError, match=r"unknown harma adapter field\(s\) \['botleneck'\]"):
        adapter_config("harma", {"botleneck": 64})
    with pytest.raises(ValueError, match="shared must be one of both, text, none"):
        adapter_config("harma", {"shared": "image"})
    with pytest.raises(ValueError, match="sentence_end"):
        adapter_config("rdb", {"sentences": "split"})
    with pytest.raises(ValueError, match="lambda_init"):
        adapter_config("rdb", {"lambda_init": 1.5})
    assert adapter_config("rdb", {"sentence_end": [269], "sentences": "split"}).sentence_end == (269,)
    model = _tiny_clip()
    attach_adapters(model, "rdb", TINY["rdb"])
    with pytest.raises(ValueError, match="already has adapters"):
        attach_adapters(model, "rdb", TINY["rdb"])


def _adapted_card(base_dir, out, method: str, extra: dict | None = None, perturb: float = 0.05):
    """A tiny clip card with trained-looking adapters: the base card's files plus an adapter weights file."""
    shutil.copytree(base_dir, out)
    data = json.loads((out / "model.json").read_text())
    model = load_model(read_card(out), device="cpu").text_model
    config = {**TINY[method], **(extra or {})}
    torch.manual_seed(3)
    attach_adapters(model, method, config)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.add_(torch.randn_like(p) * perturb)
    write_weights(adapter_state_dict(model), out / "adapters.safetensors")
    data.update(id=out.name, adapters={"method": method, "config": config, "weights": "adapters.safetensors"})
    (out / "model.json").write_text(json.dumps(data))
    return read_card(out), model


@pytest.mark.parametrize("method", ["rdb"])  # HarMA cards: test_retrieval_training (search and classify)
def test_adapted_card_loads_through_the_engines_loader(tiny_models, tmp_path, method):
    card, trained = _adapted_card(tiny_models["clip"], tmp_path / f"tiny-{method}", method)
    loaded = load_model(card, device="cpu")
    assert card.adapters["method"] == method and "adapters.safetensors" in [p.name for p in loaded.image_files]
    x = loaded.probe_batch(3)
    with torch.no_grad():
        want_img = torch.nn.functional.normalize(trained.encode_image(torch.from_numpy(x)), dim=-1)
        want_txt = torch.nn.functional.normalize(trained.encode_text(loaded.tokenize(CAPTIONS)), dim=-1)
        got_img = loaded.image_tower(torch.from_numpy(x))
    assert (got_img - want_img).abs().max() <= 1e-5
    assert np.abs(loaded.encode_text(CAPTIONS) - want_txt.numpy()).max() <= 1e-5
    base = load_model(tiny_models["clip"], device="cpu")
    assert np.abs(base.encode_text(CAPTIONS) - loaded.encode_text(CAPTIONS)).max() > 1e-3  # adapters act
    assert card.card_hash() != base.card.card_hash()


def test_adapted_card_refuses_wrong_weights(tiny_models, tmp_path):
    card, _ = _adapted_card(tiny_models["clip"], tmp_path / "tiny-harma", "harma")
    data = json.loads((card.path / "model.json").read_text())
    data["adapters"]["config"]["shared"] = "none"  # the file holds MMS-Adapters this config does not have
    (card.path / "model.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"adapter weights adapters.safetensors: unexpected keys adapters_shared\.0"):
        load_model(read_card(card.path), device="cpu")
    data["adapters"] = {"method": "harma", "weights": "../escape.safetensors"}
    (card.path / "model.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="escapes the model directory"):
        load_model(read_card(card.path), device="cpu")
    data["adapters"] = {"method": "harma"}
    (card.path / "model.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="adapters must be an object with 'method' and 'weights'"):
        read_card(card.path)
