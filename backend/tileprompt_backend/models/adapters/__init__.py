"""Retrieval adapters on open_clip ViT cards (HarMA, RDB): a card declares them, the ``clip`` family attaches them.

Card field (``clip`` family)::

    "adapters": {"method": "harma" | "rdb", "config": {...}, "weights": "adapters.safetensors"}

``config`` holds the method's choices (defaults: :class:`.harma.HarmaConfig`, :class:`.rdb.RdbConfig`); the
weights file holds exactly the adapter tensors (keys ``visual.transformer.resblocks.N.mlp.adapter.*``,
``transformer.resblocks.N.mlp.adapter.*`` and ``adapters_shared.N.*``). The base model loads first with its own
strict key check, then the adapters are attached and their file is checked key by key. Works on any open_clip
model with its own ViT image tower and CLIP text transformer (OpenAI CLIP, GeoRSCLIP, RemoteCLIP, SkyCLIP, tiny
test configs). This package imports nothing from training: the engine loads adapted cards on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import open_clip
import torch
from torch import nn

from .common import TokenContext
from .harma import HarmaConfig, build_harma
from .rdb import RdbConfig, build_rdb

#: method -> (config class, builder that appends the adapters and returns the modules shared across towers)
METHODS = {"harma": (HarmaConfig, build_harma), "rdb": (RdbConfig, build_rdb)}
SHARED = "adapters_shared"  # attribute of the open_clip model holding the modules shared across towers
_BLOCK_KEY = ".mlp.adapter."


def adapter_config(method: str, config: Mapping[str, Any] | None, where: str = "adapters"):
    """The method's config dataclass from a card's ``config`` (missing fields: defaults; unknown: an error)."""
    if method not in METHODS:
        raise ValueError(f"{where}: unknown adapter method {method!r} (valid: {', '.join(METHODS)})")
    cls = METHODS[method][0]
    config = dict(config or {})
    unknown = set(config) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{where}: unknown {method} adapter field(s) {sorted(unknown)} "
                         f"(valid: {', '.join(cls.__dataclass_fields__)})")
    for key, value in config.items():
        if isinstance(value, list):
            config[key] = tuple(value)
    try:
        cfg = cls(**config)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None
    cfg.check(where)
    return cfg


def tower_blocks(model: nn.Module, where: str) -> list[tuple[str, nn.ModuleList, int]]:
    """(side, transformer blocks, width) of the image and the text tower; a clear error for models without them."""
    if not isinstance(model, open_clip.CLIP):
        raise ValueError(f"{where}: adapters need an open_clip CLIP with its own text transformer "
                         f"(got {type(model).__name__})")
    visual = getattr(model, "visual", None)
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None:
        raise ValueError(f"{where}: adapters need an open_clip ViT image tower (this one is "
                         f"{type(visual).__name__})")
    if getattr(model, "text_pool_type", None) != "argmax" or getattr(model, "attn_mask", None) is None:
        raise ValueError(f"{where}: adapters need CLIP's causal text tower pooled at the end-of-text token")
    if any(not isinstance(b.mlp, nn.Sequential) for b in (*blocks, *model.transformer.resblocks)):
        raise ValueError(f"{where}: adapters need blocks whose MLP is an nn.Sequential")
    return [("image", blocks, visual.transformer.width), ("text", model.transformer.resblocks,
                                                           model.transformer.width)]


def attach_adapters(model: nn.Module, method: str, config, where: str = "adapters") -> nn.Module:
    """Append the method's adapters to ``model`` (in place; fresh weights, zero-initialised outputs)."""
    if has_adapters(model):
        raise ValueError(f"{where}: the model already has adapters")
    if isinstance(config, Mapping) or config is None:
        config = adapter_config(method, config, where)
    towers = tower_blocks(model, where)
    tokens = TokenContext()
    tokens.attach(model.token_embedding)
    shared = METHODS[method][1](towers, config, tokens)
    setattr(model, SHARED, shared)
    model.train(model.training)  # the new modules follow the model's mode (dropout off in eval)
    return model.to(next(model.parameters()).device)


def has_adapters(model: nn.Module) -> bool:
    return hasattr(model, SHARED)


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key of an adapted open_clip model belongs to the adapters (not the base model)."""
    return _BLOCK_KEY in key or key.startswith(SHARED + ".")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of an adapted model (what a card's adapter weights file holds)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if is_adapter_key(k)}


def text_sees_padding(model: nn.Module) -> bool:
    """True when text adapters attend over padding (HarMA's released-code mode): text needs the full context."""
    return any(getattr(m, "sees_padding", False) for m in model.modules())


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters of an adapted model: total, adapters (image blocks, text blocks, shared), and one depth's module
    (image + text adapter + shared module of block 0: what HarMA's Table 1 counts as "a single adapter module")."""
    counts = {"total": 0, "adapters": 0, "image": 0, "text": 0, "shared": 0, "per_depth": 0}
    for k, p in model.named_parameters():
        n = p.numel()
        counts["total"] += n
        if not is_adapter_key(k):
            continue
        counts["adapters"] += n
        side = "shared" if k.startswith(SHARED + ".") else "image" if k.startswith("visual.") else "text"
        counts[side] += n
        if k.startswith((f"{SHARED}.0.", "visual.transformer.resblocks.0.", "transformer.resblocks.0.")):
            counts["per_depth"] += n
    counts["base"] = counts["total"] - counts["adapters"]
    return counts


__all__ = ["METHODS", "SHARED", "HarmaConfig", "RdbConfig", "adapter_config", "adapter_parameters",
           "adapter_state_dict", "attach_adapters", "has_adapters", "is_adapter_key", "parameter_counts",
           "text_sees_padding", "tower_blocks"]
