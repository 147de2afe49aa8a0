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
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..models.card import CARD_FILE, ModelCard, card_from_dict, read_card, write_card
from ..models.identity import weights_hash
from ..models.weights import read_weights, write_weights

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


def check_card_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse, before any training, an ``--out`` that cannot or may not receive the card."""
    out = Path(out).expanduser()
    if not out.parent.is_dir():
        raise ValueError(f"output folder does not exist: {out.parent}")
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"output folder is not writable: {out.parent}")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or not _written_by_training(out):
            raise ValueError(f"{out} exists and is not a model card written by a training run: choose another --out")
        if not overwrite:
            raise ValueError(f"model card {out} exists: pass --overwrite to replace it")
    return out


def write_trained_card(out: Path, data: dict[str, Any], tensors: Mapping[str, Mapping[str, torch.Tensor]],
                       copies: Mapping[str, Path] | None = None, overwrite: bool = False,
                       own_space: bool = False) -> ModelCard:
    """Write a card folder atomically: ``tensors`` {file: state dict} as safetensors, ``copies`` {file: source}.

    ``own_space``: the card's ``space`` becomes ``"<id>@<hash of its weight files>"`` (a new teacher space).
    The card is validated (and its weight files found) before it is moved into place.
    """
    out = check_card_output(out, overwrite)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, sd in tensors.items():
            write_weights(sd, tmp / name)
        for name, src in (copies or {}).items():
            shutil.copy2(src, tmp / name)
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
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return read_card(out)


def text_tower_of(card: ModelCard) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """An ``aligned-s2`` ``text_tower`` entry for the text tower of ``card`` (a clip or aligned-s2 card), and the
    tensors to write as ``text_tower.safetensors`` when that tower comes from a file rather than an open_clip tag.
    """
    if card.family == "aligned-s2":
        spec = dict(card.text_tower)
        if not spec.get("weights"):
            return spec, None
        return dict(spec, weights="text_tower.safetensors"), read_weights(card.file(spec["weights"]))
    spec = ({"open_clip_config": card.image_tower["open_clip_config"]} if card.image_tower.get("open_clip_config")
            else {"arch": card.image_tower["arch"]})
    if card.pretrained:
        return dict(spec, pretrained=card.pretrained), None
    if not card.weights:
        raise ValueError(f"model {card.id!r} names no weights: its text tower would be random")
    text = {k: v for k, v in read_weights(card.file(card.weights)).items() if not k.startswith("visual.")}
    return dict(spec, weights="text_tower.safetensors"), text
