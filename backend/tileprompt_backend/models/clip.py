"""The ``clip`` family (one open_clip model for both towers) and the open_clip helpers the aligned family shares.

Card fields:
- ``image_tower``: ``{"arch": "open_clip:ViT-B-32-quickgelu"}`` (a model in open_clip's registry) or
  ``{"open_clip_config": {"embed_dim", "vision_cfg", "text_cfg"}}`` (tiny test models); optional
  ``"weights": "image_tower.safetensors"``: a patched visual tower (``visual.*`` keys covering it exactly)
  laid over the base weights.
- base weights: ``"pretrained": "<open_clip tag>"`` (downloaded into the cache on first use) or
  ``"weights": "model.safetensors"`` (a full open_clip state dict in the card's folder).
- ``text_tower``: ``{}`` or ``{"arch": <the same arch>, "context_length": 77}``, descriptive only.
- multispectral: with ``input.modality`` ``"s2"`` the ViT's patch embedding takes the card's ``input.bands``
  (``visual.conv1`` becomes ``Conv2d(len(bands), width, patch, patch, bias=False)``, as Llama3-MS-CLIP's);
  ``image_tower.in_chans``, when given, must equal the number of bands. The card's ``input.scale``,
  ``mean``/``std`` (per band) and ``interpolation`` say how DN become the tower's input.
- ``adapters`` (optional): HarMA or RDB retrieval adapters attached to both towers after the base weights load
  (``models/adapters``), their weights in a file of the card's folder.
"""

from __future__ import annotations

import copy
from pathlib import Path

import open_clip
import torch
from torch import nn

from ..paths import cache_dir
from .card import ModelCard
from .downloads import tag_cfg, tag_weights_path
from .registry import Family, Towers, register_family
from .towers import ClipImageTower, set_open_clip_image_size
from .weights import SEEDS, card_weights, check_keys, load_strict, read_weights, seeded

OPEN_CLIP = "open_clip:"
_IMAGE_KEYS = {"arch", "open_clip_config", "weights", "in_chans"}
_TEXT_KEYS = {"arch", "context_length"}


def check_fields(spec: dict, allowed: set[str], where: str) -> None:
    """A typo in a tower field (``"weigths"``) must not silently load random weights."""
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} (valid: {', '.join(sorted(allowed))})")


def open_clip_spec(spec: dict, where: str) -> tuple[str | None, dict]:
    """(open_clip model name or None, config) from ``{"arch": "open_clip:NAME"}`` or ``{"open_clip_config": ...}``."""
    arch, config = spec.get("arch"), spec.get("open_clip_config")
    if (arch is None) == (config is None):
        raise ValueError(f"{where}: give exactly one of 'arch' (\"open_clip:NAME\") or 'open_clip_config'")
    if arch is not None:
        if not str(arch).startswith(OPEN_CLIP):
            raise ValueError(f"{where}: arch {arch!r} must start with {OPEN_CLIP!r}")
        name = arch[len(OPEN_CLIP):]
        config = open_clip.get_model_config(name) if "/" not in name and ":" not in name else None
        if config is None:
            raise ValueError(f"{where}: unknown open_clip arch {name!r} (valid: {', '.join(open_clip.list_models())})")
        return name, config
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(config)
    if missing:
        raise ValueError(f"{where}: open_clip_config lacks {sorted(missing)}")
    if {"hf_model_name", "hf_tokenizer_name"} & set(config["text_cfg"]):
        raise ValueError(f"{where}: an open_clip_config supports open_clip's own text transformer only")
    return None, copy.deepcopy(config)


def create_open_clip(config: dict, quick_gelu: bool) -> torch.nn.Module:
    """An open_clip CLIP from a model config, random weights (callers seed and load)."""
    config = copy.deepcopy(config)
    if "multimodal_cfg" in config:
        raise ValueError("open_clip CoCa models are not supported")
    # The activation must follow the weights, not the config name: OpenAI's weights need QuickGELU, and
    # open_clip >= 2.29 builds plain GELU for "ViT-B-32" (method notes 5b).
    config["quick_gelu"] = bool(config.get("quick_gelu", False)) or quick_gelu
    text_cfg, vision_cfg = config["text_cfg"], config["vision_cfg"]
    custom_text = config.pop("custom_text", False) or "hf_model_name" in text_cfg
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False  # weights come from the card's files, not the hub
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(**config).eval()


def open_clip_tokenizer(name: str | None, config: dict):
    """open_clip's tokenizer for a named model; the bundled BPE tokenizer (offline) for a config dict."""
    if name is not None:
        return open_clip.get_tokenizer(name, cache_dir=str(cache_dir() / "open_clip"))
    return open_clip.SimpleTokenizer(context_length=config["text_cfg"].get("context_length", 77))


