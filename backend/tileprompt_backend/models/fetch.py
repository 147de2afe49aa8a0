"""``fetch``: download a model's published weights ahead of time and prove the model loads with them."""

from __future__ import annotations

from pathlib import Path

from .card import ModelCard
from .downloads import download_dir, ensure_weights, missing_weights, remove_downloaded
from .loading import load_model
from .progress import report
from .registry import get_family, list_models, resolve_card

#: The stage a fetch reports while it builds the model once to check the downloaded weights fit it.
LOADING = "loading the model"


def downloadable(card: ModelCard) -> bool:
    """Whether a card's weights come from a URL (a ``sources`` entry or an open_clip pretrained tag)."""
    return bool(card.sources) or bool(get_family(card.family).pretrained_tags(card))


def fetch(name: str | Path, models_dir: Path | None = None) -> ModelCard:
    """Download the weights of model ``name`` (a known id or a card folder) that are not here yet.

    Files a card names go into its folder (a bundled card is copied to ``models_dir``, default the user
    models folder, first); open_clip tags go into the shared cache. The model is then loaded once on the
    CPU, so a checkpoint that does not fit its card fails here, with the keys listed, and is removed.
    Progress and cancel: :func:`~.progress.download_hooks`. Returns the card to use from now on.
    """
    card = resolve_card(name)
    if not downloadable(card):
        known = ", ".join(c.id for c in list_models() if downloadable(c)) or "none"
        raise ValueError(f"model {card.id!r} names no weights to download (downloadable models: {known})")
    files, _ = missing_weights(card)
    target = download_dir(card, models_dir)
    new_folder = bool(files) and not target.exists()
    card = ensure_weights(card, models_dir)  # removes what it wrote when a download fails or is cancelled
    try:
        report(LOADING, 0, None)
        load_model(card, device="cpu")
    except ValueError:
        # What we just downloaded does not fit the card: leave nothing that looks usable.
        remove_downloaded(target, files, new_folder)
        raise
    return card

