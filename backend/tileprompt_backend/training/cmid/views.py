"""CMID's two views of a tile (method notes §4.1), made in DataLoader workers from each sample's own generator.

Both views are random resized crops with flips of the raw tile (geometry recorded for the local branch), turned
into model input by the card's own preprocessing (``inputs.model_input``: band selection, scaling, resize). The
second view is then augmented spectrally, in the card's scaled units (reflectance for the aligned-s2 cards):
brightness and contrast with a factor per band around a shared one, Gaussian blur and Gaussian noise. The
reference's RGB-only tricks (hue, saturation, solarize, grayscale) have no multispectral meaning and are left out.
Each view gets its own block mask (both are masked, as in the reference since Aug 2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..augment import apply_crop, random_resized_crop, with_flips
from ..data.samples import Sample
from ..inputs import model_input
from .geometry import crop_row
from .masking import block_mask

#: Blur and noise of the reference are defined on 224 px images; they scale with the input size.
REFERENCE_SIZE = 224


@dataclass(frozen=True)
class SpectralAug:
    """The second view's photometric augmentation (defaults: the reference's strengths where they apply)."""

    p_jitter: float = 0.8  # ColorJitter's probability
    brightness: float = 0.4  # shared gain in [1 - b, 1 + b] (ColorJitter brightness 0.4)
    contrast: float = 0.4  # shared contrast in [1 - c, 1 + c] around each band's own mean (ColorJitter 0.4)
    band_spread: float = 0.1  # each band's gain and contrast also vary by up to +-10 % on their own
    p_blur: float = 1.0  # GaussianBlur(sigma 0.1-2 px at 224 px, p 1.0)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    p_noise: float = 0.6  # GaussNoise(var 10-50 on 0-255, p 0.6): std 3.2/255-7.1/255 of the [0, 1] range
    noise_std: tuple[float, float] = (math.sqrt(10.0) / 255.0, math.sqrt(50.0) / 255.0)


def spectral_augment(x: torch.Tensor, rng: np.random.Generator, aug: SpectralAug = SpectralAug(),
                     mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
                     clip: tuple[float, float] | None = (0.0, 1.0)) -> torch.Tensor:
    """Augment one (C, S, S) model input in its scaled units (``mean``/``std``: the card's normalisation,
    undone first and redone last; ``clip``: the card's value range, kept)."""
    c, size = x.shape[0], x.shape[-1]
    u = x * std.view(-1, 1, 1) + mean.view(-1, 1, 1) if mean is not None and std is not None else x.clone()
    if rng.random() < aug.p_jitter:
        for op in rng.permutation(2):
            strength = aug.brightness if op == 0 else aug.contrast
            factor = rng.uniform(1 - strength, 1 + strength) * (1 + rng.uniform(-aug.band_spread, aug.band_spread, c))
            factor = torch.from_numpy(factor.astype(np.float32)).view(-1, 1, 1)
            if op == 0:
                u = u * factor
            else:
                centre = u.mean(dim=(1, 2), keepdim=True)
                u = centre + factor * (u - centre)
            if clip is not None:
                u = u.clamp(*clip)
    if rng.random() < aug.p_blur:
        from torchvision.transforms.v2 import functional as TF

        sigma = float(rng.uniform(*aug.blur_sigma)) * size / REFERENCE_SIZE
        kernel = 2 * math.ceil(3 * sigma) + 1
        if kernel > 1:
            u = TF.gaussian_blur(u[None], kernel_size=[kernel, kernel], sigma=[sigma, sigma])[0]
    if rng.random() < aug.p_noise:
        noise_std = float(rng.uniform(*aug.noise_std))
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        u = u + noise_std * torch.randn(u.shape, generator=g)
        if clip is not None:
            u = u.clamp(*clip)
    if mean is not None and std is not None:
        u = (u - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    return u


@dataclass
class ViewMaker:
    """``(sample, rng) -> item``: two augmented views of a raw tile, their crops and their token masks.

    ``model`` is the student's ``LoadedModel`` (its preprocessing); ``grid`` its token grid at the input size.
    The item holds ``x`` (2, C, S, S) float32, ``mask`` (2, gh, gw) bool, ``crops`` (2, 6) float32.
    """

    model: object
    grid: tuple[int, int]
    mask_block: int  # in tokens
    mask_ratio: float = 0.6
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    p_hflip: float = 0.5
    p_vflip: float = 0.5
    aug: SpectralAug = SpectralAug()

    def __call__(self, sample: Sample, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        image = np.asarray(sample.image)
        h, w = image.shape[1:]
        crops = [with_flips(random_resized_crop(h, w, rng, self.crop_scale, self.crop_ratio), rng, self.p_hflip,
                            self.p_vflip) for _ in range(2)]
        info = sample.info()
        x = model_input(self.model, [apply_crop(image, c) for c in crops], [info, info])
        inp = self.model.card.input
        mean = torch.tensor(self.model.mean, dtype=torch.float32) if self.model.mean is not None else None
        std = torch.tensor(self.model.std, dtype=torch.float32) if self.model.std is not None else None
        clip = tuple(inp.scale["clip"]) if inp.scale.get("clip") is not None else None
        x[1] = spectral_augment(x[1], rng, self.aug, mean, std, clip)
        masks = np.stack([block_mask(rng, self.grid, self.mask_block, self.mask_ratio) for _ in range(2)])
        return {"x": x, "mask": torch.from_numpy(masks),
                "crops": torch.tensor([crop_row(c) for c in crops], dtype=torch.float32)}
