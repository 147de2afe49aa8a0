"""The zero-shot head against its closed form, and the single-/multi-label maths."""

import numpy as np
import pytest

from tileprompt_backend.engine.head import class_embedding, logits, score_tiles, zero_shot_head
from tileprompt_backend.engine.prompts import parse_prompts


class FakeTextEncoder:
    """Deterministic, NOT normalised vectors per text, so the test sees whether the head normalises."""

    def __init__(self, dim=8):
        self.dim = dim
        self.calls = []

    def vector(self, text):
        rng = np.random.default_rng(abs(hash(text)) % 2**32)
        return rng.normal(size=self.dim) * (1 + len(text))

    def __call__(self, texts):
        self.calls.append(list(texts))
        return np.stack([self.vector(t) for t in texts]).astype(np.float32)


def test_class_embedding_is_mean_of_normalised_then_renormalised():
    enc = FakeTextEncoder()
    templates = ["a photo of {}.", "satellite view of {}"]
    got = class_embedding(enc, ("forest", "woodland"), templates)
    texts = ["a photo of forest.", "satellite view of forest", "a photo of woodland.", "satellite view of woodland"]
    assert enc.calls == [texts]
    v = np.stack([enc.vector(t) for t in texts])
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    expected = v.mean(0) / np.linalg.norm(v.mean(0))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-6)


def test_head_rows_follow_classes():
    enc = FakeTextEncoder()
    classes = parse_prompts("forest | woodland; water")
    head = zero_shot_head(enc, classes, ["{}"])
    assert head.shape == (2, 8)
    np.testing.assert_allclose(head[1], enc.vector("water") / np.linalg.norm(enc.vector("water")), atol=1e-6)


def test_logits_are_scaled_cosines():
    img = np.array([[3.0, 4.0], [1.0, 0.0]], dtype=np.float32)  # not normalised on purpose
    head = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(logits(img, head, 100.0), [[60.0, 80.0], [100.0, 0.0]], atol=1e-4)


def test_single_label_softmax_margin_and_second():
    z = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    s = score_tiles(z)
    e = np.exp([2.0, 1.0, 0.0])
    np.testing.assert_allclose(s.scores[0], e / e.sum(), atol=1e-12)
    np.testing.assert_allclose(s.scores.sum(1), 1.0)
    assert list(s.best) == [0, 2] and list(s.second) == [1, 0]
    assert s.margin[0] == pytest.approx((e[0] - e[1]) / e.sum())
    assert s.labels is None


def test_multi_label_sigmoid_threshold_and_bias():
    z = np.array([[2.0, -1.0, 0.5]])
    s = score_tiles(z, multi_label=True, threshold=0.6)
    np.testing.assert_allclose(s.scores[0], 1 / (1 + np.exp(-z[0])), atol=1e-12)
    assert s.labels.tolist() == [[True, False, True]]
    shifted = score_tiles(z, multi_label=True, threshold=0.6, logit_bias=-2.0)
    np.testing.assert_allclose(shifted.scores[0], 1 / (1 + np.exp(-(z[0] - 2.0))), atol=1e-12)
    assert shifted.labels.tolist() == [[False, False, False]]


def test_extreme_logits_do_not_overflow():
    s = score_tiles(np.array([[1e4, -1e4]]), multi_label=True)
    assert np.all(np.isfinite(s.scores)) and s.scores[0].tolist() == pytest.approx([1.0, 0.0])
    s = score_tiles(np.array([[1e4, -1e4]]))
    assert np.all(np.isfinite(s.scores))


def test_single_class():
    s = score_tiles(np.array([[1.0], [2.0]]))
    np.testing.assert_allclose(s.scores, 1.0)
    assert list(s.second) == list(s.best)
