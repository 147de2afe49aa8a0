"""Published checkpoints -> the state dicts our towers load: one reader per checkpoint layout.

One pure filter per checkpoint source (like timm's ``checkpoint_filter_fn``); the strict key check comes after,
in the loader, so a filter never hides a mismatch. :data:`CONVERTERS` names the layouts a card's ``sources``
(``"convert"``) and ``tileprompt models import`` accept. Pickles are read with ``torch.load(weights_only=True)``:
the unpickler rebuilds tensors and plain containers only and runs no code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .weights import read_weights

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


# Llama3-MS-CLIP's Lightning module (IBM/MS-CLIP msclip/model/model_arch.py, CLIPDualEncoderModel) keeps the open_clip
# model at clip_base_model.model and registers the same module again as image_encoder.model and text_encoder.model,
# so its state dict holds every tensor up to three times; "temperature" is the training loss's own parameter.
_MSCLIP_MODEL = "clip_base_model.model."
_MSCLIP_ALIASES = ("image_encoder.model.", "text_encoder.model.")
_MSCLIP_TRAINING_ONLY = ("temperature",)


def msclip_checkpoint_filter(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Llama3-MS-CLIP checkpoint -> open_clip keys: strip ``clip_base_model.model.``, drop the alias copies (checked
    equal to the model's tensors) and the loss temperature. Other keys are kept for the strict check to list."""
    out = {k[len(_MSCLIP_MODEL):]: v for k, v in state_dict.items() if k.startswith(_MSCLIP_MODEL)}
    for key, value in state_dict.items():
        if key.startswith(_MSCLIP_MODEL) or key in _MSCLIP_TRAINING_ONLY:
            continue
        alias = next((a for a in _MSCLIP_ALIASES if key.startswith(a)), None)
        if alias is None:
            out[key] = value
            continue
        base = key[len(alias):]
        copy = out.get(base)
        same = copy is not None and (copy is value or (copy.shape == value.shape and torch.equal(copy, value)))
        if not same:
            raise ValueError(f"checkpoint key {key} is not a copy of {_MSCLIP_MODEL}{base}: not an MS-CLIP checkpoint")
    return out


def read_torch_checkpoint(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``, memory-mapped when the file allows it (training checkpoints carry
    optimizer state that is never read into memory then)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) pickles cannot be mapped


def torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, plain or inside ``{"state_dict": ...}``/``{"model": ...}``, ``module.`` stripped
    (RemoteCLIP, GeoRSCLIP, open_clip training checkpoints such as SkyCLIP's)."""
    return strip_module_prefix(unwrap_state_dict(read_torch_checkpoint(path)))


#: Checkpoint layouts: name -> function reading a downloaded (or local) file into a state dict.
CONVERTERS: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {
    "safetensors": read_weights,
    "torch-state-dict": torch_state_dict,
    "ssl4eo-moco": lambda path: ssl4eo_checkpoint_filter(torch_state_dict(path)),
    "msclip": lambda path: msclip_checkpoint_filter(torch_state_dict(path)),
}


def convert_checkpoint(path: Path, layout: str) -> dict[str, torch.Tensor]:
    """Read ``path`` in checkpoint ``layout``; an unreadable file is one ValueError naming it."""
    if layout not in CONVERTERS:
        raise ValueError(f"unknown checkpoint layout {layout!r} (valid: {', '.join(sorted(CONVERTERS))})")
    try:
        return CONVERTERS[layout](path)
    except ValueError as e:
        raise ValueError(f"{path.name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a bad file; make them one clear error
        raise ValueError(f"{path.name}: not a usable {layout} checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
