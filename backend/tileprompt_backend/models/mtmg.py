"""Importers of the checkpoints the Mind the Modality Gap authors published (MEGA folders "Patched" and "Aligned").

Both are ``torch.save({"model": state_dict, "optimizer": ..., "scaler": ...})`` files (method notes §2.7-2.8),
read with ``torch.load(weights_only=True)``:

- **patched** (``mtmg-patched``): a CLIP image encoder after PAINT. Keys are open_clip's (``visual.*`` plus the
  token embedding, positional embedding, ``ln_final``, ``text_projection``, ``logit_scale``; the text transformer
  was deleted), possibly under ``image_encoder.model.`` and torch.compile's ``_orig_mod.``. The arch (OpenAI
  ViT-B/32, B/16, L/14, L/14-336, QuickGELU) is recognised from the patch embedding and position embedding. The
  card is the OpenAI CLIP of that arch (``pretrained: openai``, text tower unchanged) with the patched visual
  tower as its overlay, in a new embedding space.
- **aligned** (``mtmg-aligned``): the SSL4EO ViT-S/16 student under ``student_model.`` (and ``_orig_mod.``):
  ``visual.trunk.*`` (timm keys) and ``visual.head`` (Linear(384 -> D)), plus leftovers that are not the
  student's (its unused text tower, the frozen classification head, ``logit_scale``). The card is an
  ``aligned-s2`` card in the space of its teacher: the imported patched card of the same embedding width (the
  ViT-B/32 one when several are installed), whose text tower it shares.

Every key is accounted for: a key the layout does not explain, or a missing or misshapen tower key, is an error
listing them. No licence file accompanies the release; the cards say so.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import open_clip
import torch

from ..sentinel2.bands import BANDS
from .card import ModelCard, card_from_dict, read_card, write_card
from .checkpoints import read_torch_checkpoint, unwrap_state_dict
from .clip import OPEN_CLIP, create_open_clip
from .downloads import ensure_weights
from .identity import space_of, weights_hash
from .importers import register_importer
from .registry import list_models
from .weights import check_keys, write_weights

#: (open_clip config, card id) of the CLIPs the authors patched (OpenAI weights: QuickGELU configs).
PATCHED_ARCHS = {
    "ViT-B-32-quickgelu": "mtmg-patched-vit-b32",
    "ViT-B-16-quickgelu": "mtmg-patched-vit-b16",
    "ViT-L-14-quickgelu": "mtmg-patched-vit-l14",
    "ViT-L-14-336-quickgelu": "mtmg-patched-vit-l14-336",
}
ALIGNED_ID = "mtmg-aligned-vits16"
#: The authors' student: timm ViT-S/16 at 224 px (its drop-path does not matter at inference).
STUDENT_ARCH = "timm:vit_small_patch16_224"
STUDENT_TIMM_KWARGS: dict = {}
STUDENT_IMAGE_SIZE = 224
_PREFIXES = ("_orig_mod.", "module.", "student_model.", "image_encoder.model.", "image_encoder.")
#: Keys of the patched file outside the visual tower: what is left of CLIP's text side, and PAINT's frozen head.
_PATCHED_EXTRA = ("token_embedding.", "positional_embedding", "ln_final.", "text_projection", "logit_scale",
                  "attn_mask", "classification_head.")
#: Keys of the aligned file that are not the student's tower.
_ALIGNED_EXTRA = _PATCHED_EXTRA + ("transformer.", "classification_head.", "head.", "text.", "visual.trunk.head.",
                                   "visual.trunk.fc_norm.")
_SOURCE = {"paper": "Zavras et al., Mind the Modality Gap (arXiv:2402.09816; ISPRS J. 2025)",
           "code": "github.com/Orion-AI-Lab/MindTheModalityGap",
           "license": "none published with the checkpoints (no LICENSE file in the release): check with the authors"}


def read_mtmg_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an MTMG checkpoint, ``{"model": ...}`` unwrapped and wrapper prefixes stripped."""
    try:
        checkpoint = read_torch_checkpoint(path)
    except Exception as e:  # torch.load raises many types for a foreign or damaged file
        raise ValueError(f"{path}: not a checkpoint torch.load(weights_only=True) can read ({e})") from None
    sd = unwrap_state_dict(checkpoint)
    out = {}
    for key, value in sd.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if key in out:
            raise ValueError(f"{path}: key {key!r} appears twice once prefixes are stripped")
        out[key] = value
    return out