def open_clip_weights(card: ModelCard, name: str | None, tag: str | None, weights: str | None,
                      what: str) -> Path | None:
    """The file with an open_clip model's weights: a downloaded tag or a file in the card's folder (or None)."""
    if tag and weights:
        raise ValueError(f"model {card.id!r}: {what} names both a pretrained tag and a weights file")
    if tag:
        if name is None:
            raise ValueError(f"model {card.id!r}: pretrained tag {tag!r} needs a named open_clip arch")
        path = tag_weights_path(name, tag)
        if not path.is_file():
            raise ValueError(f"model {card.id!r}: open_clip weights {name}/{tag} are not downloaded "
                             f"(run `tileprompt models fetch {card.id}`)")
        return path
    if weights:
        return card_weights(card, weights)
    if card.trained:
        raise ValueError(f"model {card.id!r} is marked trained but names no weights for its {what}")
    return None


def load_adapters(model: torch.nn.Module, card: ModelCard, where: str) -> Path:
    """Attach the card's adapters to ``model`` and load their weights (exactly the adapter keys); returns the file."""
    from .adapters import adapter_state_dict, attach_adapters

    spec = card.adapters
    with seeded(SEEDS["model"]):
        attach_adapters(model, spec["method"], spec.get("config"), f"{where} adapters")
    path = card_weights(card, spec["weights"])
    sd = read_weights(path)
    check_keys(f"{where}: adapter weights {spec['weights']}", adapter_state_dict(model), sd)
    model.load_state_dict(sd, strict=False)
    return path


def check_embed_dim(card: ModelCard, config: dict, what: str) -> None:
    if int(config["embed_dim"]) != card.embed_dim:
        raise ValueError(f"model {card.id!r}: {what} embeds into {config['embed_dim']} dimensions, "
                         f"the card says embed_dim {card.embed_dim}")


@register_family("clip")
class Clip(Family):
    def weight_files(self, card: ModelCard) -> list[str]:
        adapters = card.adapters["weights"] if card.adapters else None
        return [f for f in (card.weights, card.image_tower.get("weights"), adapters) if f]

    def pretrained_tags(self, card: ModelCard) -> list[tuple[str, str]]:
        if not card.pretrained:
            return []
        name, _ = open_clip_spec(card.image_tower, f"model {card.id!r} image_tower")
        return [(name, card.pretrained)] if name else []

    def build(self, card: ModelCard, image_size: int) -> Towers:
        where = f"model {card.id!r}"
        check_fields(card.image_tower, _IMAGE_KEYS, f"{where} image_tower")
        check_fields(card.text_tower, _TEXT_KEYS, f"{where} text_tower")
        in_chans = _input_channels(card, where)
        name, config = open_clip_spec(card.image_tower, f"{where} image_tower")
        if card.text_tower.get("arch", card.image_tower.get("arch")) != card.image_tower.get("arch"):
            raise ValueError(f"{where}: a clip model has one arch for both towers")
        check_embed_dim(card, config, "the open_clip model")
        tag = tag_cfg(name, card.pretrained) if card.pretrained and name else {}

        with seeded(SEEDS["model"]):
            model = create_open_clip(config, quick_gelu=tag.get("quick_gelu", False))
            if in_chans != 3:
                set_patch_embed_channels(model.visual, in_chans, where)
        files = []
        base = open_clip_weights(card, name, card.pretrained, card.weights, "open_clip model")
        if base is not None:
            load_strict(model, read_weights(base), f"{where}: weights {base.name}")
            files.append(base)
        overlay = card.image_tower.get("weights")
        if overlay:
            path = card_weights(card, overlay)
            sd = read_weights(path)
            visual = {k: v for k, v in model.state_dict().items() if k.startswith("visual.")}
            check_keys(f"{where}: visual tower overlay {overlay}", visual, sd)  # only visual.*, all of them
            model.load_state_dict(sd, strict=False)
            files.append(path)
        if card.adapters:
            files.append(load_adapters(model, card, where))
        set_open_clip_image_size(model.visual, image_size, where)

        if card.input.modality == "rgb":
            mean = card.input.mean or tuple(tag.get("mean", open_clip.OPENAI_DATASET_MEAN))
            std = card.input.std or tuple(tag.get("std", open_clip.OPENAI_DATASET_STD))
        else:  # per-band statistics come from the card only (open_clip's are RGB)
            mean, std = card.input.mean, card.input.std
        return Towers(ClipImageTower(model.visual).eval(), model, open_clip_tokenizer(name, config),
                      mean, std, tuple(files))


def _input_channels(card: ModelCard, where: str) -> int:
    """3 for an RGB card; the number of bands for a multispectral one (checked against ``image_tower.in_chans``)."""
    if card.input.modality == "rgb":
        if card.image_tower.get("in_chans", 3) != 3:
            raise ValueError(f"{where}: an RGB card's image tower takes 3 channels, not {card.image_tower['in_chans']}")
        return 3
    n = len(card.input.bands)
    if card.image_tower.get("in_chans", n) != n:
        raise ValueError(f"{where}: image_tower.in_chans {card.image_tower['in_chans']} but the card lists {n} bands")
    return n


def set_patch_embed_channels(visual: nn.Module, in_chans: int, where: str) -> None:
    """Give an open_clip ViT's patch embedding ``in_chans`` input channels (fresh weights, seeded by the caller)."""
    conv = getattr(visual, "conv1", None)
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{where}: only open_clip ViT towers (visual.conv1) can take {in_chans} bands")
    visual.conv1 = nn.Conv2d(in_chans, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
                             bias=conv.bias is not None)
