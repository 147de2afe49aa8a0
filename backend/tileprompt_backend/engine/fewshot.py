"""Few-shot correction of the zero-shot head: a few labelled tiles re-weight the classifier, no model training.

Both corrections act on L2-normalised tile embeddings ``x`` and return a :class:`LinearHead` (logits
``x @ weight.T + bias``); the zero-shot head is ``LinearHead(logit_scale * T, 0)`` for the (C, D) class text
embeddings ``T`` (engine.head). With no examples both return exactly the zero-shot head.

- :func:`prototype_head` - class prototypes from the examples blended with the text head:
  ``w_c = normalize((1 - a_c) t_c + a_c gap_shift(p_c))``, ``a_c = n_c / (n_c + kappa)``; the text head counts as
  ``kappa`` virtual examples, so one example nudges a class and ten dominate it.
- :func:`probe_head` - a logistic-regression probe initialised from the text head and held near it:
  ``min_W,b  mean_i balanced CE(W x_i + b, y_i) + lam/2 ||W/s - W0/s||^2 + lam/2 ||b/s||^2``, fitted with
  L-BFGS (the objective is convex, so the fit is deterministic).

Image and text embeddings of CLIP-like models sit in different cones of the sphere (the "modality gap"): an image
prototype has cosine ~0.8 with images of its class, a text embedding ~0.3. A raw prototype would win every tile
for its class; :func:`gap_shift` moves prototypes into the text cone first (``p - mean image + mean text``), so
classes with and without examples compete on the same scale. A class that only the examples name (no prompt)
gets its shifted prototype as its head row. Which of the two corrections the engine uses was chosen by
measurement (benchmarks/bench_fewshot_change.py, docs/corrections.md): :data:`DEFAULT_METHOD`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .head import l2_normalize, logits

METHODS = ("prototype", "probe")
DEFAULT_METHOD = "probe"
#: Virtual examples the text head is worth in the prototype blend.
PROTOTYPE_KAPPA = 4.0
#: Strength of the pull of the probe towards its text-head initialisation (per unit-norm class row).
PROBE_LAMBDA = 0.1
PROBE_MAX_ITER = 100


@dataclass(frozen=True)
class LinearHead:
    """Logits ``scale * (x @ weight.T) + bias`` for unit tile embeddings ``x`` ((N, D) -> (N, C)).

    The zero-shot head is ``LinearHead(T, logit_scale, 0)``, so its logits are exactly engine.head.logits's.
    """

    weight: np.ndarray  # (C, D) float32, rows near unit length
    scale: float
    bias: np.ndarray  # (C,) float32

    def logits(self, x: np.ndarray) -> np.ndarray:
        return logits(x, self.weight, self.scale) + self.bias


def zero_shot_linear(text_head: np.ndarray, logit_scale: float) -> LinearHead:
    """The zero-shot classifier as a linear head: ``logit_scale x cosine(x, t_c)`` (engine.head.logits)."""
    text_head = np.asarray(text_head, dtype=np.float32)
    return LinearHead(text_head, float(logit_scale), np.zeros(len(text_head), dtype=np.float32))


def class_prototypes(x: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(C, D) normalised mean of each class's unit example embeddings, and (C,) example counts (0 -> zero row)."""
    x = l2_normalize(np.asarray(x, dtype=np.float64))
    y = np.asarray(y, dtype=np.int64)
    sums = np.zeros((n_classes, x.shape[1]))
    np.add.at(sums, y, x)
    counts = np.bincount(y, minlength=n_classes)
    protos = np.where(counts[:, None] > 0, l2_normalize(sums), 0.0)
    return protos, counts


def gap_shift(prototypes: np.ndarray, image_mean: np.ndarray, text_mean: np.ndarray) -> np.ndarray:
    """Image prototypes moved across the modality gap: ``normalize(p - image_mean + text_mean)`` per row.

    ``image_mean`` is the mean unit embedding of the tiles being classified, ``text_mean`` that of the prompt
    classes' text embeddings (neither re-normalised).
    """
    return l2_normalize(np.asarray(prototypes, np.float64) - np.asarray(image_mean, np.float64)
                        + np.asarray(text_mean, np.float64))


