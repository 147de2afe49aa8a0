"""Pixels -> model input: resizing and per-channel normalisation, after the Sentinel-2 scaling or RGB composite."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _normalise(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    if mean is not None or std is not None:
        c = x.shape[1]
        m = torch.tensor(mean if mean is not None else [0.0] * c, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std if std is not None else [1.0] * c, dtype=torch.float32).view(1, -1, 1, 1)
        if m.shape[1] != c or s.shape[1] != c:
            raise ValueError(f"mean/std have {m.shape[1]}/{s.shape[1]} values for {c} channels")
        x = (x - m) / s
    return x.numpy()


def _tensor(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim != 4:
        raise ValueError(f"expected tiles shaped (N, C, H, W), got {a.shape}")
    return torch.from_numpy(a)


def clip_pixels(rgb: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, 3, h, w) RGB in [0, 1] -> CLIP input (N, 3, size, size).

    Bicubic with antialiasing, like CLIP's PIL resize, then clamped to [0, 1] because PIL resizes 8-bit images
    and cannot overshoot; no centre crop, because the whole tile is what gets classified (tiles are square).
    """
    x = _tensor(rgb)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp_(0.0, 1.0)
    return _normalise(x, mean, std)


def reflectance_pixels(refl: np.ndarray, size: int, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None, interpolation: str | None = None) -> np.ndarray:
    """(N, C, h, w) scaled bands -> model input (N, C, size, size).

    Bilinear without antialiasing by default (values stay within the input range); ``"bicubic"`` for cards
    whose publisher resized that way (Llama3-MS-CLIP: torchvision's bicubic Resize; tiles are enlarged, where
    antialiasing does nothing).
    """
    x = _tensor(refl)
    if x.shape[-2:] != (size, size):
        mode = interpolation or "bilinear"
        x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=False)
    return _normalise(x, mean, std)


def smooth_noise(n: int, channels: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, channels, size, size) values in [0, 1] varying smoothly in space: synthetic tiles for parity checks.

    Smooth fields exercise a ViT more like real imagery than white noise does (neighbouring patches agree).
    """
    coarse = np.random.default_rng(seed).random((n, channels, 4, 4), dtype=np.float32)
    return F.interpolate(torch.from_numpy(coarse), size=(size, size), mode="bilinear", align_corners=False).numpy()
