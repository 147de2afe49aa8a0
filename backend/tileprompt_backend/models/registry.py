"""Two registries: model families (builders, recorded by decorator) and model cards (folders on disk)."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..paths import bundled_models_dir, user_models_dir
from .card import CARD_FILE, ModelCard, read_card

log = logging.getLogger(__name__)


@dataclass
class Towers:
    """What a family builder hands to :class:`~.loading.LoadedModel` (all on the CPU, eval mode)."""

    image_tower: torch.nn.Module  # (N, C, S, S) model input -> (N, D) L2-normalised
    text_model: torch.nn.Module  # has encode_text(tokens, normalize=True)
    tokenizer: Callable[[list[str]], torch.Tensor]
    mean: tuple[float, ...] | None  # per-channel normalisation of the model input (after scaling to [0, 1])
    std: tuple[float, ...] | None
    image_files: tuple[Path, ...]  # the files the image tower's weights came from (keys for derived caches)


class Family:
    """A model family: which files and pretrained tags a card names, and how to build its towers."""

    name = ""

    def weight_files(self, card: ModelCard) -> list[str]:
        """Weight files the card names, relative to its directory."""
        raise NotImplementedError

    def pretrained_tags(self, card: ModelCard) -> list[tuple[str, str]]:
        """(open_clip model name, pretrained tag) pairs whose weights the card needs."""
        raise NotImplementedError

    def build(self, card: ModelCard, image_size: int) -> Towers:
        """Build both towers with their weights; the image tower runs at ``image_size``."""
        raise NotImplementedError


_FAMILIES: dict[str, Family] = {}


def register_family(name: str) -> Callable[[type[Family]], type[Family]]:
    """Class decorator: record a :class:`Family` under ``name`` (the card's ``family`` field)."""
    def wrap(cls: type[Family]) -> type[Family]:
        if name in _FAMILIES:
            raise ValueError(f"model family {name!r} registered twice")
        cls.name = name
        _FAMILIES[name] = cls()
        return cls
    return wrap


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r} (valid: {', '.join(sorted(_FAMILIES))})")
    return _FAMILIES[name]


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def list_models(pattern: str = "*") -> list[ModelCard]:
    """Cards in the bundled and the user models folders whose id matches the glob ``pattern``, sorted by id.

    A user card with the same id as a bundled one replaces it (that is how ``fetch`` and retraining
    override bundled cards). Unreadable cards are skipped with a warning so one broken folder cannot hide
    the others.
    """
    cards: dict[str, ModelCard] = {}
    for root in (bundled_models_dir(), user_models_dir()):
        if not root.is_dir():
            continue
        for f in sorted(root.glob(f"*/{CARD_FILE}")):
            try:
                card = read_card(f.parent)
            except ValueError as e:
                log.warning("skipping model card %s: %s", f, e)
                continue
            cards[card.id] = card
    return [cards[i] for i in sorted(cards) if fnmatch.fnmatchcase(i, pattern)]


def resolve_card(name_or_dir: str | Path) -> ModelCard:
    """A model directory (holding ``model.json``) or the id of a known card; anything else is a ValueError."""
    path = Path(name_or_dir).expanduser()
    if (path / CARD_FILE).is_file():
        return read_card(path)
    name = str(name_or_dir)
    for card in list_models():
        if card.id == name:
            return card
    if isinstance(name_or_dir, Path) or path.is_dir() or "/" in name or "\\" in name:
        return read_card(path)  # raises "not a model directory"
    valid = ", ".join(c.id for c in list_models()) or "none installed"
    raise ValueError(f"unknown model {name!r} (valid ids: {valid}; or give a model directory)")
