"""Weight files: safetensors in and out, strict key checks, seeded random initialisation.

Model directories hold safetensors only: they load without running any code, unlike pickles.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .card import ModelCard

#: Seeds for towers a card names no weights for (untrained cards only): each part gets its own seed, so
#: a projection head stays the same whatever RNG the backbone's construction consumed.
SEEDS = {"model": 0, "image": 0, "proj": 1, "text": 2}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def card_weights(card: ModelCard, relative: str) -> Path:
    """The weight file ``relative`` named by ``card``: inside the card's directory, safetensors, present."""
    path = card.file(relative)  # raises for names that escape the directory
    if path.suffix != ".safetensors":
        raise ValueError(f"model {card.id!r}: weights {relative!r} must be a .safetensors file (no pickles)")
    if not path.is_file():
        hint = " (it has a download source: run `tileprompt models fetch`)" if relative in card.sources else ""
        raise ValueError(f"model {card.id!r}: weights file {relative!r} not found in {card.path}{hint}")
    return path


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU; an unreadable file is a ValueError naming it."""
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def write_weights(state_dict: Mapping[str, torch.Tensor], path: Path) -> Path:
    """Save tensors as safetensors atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path


def check_keys(what: str, expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor],
               may_miss: Iterable[str] = ()) -> None:
    """Raise ValueError unless ``got`` has exactly the keys and shapes of ``expected`` (``may_miss`` may be absent)."""
    missing = sorted(set(expected) - set(got) - set(may_miss))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(f"{k} {tuple(got[k].shape)} != {tuple(expected[k].shape)}"
                    for k in set(expected) & set(got) if got[k].shape != expected[k].shape)
    problems = [f"{label} {_few(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)) if keys]
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str,
                may_miss: Iterable[str] = ()) -> None:
    """Load ``state_dict`` into ``module`` after :func:`check_keys`; keys in ``may_miss`` keep their init."""
    check_keys(what, module.state_dict(), state_dict, may_miss)
    module.load_state_dict(state_dict, strict=False)


def _few(keys: list[str], n: int = 12) -> str:
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
