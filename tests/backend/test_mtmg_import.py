"""`tileprompt models import mtmg-patched|mtmg-aligned FILE`: the authors' checkpoint layouts (method notes
§2.7-2.8), built here file for file: ``{"model", "optimizer", "scaler"}`` dicts with ``_orig_mod.``,
``image_encoder.model.`` and ``student_model.`` prefixes, read with ``weights_only=True`` and checked key by key.

The files are built at tiny size through an open_clip config registered for the test (and a stand-in for the
``openai`` tag's weights in the cache); the arch recognition and key rules are also checked on the real
ViT-B/16 and ViT-S/16 shapes, on the meta device."""

from __future__ import annotations

import datetime
import json

import open_clip
import pytest
import timm
import torch

from tileprompt_backend.cli import main as cli_main
from tileprompt_backend.models import list_models, load_model, resolve_card
from tileprompt_backend.models import mtmg
from tileprompt_backend.models.clip import create_open_clip
from tileprompt_backend.models.downloads import tag_weights_path
from tileprompt_backend.models.identity import space_of
from tileprompt_backend.models.tiny import TINY_OPEN_CLIP, TINY_TIMM_KWARGS
from tileprompt_backend.models.weights import read_weights, write_weights

TINY = "tiny-mtmg-quickgelu"
#: torch.cuda.amp.GradScaler().state_dict() of a CUDA run, as the reference saves it.
SCALER = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0}


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: see conftest


@pytest.fixture
def tiny_openai(tmp_path, monkeypatch):
    """A tiny open_clip config with an 'openai' tag whose weights are already in the cache; a fresh models folder."""
    monkeypatch.setenv("TILEPROMPT_HOME", str(tmp_path / "home"))
    cfg_file = tmp_path / f"{TINY}.json"
    cfg_file.write_text(json.dumps(dict(TINY_OPEN_CLIP, quick_gelu=True)))
    open_clip.add_model_config(cfg_file)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, {"openai": {
        "hf_hub": "test/tiny-mtmg-openai/", "quick_gelu": True, "mean": open_clip.OPENAI_DATASET_MEAN,
        "std": open_clip.OPENAI_DATASET_STD}})
    monkeypatch.setattr(mtmg, "PATCHED_ARCHS", {TINY: "mtmg-patched-tiny", **mtmg.PATCHED_ARCHS})
    torch.manual_seed(0)
    base = create_open_clip(open_clip.get_model_config(TINY), quick_gelu=True)
    write_weights(base.state_dict(), tag_weights_path(TINY, "openai"))
    return base


def _optimizer_state(params) -> dict:
    opt = torch.optim.AdamW(params, lr=1e-5)
    sum(p.sum() for p in params).backward()
    opt.step()
    return opt.state_dict()


def patched_file(path, base, shift: float = 0.01):
    """Exactly the PatchingAgent's checkpoint: the compiled ImageClassifier, text transformer deleted."""
    sd = {}
    for k, v in base.state_dict().items():
        if k.startswith("transformer."):
            continue  # the reference deletes CLIP's text transformer from the image encoder
        sd[f"_orig_mod.image_encoder.model.{k}"] = v + shift if k.startswith("visual.") else v
    sd["_orig_mod.classification_head.weight"] = torch.randn(19, 32)
    sd["_orig_mod.classification_head.bias"] = torch.zeros(19)
    params = [torch.nn.Parameter(torch.randn(3))]
    torch.save({"model": sd, "optimizer": _optimizer_state(params), "scaler": SCALER},
               path)
    return {k[len("_orig_mod.image_encoder.model."):]: v for k, v in sd.items() if ".visual." in k}


def aligned_file(path, student, dim: int = 32):
    """The AlignmentAgent's checkpoint: compiled KDClassifier, 'student_model.' kept, teacher removed."""
    head = torch.nn.Linear(student.num_features, dim)
    sd = {f"_orig_mod.student_model.visual.trunk.{k}": v for k, v in student.state_dict().items()}
    sd.update({"_orig_mod.student_model.visual.head.weight": head.weight.detach(),
               "_orig_mod.student_model.visual.head.bias": head.bias.detach(),
               "_orig_mod.student_model.token_embedding.weight": torch.zeros(10, 8),  # its unused text tower
               "_orig_mod.student_model.transformer.resblocks.0.ln_1.weight": torch.ones(8),
               "_orig_mod.student_model.logit_scale": torch.tensor(4.6),
               "_orig_mod.classification_head.weight": torch.randn(19, dim)})
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "scaler": SCALER}, path)
    return head


