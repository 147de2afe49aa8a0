"""Where each feature of a view lies in the original tile, and the position-matched pairs of the local branch
(CMID paper Eq. 6-7 and Fig. 4; method notes §4.5).

A view is a crop ``(top, left, height, width)`` of the tile in tile pixels, flipped horizontally and/or
vertically, resized to the model's input; the encoder gives a gh x gw feature grid over it. Feature (k, l)
covers the crop's cell centred at (top + (k + 0.5) height / gh, left + (l + 0.5) width / gw), mirrored inside
the crop when the view is flipped. The reference takes albumentations' ``h_start``/``w_start`` - fractions
i / (H - h) of the free range - as the crop's pixel offsets, which puts every crop at about (0, 0); here the
offsets are the crop's own pixels (``augment.Crop``), which is what Eq. 6-7 say.
"""

from __future__ import annotations

import torch

#: Columns of a crop row: top, left, height, width (tile pixels), hflip, vflip (0/1).
CROP_FIELDS = ("top", "left", "height", "width", "hflip", "vflip")


def crop_row(crop) -> list[float]:
    """An ``augment.Crop`` as the numbers :func:`cell_centres` reads."""
    return [float(crop.top), float(crop.left), float(crop.height), float(crop.width), float(crop.hflip),
            float(crop.vflip)]


def cell_centres(crops: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, gh x gw, 2) centres (row, col) in tile pixels of each feature of N views; ``crops`` (N, 6) rows of
    :data:`CROP_FIELDS`. Features are in row-major order, as a ViT's patch tokens."""
    gh, gw = grid
    crops = crops.to(torch.float32)
    top, left, height, width, hflip, vflip = crops.unbind(dim=1)
    k = (torch.arange(gh, dtype=torch.float32, device=crops.device) + 0.5) / gh  # fractions down the view
    l = (torch.arange(gw, dtype=torch.float32, device=crops.device) + 0.5) / gw  # fractions across
    # a flipped view's k-th row (l-th column) shows the crop's row (column) counted from the other side
    fk = torch.where(vflip[:, None] > 0.5, 1.0 - k[None, :], k[None, :])  # (N, gh)
    fl = torch.where(hflip[:, None] > 0.5, 1.0 - l[None, :], l[None, :])  # (N, gw)
    rows = top[:, None] + fk * height[:, None]
    cols = left[:, None] + fl * width[:, None]
    return torch.stack(torch.broadcast_tensors(rows[:, :, None], cols[:, None, :]), dim=-1).reshape(len(crops), -1, 2)


def match_positions(centres_a: torch.Tensor, centres_b: torch.Tensor, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``pairs`` position-matched feature pairs of two views: for each feature of A its nearest feature of B
    (Euclidean distance of their centres in the tile), and of those the ``pairs`` closest.

    Returns (index into A, index into B), each (N, pairs), A's indices in increasing order.
    """
    n_a = centres_a.shape[1]
    if not 0 < pairs <= n_a:
        raise ValueError(f"number of matched pairs must be in 1..{n_a} (the feature grid), got {pairs}")
    distance = torch.cdist(centres_a.float(), centres_b.float())
    nearest, index_b = distance.min(dim=2)
    # a stable sort: among equally near features the first ones win, on every device
    chosen = nearest.sort(dim=1, stable=True).indices[:, :pairs].sort(dim=1).values
    return chosen, index_b.gather(1, chosen)
