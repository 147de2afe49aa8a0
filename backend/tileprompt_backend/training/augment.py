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


#: The operations of ALBEF's ``RandomAugment(2, 7, ...)`` that HarMA's training transform uses (method notes §3.6).
RAND_AUGMENT_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
                    "TranslateX", "TranslateY", "Rotate")


@dataclass(frozen=True)
class RandAugment:
    """ALBEF's RandomAugment: ``n`` operations drawn (with replacement), each applied with probability 0.5 at
    ``magnitude`` (of 10): enhance factor m/10 x 1.8 + 0.1, shear m/10 x 0.3, translation m/10 x 10 px at 224 px
    (scaled to the tile's size here, as our tiles are augmented before the resize), rotation m/10 x 30 degrees;
    shear, translation and rotation take a random sign and fill with grey (128)."""

    n: int = 2
    magnitude: float = 7.0
    ops: tuple[str, ...] = RAND_AUGMENT_OPS
    fill: int = 128


def rand_augment(rgb: np.ndarray, rng: np.random.Generator, aug: RandAugment = RandAugment()) -> np.ndarray:
    """Apply :class:`RandAugment` to a (3, H, W) uint8 RGB image (torchvision's functions on uint8 tensors)."""
    from torchvision.transforms.v2 import functional as TF

    img = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.uint8))
    level = aug.magnitude / 10.0
    size = img.shape[-1]
    for name in rng.choice(aug.ops, size=aug.n):
        if rng.random() < 0.5:
            continue
        sign = -1.0 if rng.random() < 0.5 else 1.0
        fill = [float(aug.fill)] * 3
        if name == "AutoContrast":
            img = TF.autocontrast(img)
        elif name == "Equalize":
            img = TF.equalize(img)
        elif name == "Brightness":
            img = TF.adjust_brightness(img, level * 1.8 + 0.1)
        elif name == "Sharpness":
            img = TF.adjust_sharpness(img, level * 1.8 + 0.1)
        elif name in ("ShearX", "ShearY"):
            degrees = sign * math.degrees(math.atan(level * 0.3))  # PIL's shear factor as torchvision's angle
            shear = [degrees, 0.0] if name == "ShearX" else [0.0, degrees]
            img = TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, fill=fill)
        elif name in ("TranslateX", "TranslateY"):
            pixels = int(round(sign * level * 10.0 * size / 224.0))
            shift = [pixels, 0] if name == "TranslateX" else [0, pixels]
            img = TF.affine(img, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], fill=fill)
        elif name == "Rotate":
            img = TF.rotate(img, sign * level * 30.0, fill=fill)
    return img.numpy()
