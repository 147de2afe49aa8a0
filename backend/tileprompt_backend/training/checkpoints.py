"""Resumable training checkpoints: trainable weights as safetensors, the rest loadable with ``weights_only=True``.

``RUN_DIR/checkpoints/step-00001200/`` holds ``weights.safetensors`` (the trainable module's state dict),
``state.pt`` (optimizer, scheduler, step, epoch, RNG states and the run's config: only tensors, numbers,
strings, lists and dicts, so ``torch.load(weights_only=True)`` reads it without running any code) and
``meta.json``. A checkpoint is written into a temporary folder and renamed into place, so a crash leaves the
previous checkpoint intact and never a half-written one under a final name. The newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..models.weights import read_weights, write_weights
from ..outputs import staged_folder

CHECKPOINTS = "checkpoints"
WEIGHTS = "weights.safetensors"
STATE = "state.pt"
META = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def save_checkpoint(run_dir: Path, step: int, weights: Mapping[str, torch.Tensor], state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep``; returns its folder."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    with staged_folder(final) as tmp:
        write_weights(weights, tmp / WEIGHTS)
        with open(tmp / STATE, "wb") as f:
            torch.save(dict(state, step=step), f)
            f.flush()
            os.fsync(f.fileno())
        (tmp / META).write_text(json.dumps({"step": step, "saved": datetime.now(timezone.utc).isoformat(
            timespec="seconds")}) + "\n")
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary folders of interrupted saves are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()
             and (p / WEIGHTS).is_file() and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, state) of a checkpoint folder; the state is read with ``weights_only=True``."""
    path = Path(path)
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise ValueError(f"checkpoint {path}: {STATE} is not a readable training state ({e})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"checkpoint {path}: {STATE} holds no training state")
    return read_weights(path / WEIGHTS), state