def _visual_shapes(arch: str) -> dict[str, torch.Tensor]:
    """The visual tower's state dict of an open_clip arch, on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        model = create_open_clip(open_clip.get_model_config(arch), quick_gelu=True)
    return {k: v for k, v in model.state_dict().items() if k.startswith("visual.")}


def detect_patched_arch(sd: Mapping[str, torch.Tensor]) -> str:
    """The open_clip config whose patch and position embeddings match the checkpoint's."""
    conv, pos = sd.get("visual.conv1.weight"), sd.get("visual.positional_embedding")
    if conv is None or pos is None:
        raise ValueError("not a patched CLIP checkpoint: no visual.conv1.weight / visual.positional_embedding "
                         f"(keys start: {', '.join(sorted(sd)[:6])})")
    for arch in PATCHED_ARCHS:
        ref = _visual_shapes(arch)
        if ref["visual.conv1.weight"].shape == conv.shape and ref["visual.positional_embedding"].shape == pos.shape:
            return arch
    raise ValueError(f"patch embedding {tuple(conv.shape)} / position embedding {tuple(pos.shape)} match none of "
                     f"{', '.join(PATCHED_ARCHS)}")


def _unexplained(keys, allowed_prefixes: tuple[str, ...]) -> list[str]:
    return sorted(k for k in keys if not k.startswith(allowed_prefixes))


