"""``load_model``: a card becomes towers on a device plus the preprocessing that card prescribes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from ..sentinel2.bands import FILLABLE_BANDS, RGB_BANDS
from ..sentinel2.composite import rgb_composite, scale_reflectance
from . import aligned_s2, clip  # noqa: F401  (importing registers the families)
from .adapters import text_sees_padding
from .card import ModelCard
from .downloads import ensure_weights
from .preprocess import clip_pixels, reflectance_pixels, smooth_noise
from .registry import Towers, get_family, resolve_card

DEVICES = ("auto", "cpu", "cuda")
_TEXT_BATCH = 256


class LoadedModel:
    """A card's towers, ready on ``device``; preprocessing travels with the model (callers never normalise)."""

    def __init__(self, card: ModelCard, device: str, image_size: int, towers: Towers):
        self.card = card
        self.device = device
        self.image_size = image_size
        self.logit_scale = card.logit_scale
        self.image_tower = towers.image_tower.to(device).eval()
        self.mean, self.std = towers.mean, towers.std
        self.image_files: tuple[Path, ...] = towers.image_files
        self._text = towers.text_model.to(device).eval()
        self._tokenizer = towers.tokenizer

    @property
    def text_model(self) -> torch.nn.Module:
        """The module behind :meth:`encode_text` (for a clip card: the whole open_clip model, both towers)."""
        return self._text

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(N, context) token ids of the card's tokenizer, on the CPU."""
        return self._tokenizer(list(texts))

    @property
    def embed_dim(self) -> int:
        return self.card.embed_dim

    @property
    def channels(self) -> int:
        return 3 if self.card.input.modality == "rgb" else len(self.card.input.bands)

    def _scaled_to_input(self, scaled: np.ndarray) -> np.ndarray:
        return reflectance_pixels(scaled, self.image_size, self.mean, self.std, self.card.input.interpolation)

    def required_bands(self, info) -> tuple[str, ...]:
        """The bands to read from a raster (a ``RasterInfo``), in the order :meth:`preprocess` expects."""
        inp = self.card.input
        if inp.modality == "rgb":
            if info.kind == "rgb":
                return ("R", "G", "B")
            missing = [b for b in RGB_BANDS if b not in info.bands]
            if missing:
                raise ValueError(f"model {self.card.id} needs bands {', '.join(RGB_BANDS)} for its RGB composite; "
                                 f"the raster lacks {', '.join(missing)}")
            return RGB_BANDS
        if info.kind != "s2":
            raise ValueError(f"model {self.card.id} needs Sentinel-2 bands {', '.join(inp.bands)}; "
                             f"the raster is {info.kind} ({', '.join(info.bands)})")
        # L2A lacks B10: readers zero-fill it on request, as the SSL4EO/MTMG encoders were fed.
        missing = [b for b in inp.bands if b not in info.bands and b not in FILLABLE_BANDS]
        if missing:
            raise ValueError(f"model {self.card.id} needs Sentinel-2 bands {', '.join(inp.bands)}; "
                             f"the raster lacks {', '.join(missing)}")
        return inp.bands

    def preprocess(self, raw: np.ndarray, info) -> np.ndarray:
        """Raw tiles (N, C, h, w) as read (bands of :meth:`required_bands`) -> model input (N, C, S, S) float32."""
        raw = np.asarray(raw, dtype=np.float32)
        bands = self.required_bands(info)
        if raw.ndim != 4 or raw.shape[1] != len(bands):
            raise ValueError(f"model {self.card.id}: expected tiles shaped (N, {len(bands)}, h, w) for bands "
                             f"{', '.join(bands)}, got {raw.shape}")
        inp = self.card.input
        if inp.modality == "rgb":
            rgb = rgb_composite(raw, info.level, inp.composite) if info.kind == "s2" else raw
            return clip_pixels(np.asarray(rgb, dtype=np.float32) / 255.0, self.image_size, self.mean, self.std)
        clip_range = inp.scale.get("clip")
        refl = scale_reflectance(raw, float(inp.scale.get("divide", 10000.0)),
                                 tuple(clip_range) if clip_range is not None else None)
        return self._scaled_to_input(refl)

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """(N, D) float32 L2-normalised text embeddings (the card's text tower and tokenizer)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), _TEXT_BATCH):
                tokens = self._tokenizer(texts[i:i + _TEXT_BATCH]).to(self.device)
                out.append(F.normalize(encode_text_trimmed(self._text, tokens).float(), dim=-1).cpu())
        return torch.cat(out).numpy()

    def probe_batch(self, n: int = 4, seed: int = 0) -> np.ndarray:
        """A deterministic synthetic batch in model-input space (smooth fields through this card's normalisation).

        For parity checks of exported or quantised towers and for benchmarks; not a substitute for real tiles.
        """
        unit = smooth_noise(n, self.channels, self.image_size, seed)
        if self.card.input.modality == "rgb":
            return clip_pixels(unit, self.image_size, self.mean, self.std)
        divide = float(self.card.input.scale.get("divide", 10000.0))
        return self._scaled_to_input(unit * 5000.0 / divide)  # reflectance 0-0.5 (DN 0-5000) in the card's scale

    def __repr__(self) -> str:
        return f"LoadedModel({self.card.id!r}, device={self.device!r}, image_size={self.image_size})"


def encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text`` (unnormalised), run only over the longest sentence's tokens, not all 77.

    Exact for CLIP text towers: the attention mask is causal, so no position before the end-of-text token sees
    the padding after it, and the pooled feature is read at the end-of-text token. Retrieval adapters mask
    padding too (models/adapters), except HarMA's released-code mode, which takes open_clip's path. About 6-7x faster for
    prompt-length sentences. Other text towers (HF, SigLIP-style pooling) take open_clip's own path.
    """
    causal = isinstance(model, open_clip.CLIP) and getattr(model, "attn_mask", None) is not None
    if not causal or model.text_pool_type != "argmax" or text_sees_padding(model):
        return model.encode_text(tokens)
    length = int((tokens != 0).sum(dim=1).max().clamp(min=1))  # 0 pads; every sentence ends with its EOT
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = x[torch.arange(len(x), device=x.device), tokens.argmax(dim=-1)]  # EOT has the highest token id
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r} (valid: {', '.join(DEVICES)})")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA GPU")
    return device


def load_model(card: ModelCard | str | Path, device: str = "auto", image_size: int | None = None) -> LoadedModel:
    """Build a card's towers with their weights (downloading published weights on first use).

    ``image_size`` runs the image tower at another input size (e.g. a tile's native 64 px: fewer tokens);
    it must be a multiple of the ViT's patch size.
    """
    if not isinstance(card, ModelCard):
        card = resolve_card(card)
    size = card.input.image_size if image_size is None else int(image_size)
    if size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    device = resolve_device(device)
    card = ensure_weights(card)  # first use: download (progress and cancel: progress.download_hooks)
    towers = get_family(card.family).build(card, size)
    return LoadedModel(card, device, size, towers)
