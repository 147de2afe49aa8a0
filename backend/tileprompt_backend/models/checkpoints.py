"""Pure functions that turn published checkpoints into the state dicts our towers load.

One filter per checkpoint source (like timm's ``checkpoint_filter_fn``); the strict key check comes after,
in the loader, so a filter never hides a mismatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# zhu-xlab's raw MoCo-v3 files keep the encoder under DataParallel's "module." and MoCo's "base_encoder.";
# DINO files use "backbone."; torchgeo's re-published file is already a flat timm state dict.
_SSL4EO_PREFIXES = ("module.base_encoder.", "base_encoder.", "module.backbone.", "backbone.", "module.")
# The momentum encoder and the predictor are training-only parts of MoCo.
_SSL4EO_DROP = ("module.momentum_encoder.", "momentum_encoder.", "module.predictor.", "predictor.")
# MoCo-v3 puts its projector MLP at the encoder's "head"; a classifier would sit there too. Neither is ours.
_HEAD = ("head.", "fc.")


def unwrap_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint: ``{"state_dict": ...}``, ``{"model": ...}`` or the dict itself."""
    while isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
        else:
            break
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise ValueError("checkpoint holds no state dict")
    not_tensors = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"checkpoint state dict has non-tensor entries: {', '.join(map(str, not_tensors[:8]))}")
    return dict(checkpoint)


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel's ``module.`` prefix when every key has it (as open_clip's loader does)."""
    if all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def ssl4eo_checkpoint_filter(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SSL4EO-S12 ViT-S/16 checkpoint (raw MoCo/DINO or torchgeo's flat file) -> timm ``vit_small_patch16_224`` keys.

    Strips ``module.base_encoder.`` / ``backbone.`` prefixes, drops the momentum encoder, predictor and
    projection/classification heads. Keys are not checked here: the loader's strict check lists any leftovers.
    Wang et al., SSL4EO-S12 (arXiv 2211.07044); weights from zhu-xlab/SSL4EO-S12 via torchgeo.
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_SSL4EO_DROP):
            continue
        for prefix in _SSL4EO_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key.startswith(_HEAD):
            continue
        out[key] = value
    return out
