"""The zero-shot head of CLIP and PAINT: class embeddings from prompts, logits, and per-tile scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .prompts import PromptClass, expand

TextEncoder = Callable[[list[str]], np.ndarray]


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def class_embedding(encode_text: TextEncoder, phrases: tuple[str, ...], templates: list[str]) -> np.ndarray:
    """Mean of the L2-normalised embeddings of every template x phrase, re-normalised (CLIP / PAINT head)."""
    texts = [t for p in phrases for t in expand(templates, p)]
    emb = l2_normalize(np.asarray(encode_text(texts), dtype=np.float64))
    return l2_normalize(emb.mean(axis=0)).astype(np.float32)


def zero_shot_head(encode_text: TextEncoder, classes: list[PromptClass], templates: list[str]) -> np.ndarray:
    """(C, D) matrix of class embeddings, one row per class."""
    return np.stack([class_embedding(encode_text, c.phrases, templates) for c in classes])


def inverse_norms(x: np.ndarray) -> np.ndarray:
    """1 / |x| of each row of float32 ``x`` (tiny norms clipped), without a normalised (N, D) copy of ``x``."""
    return 1.0 / np.maximum(np.sqrt(np.einsum("...d,...d->...", x, x)), 1e-12)


def logits(image_emb: np.ndarray, head: np.ndarray, logit_scale: float) -> np.ndarray:
    """logit_scale x cosine(image, class) for (N, D) image embeddings and a (C, D) head.

    The products are divided by the image norms rather than taken with normalised copies: at 1e5 tiles the
    three (N, D) temporaries of normalising first cost more than the product itself.
    """
    x = np.asarray(image_emb, dtype=np.float32)
    return (x @ np.asarray(head, dtype=np.float32).T) * (logit_scale * inverse_norms(x))[..., None]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free form of 1 / (1 + exp(-z))


@dataclass
class Scores:
    """Per-tile results for N tiles and C classes."""

    scores: np.ndarray  # (N, C) probabilities (softmax) or per-class sigmoids (multi-label)
    best: np.ndarray  # (N,) index of the top class
    second: np.ndarray  # (N,) index of the runner-up class (== best when C == 1)
    margin: np.ndarray  # (N,) top score minus runner-up score
    labels: np.ndarray | None = None  # (N, C) bool, multi-label only: score >= threshold


def probabilities(z: np.ndarray, multi_label: bool = False, logit_bias: float = 0.0) -> np.ndarray:
    """(N, C) logits -> softmax over classes, or one sigmoid per class (``sigmoid(z + logit_bias)``)."""
    return sigmoid(z + logit_bias) if multi_label else softmax(z)


def score_tiles(z: np.ndarray, multi_label: bool = False, threshold: float = 0.5, logit_bias: float = 0.0) -> Scores:
    """Turn (N, C) logits into scores: softmax over classes, or one sigmoid per class with a threshold."""
    return rank_scores(probabilities(z, multi_label, logit_bias), multi_label, threshold)


def rank_scores(s: np.ndarray, multi_label: bool = False, threshold: float = 0.5) -> Scores:
    """Top class, runner-up and margin of (N, C) scores (probabilities or per-class sigmoids)."""
    order = np.argsort(-s, axis=1, kind="stable")
    best = order[:, 0]
    second = order[:, 1] if s.shape[1] > 1 else best
    rows = np.arange(len(s))
    margin = s[rows, best] - (s[rows, second] if s.shape[1] > 1 else 0.0)
    return Scores(scores=s, best=best, second=second, margin=margin, labels=(s >= threshold) if multi_label else None)
