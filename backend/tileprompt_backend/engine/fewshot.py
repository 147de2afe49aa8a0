"""Few-shot correction of the zero-shot head: a few labelled tiles re-weight the classifier, no model training.

Both corrections act on L2-normalised tile embeddings ``x`` and return a :class:`LinearHead` (logits
``logit_scale * (x @ weight.T) + bias``); the zero-shot head is ``LinearHead(T, logit_scale, 0)`` for the (C, D)
class text embeddings ``T`` (engine.head). With no examples both return exactly the zero-shot head.

Image prototypes cannot be compared with text embeddings as they are: CLIP-like models put image and text
embeddings in different cones of the sphere (the "modality gap": cosine ~0.8 between images of a class, ~0.25
between an image and its class text), and an untrained or narrow encoder may put every tile within a degree of
every other. :func:`prototype_expert` therefore builds each class's prototype score in the layer's own frame:

    proto_c(x) = m . t + rho * (x - m) . q_c / r,    q_c = normalize(p_c - m)

with ``p_c`` the normalised mean of the class's examples, ``m`` the mean tile embedding of the layer, ``r`` the
mean distance of a tile from ``m`` (so the centred cosine spans about -1..1), ``rho`` the ratio of how far apart
the classes' scores of a tile are (standard deviation around the tile's mean over classes, over the layer's
tiles) for the text head and for the centred prototypes - so that both experts separate classes by as much -
and ``m . t`` the mean text score over the layer and the prompt classes (a common base: the class priors of the
text head fade with the text head's weight). It is linear in ``x``, hence a head row and a bias.

- :func:`prototype_head` - the text head blended with the prototypes by example count:
  ``logit_c = s * ((1 - a_c) x . t_c + a_c proto_c(x))``, ``a_c = n_c / (n_c + kappa)``: the text head counts as
  ``kappa`` virtual examples, so one example nudges a class and ten dominate it.
- :func:`probe_head` - a logistic-regression probe started from the text head (prototype rows for classes
  without a prompt) and held near it: ``min mean_i balanced CE(logits_i, y_i) + lam/2 ||dW||^2 + lam/2 ||db||^2``
  for ``W = s (W0 + dW)``, ``b = s (b0 + db)``, fitted with L-BFGS (convex: deterministic).

Which one the engine uses was chosen by measurement (benchmarks/bench_fewshot_change.py, docs/corrections.md):
:data:`DEFAULT_METHOD`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .head import inverse_norms, l2_normalize, logits

METHODS = ("prototype", "probe")
DEFAULT_METHOD = "prototype"
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


def _class_gaps(scores: np.ndarray) -> float:
    """How far apart the classes' scores of a tile are: standard deviation around each tile's mean score."""
    return float(np.std(scores - scores.mean(axis=1, keepdims=True))) if scores.size else 0.0


def prototype_expert(text_head: np.ndarray, has_text: np.ndarray, protos: np.ndarray, tiles: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Row and bias of each class's prototype score ``proto_c(x) = row_c . x + bias_c`` (module docstring).

    ``protos`` (C, D) unit class prototypes (zero rows: no examples), ``tiles`` (N, D) the layer's embeddings.
    """
    # two passes over the raw float32 tiles (their norms and mean, then one product with every row needed),
    # divided by the norms: no (N, D) copy of 1e5 tiles (200-400 MB) is made
    x = np.asarray(tiles, dtype=np.float32)
    inv = inverse_norms(x)
    m = (inv @ x).astype(np.float64) / len(x)  # the mean unit tile
    with_examples = np.linalg.norm(protos, axis=1) > 0
    q = np.where(with_examples[:, None], l2_normalize(protos - m), 0.0)
    text, qe = np.asarray(text_head, np.float64)[has_text], q[with_examples]
    directions = np.vstack([m[None], text, qe]).astype(np.float32)
    products = (x @ directions.T).astype(np.float64) * inv[:, None]  # (N, 1 + classes with text + with examples)
    x_m, x_text, x_q = products[:, 0], products[:, 1:1 + len(text)], products[:, 1 + len(text):]
    # |x - m| of unit tiles is sqrt(1 - 2 x.m + |m|^2): one product instead of the (N, D) difference
    r = max(float(np.sqrt(np.maximum(1.0 - 2.0 * x_m + m @ m, 0.0)).mean()), 1e-12)
    base = float((text @ m).mean())
    text_gaps = _class_gaps(x_text)
    centred = (x_q - m @ qe.T) / r
    # one class with examples: its score's spread over the tiles is what separates it from the others
    proto_gaps = _class_gaps(centred) if with_examples.sum() > 1 else float(np.std(centred))
    rho = text_gaps / proto_gaps if proto_gaps > 0 and text_gaps > 0 else 1.0
    rows = rho * q / r
    return rows, base - rows @ m


