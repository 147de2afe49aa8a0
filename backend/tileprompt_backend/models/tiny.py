"""Untrained cards: tiny ones for tests (weights written as files, loaded by the real loaders) and full-size
ones with seeded random weights for benchmarks (no files: the loader's seeded init builds the same weights)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import open_clip

from ..sentinel2.bands import BANDS
from .aligned_s2 import DEFAULT_ARCH
from .card import ModelCard, card_from_dict, read_card, write_card
from .clip import OPEN_CLIP
from .registry import get_family
from .weights import SEEDS, write_weights

#: About 1.7 M parameters, 1.6 M of them the token embedding (the BPE vocabulary size is fixed).
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_TIMM_KWARGS = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}
DEFAULT_TEXT_ARCH = OPEN_CLIP + "ViT-B-32-quickgelu"
_S2_INPUT = {"modality": "s2", "level": "L1C", "bands": list(BANDS), "scale": {"divide": 10000.0, "clip": [0.0, 1.0]}}
_RGB_INPUT = {"modality": "rgb", "composite": {"L2A": 2000.0, "L1C": 3558.0}}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides replace top-level fields; dict fields (input, towers, provenance) are updated one level deep."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_tiny(family: str, out_dir: Path, **overrides: Any) -> ModelCard:
    """Write a tiny untrained card of ``family`` with seeded random weights as safetensors files; returns it."""
    get_family(family)  # an unknown family is a ValueError listing the valid ones
    out_dir = Path(out_dir)
    if family == "clip":
        data = {"input": {**_RGB_INPUT, "image_size": 32, "tile_px": 32},
                "image_tower": {"open_clip_config": TINY_OPEN_CLIP}, "text_tower": {}}
    else:
        data = {"input": {**_S2_INPUT, "image_size": 32, "tile_px": 32},
                "image_tower": {"arch": DEFAULT_ARCH, "in_chans": len(BANDS), "proj_dim": 32,
                                "timm_kwargs": TINY_TIMM_KWARGS},
                "text_tower": {"open_clip_config": TINY_OPEN_CLIP}}
    data.update(id=f"tiny-{family}", family=family, trained=False, embed_dim=32, logit_scale=100.0,
                title=f"Tiny untrained {family} model (random weights, for tests only)",
                provenance={"method": "seeded random init", "seeds": SEEDS})
    data = _merge(data, overrides)
    card = card_from_dict(data, out_dir)
    towers = get_family(family).build(card, card.input.image_size)
    if family == "clip":
        data["weights"] = "model.safetensors"
        write_weights(towers.text_model.state_dict(), out_dir / data["weights"])  # the whole CLIP
    else:
        data["image_tower"]["weights"] = "image_tower.safetensors"
        data["text_tower"]["weights"] = "text_tower.safetensors"
        write_weights(towers.image_tower.state_dict(), out_dir / "image_tower.safetensors")
        write_weights(towers.text_model.state_dict(), out_dir / "text_tower.safetensors")
    write_card(card_from_dict(data, out_dir), out_dir)
    return read_card(out_dir)


def write_untrained(family: str, out_dir: Path, arch: str | None = None, image_size: int = 224,
                    **overrides: Any) -> ModelCard:
    """Write a full-size card with seeded random weights (benchmarks, export tests); ``arch`` is the image tower's.

    clip: ``open_clip:ViT-B-32-quickgelu`` by default; aligned-s2: ``timm:vit_small_patch16_224`` with a
    ``ViT-B-32-quickgelu`` text tower (override ``text_tower`` for another).
    """
    get_family(family)  # an unknown family is a ValueError listing the valid ones
    if family == "clip":
        arch = arch or DEFAULT_TEXT_ARCH
        text_arch = arch
        data = {"input": {**_RGB_INPUT, "image_size": image_size, "tile_px": 64},
                "image_tower": {"arch": arch}, "text_tower": {"arch": arch}}
    else:
        arch = arch or DEFAULT_ARCH
        text_arch = overrides.get("text_tower", {}).get("arch", DEFAULT_TEXT_ARCH)
        data = {"input": {**_S2_INPUT, "image_size": image_size, "tile_px": 120},
                "image_tower": {"arch": arch, "in_chans": len(BANDS)}, "text_tower": {"arch": text_arch}}
    config = open_clip.get_model_config(text_arch[len(OPEN_CLIP):]) if text_arch.startswith(OPEN_CLIP) else None
    if config is None:
        raise ValueError(f"unknown open_clip arch {text_arch!r} (valid: {', '.join(open_clip.list_models())})")
    slug = re.sub(r"[^a-z0-9]+", "-", arch.split(":", 1)[-1].lower()).strip("-")
    data.update(id=f"untrained-{family}-{slug}", family=family, trained=False, embed_dim=int(config["embed_dim"]),
                title=f"Untrained {arch.split(':', 1)[-1]} ({family}; random weights, for benchmarks only)",
                provenance={"method": "seeded random init", "seeds": SEEDS})
    write_card(card_from_dict(_merge(data, overrides), Path(out_dir)), out_dir)
    return read_card(out_dir)
