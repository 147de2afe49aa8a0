"""Train/val/test splits: by a hash of each sample's key, and spatial (by blocks of tiles).

Neighbouring tiles of one scene look alike; a random split by tile puts near-copies of test tiles into training
and flatters every metric. ``spatial_split`` assigns whole blocks of ``block x block`` tiles to one split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence

import numpy as np

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


def parse_fractions(text: str | Sequence[float] | None) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` -> (0.7, 0.15, 0.15); they must be non-negative and sum to 1."""
    if text is None:
        return DEFAULT_FRACTIONS
    values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6 or values[0] == 0:
        raise ValueError(f"split fractions must be three non-negative numbers for train,val,test summing to 1 "
                         f"with train > 0, got {text!r}")
    return values[0], values[1], values[2]


def assign_groups(groups: Sequence[Hashable], weights: Sequence[float], fractions: Sequence[float],
                  seed: int) -> dict[Hashable, str]:
    """Group -> split: groups in seeded random order, each to the split furthest below its target share.

    ``weights`` is each group's size (e.g. its labelled tiles). Every split with a non-zero fraction gets at
    least one group when there are enough groups.
    """
    unique = list(dict.fromkeys(groups))
    size = {g: 0.0 for g in unique}
    for g, w in zip(groups, weights):
        size[g] += float(w)
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    wanted = [s for s, f in zip(SPLITS, fractions) if f > 0]
    share = {s: f for s, f in zip(SPLITS, fractions)}
    total = sum(size.values()) or 1.0
    got = {s: 0.0 for s in SPLITS}
    out: dict[Hashable, str] = {}
    for i, g in enumerate(order):
        empty = [s for s in wanted if got[s] == 0]
        if empty and len(order) - i <= len(empty):
            split = empty[0]  # the last groups go to splits that have none yet
        else:
            split = max(wanted, key=lambda s: share[s] - got[s] / total)
        out[g] = split
        got[split] += size[g]
    return out


def spatial_split(rows: Sequence[int], cols: Sequence[int], weights: Sequence[float], fractions: Sequence[float],
                  block: int, seed: int, scene: str = "") -> list[str]:
    """The split of each tile (grid row/col) when blocks of ``block x block`` tiles go to one split together."""
    if block < 1:
        raise ValueError(f"block size must be a positive number of tiles, got {block}")
    groups = [(scene, r // block, c // block) for r, c in zip(rows, cols)]
    by_group = assign_groups(groups, weights, fractions, seed)
    return [by_group[g] for g in groups]


def hash_split(key: str, fractions: Sequence[float], seed: int) -> str:
    """A sample's split from a hash of (seed, key): deterministic, streaming (nothing held), not stratified."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2.0**64
    return "train" if h < fractions[0] else "val" if h < fractions[0] + fractions[1] else "test"
