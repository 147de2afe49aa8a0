"""The default model for a layer, and why: used when the analyst picks none (``--model`` left out, "automatic").

Cards declare ``preference`` (> 0: may be a default; higher first) and quote their published zero-shot figures in
``provenance.zero_shot``. For a Sentinel-2 product the best trained multispectral card that can read the
product's bands wins; when none can, the best RGB card (composite of B04, B03, B02). An RGB layer gets the best
RGB card. Cards without weights yet are chosen all the same: they download on first use, and the reason says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..defaults import DEFAULT_MODEL
from ..sentinel2.bands import FILLABLE_BANDS, RGB_BANDS
from .card import ModelCard
from .downloads import weights_state
from .registry import list_models, resolve_card


@dataclass(frozen=True)
class ModelChoice:
    card: ModelCard
    reason: str

    def to_json(self) -> dict:
        return {"model": self.card.id, "reason": self.reason}


def reads(card: ModelCard, info) -> bool:
    """Whether ``card`` can read a raster (a ``RasterInfo``): its bands (B10 may be zero-filled) or RGB."""
    if card.input.modality == "rgb":
        return info.kind == "rgb" or all(b in info.bands for b in RGB_BANDS)
    return info.kind == "s2" and all(b in info.bands or b in FILLABLE_BANDS for b in card.input.bands)


def choose_model(info, cards: list[ModelCard] | None = None) -> ModelChoice:
    """The default card for a raster (``RasterInfo``) and a one-line reason."""
    cards = [c for c in (list_models() if cards is None else cards) if c.trained and c.preference > 0]
    ranked = sorted(cards, key=lambda c: (-c.preference, c.id))
    what = f"Sentinel-2 {info.level} product" if info.kind == "s2" else "RGB layer"
    if info.kind == "s2":
        for card in ranked:
            if card.input.modality == "s2" and reads(card, info):
                return ModelChoice(card, _reason(card, f"best multispectral model that reads this {what}'s bands"))
    for card in ranked:
        if card.input.modality == "rgb" and reads(card, info):
            why = "best RGB model" + (" (no multispectral model reads its bands)" if info.kind == "s2" else "")
            return ModelChoice(card, _reason(card, f"{why} for this {what}"))
    card = resolve_card(DEFAULT_MODEL)
    return ModelChoice(card, _reason(card, "no card declares a preference for this layer; TilePrompt's default"))


def _reason(card: ModelCard, why: str) -> str:
    figures = card.provenance.get("zero_shot")
    quoted = f"; published zero-shot: {figures}" if figures else ""
    return f"{card.id}: {why}{quoted}; weights {weights_state(card).describe()}"
