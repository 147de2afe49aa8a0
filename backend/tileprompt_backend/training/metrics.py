"""Evaluation metrics: zero-shot mAP (multi-label), top-1 accuracy (multi-class), cross-modal Recall@K, and
image-text retrieval Recall@K with mean recall (HarMA / RDB protocol).

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


#: The cut-offs of image-text retrieval (RSICD / RSITMD tables: R@1, R@5, R@10 and their mean mR).
RETRIEVAL_KS = (1, 5, 10)


#: Similarities closer than this count as equal (identical captions encoded in different batches differ by float noise).
TIE_TOLERANCE = 1e-6


def image_text_recall(images, texts, text_image, ks: Sequence[int] = RETRIEVAL_KS) -> dict:
    """Image->text and text->image Recall@K and mean recall of N images and their M captions (cosine).

    ``text_image[j]`` is the index of caption j's image. Image->text: an image's rank is that of its best-ranked
    own caption; text->image: a caption's rank is that of its image (HarMA's evaluation; RDB Eq. 15, HarMA Eq. 9:
    ``mR`` = the mean of the six recalls). Ties (similarities within ``TIE_TOLERANCE``, e.g. the same caption
    written for two images) are broken at random and R@K is its expectation over tie orders: counting ties for
    the query would credit a template caption shared by hundreds of tiles as found at rank 1 for all of them.
    """
    img = torch.nn.functional.normalize(_tensor(images, torch.float32), dim=-1)
    txt = torch.nn.functional.normalize(_tensor(texts, torch.float32), dim=-1)
    owner = _tensor(text_image, torch.long).reshape(-1)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1] or len(owner) != len(txt):
        raise ValueError(f"images {tuple(img.shape)}, texts {tuple(txt.shape)} and {len(owner)} caption owners "
                         "do not fit together")
    if len(img) == 0 or len(txt) == 0:
        raise ValueError("no images or no captions: recall is undefined")
    if int(owner.min()) < 0 or int(owner.max()) >= len(img):
        raise ValueError("a caption names an image index outside the images")
    if len(torch.unique(owner)) != len(img):
        raise ValueError("every image needs at least one caption")
    sims = (img @ txt.T).double()  # (N, M)
    own = torch.zeros_like(sims, dtype=torch.bool)
    own[owner, torch.arange(len(txt))] = True
    # image -> text: above = other captions more similar than the best own one; tied own / other captions
    best = sims.masked_fill(~own, float("-inf")).max(dim=1).values[:, None]
    tied = (sims - best).abs() <= TIE_TOLERANCE
    above = ((sims > best) & ~tied & ~own).sum(1)
    tied_own, tied_other = (tied & own).sum(1), (tied & ~own).sum(1)
    # text -> image: the same for a caption's one image
    mine = sims[owner, torch.arange(len(txt))][None, :]
    tied_t = (sims - mine).abs() <= TIE_TOLERANCE
    above_t = ((sims > mine) & ~tied_t).sum(0)
    out = {"i2t": {int(k): float(_first_in_top(above, tied_own, tied_other, k).mean()) for k in ks},
           "t2i": {int(k): float(_first_in_top(above_t, torch.ones_like(above_t), tied_t.sum(0) - 1, k).mean())
                   for k in ks},
           "images": len(img), "captions": len(txt)}
    out["mR"] = float(np.mean(list(out["i2t"].values()) + list(out["t2i"].values())))
    return out


def _first_in_top(above: torch.Tensor, tied_own: torch.Tensor, tied_other: torch.Tensor, k: int) -> torch.Tensor:
    """P(a positive is among the first k) when ``above`` items come first, then the tied group in random order.

    The first positive of the tied group lands within the top k unless the first ``m = k - above`` tied items
    are all others: 1 - C(others, m) / C(others + positives, m) (hypergeometric); 0 if m <= 0.
    """
    m = k - above
    n = tied_own + tied_other
    none_first = torch.ones(len(above), dtype=torch.float64)
    for i in range(k):
        factor = ((tied_other - i).clamp(min=0) / (n - i).clamp(min=1)).double()
        none_first = torch.where(i < m, none_first * factor, none_first)
    return torch.where(m > 0, 1.0 - none_first, torch.zeros_like(none_first))
