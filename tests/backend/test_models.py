"""tileprompt_backend.models: cards, loaders, preprocessing, runners, ONNX export and weight downloads.

Everything runs on tiny untrained models built from configs by the same loaders real weights go through;
nothing leaves the machine (downloads come from a real HTTP server on loopback, tests/fileserver.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime
import open_clip
import pytest
import timm
import torch

from fileserver import FileServer
from tileprompt_backend.models import (
    DEFAULT_MODEL, check_onnx_parity, export_onnx, fetch, list_models, load_model, make_runner, read_card,
    resolve_card, ssl4eo_checkpoint_filter, write_tiny, write_untrained,
)
from tileprompt_backend.models.downloads import download_tag, missing_weights, tag_weights_path
from tileprompt_backend.models.onnx_export import int8_cosine, onnx_file
from tileprompt_backend.models.runners import AUTO_MIN_COSINE, cpu_has_bf16, openvino_module, openvino_precision
from tileprompt_backend.paths import cache_dir
from tileprompt_backend.models.tiny import TINY_TIMM_KWARGS
from tileprompt_backend.models.weights import read_weights, write_weights
from tileprompt_backend.sentinel2.bands import BANDS

FAMILIES = ("clip", "aligned-s2")
S2_L1C = SimpleNamespace(kind="s2", level="L1C", bands=BANDS)
S2_L2A = SimpleNamespace(kind="s2", level="L2A", bands=tuple(b for b in BANDS if b != "B10"))
RGB = SimpleNamespace(kind="rgb", level="unknown", bands=("R", "G", "B"))


@pytest.fixture(scope="module")
def models(tiny_models):
    return {family: load_model(tiny_models[family], device="cpu") for family in FAMILIES}


def _edit_card(src: Path, dest: Path, **changes) -> Path:
    """Copy a card folder and change fields of its model.json: dict fields are updated one level deep,
    and a None value deletes the field."""
    if src != dest:
        shutil.copytree(src, dest)
    data = json.loads((dest / "model.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            value = {k: v for k, v in {**data[key], **value}.items() if v is not None}
        data[key] = value
    (dest / "model.json").write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    return dest


def _unit(a: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a, axis=1)


# --- loading and towers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_cards_load_untrained(models, family):
    m = models[family]
    assert m.card.family == family and not m.card.trained and "untrained" in m.card.title.lower()
    assert (m.device, m.image_size, m.embed_dim, m.logit_scale) == ("cpu", 32, 32, 100.0)
    assert not m.image_tower.training


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_text_unit_norm_and_deterministic(models, tiny_models, family):
    texts = ["a satellite photo of a forest", "water", ""]
    a = models[family].encode_text(texts)
    assert a.shape == (3, 32) and a.dtype == np.float32
    np.testing.assert_allclose(_unit(a), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, models[family].encode_text(texts))
    np.testing.assert_array_equal(a, load_model(tiny_models[family], device="cpu").encode_text(texts))
    assert models[family].encode_text([]).shape == (0, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tower_unit_norm(models, family):
    m = models[family]
    with torch.inference_mode():
        y = m.image_tower(torch.from_numpy(m.probe_batch(3))).numpy()
    assert y.shape == (3, 32)
    np.testing.assert_allclose(_unit(y), 1.0, atol=1e-5)


def test_reference_outputs_catch_drift(models):
    """Seeded tiny weights + fixed input -> stored numbers. Regenerate only for an intended architecture change."""
    expected = {
        "clip": ([0.052328, 0.104741, -0.136214, 0.161410, 0.110599, -0.282460],
                 [-0.030620, 0.135928, 0.088437, -0.040788, 0.128553, -0.332442]),
        "aligned-s2": ([0.090278, 0.288218, 0.032559, -0.280441, 0.003301, -0.256749],
                       [0.036253, 0.249324, -0.144899, 0.206434, 0.016585, -0.002179]),
    }
    for family, (image_ref, text_ref) in expected.items():
        m = models[family]
        with torch.inference_mode():
            image = m.image_tower(torch.from_numpy(m.probe_batch(1, seed=0))).numpy()[0, :6]
        text = m.encode_text(["a satellite photo of a forest"])[0, :6]
        np.testing.assert_allclose(image, image_ref, atol=1e-5, err_msg=f"{family} image tower drifted")
        np.testing.assert_allclose(text, text_ref, atol=1e-5, err_msg=f"{family} text tower drifted")


def test_untrained_full_size_cards(tmp_path):
    s2 = write_untrained("aligned-s2", tmp_path / "s2")
    assert s2.image_tower["arch"] == "timm:vit_small_patch16_224"
    assert s2.text_tower["arch"] == "open_clip:ViT-B-32-quickgelu"
    card = write_untrained("clip", tmp_path / "b32")
    assert card.embed_dim == 512 and not card.trained and "random weights" in card.title
    m = load_model(card, device="cpu")  # seeded random init, no files
    assert make_runner(m, "torch")(m.probe_batch(1)).shape == (1, 512)


# --- preprocessing -------------------------------------------------------------------------------------------

def test_preprocess_rgb_card_on_s2_equals_closed_form(models):
    m = models["clip"]
    assert m.required_bands(S2_L1C) == ("B04", "B03", "B02")
    raw = np.empty((2, 3, 20, 20), np.float32)
    raw[:, 0], raw[:, 1], raw[:, 2] = 1000.0, 500.0, 3000.0  # R, G, B DN
    mean, std = np.array(open_clip.OPENAI_DATASET_MEAN), np.array(open_clip.OPENAI_DATASET_STD)
    for info, divisor in ((S2_L2A, 2000.0), (S2_L1C, 3558.0)):
        u8 = np.floor(np.clip(np.array([1000.0, 500.0, 3000.0]) / divisor * 255, 0, 255))  # composite truncates
        want = (u8 / 255 - mean) / std
        got = m.preprocess(raw, info)
        assert got.shape == (2, 3, 32, 32) and got.dtype == np.float32
        np.testing.assert_allclose(got, np.broadcast_to(want[None, :, None, None], got.shape), atol=1e-5)


def test_preprocess_rgb_source_is_used_as_8_bit(models):
    raw = np.full((1, 3, 32, 32), 51.0, np.float32)
    want = (0.2 - np.array(open_clip.OPENAI_DATASET_MEAN)) / np.array(open_clip.OPENAI_DATASET_STD)
    np.testing.assert_allclose(models["clip"].preprocess(raw, RGB)[0, :, 0, 0], want, atol=1e-6)


def test_preprocess_s2_card_scales_and_clips(models, tiny_models, tmp_path):
    dn = np.linspace(-500, 12000, 13, dtype=np.float32)  # below 0 and above 10000 get clipped
    raw = np.broadcast_to(dn[None, :, None, None], (2, 13, 48, 48)).copy()
    got = models["aligned-s2"].preprocess(raw, S2_L1C)
    want = np.clip(dn / 10000.0, 0.0, 1.0)
    assert got.shape == (2, 13, 32, 32)
    np.testing.assert_allclose(got, np.broadcast_to(want[None, :, None, None], got.shape), atol=1e-6)
    mean, std = [0.1] * 13, [0.5] * 13
    normed = load_model(write_tiny("aligned-s2", tmp_path / "norm", input={"mean": mean, "std": std}), device="cpu")
    np.testing.assert_allclose(normed.preprocess(raw, S2_L1C)[0, :, 0, 0], (want - 0.1) / 0.5, atol=1e-6)


def test_required_bands_for_each_combination(models):
    clip, s2 = models["clip"], models["aligned-s2"]
    assert clip.required_bands(S2_L2A) == ("B04", "B03", "B02")
    assert clip.required_bands(RGB) == ("R", "G", "B")
    assert s2.required_bands(S2_L1C) == BANDS
    assert s2.required_bands(S2_L2A) == BANDS  # B10 is zero-filled by the reader
    with pytest.raises(ValueError, match="needs Sentinel-2 bands"):
        s2.required_bands(RGB)
    with pytest.raises(ValueError, match="lacks B01, B05"):
        s2.required_bands(SimpleNamespace(kind="s2", level="L2A", bands=("B02", "B03", "B04", "B08")))
    with pytest.raises(ValueError, match=r"\(N, 13, h, w\)"):
        s2.preprocess(np.zeros((1, 12, 8, 8), np.float32), S2_L1C)


# --- image size ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_image_size_override(tiny_models, family):
    m = load_model(tiny_models[family], device="cpu", image_size=64)
    raw = np.full((1, 3 if family == "clip" else 13, 20, 20), 800.0, np.float32)
    x = m.preprocess(raw, S2_L1C)
    assert m.image_size == 64 and x.shape[-2:] == (64, 64)
    y = make_runner(m, "torch")(x)
    assert y.shape == (1, 32)
    np.testing.assert_allclose(_unit(y), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        load_model(tiny_models[family], device="cpu", image_size=36)


# --- ONNX and runners ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_export_parity_dynamic_batch(models, family, tmp_path):
    m = models[family]
    path = export_onnx(m, tmp_path / f"{family}.onnx")
    assert check_onnx_parity(m, path) <= 1e-4
    onnx_runner, torch_runner = make_runner(m, "onnx"), make_runner(m, "torch")
    assert (onnx_runner.name, torch_runner.name) == ("onnxruntime-cpu-fp32", "torch-cpu-fp32")
    assert "CPUExecutionProvider" in onnx_runner.providers and torch_runner.providers == []
    for n in (1, 5):
        x = m.probe_batch(n, seed=n)
        np.testing.assert_allclose(onnx_runner(x), torch_runner(x), atol=1e-4)
    assert onnx_runner(m.probe_batch(0)).shape == (0, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_and_auto_runners(models, family):
    m = models[family]
    x = m.probe_batch(5, seed=7)
    ref = make_runner(m, "torch")(x)
    int8 = make_runner(m, "onnx-int8")
    assert int8.name == "onnxruntime-cpu-int8" and int8.providers == ["CPUExecutionProvider"]
    y = int8(x)
    np.testing.assert_allclose(_unit(y), 1.0, atol=1e-4)
    assert (y * ref).sum(1).min() > 0.9  # tiny random towers: a loose bound; full-size figures in docs/models.md
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        auto = make_runner(m)
        recorded = int8_cosine(onnx_file(m, int8=True))
        allowed = {"onnxruntime-cpu-int8"} if recorded >= AUTO_MIN_COSINE else set()
        if cpu_has_bf16() or openvino_module() is not None:  # measured; chosen only if it keeps the cosine
            allowed |= {"torch-cpu-bf16", "torch-cpu-fp32", "openvino-cpu-bf16", "openvino-cpu-fp32"}
        assert auto.name in (allowed or {"torch-cpu-fp32"})
        assert auto.device == "cpu"


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_onnx_runner_reports_the_provider_it_got(models, monkeypatch):
    """onnxruntime-gpu lists CUDA as available even where CUDA cannot load: the session decides the device."""
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a real CUDA provider is installed")
    listed = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: listed)
    runner = make_runner(models["clip"], "onnx", device="cuda")
    assert (runner.name, runner.device, runner.providers) == ("onnxruntime-cpu-fp32", "cpu", ["CPUExecutionProvider"])
    assert make_runner(models["clip"]).device == "cpu"  # auto tries CUDA, gets the CPU, falls back to the CPU choice


def test_runner_argument_errors(models):
    with pytest.raises(ValueError, match="onnx-int8"):
        make_runner(models["clip"], "tensorrt")
    with pytest.raises(ValueError, match="load the model with device='cuda'"):
        make_runner(models["clip"], "torch", device="cuda")


# --- cards, registry, weights --------------------------------------------------------------------------------

def test_list_models_finds_bundled_cards():
    ids = [c.id for c in list_models()]
    assert {"clip-vit-b32-openai", "clip-vit-b16-openai", "s2-vits16-ssl4eo-moco"} <= set(ids)
    assert DEFAULT_MODEL in ids and ids == sorted(ids)
    assert [c.id for c in list_models("clip-*")] == ["clip-vit-b16-openai", "clip-vit-b32-openai"]
    s2 = resolve_card("s2-vits16-ssl4eo-moco")
    assert not s2.trained and "UNTRAINED" in s2.title and s2.input.bands == BANDS
    assert resolve_card(DEFAULT_MODEL).image_tower["arch"].endswith("-quickgelu")  # OpenAI weights need QuickGELU


def test_resolve_card_errors_list_valid_ids(tmp_path):
    with pytest.raises(ValueError, match="clip-vit-b32-openai") as e:
        resolve_card("no-such-model")
    assert "s2-vits16-ssl4eo-moco" in str(e.value)
    with pytest.raises(ValueError, match="not a model directory"):
        resolve_card(tmp_path)


def test_unknown_family_and_arch_list_valid_ones(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="aligned-s2, clip"):
        write_tiny("resnet", tmp_path / "x")
    bad = _edit_card(tiny_models["clip"], tmp_path / "arch",
                     image_tower={"arch": "open_clip:ViT-Q-99", "open_clip_config": None})
    with pytest.raises(ValueError, match="unknown open_clip arch 'ViT-Q-99'.*ViT-B-32"):
        load_model(bad)
    bad = _edit_card(tiny_models["aligned-s2"], tmp_path / "timm", image_tower={"arch": "timm:vit_smal_patch16_224"})
    with pytest.raises(ValueError, match="close matches: vit_small_patch16_224"):
        load_model(bad)
    bad = _edit_card(tiny_models["clip"], tmp_path / "typo", image_tower={"weigths": "x.safetensors"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['weigths'\]"):
        load_model(bad)


def test_weights_outside_the_card_folder_are_rejected(tiny_models, tmp_path):
    bad = _edit_card(tiny_models["clip"], tmp_path / "escape", weights="../../etc/passwd")
    with pytest.raises(ValueError, match="escapes the model directory"):
        load_model(bad)
    pickle = _edit_card(tiny_models["clip"], tmp_path / "pickle", weights="model.pth")
    torch.save({}, pickle / "model.pth")
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        load_model(pickle)


def test_corrupt_or_missing_weights_are_clear_errors(tiny_models, tmp_path):
    card = _edit_card(tiny_models["clip"], tmp_path / "corrupt")
    (card / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_model(card)
    (card / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="not found .*no source to download it"):
        load_model(card)


def test_trained_card_must_name_weights(tiny_models, tmp_path):
    card = _edit_card(tiny_models["aligned-s2"], tmp_path / "trained", trained=True, image_tower={"weights": None})
    with pytest.raises(ValueError, match="marked trained"):
        load_model(card)


def test_clip_visual_overlay_must_cover_the_visual_tower_exactly(models, tiny_models, tmp_path):
    base = models["clip"]
    visual = {f"visual.{k}": v * 0.5 for k, v in base.image_tower.visual.state_dict().items()}
    write_weights(visual, tmp_path / "image_tower.safetensors")
    card = _edit_card(tiny_models["clip"], tmp_path / "patched", image_tower={"weights": "image_tower.safetensors"})
    shutil.copy(tmp_path / "image_tower.safetensors", card)
    patched = load_model(card, device="cpu")
    x = base.probe_batch(2)
    assert not np.allclose(make_runner(patched, "torch")(x), make_runner(base, "torch")(x))
    np.testing.assert_array_equal(patched.encode_text(["forest"]), base.encode_text(["forest"]))  # text untouched
    write_weights({**visual, "logit_scale": torch.ones(())}, card / "image_tower.safetensors")
    with pytest.raises(ValueError, match="unexpected keys logit_scale"):
        load_model(card)
    write_weights({k: v for k, v in visual.items() if k != "visual.proj"}, card / "image_tower.safetensors")
    with pytest.raises(ValueError, match="missing keys visual.proj"):
        load_model(card)


# --- SSL4EO checkpoints and fetch ----------------------------------------------------------------------------

def _tiny_vit_state_dict() -> dict[str, torch.Tensor]:
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, in_chans=13, num_classes=0, img_size=32,
                            **TINY_TIMM_KWARGS)
    return {k: v.clone() for k, v in vit.state_dict().items()}


def _fake_moco_checkpoint(path: Path, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """A raw MoCo-v3 file as zhu-xlab publishes it: DataParallel + base/momentum encoders, projector, predictor."""
    backbone = _tiny_vit_state_dict()
    sd = {f"module.base_encoder.{k}": v for k, v in backbone.items()}
    sd.update({f"module.momentum_encoder.{k}": v for k, v in backbone.items()})
    sd["module.base_encoder.head.0.weight"] = torch.randn(64, 32)  # MoCo-v3 projector
    sd["module.predictor.0.weight"] = torch.randn(8, 8)
    sd.update(extra or {})
    torch.save({"state_dict": sd, "epoch": 99, "arch": "vit_small"}, path)
    return backbone


def test_ssl4eo_checkpoint_filter_is_pure_and_strips_prefixes():
    t = torch.zeros(1)
    sd = {"module.base_encoder.cls_token": t, "module.base_encoder.head.2.weight": t,
          "module.momentum_encoder.cls_token": t, "module.predictor.0.bias": t, "backbone.pos_embed": t,
          "norm.weight": t, "head.weight": t}
    before = dict(sd)
    assert ssl4eo_checkpoint_filter(sd) == {"cls_token": t, "pos_embed": t, "norm.weight": t}
    assert sd == before


@pytest.fixture
def ssl4eo_bundle(tiny_models, tmp_path, monkeypatch):
    """A bundled tiny card whose backbone comes from a (fake) published MoCo checkpoint served on loopback."""
    resources = tmp_path / "resources"
    monkeypatch.setenv("TILEPROMPT_RESOURCES", str(resources))
    monkeypatch.setenv("TILEPROMPT_HOME", str(tmp_path / "home"))
    published = tmp_path / "published" / "moco.pth"
    published.parent.mkdir()
    with FileServer() as server:
        url = server.url("/moco-v3.pth")
        card = _edit_card(tiny_models["aligned-s2"], resources / "models" / "tiny-ssl4eo", id="tiny-ssl4eo",
                          image_tower={"weights": None, "backbone_weights": "ssl4eo.safetensors"},
                          sources={"ssl4eo.safetensors": {"url": url, "convert": "ssl4eo-moco"}})
        (card / "image_tower.safetensors").unlink()

        def publish(**kwargs):
            backbone = _fake_moco_checkpoint(published, **kwargs)
            server.add("/moco-v3.pth", published.read_bytes())
            return backbone

        yield SimpleNamespace(card=card, published=published, publish=publish, server=server, url=url,
                              user_dir=tmp_path / "home" / "models" / "tiny-ssl4eo")


def test_fetch_converts_a_published_moco_checkpoint(ssl4eo_bundle):
    b = ssl4eo_bundle
    backbone = b.publish()
    assert missing_weights(read_card(b.card)) == (["ssl4eo.safetensors"], [])
    card = fetch("tiny-ssl4eo")
    assert len(b.server.gets("/moco-v3.pth")) == 1
    assert card.path == b.user_dir.resolve()
    assert card.card_hash() == read_card(b.card).card_hash()  # the user copy is the same model
    assert resolve_card("tiny-ssl4eo").path == card.path  # ... and now shadows the bundled card
    m = load_model("tiny-ssl4eo", device="cpu")
    for k, v in backbone.items():
        torch.testing.assert_close(m.image_tower.backbone.state_dict()[k], v)
    assert fetch("tiny-ssl4eo").path == card.path and len(b.server.gets()) == 1  # nothing to do


def test_fetch_rejects_unexpected_keys_and_bad_checksums(ssl4eo_bundle):
    b = ssl4eo_bundle
    b.publish(extra={"module.base_encoder.dist_token": torch.zeros(1, 1, 32)})
    with pytest.raises(ValueError, match="unexpected keys dist_token"):
        fetch("tiny-ssl4eo")
    assert not b.user_dir.exists()  # a failed fetch leaves nothing that looks usable
    source = {"url": b.url, "convert": "ssl4eo-moco", "sha256": "deadbeef"}
    _edit_card(b.card, b.card, sources={"ssl4eo.safetensors": source})
    with pytest.raises(ValueError, match="checksum mismatch"):
        fetch("tiny-ssl4eo")
    assert not b.user_dir.exists() and not list((cache_dir() / "downloads").glob("*"))  # nothing half-written
    source["sha256"] = hashlib.sha256(b.published.read_bytes()).hexdigest()[:8]
    _edit_card(b.card, b.card, sources={"ssl4eo.safetensors": source})
    with pytest.raises(ValueError, match="dist_token"):  # checksum now fine, keys still wrong
        fetch("tiny-ssl4eo")


def test_open_clip_tag_download_prefers_safetensors_then_converts_pickles(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEPROMPT_CACHE", str(tmp_path / "cache"))
    state = {"logit_scale": torch.tensor(4.6), "module_free.weight": torch.ones(2)}
    torch.save({"state_dict": state}, tmp_path / "weights.bin")
    repo = "timm/vit_base_patch32_clip_224.openai"
    with FileServer() as server:
        server.add_hf(repo, "open_clip_pytorch_model.bin", (tmp_path / "weights.bin").read_bytes())  # no safetensors
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        path = download_tag("ViT-B-32-quickgelu", "openai")
        assert path == tag_weights_path("ViT-B-32", "openai")  # both configs share the OpenAI weights
        asked = [(r.method, r.path.rsplit("/", 1)[1]) for r in server.log]
        assert asked[0] == ("HEAD", "open_clip_model.safetensors") and asked[-1] == ("GET",
                                                                                      "open_clip_pytorch_model.bin")
        assert set(read_weights(path)) == set(state)
        n = len(server.log)
        assert download_tag("ViT-B-32", "openai") == path and len(server.log) == n  # cached


@pytest.mark.parametrize("family", ["clip", "aligned-s2"])
def test_trimmed_text_encoding_equals_open_clip(tiny_models, family):
    """Running the text tower over the longest sentence only must not change any embedding."""
    import torch

    from tileprompt_backend.models.loading import encode_text_trimmed

    model = load_model(str(tiny_models[family]), device="cpu")
    texts = ["a", "a photo of a flooded field.", "solar farm seen from above"]  # tiny towers read 16 tokens
    tokens = model._tokenizer(texts)
    with torch.inference_mode():
        full = model._text.encode_text(tokens)
        trimmed = encode_text_trimmed(model._text, tokens)
    assert (tokens != 0).sum(1).max() < tokens.shape[1]  # the test really trims something
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(model.encode_text(texts), torch.nn.functional.normalize(full, dim=-1).numpy(),
                               atol=1e-5)


def test_auto_on_cpu_records_a_measured_choice(tiny_models):
    """auto picks among the candidates that keep the cosine, by measured speed, and records why."""
    import json as _json

    model = load_model(str(tiny_models["aligned-s2"]), device="cpu")
    runner = make_runner(model, "auto")
    assert runner.name in {"onnxruntime-cpu-int8", "torch-cpu-bf16", "torch-cpu-fp32", "openvino-cpu-bf16",
                           "openvino-cpu-fp32"}
    records = list((cache_dir() / "onnx").glob(f"{model.card.card_hash()}-*-auto.json"))
    if (cpu_has_bf16() or openvino_module() is not None) and records:
        saved = _json.loads(records[0].read_text())
        assert saved["choice"] == runner.name
        assert saved["choice"] == max(saved["tiles_per_s"], key=saved["tiles_per_s"].get)
    assert make_runner(model, "auto").name == runner.name  # the recorded choice is reused


@pytest.mark.skipif(openvino_module() is None, reason="openvino is not installed")
@pytest.mark.parametrize("family", FAMILIES)
def test_openvino_runner_matches_eager(tiny_models, family):
    """OpenVINO over the same exported tower: bf16 where the CPU has it (cosine > 0.99 on tiny random towers;
    full-size figures in docs/models.md), fp32 elsewhere (equal to eager)."""
    model = load_model(str(tiny_models[family]), device="cpu")
    x = model.probe_batch(6, seed=4)
    ov, fp32 = make_runner(model, "openvino"), make_runner(model, "torch")
    assert ov.name == f"openvino-cpu-{openvino_precision()}" and ov.device == "cpu"
    y = ov(x)
    np.testing.assert_allclose(_unit(y), 1.0, atol=1e-5)
    assert (y * fp32(x)).sum(1).min() > (0.99 if ov.precision == "bf16" else 0.99999)
    assert ov(model.probe_batch(0)).shape == (0, model.embed_dim)


def test_torch_bf16_runner_stays_close_to_fp32(tiny_models):
    model = load_model(str(tiny_models["clip"]), device="cpu")
    x = model.probe_batch(4)
    bf16, fp32 = make_runner(model, "torch-bf16"), make_runner(model, "torch")
    assert (bf16.name, fp32.name) == ("torch-cpu-bf16", "torch-cpu-fp32")
    cos = (bf16(x) * fp32(x)).sum(1)
    assert cos.min() > 0.99


def test_health_questions_do_not_wait_for_a_runner_being_built(tiny_models, monkeypatch):
    """A first runner (ONNX export and int8 probe: seconds to minutes) must not block what /v1/health asks."""
    import threading
    import time

    from tileprompt_backend.models import cache as cache_module

    started, release = threading.Event(), threading.Event()

    def slow_make_runner(model, backend="auto", device=None):
        started.set()
        release.wait(10)
        return SimpleNamespace(providers=["CPUExecutionProvider"])

    monkeypatch.setattr(cache_module, "make_runner", slow_make_runner)
    models = cache_module.ModelCache()
    model = models.model(tiny_models["clip"], device="cpu")
    worker = threading.Thread(target=models.runner, args=(model,))
    worker.start()
    assert started.wait(10)
    t0 = time.perf_counter()
    assert models.loaded() == ["tiny-clip"] and models.providers() == []
    assert time.perf_counter() - t0 < 1.0  # answered while the runner is still being built
    release.set()
    worker.join(10)
    assert models.providers() == ["CPUExecutionProvider"]
def test_the_model_cache_reports_without_waiting_for_a_load(tiny_models):
    """/v1/health asks what is loaded while the worker may be loading a 1.7 GB model or exporting it to ONNX."""
    import threading

    from tileprompt_backend.models import ModelCache

    cache = ModelCache()
    model = cache.model(tiny_models["clip"], device="cpu")
    cache.runner(model, backend="torch")
    holding, release = threading.Event(), threading.Event()

    def slow_load():
        with cache._lock:  # what a load or an export holds for its whole duration
            holding.set()
            release.wait(10)

    worker = threading.Thread(target=slow_load)
    worker.start()
    try:
        assert holding.wait(5)
        answers = []
        reader = threading.Thread(target=lambda: answers.append((cache.loaded(), cache.providers())))
        reader.start()
        reader.join(2)
        assert answers == [(["tiny-clip"], [])]
    finally:
        release.set()
        worker.join()
