"""Image-tower modules (model input -> L2-normalised embedding) and running a ViT at another input size."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn


class ClipImageTower(nn.Module):
    """open_clip's visual tower with its output L2-normalised."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The un-normalised embedding (what alignment training distils)."""
        return self.visual(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x), dim=-1)


class S2ImageTower(nn.Module):
    """A timm ViT backbone (pooled CLS feature) and a linear projection into the text tower's space."""

    def __init__(self, backbone: nn.Module, proj: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.proj = proj

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The un-normalised embedding (what alignment training distils)."""
        return self.proj(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x), dim=-1)


def _check_patch(size: int, patch: int, where: str) -> int:
    # A ViT whose input is not a whole number of patches silently drops the remainder (timm) or fails
    # in reshape (open_clip); refuse it up front.
    if size <= 0 or size % patch:
        raise ValueError(f"{where}: image size {size} is not a positive multiple of the patch size {patch}")
    return size // patch


def set_timm_image_size(vit: nn.Module, size: int, where: str) -> None:
    """Run a timm ViT at ``size`` x ``size``: position embeddings resampled (bicubic) by timm itself."""
    _check_patch(size, vit.patch_embed.patch_size[0], where)
    if tuple(vit.patch_embed.img_size) != (size, size):
        vit.set_input_size(img_size=(size, size))


def set_open_clip_image_size(visual: nn.Module, size: int, where: str) -> None:
    """Run an open_clip visual tower at ``size`` x ``size`` (ViT towers; others only at their own size)."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "set_input_size"):  # open_clip tower wrapping a timm ViT
        set_timm_image_size(trunk, size, where)
        visual.image_size = (size, size)
        return
    if not hasattr(visual, "positional_embedding") or not hasattr(visual, "grid_size"):
        current = visual.image_size
        if tuple(current if isinstance(current, (tuple, list)) else (current, current)) == (size, size):
            return
        raise ValueError(f"{where}: only ViT image towers can run at another image size")
    grid = _check_patch(size, visual.patch_size[0], where)
    if tuple(visual.grid_size) == (grid, grid):
        return
    pos = resample_abs_pos_embed(visual.positional_embedding.data[None], new_size=(grid, grid),
                                 old_size=visual.grid_size, num_prefix_tokens=1)[0]
    visual.positional_embedding = nn.Parameter(pos, requires_grad=visual.positional_embedding.requires_grad)
    visual.image_size = (size, size)
    visual.grid_size = (grid, grid)


def fit_pos_embed(state_dict: Mapping[str, torch.Tensor], key: str, target: torch.Tensor,
                  num_prefix_tokens: int) -> dict[str, torch.Tensor]:
    """Resample a checkpoint's position embedding (1, prefix + g*g, D) to ``target``'s token count.

    Like timm's checkpoint filter: lets 224-px weights load into a tower built at another size.
    Anything else about the tensor (width, a missing key) is left for the strict key check to report.
    """
    pe = state_dict.get(key)
    if pe is None or pe.shape == target.shape or pe.ndim != 3 or pe.shape[-1] != target.shape[-1]:
        return dict(state_dict)
    old = int(round((pe.shape[1] - num_prefix_tokens) ** 0.5))
    new = int(round((target.shape[1] - num_prefix_tokens) ** 0.5))
    if old * old + num_prefix_tokens != pe.shape[1] or new * new + num_prefix_tokens != target.shape[1]:
        return dict(state_dict)
    out = dict(state_dict)
    out[key] = resample_abs_pos_embed(pe, new_size=(new, new), old_size=(old, old), num_prefix_tokens=num_prefix_tokens)
    return out
