"""Few-shot correction and transductive refinement maths, on hand-made embeddings with closed-form expectations."""

from __future__ import annotations

import numpy as np
import pytest

from tileprompt_backend.engine.fewshot import (LinearHead, class_prototypes, fit_correction, probe_head,
                                               prototype_expert, prototype_head, zero_shot_linear)
from tileprompt_backend.engine.head import l2_normalize, logits, softmax
from tileprompt_backend.engine.transductive import NEIGHBOURS, grid_neighbours, refine


def unit(*v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


T = np.stack([unit(1, 0, 0, 0.2), unit(0, 1, 0, 0.2), unit(0, 0, 1, 0.2)])  # 3 classes in 4-d
SCALE = 100.0


def test_zero_shot_linear_head_gives_exactly_the_zero_shot_logits():
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    head = zero_shot_linear(T, SCALE)
    assert np.array_equal(head.logits(x), logits(x, T.astype(np.float32), SCALE))


@pytest.mark.parametrize("method", ["prototype", "probe"])
def test_correction_with_zero_examples_is_the_zero_shot_head(method):
    x = np.random.default_rng(1).normal(size=(30, 4)).astype(np.float32)
    head = fit_correction(method, T, SCALE, np.zeros((0, 4)), np.zeros(0, np.int64), tiles=x)
    assert np.array_equal(head.logits(x), zero_shot_linear(T, SCALE).logits(x))


def test_class_prototypes_are_normalised_means_of_unit_examples():
    x = np.array([[3.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 0, 2.0]])
    protos, counts = class_prototypes(x, np.array([0, 0, 2]), 3)
    assert counts.tolist() == [2, 0, 1]
    assert np.allclose(protos[0], [2 ** -0.5, 2 ** -0.5, 0, 0])  # mean of (1,0,0,0) and (0,1,0,0), normalised
    assert np.allclose(protos[1], 0) and np.allclose(protos[2], [0, 0, 0, 1])


# Two tiles, two classes: m = (.5, .5, 0, 0), r = |tile - m| = sqrt(.5); one class-0 example at tile 1 gives
# q_0 = normalize(tile1 - m) = (1, -1, 0, 0)/sqrt(2), centred prototype scores +1 (tile 1) and -1 (tile 2), spread 1.
# Text scores x . t: tile 1 (0, .6), tile 2 (0, 0); around each tile's mean: (-.3, .3), (0, 0): spread .3/sqrt(2);
# their mean (the common base) .15.
TILES = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
TEXT = np.array([[0, 0, 1.0, 0], [0.6, 0, 0.8, 0]])
RHO = 0.3 / np.sqrt(2)


def test_the_prototype_expert_in_closed_form():
    protos = np.array([[1.0, 0, 0, 0], [0, 0, 0, 0]])
    rows, bias = prototype_expert(TEXT, np.array([True, True]), protos, TILES)
    proto = TILES @ rows.T + bias
    assert np.allclose(proto[:, 0], [0.15 + RHO, 0.15 - RHO])  # the common base, centred score +-1 scaled by rho
    assert np.allclose(rows[1], 0) and np.isclose(bias[1], 0.15)  # no examples: only the base


def test_prototype_head_blends_text_and_prototype_by_example_count():
    head = prototype_head(TEXT, SCALE, TILES[:1], np.array([0]), tiles=TILES, kappa=2.0)
    a = 1 / (1 + 2.0)
    expected0 = SCALE * ((1 - a) * (TILES @ TEXT[0]) + a * (0.15 + np.array([RHO, -RHO])))
    logits = head.logits(TILES.astype(np.float32))
    assert np.allclose(logits[:, 0], expected0, atol=1e-4)
    assert np.allclose(logits[:, 1], SCALE * (TILES @ TEXT[1]), atol=1e-4)  # no examples: the text row
    assert head.scale == SCALE


def test_a_class_without_a_prompt_scores_by_its_prototype_at_the_common_base():
    text = np.vstack([TEXT, np.zeros(4)])
    has_text = np.array([True, True, False])
    head = prototype_head(text, SCALE, TILES[1:], np.array([2]), tiles=TILES, has_text=has_text)
    logits = head.logits(TILES.astype(np.float32))
    assert np.allclose(logits[:, 2], SCALE * (0.15 + np.array([-RHO, RHO])), atol=1e-4)
    rng = np.random.default_rng(2)
    tiles = l2_normalize(rng.normal(size=(50, 4)) + [0, 0, 0, 3.0])
    probe = probe_head(text, SCALE, tiles[:3], np.array([2, 2, 2]), tiles=tiles, has_text=has_text)
    assert (probe.logits(tiles[:3]).argmax(axis=1) == 2).all()


def probe_objective(head: LinearHead, prior: np.ndarray, x, y, lam: float) -> float:
    """The probe's loss at ``head``: class-balanced cross-entropy + lam/2 (||W/s - prior||^2 + ||b/s||^2)."""
    z = head.logits(x).astype(np.float64)
    p = softmax(z)
    counts = np.bincount(y, minlength=len(prior))
    w = 1.0 / (counts[y] * (counts > 0).sum())
    ce = -(w * np.log(p[np.arange(len(y)), y])).sum()
    return ce + 0.5 * lam * (((head.weight - prior) ** 2).sum() + ((head.bias / head.scale) ** 2).sum())


def test_probe_is_a_stationary_point_of_its_objective():
    rng = np.random.default_rng(3)
    x = l2_normalize(rng.normal(size=(12, 4)))
    y = np.array([0, 1, 2] * 4)
    lam = 0.5
    head = probe_head(T, 10.0, x, y, tiles=x, lam=lam, max_iter=500)
    base = probe_objective(head, T, x, y, lam)
    # a step along any coordinate of the weights or the bias raises the loss by at least its curvature term
    # lam/2 step^2 (strictly convex objective: the fit is its minimum; float32 rounding of the head is far below)
    for c in range(3):
        for d in range(4):
            for step in (1e-2, -1e-2):
                w = head.weight.astype(np.float64).copy()
                w[c, d] += step
                moved = LinearHead(w, head.scale, head.bias)
                assert probe_objective(moved, T, x, y, lam) >= base + 0.4 * lam * step ** 2
        for step in (0.1, -0.1):
            b = head.bias.astype(np.float64).copy()
            b[c] += step
            moved = LinearHead(head.weight, head.scale, b)
            assert probe_objective(moved, T, x, y, lam) >= base + 0.4 * lam * (step / head.scale) ** 2


def test_a_strong_prior_keeps_the_probe_at_the_text_head_and_a_weak_one_fits_the_examples():
    # examples that the text head gets wrong: class-0 examples look like text row 1 and vice versa
    x = np.array([[0, 1.0, 0, 0.1], [0.1, 1.0, 0, 0], [1.0, 0, 0, 0.1], [1.0, 0.1, 0, 0]])
    y = np.array([0, 0, 1, 1])
    strong = probe_head(T, SCALE, x, y, tiles=x, lam=1e6)
    assert np.allclose(strong.weight, T, atol=1e-4) and np.allclose(strong.bias, 0, atol=1e-2)
    weak = probe_head(T, SCALE, x, y, tiles=x, lam=1e-3)
    assert (weak.logits(x).argmax(axis=1) == y).all()
    assert (zero_shot_linear(T, SCALE).logits(x).argmax(axis=1) != y).all()


def test_grid_neighbours_of_a_small_grid():
    rows = np.array([0, 0, 0, 1, 1, 2])
    cols = np.array([0, 1, 2, 0, 2, 5])  # (1, 1) missing; (2, 5) alone
    nbr = grid_neighbours(rows, cols)
    as_sets = [{int(j) for j in row if j >= 0} for row in nbr]
    assert as_sets == [{1, 3}, {0, 2, 3, 4}, {1, 4}, {0, 1}, {1, 2}, set()]
    east = NEIGHBOURS.index((0, 1))
    assert nbr[0, east] == 1 and nbr[2, east] == -1


def test_transduction_leaves_a_layer_of_identical_tiles_unchanged():
    rng = np.random.default_rng(4)
    x = np.tile(rng.normal(size=(1, 16)), (30, 1))
    y_hat = np.tile(softmax(rng.normal(size=(1, 5)) * 3), (30, 1))
    rows, cols = np.divmod(np.arange(30), 6)
    out = refine(y_hat, x, rows, cols)
    assert np.allclose(out.probabilities, y_hat, atol=1e-9) and out.changed == 0


def test_transduction_keeps_probabilities_normalised_and_uses_the_neighbours():
    rng = np.random.default_rng(5)
    n_rows, n_cols, dim = 8, 8, 16
    rows, cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    left = cols < 4  # two regions, two looks
    centre = np.where(left[:, None], unit(*([1.0] + [0] * (dim - 1))), unit(*([0, 1.0] + [0] * (dim - 2))))
    x = l2_normalize(centre + 0.05 * rng.normal(size=(len(rows), dim)))
    y_hat = np.where(left[:, None], [0.8, 0.2], [0.2, 0.8])
    doubtful = 3 * n_cols + 1  # a tile of the left region that the text gets wrong, barely
    y_hat[doubtful] = [0.45, 0.55]
    out = refine(y_hat, x, rows, cols)
    assert np.allclose(out.probabilities.sum(axis=1), 1.0) and (out.probabilities >= 0).all()
    assert out.probabilities[doubtful].argmax() == 0 and out.changed >= 1
    assert (out.probabilities.argmax(axis=1) == np.where(left, 0, 1)).all()
