"""CMID's masking (paper §III-B, Eq. 3; method notes §4.2): random blocks of tokens, filled with each image's own
per-band mean, plus a learnable mask token added to the masked patch embeddings (in the model).

The reference's ``BlockwiseMaskGenerator`` is SimMIM's: the token grid is cut into blocks of ``block x block``
tokens (32 px blocks of 16 px ViT patches: 2 x 2), and ceil(ratio x blocks) blocks drawn without replacement are
masked (30 of 49 at 224 px and ratio 0.6).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def block_mask(rng: np.random.Generator, grid: tuple[int, int], block: int, ratio: float) -> np.ndarray:
    """(gh, gw) bool token mask: ceil(ratio x blocks) random ``block x block`` blocks of the token grid set.

    A grid that is not a whole number of blocks gets partial blocks at its bottom and right edges.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    gh, gw = grid
    bh, bw = math.ceil(gh / block), math.ceil(gw / block)
    n = bh * bw
    chosen = np.zeros(n, dtype=bool)
    chosen[rng.permutation(n)[:math.ceil(round(n * ratio, 6))]] = True
    return chosen.reshape(bh, bw).repeat(block, axis=0).repeat(block, axis=1)[:gh, :gw]


def pixel_mask(token_mask: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, gh, gw) token mask -> (N, 1, gh x patch, gw x patch) float mask of the pixels each token covers."""
    m = token_mask.to(torch.float32)
    return m.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2).unsqueeze(1)


def mean_fill(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked pixels of (N, C, H, W) ``x`` replaced by each image's own per-band mean (over all its pixels).

    ``mask`` (N, 1, H, W): 1 where masked. The mean is the image's DC component (paper §III-B: a fill with the
    least local statistics change); the reference fills the normalised tensor the same way.
    """
    mean = x.mean(dim=(2, 3), keepdim=True)
    return x * (1.0 - mask) + mean * mask