def _prior_rows(text_head: np.ndarray, has_text: np.ndarray, shifted: np.ndarray) -> np.ndarray:
    """Unit rows the correction starts from: the text embedding, or (classes without a prompt) the prototype."""
    return np.where(np.asarray(has_text)[:, None], np.asarray(text_head, np.float64), shifted)


def prototype_head(text_head: np.ndarray, logit_scale: float, x: np.ndarray, y: np.ndarray, *,
                   image_mean: np.ndarray, has_text: np.ndarray | None = None,
                   kappa: float = PROTOTYPE_KAPPA) -> LinearHead:
    """Text head blended with the examples' class prototypes (see the module docstring).

    ``text_head`` (C, D) unit rows (rows of classes without a prompt are ignored: ``has_text`` False);
    ``x`` (n, D) example embeddings, ``y`` (n,) their class indices; ``image_mean`` (D,) the mean tile embedding.
    """
    text_head = np.asarray(text_head, dtype=np.float64)
    n_classes = len(text_head)
    has_text = np.ones(n_classes, bool) if has_text is None else np.asarray(has_text, bool)
    if len(y) == 0:
        return zero_shot_linear(text_head, logit_scale)
    protos, counts = class_prototypes(x, y, n_classes)
    shifted = gap_shift(protos, image_mean, text_head[has_text].mean(axis=0))
    alpha = np.where(has_text, counts / (counts + kappa), 1.0)[:, None]
    rows = np.where(counts[:, None] > 0, l2_normalize((1 - alpha) * text_head + alpha * shifted), text_head)
    return zero_shot_linear(rows, logit_scale)


def probe_head(text_head: np.ndarray, logit_scale: float, x: np.ndarray, y: np.ndarray, *,
               image_mean: np.ndarray, has_text: np.ndarray | None = None, lam: float = PROBE_LAMBDA,
               max_iter: int = PROBE_MAX_ITER) -> LinearHead:
    """Logistic-regression probe initialised from (and held near) the text head (see the module docstring).

    Classes weigh equally in the loss whatever their number of examples. Classes without a prompt start
    from their gap-shifted prototype.
    """
    import torch

    text_head = np.asarray(text_head, dtype=np.float64)
    n_classes = len(text_head)
    has_text = np.ones(n_classes, bool) if has_text is None else np.asarray(has_text, bool)
    if len(y) == 0:
        return zero_shot_linear(text_head, logit_scale)
    protos, counts = class_prototypes(x, y, n_classes)
    shifted = gap_shift(protos, image_mean, text_head[has_text].mean(axis=0))
    prior = _prior_rows(text_head, has_text, shifted)
    s = float(logit_scale)

    xt = torch.from_numpy(l2_normalize(np.asarray(x, dtype=np.float64)))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    present = counts > 0
    sample_w = torch.from_numpy(1.0 / (counts[np.asarray(y)] * present.sum()))  # classes weigh equally
    w0 = torch.from_numpy(prior)
    # optimise the offsets from the prior, in units of the unit-norm rows: well scaled for any logit_scale
    dw = torch.zeros_like(w0, requires_grad=True)
    db = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([dw, db], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = s * (xt @ (w0 + dw).T + db)
        ce = torch.nn.functional.cross_entropy(logits, yt, reduction="none")
        loss = (sample_w * ce).sum() + 0.5 * lam * (dw.pow(2).sum() + db.pow(2).sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    weight = prior + dw.detach().numpy()
    return LinearHead(weight.astype(np.float32), s, (s * db.detach().numpy()).astype(np.float32))


def fit_correction(method: str, text_head: np.ndarray, logit_scale: float, x: np.ndarray, y: np.ndarray, *,
                   image_mean: np.ndarray, has_text: np.ndarray | None = None) -> LinearHead:
    """The correction named ``method`` (:data:`METHODS`) with its default parameters."""
    if method == "prototype":
        return prototype_head(text_head, logit_scale, x, y, image_mean=image_mean, has_text=has_text)
    if method == "probe":
        return probe_head(text_head, logit_scale, x, y, image_mean=image_mean, has_text=has_text)
    raise ValueError(f"unknown few-shot method {method!r} (valid: {', '.join(METHODS)})")
