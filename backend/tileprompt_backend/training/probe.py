"""Frozen-feature probes of an image backbone on a labelled dataset: k-nearest-neighbour and linear (logistic
regression) classifiers, scikit-learn's, fitted on one split and scored on another.

The usual read-out of self-supervised features (CMID paper Table VII reports linear-probe OA). Multi-class tasks
score top-1 accuracy (``metrics.top1_accuracy``), multi-label tasks macro mAP (``metrics.mean_average_precision``;
kNN scores are the neighbours' label shares, the linear probe is one logistic regression per class). Features are
L2-normalised for kNN (cosine distance) and standardised for the linear probe.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data.shards import DatasetSpec
from .data.stream import eval_samples
from .inputs import model_input
from .metrics import mean_average_precision, top1_accuracy

DEFAULT_K = 10


@dataclass
class Features:
    x: np.ndarray  # (N, D) float32
    y: list  # per sample: class index or multi-hot
    keys: list[str]


def dataset_features(embed: Callable[[torch.Tensor], torch.Tensor], model, spec: DatasetSpec, split: str,
                     device: torch.device | str = "cpu", batch_size: int = 64, limit: int | None = None) -> Features:
    """Features of every labelled sample of ``split``: raw tile -> ``model``'s preprocessing -> ``embed``."""
    xs, ys, keys, pending = [], [], [], []

    def flush() -> None:
        if not pending:
            return
        x = model_input(model, [s.image for s in pending], [s.info() for s in pending], device)
        with torch.inference_mode():
            xs.append(embed(x).float().cpu().numpy())
        ys.extend(s.target for s in pending)
        keys.extend(s.key for s in pending)
        pending.clear()

    for _, sample in eval_samples(spec, split, limit=limit):
        if sample.target is None:
            continue
        pending.append(sample)
        if len(pending) == batch_size:
            flush()
    flush()
    if not xs:
        raise ValueError(f"dataset {spec.root}: split {split!r} has no labelled samples to probe")
    return Features(np.concatenate(xs), ys, keys)


def band_statistics(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) model input -> (N, 2C) per-band mean and standard deviation: the no-learning baseline."""
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def _score(scores: np.ndarray, y: Sequence, task: str, n_classes: int) -> float:
    if task == "multi-label":
        return mean_average_precision(scores, np.stack(y)).value
    return top1_accuracy(scores, np.asarray(y), n_classes).value


def knn_score(train: Features, test: Features, task: str, n_classes: int, k: int = DEFAULT_K) -> float:
    """Accuracy (multi-class) or mAP (multi-label) of a k-NN vote with cosine distance, distance-weighted."""
    from sklearn.neighbors import KNeighborsClassifier

    k = max(1, min(k, len(train.x)))
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance")
    if task == "multi-label":
        clf.fit(train.x, np.stack(train.y))
        scores = np.stack([p[:, 1] if p.shape[1] > 1 else np.zeros(len(test.x)) for p in clf.predict_proba(test.x)],
                          axis=1)
    else:
        clf.fit(train.x, np.asarray(train.y))
        scores = np.full((len(test.x), n_classes), 0.0)
        scores[:, clf.classes_] = clf.predict_proba(test.x)
    return _score(scores, test.y, task, n_classes)


def linear_probe_score(train: Features, test: Features, task: str, n_classes: int, c: float = 1.0) -> float:
    """Accuracy (multi-class) or mAP (multi-label) of L2-regularised logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    base = LogisticRegression(C=c, max_iter=2000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on tiny or separable sets
        if task == "multi-label":
            y = np.stack(train.y)
            keep = (y.sum(0) > 0) & (y.sum(0) < len(y))  # a class all or nothing in train cannot be fitted
            scores = np.zeros((len(test.x), n_classes))
            if keep.any():
                clf = make_pipeline(StandardScaler(), OneVsRestClassifier(base)).fit(train.x, y[:, keep])
                scores[:, keep] = clf.predict_proba(test.x)
        else:
            y = np.asarray(train.y)
            scores = np.zeros((len(test.x), n_classes))
            if len(set(y.tolist())) == 1:
                scores[:, y[0]] = 1.0
            else:
                clf = make_pipeline(StandardScaler(), base).fit(train.x, y)
                scores[:, clf.classes_] = clf.predict_proba(test.x)
    return _score(scores, test.y, task, n_classes)


def probe(train: Features, test: Features, task: str, n_classes: int, k: int = DEFAULT_K) -> dict[str, float]:
    """Both probes; the metric is accuracy for multi-class tasks, mAP for multi-label ones."""
    if task not in ("multi-class", "multi-label"):
        raise ValueError(f"probing needs a labelled dataset (task {task!r})")
    return {"knn": knn_score(train, test, task, n_classes, k),
            "linear": linear_probe_score(train, test, task, n_classes),
            "metric": "accuracy" if task == "multi-class" else "mAP", "train": len(train.x), "test": len(test.x)}