def patched_visual(sd: Mapping[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """The ``visual.*`` overlay: every key of the arch's visual tower, shapes checked; other keys explained."""
    ref = _visual_shapes(arch)
    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    check_keys(f"patched checkpoint ({arch})", ref, visual)
    other = _unexplained((k for k in sd if not k.startswith("visual.")), _PATCHED_EXTRA)
    if other:
        raise ValueError(f"patched checkpoint: keys the MTMG layout does not explain: {', '.join(other[:12])}")
    return {k: v.float() for k, v in visual.items()}


@register_importer("mtmg-patched", "Mind the Modality Gap: a PAINT-patched OpenAI CLIP image encoder "
                                   "(the authors' 'Patched' .pt files)")
def import_mtmg_patched(file: Path, folder: Path) -> ModelCard:
    sd = read_mtmg_checkpoint(file)
    arch = detect_patched_arch(sd)
    overlay = patched_visual(sd, arch)
    card_id = PATCHED_ARCHS[arch]
    config = open_clip.get_model_config(arch)
    name = arch.replace("-quickgelu", "").replace("-", "/", 1).replace("-", "/", 1)
    data = {
        "id": card_id, "family": "clip", "trained": True,
        "title": f"CLIP {name} patched on BigEarthNet-19 RGB composites (Mind the Modality Gap, authors' weights)",
        "input": {"modality": "rgb", "level": "any", "composite": {"L2A": 2000.0, "L1C": 3558.0},
                  "image_size": int(config["vision_cfg"]["image_size"]), "tile_px": 120, "gsd_m": 10.0},
        "image_tower": {"arch": OPEN_CLIP + arch, "weights": "image_tower.safetensors"},
        "text_tower": {"arch": OPEN_CLIP + arch, "context_length": 77},
        "embed_dim": int(config["embed_dim"]), "logit_scale": 100.0, "pretrained": "openai",
        "templates": "templates/satellite.txt",
        "provenance": {"method": "PAINT patching (Mind the Modality Gap, stage 1), imported", **_SOURCE,
                       "imported_from": Path(file).name, "text_tower": "OpenAI CLIP's, unchanged (frozen in PAINT)"},
    }
    write_weights(overlay, folder / "image_tower.safetensors")
    card = ensure_weights(card_from_dict(data, folder))  # the openai tag: needed for the base and the space
    data["space"] = f"{card_id}@{weights_hash(card)}"
    write_card(card_from_dict(data, folder), folder)
    return read_card(folder)


def aligned_tower(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``visual.trunk.*`` -> ``backbone.*`` and ``visual.head`` -> ``proj``; every other key explained."""
    out = {}
    for key, value in sd.items():
        if key.startswith("visual.trunk.") and not key.startswith(("visual.trunk.head.", "visual.trunk.fc_norm.")):
            out["backbone." + key[len("visual.trunk."):]] = value.float()
        elif key in ("visual.head.weight", "visual.head.bias", "visual.head.proj.weight", "visual.head.proj.bias"):
            out["proj." + key.rsplit(".", 1)[1]] = value.float()
    if "proj.weight" not in out:
        raise ValueError("not an MTMG aligned checkpoint: no visual.head projection "
                         f"(keys start: {', '.join(sorted(sd)[:6])})")
    other = _unexplained((k for k in sd if not k.startswith(("visual.trunk.", "visual.head."))), _ALIGNED_EXTRA)
    if other:
        raise ValueError(f"aligned checkpoint: keys the MTMG layout does not explain: {', '.join(other[:12])}")
    return out


def aligned_teacher(dim: int, teacher: str | None = None) -> ModelCard:
    """The imported patched card an aligned student of width ``dim`` belongs to."""
    if teacher is not None:
        from .registry import resolve_card

        card = resolve_card(teacher)
        if card.embed_dim != dim:
            raise ValueError(f"teacher {card.id!r} embeds into {card.embed_dim} dimensions; the student projects "
                             f"into {dim}")
        return card
    found = [c for c in list_models("mtmg-patched-*") if c.embed_dim == dim]
    if not found:
        raise ValueError(f"the aligned student projects into {dim} dimensions; import its teacher first "
                         "(`tileprompt models import mtmg-patched FILE`, the authors' 'Patched' checkpoint): the "
                         "student lives in the patched CLIP's embedding space and uses its text tower")
    preferred = [c for c in found if c.id == PATCHED_ARCHS["ViT-B-32-quickgelu"]]
    return (preferred or found)[0]


def import_aligned(file: Path, folder: Path, teacher: str | None = None) -> ModelCard:
    tower = aligned_tower(read_mtmg_checkpoint(file))
    dim = int(tower["proj.weight"].shape[0])
    in_chans = int(tower["backbone.patch_embed.proj.weight"].shape[1]) if "backbone.patch_embed.proj.weight" in tower \
        else 0
    if in_chans != 13:
        raise ValueError(f"the aligned student takes {in_chans} input bands; the MTMG student takes 13 (L1C order)")
    t = aligned_teacher(dim, teacher)
    if not t.pretrained:
        raise ValueError(f"teacher {t.id!r} has no open_clip tag to share its text tower from")
    data = {
        "id": ALIGNED_ID, "family": "aligned-s2", "trained": True,
        "title": f"Sentinel-2 ViT-S/16 aligned to {t.id} (Mind the Modality Gap, authors' weights)",
        "input": {"modality": "s2", "level": "any", "bands": list(BANDS), "scale": {"divide": 10000.0,
                  "clip": [0.0, 1.0]}, "image_size": STUDENT_IMAGE_SIZE, "tile_px": 120, "gsd_m": 10.0},
        "image_tower": {"arch": STUDENT_ARCH, "in_chans": 13, "proj_dim": dim, "timm_kwargs": dict(STUDENT_TIMM_KWARGS),
                        "weights": "image_tower.safetensors"},
        "text_tower": {"arch": t.image_tower["arch"], "pretrained": t.pretrained},
        "embed_dim": dim, "logit_scale": t.logit_scale, "templates": t.templates, "space": space_of(t),
        "provenance": {"method": "cross-modal alignment (Mind the Modality Gap, stage 2), imported", **_SOURCE,
                       "imported_from": Path(file).name, "teacher": {"id": t.id, "space": space_of(t)}},
    }
    write_weights(tower, folder / "image_tower.safetensors")
    write_card(card_from_dict(data, folder), folder)
    return read_card(folder)


@register_importer("mtmg-aligned", "Mind the Modality Gap: the 13-band SSL4EO ViT-S/16 student aligned to the "
                                   "patched CLIP (the authors' 'Aligned' .pt files; import mtmg-patched first)")
def import_mtmg_aligned(file: Path, folder: Path) -> ModelCard:
    return import_aligned(file, folder)
