"""Evaluation metrics: zero-shot mAP (multi-label), top-1 accuracy (multi-class), cross-modal Recall@K.

Average precision is torchmetrics' (exact, no thresholds). Classes without a single positive sample have no
defined AP and are left out of the macro mean, as the reference code's torchmetrics did (it returned NaN for
them and skipped them with a warning); torchmetrics >= 1.x instead scores such a class 0 and averages it in,
which would make mAP depend on how many absent classes a test split happens to have. We report how many
classes were left out. Mind the Modality Gap §IV-B; torchmetrics ``multilabel_average_precision``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

#: The retrieval cut-offs of Mind the Modality Gap (Table II reports 1, 5, 10, 20; the code also logs 50).
RECALL_KS = (1, 5, 10, 20, 50)


@dataclass
class ClassScores:
    """A classification metric overall and per class (None where a class has no positives / no samples)."""

    name: str  # "mAP" | "accuracy"
    value: float  # in [0, 1]
    per_class: list[float | None]
    support: list[int]  # positives (multi-label) or samples (multi-class) per class
    ignored: int = 0  # classes left out of the mean (no positives)


def _tensor(x, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def mean_average_precision(scores, targets) -> ClassScores:
    """Macro mAP of (N, C) scores (logits or probabilities) against (N, C) multi-hot targets.

    Classes without positives are ignored (see the module docstring); if no class has a positive, ValueError.
    """
    from torchmetrics.functional.classification import multilabel_average_precision

    s, t = _tensor(scores, torch.float32), _tensor(targets, torch.long)
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"scores {tuple(s.shape)} and targets {tuple(t.shape)} must both be (N, C)")
    support = t.sum(dim=0).tolist()
    keep = [i for i, n in enumerate(support) if n > 0]
    if not keep:
        raise ValueError("no class has a positive sample: mAP is undefined")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about the classes we already left out
        ap = multilabel_average_precision(s[:, keep], t[:, keep], num_labels=len(keep), average=None,
                                          thresholds=None)
    per_class: list[float | None] = [None] * s.shape[1]
    for i, v in zip(keep, ap.tolist()):
        per_class[i] = float(v)
    return ClassScores("mAP", float(np.mean([per_class[i] for i in keep])), per_class, [int(n) for n in support],
                       ignored=s.shape[1] - len(keep))


def top1_accuracy(scores, labels, n_classes: int | None = None) -> ClassScores:
    """Top-1 (micro) accuracy of (N, C) scores against (N,) class indices; per class: recall of that class."""
    s, y = _tensor(scores, torch.float32), _tensor(labels, torch.long).reshape(-1)
    if s.ndim != 2 or len(s) != len(y):
        raise ValueError(f"scores {tuple(s.shape)} must be (N, C) for {len(y)} labels")
    if len(y) == 0:
        raise ValueError("no samples: accuracy is undefined")
    c = n_classes or s.shape[1]
    pred = s.argmax(dim=1)
    support = torch.bincount(y, minlength=c).tolist()
    correct = torch.bincount(y[pred == y], minlength=c).tolist()
    per_class = [correct[i] / support[i] if support[i] else None for i in range(c)]
    return ClassScores("accuracy", float((pred == y).float().mean()), per_class, [int(n) for n in support])


def recall_at_k(queries, gallery, ks: Sequence[int] = RECALL_KS, chunk: int = 4096) -> dict[int, float]:
    """Recall@K of paired embeddings: query i's one positive is gallery item i; cosine similarity.

    The rank of the positive is the number of gallery items strictly more similar to the query (ties count in
    the positive's favour). R@K = share of queries whose positive ranks below K. The whole gallery is searched,
    as in Mind the Modality Gap §IV-B ("A -> B": rank B items for each A query).
    """
    q = torch.nn.functional.normalize(_tensor(queries, torch.float32), dim=-1)
    g = torch.nn.functional.normalize(_tensor(gallery, torch.float32), dim=-1)
    if q.ndim != 2 or q.shape != g.shape:
        raise ValueError(f"queries {tuple(q.shape)} and gallery {tuple(g.shape)} must be paired (N, D) embeddings")
    if len(q) == 0:
        raise ValueError("no embeddings: recall is undefined")
    ranks = torch.empty(len(q), dtype=torch.long)
    for start in range(0, len(q), chunk):
        sims = q[start:start + chunk] @ g.T
        own = sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))]
        ranks[start:start + len(sims)] = (sims > own[:, None]).sum(dim=1)
    return {int(k): float((ranks < k).float().mean()) for k in ks}


def cross_modal_recall(ms, rgb, ks: Sequence[int] = RECALL_KS) -> dict[str, dict[int, float]]:
    """Both directions of Mind the Modality Gap's retrieval protocol on paired tiles.

    ``ms_to_rgb``: each multispectral embedding queries the RGB gallery (rows of S = MS RGB^T; the reference's
    ``image_rgb_retrieval_recall``); ``rgb_to_ms``: each RGB embedding queries the MS gallery (columns).
    """
    return {"ms_to_rgb": recall_at_k(ms, rgb, ks), "rgb_to_ms": recall_at_k(rgb, ms, ks)}


def chance_recall(n: int, ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """Recall@K of a random ranking over a gallery of ``n``: K / n (capped at 1)."""
    return {int(k): min(1.0, k / n) if n else math.nan for k in ks}