def prototype_head(text_head: np.ndarray, logit_scale: float, x: np.ndarray, y: np.ndarray, *, tiles: np.ndarray,
                   has_text: np.ndarray | None = None, kappa: float = PROTOTYPE_KAPPA) -> LinearHead:
    """The text head blended with the examples' calibrated class prototypes (see the module docstring).

    ``text_head`` (C, D) unit rows (rows of classes without a prompt are ignored: ``has_text`` False);
    ``x`` (n, D) example embeddings, ``y`` (n,) their class indices; ``tiles`` (N, D) the layer's embeddings.
    """
    text_head = np.asarray(text_head, dtype=np.float64)
    has_text = np.ones(len(text_head), bool) if has_text is None else np.asarray(has_text, bool)
    if len(y) == 0:
        return zero_shot_linear(text_head, logit_scale)
    protos, counts = class_prototypes(x, y, len(text_head))
    rows, bias = prototype_expert(text_head, has_text, protos, tiles)
    alpha = np.where(has_text, counts / (counts + kappa), 1.0)
    weight = (1 - alpha)[:, None] * np.where(has_text[:, None], text_head, 0.0) + alpha[:, None] * rows
    return LinearHead(weight.astype(np.float32), float(logit_scale),
                      (float(logit_scale) * alpha * bias).astype(np.float32))


def probe_head(text_head: np.ndarray, logit_scale: float, x: np.ndarray, y: np.ndarray, *, tiles: np.ndarray,
               has_text: np.ndarray | None = None, lam: float = PROBE_LAMBDA,
               max_iter: int = PROBE_MAX_ITER) -> LinearHead:
    """Logistic-regression probe initialised from (and held near) the text head (see the module docstring).

    Classes weigh equally in the loss whatever their number of examples. Classes without a prompt start
    from their calibrated prototype score.
    """
    import torch

    text_head = np.asarray(text_head, dtype=np.float64)
    n_classes = len(text_head)
    has_text = np.ones(n_classes, bool) if has_text is None else np.asarray(has_text, bool)
    if len(y) == 0:
        return zero_shot_linear(text_head, logit_scale)
    protos, counts = class_prototypes(x, y, n_classes)
    rows, bias = prototype_expert(text_head, has_text, protos, tiles)
    prior_w = np.where(has_text[:, None], text_head, rows)
    prior_b = np.where(has_text, 0.0, bias)
    s = float(logit_scale)

    xt = torch.from_numpy(l2_normalize(np.asarray(x, dtype=np.float64)))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    sample_w = torch.from_numpy(1.0 / (counts[np.asarray(y)] * (counts > 0).sum()))  # classes weigh equally
    w0, b0 = torch.from_numpy(prior_w), torch.from_numpy(prior_b)
    # optimise the offsets from the prior, in units of the unit-norm rows: well scaled for any logit_scale
    dw = torch.zeros_like(w0, requires_grad=True)
    db = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([dw, db], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = s * (xt @ (w0 + dw).T + b0 + db)
        ce = torch.nn.functional.cross_entropy(logits, yt, reduction="none")
        loss = (sample_w * ce).sum() + 0.5 * lam * (dw.pow(2).sum() + db.pow(2).sum())
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    # a problem this small runs faster on one thread; two threads spinning against numpy's BLAS threads on
    # a two-core machine made each fit 20x slower (measured: 14 s instead of 0.6 s under load)
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    weight = prior_w + dw.detach().numpy()
    return LinearHead(weight.astype(np.float32), s, (s * (prior_b + db.detach().numpy())).astype(np.float32))


def fit_correction(method: str, text_head: np.ndarray, logit_scale: float, x: np.ndarray, y: np.ndarray, *,
                   tiles: np.ndarray, has_text: np.ndarray | None = None) -> LinearHead:
    """The correction named ``method`` (:data:`METHODS`) with its default parameters."""
    if method == "prototype":
        return prototype_head(text_head, logit_scale, x, y, tiles=tiles, has_text=has_text)
    if method == "probe":
        return probe_head(text_head, logit_scale, x, y, tiles=tiles, has_text=has_text)
    raise ValueError(f"unknown few-shot method {method!r} (valid: {', '.join(METHODS)})")