def test_import_patched_then_aligned(tiny_openai, tmp_path, monkeypatch, capsys):
    expected = patched_file(tmp_path / "patched_ViT-B-32.pt", tiny_openai)
    assert cli_main(["models", "import", "mtmg-patched", str(tmp_path / "patched_ViT-B-32.pt")]) == 0
    card = resolve_card("mtmg-patched-tiny")
    assert card.family == "clip" and card.pretrained == "openai" and card.trained
    assert card.space == space_of(card) and card.space.startswith("mtmg-patched-tiny@")
    assert "no LICENSE" in card.provenance["license"]
    overlay = read_weights(card.file("image_tower.safetensors"))
    assert set(overlay) == set(expected)
    for k, v in expected.items():
        assert torch.equal(overlay[k], v)
    model = load_model(card, device="cpu")
    assert torch.equal(model.image_tower.visual.conv1.weight, expected["visual.conv1.weight"])

    # the aligned student: its card lives in the patched card's space and shares its text tower
    monkeypatch.setattr(mtmg, "STUDENT_TIMM_KWARGS", dict(TINY_TIMM_KWARGS))
    monkeypatch.setattr(mtmg, "STUDENT_IMAGE_SIZE", 32)
    student = timm.create_model("vit_small_patch16_224", pretrained=False, in_chans=13, num_classes=0, img_size=32,
                                **TINY_TIMM_KWARGS)
    head = aligned_file(tmp_path / "aligned.pt", student)
    assert cli_main(["models", "import", "mtmg-aligned", str(tmp_path / "aligned.pt")]) == 0
    aligned = resolve_card(mtmg.ALIGNED_ID)
    assert aligned.family == "aligned-s2" and aligned.space == card.space
    assert aligned.text_tower == {"arch": f"open_clip:{TINY}", "pretrained": "openai"}
    s2 = load_model(aligned, device="cpu")
    assert torch.equal(s2.image_tower.proj.weight, head.weight.detach())
    assert torch.equal(s2.image_tower.backbone.cls_token, student.cls_token.detach())
    texts = ["a satellite photo of a forest"]
    assert (s2.encode_text(texts) == model.encode_text(texts)).all()
    assert cli_main(["models", "import", "mtmg-aligned", str(tmp_path / "aligned.pt")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["models", "import", "mtmg-aligned", str(tmp_path / "aligned.pt"), "--replace"]) == 0


def test_refused_files_leave_nothing(tiny_openai, tmp_path, capsys):
    good = patched_file(tmp_path / "good.pt", tiny_openai)
    cases = {
        "extra key": lambda sd: sd.update({"_orig_mod.image_encoder.model.adapter.weight": torch.zeros(2)}),
        "missing key": lambda sd: sd.pop("_orig_mod.image_encoder.model.visual.proj"),
        "wrong shape": lambda sd: sd.update({"_orig_mod.image_encoder.model.visual.proj": torch.zeros(3, 3)}),
    }
    messages = {"extra key": "does not explain: adapter.weight", "missing key": "missing keys visual.proj",
                "wrong shape": "wrong shapes visual.proj"}
    assert good
    for name, edit in cases.items():
        ckpt = torch.load(tmp_path / "good.pt", weights_only=True)
        edit(ckpt["model"])
        torch.save(ckpt, tmp_path / f"{name}.pt")
        assert cli_main(["models", "import", "mtmg-patched", str(tmp_path / f"{name}.pt")]) == 2
        assert messages[name] in capsys.readouterr().err
    torch.save({"model": {"x": torch.zeros(1)}, "when": datetime.datetime(2024, 1, 1)}, tmp_path / "pickle.pt")
    assert cli_main(["models", "import", "mtmg-patched", str(tmp_path / "pickle.pt")]) == 2
    assert "weights_only" in capsys.readouterr().err
    assert cli_main(["models", "import", "mtmg-aligned", str(tmp_path / "good.pt")]) == 2
    assert "no visual.head projection" in capsys.readouterr().err
    assert not list_models("mtmg-*")


def test_real_arch_shapes_on_the_meta_device():
    with torch.device("meta"):
        b16 = create_open_clip(open_clip.get_model_config("ViT-B-16-quickgelu"), quick_gelu=True)
        vits = timm.create_model("vit_small_patch16_224", pretrained=False, in_chans=13, num_classes=0)
    sd = {k: v for k, v in b16.state_dict().items() if not k.startswith("transformer.")}
    assert mtmg.detect_patched_arch(sd) == "ViT-B-16-quickgelu"
    assert set(mtmg.patched_visual(sd, "ViT-B-16-quickgelu")) == {k for k in sd if k.startswith("visual.")}
    aligned = {f"visual.trunk.{k}": v for k, v in vits.state_dict().items()}
    aligned.update({"visual.head.weight": torch.empty(512, 384, device="meta"),
                    "visual.head.bias": torch.empty(512, device="meta")})
    tower = mtmg.aligned_tower(aligned)
    assert tower["proj.weight"].shape == (512, 384) and tower["backbone.patch_embed.proj.weight"].shape[1] == 13
