"""CMID's two views of a tile (method notes §4.1), drawn in DataLoader workers from each sample's own generator.

Both views are random resized crops with flips of the raw tile (geometry recorded for the local branch), turned
into model input by the card's own preprocessing (``inputs.model_input``: band selection, scaling, resize). The
second view is then augmented spectrally, in the card's scaled units (reflectance for the aligned-s2 cards):
brightness and contrast with a factor per band around a shared one, Gaussian blur and Gaussian noise. The
reference's RGB-only tricks (hue, saturation, solarize, grayscale) have no multispectral meaning and are left out.
Each view gets its own block mask (both are masked, as in the reference since Aug 2023). Workers draw the
augmentation's parameters; on GPUs the training process applies them to the whole batch on its device
(``ViewMaker.augment``: most of the per-sample work, nearly free there), on CPUs the workers apply them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

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


def draw_spectral(rng: np.random.Generator, aug: SpectralAug, channels: int, size: int) -> dict[str, torch.Tensor]:
    """One view's augmentation parameters, drawn from the sample's generator (identity where a step is skipped).

    ``gain``/``contrast`` (C,): brightness and contrast factors per band (a shared draw times a per-band one);
    ``sigma``: blur in pixels of the ``size`` px input (0: none); ``noise_std`` (0: none) and ``noise_seed`` of the
    additive Gaussian noise.
    """
    gain, contrast = np.ones(channels), np.ones(channels)
    if rng.random() < aug.p_jitter:
        gain = rng.uniform(1 - aug.brightness, 1 + aug.brightness) * (
            1 + rng.uniform(-aug.band_spread, aug.band_spread, channels))
        contrast = rng.uniform(1 - aug.contrast, 1 + aug.contrast) * (
            1 + rng.uniform(-aug.band_spread, aug.band_spread, channels))
    sigma = float(rng.uniform(*aug.blur_sigma)) * size / REFERENCE_SIZE if rng.random() < aug.p_blur else 0.0
    noise_std, noise_seed = 0.0, 0
    if rng.random() < aug.p_noise:
        noise_std, noise_seed = float(rng.uniform(*aug.noise_std)), int(rng.integers(2**62))
    return {"gain": torch.tensor(gain, dtype=torch.float32), "contrast": torch.tensor(contrast, dtype=torch.float32),
            "sigma": torch.tensor(sigma, dtype=torch.float32), "noise_std": torch.tensor(noise_std, dtype=torch.float32),
            "noise_seed": torch.tensor(noise_seed, dtype=torch.int64)}


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images blurred with a Gaussian of ``sigma`` (N,) px each (0: unchanged): separable, reflect
    padding, taps to 3 sigma (torchvision's kernel shape)."""
    radius = int(math.ceil(3 * float(sigma.max()))) if len(sigma) else 0
    if radius == 0:
        return x
    n, c, h, w = x.shape
    radius = min(radius, h - 1, w - 1)
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.to(x.device, x.dtype).clamp_min(1e-6)[:, None]
    kernel = torch.softmax(-(taps[None, :] ** 2) / (2 * s ** 2), dim=1)  # (N, k), sums to 1; sigma 0: a delta
    kernel = kernel.repeat_interleave(c, dim=0)  # one kernel per image and band
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def apply_spectral(x: torch.Tensor, params: dict[str, torch.Tensor], mean: torch.Tensor | None = None,
                   std: torch.Tensor | None = None, clip: tuple[float, float] | None = (0.0, 1.0)) -> torch.Tensor:
    """Augment a batch of (N, C, S, S) model inputs with :func:`draw_spectral` parameters (stacked per key), on
    whatever device ``x`` is; in the card's scaled units (``mean``/``std`` undone first and redone last, values kept
    in ``clip``)."""
    dev = x.device
    p = {k: v.to(dev) for k, v in params.items()}
    u = x * std.to(dev).view(1, -1, 1, 1) + mean.to(dev).view(1, -1, 1, 1) if mean is not None else x

    def keep(v):
        return v.clamp(*clip) if clip is not None else v

    # brightness g and contrast c about each band's mean m: g (m + c (u - m)), the same in either order
    gain, contrast = p["gain"][:, :, None, None], p["contrast"][:, :, None, None]
    centre = u.mean(dim=(2, 3), keepdim=True)
    u = keep(gain * (centre + contrast * (u - centre)))
    u = gaussian_blur(u, p["sigma"])
    noisy = torch.nonzero(p["noise_std"] > 0).flatten().tolist()
    if noisy:
        noise = torch.zeros_like(u)
        for i in noisy:
            g = torch.Generator(device=dev).manual_seed(int(p["noise_seed"][i]))
            noise[i] = torch.randn(u.shape[1:], generator=g, device=dev, dtype=u.dtype) * p["noise_std"][i]
        u = keep(u + noise)
    if mean is not None:
        u = (u - mean.to(dev).view(1, -1, 1, 1)) / std.to(dev).view(1, -1, 1, 1)
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
    augment_in_worker: bool = True  # False: the training process augments the batch on its device (GPUs)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        image = np.asarray(sample.image)
        h, w = image.shape[1:]
        crops = [with_flips(random_resized_crop(h, w, rng, self.crop_scale, self.crop_ratio), rng, self.p_hflip,
                            self.p_vflip) for _ in range(2)]
        info = sample.info()
        x = model_input(self.model, [apply_crop(image, c) for c in crops], [info, info])
        masks = np.stack([block_mask(rng, self.grid, self.mask_block, self.mask_ratio) for _ in range(2)])
        item = {"x": x, "mask": torch.from_numpy(masks),
                "crops": torch.tensor([crop_row(c) for c in crops], dtype=torch.float32),
                **{f"aug_{k}": v for k, v in draw_spectral(rng, self.aug, x.shape[1], x.shape[-1]).items()}}
        if self.augment_in_worker:
            x[1] = self.augment(x[1:], [item])[0]
            item = {k: v for k, v in item.items() if not k.startswith("aug_")}
        return item

    def augment(self, x: torch.Tensor, batch: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The second views ``x`` (N, C, S, S) of a batch, on any device, augmented with their items' parameters;
        unchanged when the workers augmented them already. On the CPU both places give the same result."""
        params = {k[4:]: torch.stack([item[k] for item in batch]) for k in batch[0] if k.startswith("aug_")}
        if not params:
            return x
        inp = self.model.card.input
        mean = torch.tensor(self.model.mean, dtype=torch.float32) if self.model.mean is not None else None
        std = torch.tensor(self.model.std, dtype=torch.float32) if self.model.std is not None else None
        clip = tuple(inp.scale["clip"]) if inp.scale.get("clip") is not None else None
        return apply_spectral(x, params, mean, std, clip)
