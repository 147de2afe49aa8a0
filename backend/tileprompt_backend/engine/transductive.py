"""Context-aware (transductive) zero-shot: refine every tile's class probabilities with the layer's other tiles.

Training-free, in the family of TransCLIP (Zanella et al., NeurIPS 2024) and its remote-sensing use RS-TransCLIP
(El Khoury et al., ICASSP 2025): the zero-shot probabilities ``y_hat`` of the N tiles of one run are replaced by
assignments ``z`` (rows on the simplex) that minimise

    sum_i KL(z_i || y_hat_i)                                   stay close to what the text says
  - tau * sum_i z_i . log N(x_i; mu_k, diag(sigma^2))          a Gaussian mixture over the tile embeddings
  + gamma/2 * sum_ij w_ij ||z_i - z_j||^2                      spatial neighbours that look alike agree

by block majorize-minimize: ``z`` updates (5 per round) ``z_i ~ y_hat_i * exp(tau log N_i + gamma sum_j w_ij
(z_j - z_i))``, then the class means ``mu_k`` (z-weighted means, re-normalised as TransCLIP does) and the shared
diagonal variance; 10 rounds. Means start from the 8 most confident tiles of each class, the variance at 1/D,
tau = 1/50 (TransCLIP's temperature). The graph: each tile and its 8 grid neighbours,
``w_ij = max(cos(x_i, x_j), 0) / 8``.

Deviations from TransCLIP, on purpose: (1) the graph joins spatial neighbours on the tile grid instead of the 3
nearest tiles in embedding space over the whole set (which costs N^2 D: 5e12 operations at 1e5 tiles); the
mixture term still brings the whole layer's structure in. (2) The Laplacian term is the centred
``||z_i - z_j||^2`` instead of ``-z_i . z_j``: a layer whose tiles are all alike carries no information beyond
the text, and the centred form leaves it exactly unchanged (``-z_i . z_j`` would sharpen every tile towards its
top class). Results are probabilities: every row is a softmax.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .head import l2_normalize

ROUNDS = 10
Z_STEPS = 5
GMM_TEMPERATURE = 1.0 / 50.0
NEIGHBOUR_WEIGHT = 1.0
CONFIDENT_PER_CLASS = 8
VARIANCE_FLOOR = 1e-6
#: The 8 grid neighbours of a tile (row, col offsets).
NEIGHBOURS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]


@dataclass
class Refinement:
    probabilities: np.ndarray  # (N, C), rows sum to 1
    changed: int  # tiles whose top class changed
    seconds: float
    rounds: int = ROUNDS
    neighbour_pairs: int = 0  # directed edges of the spatial graph


def grid_neighbours(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(N, 8) index of each tile's grid neighbour at each of :data:`NEIGHBOURS` among the given tiles, -1 if none."""
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    out = np.full((len(rows), len(NEIGHBOURS)), -1, dtype=np.int64)
    if len(rows) == 0:
        return out
    width = int(cols.max()) + 3  # a margin column so that offsets never wrap into another row
    key = (rows + 1) * width + (cols + 1)
    order = np.argsort(key)
    sorted_keys = key[order]
    for k, (dr, dc) in enumerate(NEIGHBOURS):
        want = key + dr * width + dc
        pos = np.clip(np.searchsorted(sorted_keys, want), 0, len(key) - 1)
        hit = sorted_keys[pos] == want
        out[hit, k] = order[pos[hit]]
    return out


def _log_likelihood(x: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """(N, K) ``-1/2 sum_d (x_d - mu_kd)^2 / var_d`` (the Gaussian log-density up to a constant shared by all k)."""
    inv = 1.0 / var
    cross = (x @ (mu * inv).T.astype(x.dtype)).astype(np.float64)
    return -0.5 * (((x * x) @ inv.astype(x.dtype)).astype(np.float64)[:, None] - 2.0 * cross
                   + ((mu * mu) @ inv)[None, :])


def _softmax_rows(a: np.ndarray) -> np.ndarray:
    a = a - a.max(axis=1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=1, keepdims=True)


def refine(y_hat: np.ndarray, x: np.ndarray, rows: np.ndarray, cols: np.ndarray, *, rounds: int = ROUNDS,
           z_steps: int = Z_STEPS, tau: float = GMM_TEMPERATURE, gamma: float = NEIGHBOUR_WEIGHT) -> Refinement:
    """Transductive refinement of (N, C) probabilities ``y_hat`` for tiles with embeddings ``x`` (N, D) at grid
    positions ``rows``, ``cols`` (see the module docstring). Returns probabilities (rows sum to 1)."""
    t0 = time.perf_counter()
    y_hat = np.asarray(y_hat, dtype=np.float64)
    n, c = y_hat.shape
    if n < 2 or c < 2:
        return Refinement(y_hat.copy(), 0, time.perf_counter() - t0, rounds=0)
    x = l2_normalize(np.asarray(x, dtype=np.float64))
    log_prior = np.log(np.clip(y_hat, 1e-300, None))
    nbr = grid_neighbours(rows, cols)
    present = nbr >= 0
    nbr = np.where(present, nbr, np.arange(n)[:, None])  # missing neighbours point at the tile itself, weight 0
    x32 = x.astype(np.float32)
    cosine = np.stack([np.einsum("id,id->i", x32, x32[nbr[:, k]]) for k in range(nbr.shape[1])], axis=1)
    w = np.where(present, np.maximum(cosine, 0.0), 0.0).astype(np.float64) / len(NEIGHBOURS)
    degree = w.sum(axis=1)

    def neighbour_term(z: np.ndarray) -> np.ndarray:
        return np.einsum("ik,ikc->ic", w, z[nbr]) - degree[:, None] * z  # sum_j w_ij (z_j - z_i)

    z = y_hat.copy()
    top = np.argsort(-z, axis=0)[:CONFIDENT_PER_CLASS]  # (8, C) most confident tiles per class
    mu = np.stack([z[top[:, k], k] @ x[top[:, k]] for k in range(c)])
    mu = l2_normalize(mu)
    var = np.full(x.shape[1], 1.0 / x.shape[1])
    x = x.astype(np.float32)  # the mixture's matrix products in float32: half the memory traffic
    squares = (x * x).sum(axis=0, dtype=np.float64)
    for _ in range(rounds):
        log_gmm = tau * _log_likelihood(x, mu, var)
        for _ in range(z_steps):
            z = _softmax_rows(log_prior + log_gmm + gamma * neighbour_term(z))
        mass = z.sum(axis=0)
        weighted = (z.T.astype(np.float32) @ x).astype(np.float64)
        mu = l2_normalize(weighted / np.maximum(mass, 1e-12)[:, None])
        # shared diagonal variance: sum_i sum_k z_ik (x_i - mu_k)^2 / N, expanded to stay O(N D + K D)
        var = (squares - 2.0 * (mu * weighted).sum(axis=0) + (mass[:, None] * mu * mu).sum(axis=0)) / n
        var = np.maximum(var, VARIANCE_FLOOR)
    changed = int((z.argmax(axis=1) != y_hat.argmax(axis=1)).sum())
    return Refinement(z, changed, time.perf_counter() - t0, rounds=rounds, neighbour_pairs=int(present.sum()))
