"""Writing the model cards trainings produce: complete and loadable, or not there at all.

Weights and ``model.json`` go into a hidden temporary folder beside ``--out`` that is renamed into place only
once complete, so a crash or Ctrl-C never leaves a half-written card under the name the admin asked for. An
existing folder at ``--out`` is replaced only with ``--overwrite`` and only if it is a card a training run
wrote (its provenance says so), never a folder we did not write. A card names its embedding ``space``: a
patched CLIP its own (``"<id>@<weights hash>"``), an aligned student its teacher's.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..models.card import CARD_FILE, ModelCard, card_from_dict, read_card, write_card
from ..models.identity import weights_hash
from ..models.loading import load_model
from ..models.weights import write_weights
from ..outputs import guard_folder_output, staged_folder

#: ``provenance.software`` of every card a training run writes (how --overwrite knows a card is ours).
TRAINER = "tileprompt training"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _written_by_training(folder: Path) -> bool:
    try:
        data = json.loads((folder / CARD_FILE).read_text())
    except (OSError, ValueError):
        return False
    return str(data.get("provenance", {}).get("software", "")).startswith(TRAINER)


def check_card_output(out: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse, before any training, an ``--out`` that cannot or may not receive the card: an input of the run
    (dataset, base or teacher card, student weights), or a folder a training run did not write."""
    return guard_folder_output(out, _written_by_training, overwrite, inputs, "model card folder")


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link when the file system allows (a base model's weights cost no space twice), else a copy.

    Safe for weight files: they are only ever replaced by renaming a new file into place, never rewritten.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_trained_card(out: Path, data: dict[str, Any], tensors: Mapping[str, Mapping[str, torch.Tensor]],
                       copies: Mapping[str, Path] | None = None, overwrite: bool = False,
                       own_space: bool = False) -> ModelCard:
    """Write a card folder atomically: ``tensors`` {file: state dict} as safetensors, ``copies`` {file: source}
    (hard-linked where possible).

    ``own_space``: the card's ``space`` becomes ``"<id>@<hash of its weight files>"`` (a new teacher space).
    The card is loaded once (strict key checks) before it is moved into place.
    """
    out = check_card_output(out, overwrite)
    with staged_folder(out) as tmp:
        for name, sd in tensors.items():
            write_weights(sd, tmp / name)
        for name, src in (copies or {}).items():
            link_or_copy(Path(src), tmp / name)
        data = dict(data)
        data["provenance"] = dict(data.get("provenance", {}), software=f"{TRAINER} (tileprompt {__version__})")
        card = card_from_dict(data, tmp)
        if own_space:
            w = weights_hash(card)
            if w is None:
                raise ValueError(f"model {card.id!r}: a weight file it names is missing; cannot name its space")
            data["space"] = f"{card.id}@{w}"
            card = card_from_dict(data, tmp)
        write_card(card, tmp)  # model.json last: a folder without it is not a card
        load_model(read_card(tmp), device="cpu")  # a card that does not load never reaches --out
    return read_card(out)
