"""Augmentations on raw tiles (before the model's preprocessing), with their geometry recorded.

The crop follows torchvision's ``RandomResizedCrop.get_params`` (area share and aspect ratio drawn, ten tries,
then a centre crop); the resize to the model's input size is the model's own preprocessing. Colour jitter,
grayscale and blur are torchvision's own functions, applied to the RGB bands scaled as the composite scales
them (DN / the card's divisor, clipped to [0, 1]) and scaled back, so they act exactly as on the 8-bit composite
the reference augments (up to where the 8-bit rounding happens). Every draw comes from the sample's own
generator (``data.stream.sample_rng``): the same on any rank and worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Crop:
    """A window of a tile (pixels of the raw tile) and flips applied after cropping."""

    top: int
    left: int
    height: int
    width: int
    hflip: bool = False
    vflip: bool = False

    def as_dict(self) -> dict:
        return {"top": self.top, "left": self.left, "height": self.height, "width": self.width,
                "hflip": self.hflip, "vflip": self.vflip}


def random_resized_crop(height: int, width: int, rng: np.random.Generator, scale: tuple[float, float] = (0.9, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Crop:
    """torchvision's RandomResizedCrop window: area share in ``scale``, log-uniform aspect ratio in ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return Crop(top, left, h, w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return Crop((height - h) // 2, (width - w) // 2, h, w)


def with_flips(crop: Crop, rng: np.random.Generator, p_h: float = 0.5, p_v: float = 0.5) -> Crop:
    return Crop(crop.top, crop.left, crop.height, crop.width, bool(rng.random() < p_h), bool(rng.random() < p_v))


def apply_crop(image: np.ndarray, crop: Crop) -> np.ndarray:
    """The (C, h, w) window of a (C, H, W) tile, flipped as the crop says (a copy)."""
    out = image[:, crop.top:crop.top + crop.height, crop.left:crop.left + crop.width]
    if crop.hflip:
        out = out[:, :, ::-1]
    if crop.vflip:
        out = out[:, ::-1, :]
    return np.ascontiguousarray(out)


@dataclass(frozen=True)
class ColorAug:
    """The reference's patching augmentation of RGB composites (method notes §2.6)."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    p_jitter: float = 0.8
    p_gray: float = 0.2
    p_blur: float = 0.4
    blur_kernel: tuple[int, int] = (3, 7)  # torchvision GaussianBlur(kernel_size=(3, 7)): (x, y)
    blur_sigma: tuple[float, float] = (0.1, 2.0)


def color_augment(rgb: np.ndarray, divisor: float, rng: np.random.Generator, aug: ColorAug = ColorAug()) -> np.ndarray:
    """ColorJitter (random order of brightness/contrast/saturation), RandomGrayscale, GaussianBlur on (3, H, W)
    R, G, B values that the composite divides by ``divisor`` (S2 DN: the card's divisor for the level; 8-bit: 255).
    """
    from torchvision.transforms.v2 import functional as TF

    u = torch.from_numpy(np.clip(np.asarray(rgb, dtype=np.float32) / np.float32(divisor), 0.0, 1.0))
    if rng.random() < aug.p_jitter:
        ops = [("brightness", TF.adjust_brightness, aug.brightness),
               ("contrast", TF.adjust_contrast, aug.contrast),
               ("saturation", TF.adjust_saturation, aug.saturation)]
        for i in rng.permutation(len(ops)):
            _, fn, strength = ops[int(i)]
            if strength > 0:
                u = fn(u, float(rng.uniform(max(0.0, 1 - strength), 1 + strength)))
    if rng.random() < aug.p_gray:
        u = TF.rgb_to_grayscale(u, num_output_channels=3)
    if rng.random() < aug.p_blur:
        sigma = float(rng.uniform(*aug.blur_sigma))
        u = TF.gaussian_blur(u, kernel_size=list(aug.blur_kernel), sigma=[sigma, sigma])
    return (u.numpy() * np.float32(divisor)).astype(np.float32)
