"""One training sample: a raw tile as read (Sentinel-2 DN or 8-bit RGB), the names of its channels, and a target.

Samples stay raw until the last step: augmentation works on raw tiles, and the model's own preprocessing
(``LoadedModel.preprocess``: scaling, RGB composite, resize, normalisation) turns them into model input
(see :mod:`..inputs`), so a trained card sees tiles at inference exactly as it saw them in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from ...sentinel2.bands import FILLABLE_BANDS
from ...sentinel2.readers import RGB_NAMES

#: Tasks a dataset can hold: one class per sample, any number of classes per sample, or no labels.
TASKS = ("multi-class", "multi-label", "none")


@dataclass
class Sample:
    key: str  # unique within the dataset; letters, digits, '-' and '_' only (webdataset splits keys at dots)
    image: np.ndarray  # (C, H, W) raw: Sentinel-2 DN (uint16/float32) or uint8 RGB
    bands: tuple[str, ...]  # channel names: canonical band names, or ("R", "G", "B")
    level: str  # "L1C" | "L2A" for Sentinel-2; "unknown" for RGB
    target: np.ndarray | int | None = None  # multi-hot (n_classes,) uint8, a class index, or None (unlabelled)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "rgb" if tuple(self.bands) == RGB_NAMES else "s2"

    def info(self) -> SimpleNamespace:
        """What ``LoadedModel.required_bands`` / ``preprocess`` read from a raster's info, for this sample."""
        return SimpleNamespace(kind=self.kind, level=self.level, bands=tuple(self.bands), path=self.key)


def take_bands(image: np.ndarray, have: tuple[str, ...], want: tuple[str, ...], key: str = "") -> np.ndarray:
    """The channels ``want`` of a (C, H, W) ``image`` whose channels are ``have``, in ``want``'s order.

    A band the image lacks is zero-filled when it may be (L2A has no B10, as the SSL4EO/MTMG encoders were
    fed); any other missing band is a ValueError naming it.
    """
    have, want = tuple(have), tuple(want)
    if have == want:
        return image
    index = {b: i for i, b in enumerate(have)}
    missing = [b for b in want if b not in index and b not in FILLABLE_BANDS]
    if missing:
        where = f"sample {key}: " if key else ""
        raise ValueError(f"{where}the model needs band(s) {', '.join(missing)} but the sample has "
                         f"{', '.join(have)}")
    out = np.zeros((len(want),) + image.shape[1:], dtype=image.dtype)
    for i, b in enumerate(want):
        if b in index:
            out[i] = image[index[b]]
    return out


def multi_hot(indices: list[int], n_classes: int) -> np.ndarray:
    """(n_classes,) uint8 with ones at ``indices``."""
    out = np.zeros(n_classes, dtype=np.uint8)
    out[list(indices)] = 1
    return out


def compact_dtype(image: np.ndarray) -> np.ndarray:
    """Raw DN as uint16 when every value is a whole number in 0..65535 (Sentinel-2 DN are): half the bytes."""
    a = np.asarray(image)
    if a.dtype == np.uint8 or a.dtype == np.uint16:
        return a
    if a.size and np.all(np.isfinite(a)) and a.min() >= 0 and a.max() <= 65535 and np.all(a == np.round(a)):
        return a.astype(np.uint16)
    return a.astype(np.float32)
