"""Raw tiles -> model input, through the engine's own preprocessing (``LoadedModel.preprocess``).

Training never normalises by hand: each sample's bands are picked the way the engine picks them from a raster
(``required_bands``), and the card's scaling, RGB composite, resize and mean/std are applied by the very function
classification uses. Augmentation happens before this, on raw tiles.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import torch

from .data.samples import take_bands


def model_input(model, images: Sequence[np.ndarray], infos: Sequence[SimpleNamespace],
                device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, C, S, S) float32 input of ``model`` (a ``LoadedModel``) for raw (C, h, w) tiles described by ``infos``.

    Tiles of different sizes (random crops) are fine: each group of one size and kind goes through
    ``model.preprocess`` together.
    """
    if len(images) != len(infos):
        raise ValueError(f"{len(images)} images but {len(infos)} descriptions")
    groups: dict[tuple, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for i, (image, info) in enumerate(zip(images, infos)):
        want = model.required_bands(info)
        raw = take_bands(np.asarray(image), tuple(info.bands), tuple(want), getattr(info, "path", ""))
        groups[(raw.shape, info.kind, info.level, tuple(info.bands))].append((i, raw))
    out: list[np.ndarray | None] = [None] * len(images)
    for (_, _, _, _), members in groups.items():
        info = infos[members[0][0]]
        x = model.preprocess(np.stack([raw for _, raw in members]), info)
        for (i, _), xi in zip(members, x):
            out[i] = xi
    return torch.from_numpy(np.stack(out)).to(device, non_blocking=True)
