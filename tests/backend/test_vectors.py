"""index.vectors and index.ann: exact and IVF-SQ8 search, incremental updates, persistence and staleness."""

from __future__ import annotations

import numpy as np
import pytest

from tileprompt_backend.engine.head import l2_normalize
from tileprompt_backend.index import IndexStore, build_index
from tileprompt_backend.index import ann, query
from tileprompt_backend.index import vectors as V
from tileprompt_backend.index.query import load_view
from tileprompt_backend.index.vectors import VectorIndex, numpy_topk


def clustered(n, dim=64, centers=300, seed=0):
    """n unit vectors around random centres of uneven sizes and spreads (the same centres whatever n)."""
    c = np.random.default_rng(0).normal(size=(centers, dim))
    size = np.random.default_rng(1).pareto(1.2, centers) + 1
    spread = np.random.default_rng(2).uniform(0.2, 0.6, centers)
    rng = np.random.default_rng(seed + 10)
    which = rng.choice(centers, n, p=size / size.sum())
    x = c[which] + spread[which, None] * rng.normal(size=(n, dim))
    return l2_normalize(x.astype(np.float32))


def recall(got, truth):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, truth)]))


def test_small_sets_are_searched_exactly_and_ivf_reaches_exact_order_when_exhaustive():
    x = clustered(3000)
    q = clustered(30, seed=5)
    truth_s, truth = numpy_topk(x, q, 50)
    auto = VectorIndex.build(x)
    assert auto.method == "numpy"
    s, i = auto.search(q, 50)
    assert (i == truth).all()
    ivf = VectorIndex.build(x, method="ivf")
    ivf._set(ivf.nlist)  # every list: the candidates include the true top k; re-scoring puts them in order
    s, i = ivf.search(q, 50, exact=lambda ids: x[ids])
    np.testing.assert_allclose(s, truth_s, atol=1e-6)
    assert recall(i, truth) == 1.0


def test_ivf_meets_its_recall_on_a_generated_set():
    x = clustered(60_000)
    vi = VectorIndex.build(x, method="ivf", exact=lambda ids: x[ids])
    assert vi.recall >= V.TARGET_RECALL and vi.param < vi.nlist and vi.latency_ms is not None
    # fresh queries of both kinds: new points of the clusters, and means of two stored vectors
    rng = np.random.default_rng(7)
    for q in (clustered(200, seed=3), l2_normalize(x[rng.integers(0, len(x), 200)] + x[rng.integers(0, len(x), 200)])):
        _, truth = numpy_topk(x, q, V.RECALL_K)
        _, got = vi.search(q, V.RECALL_K, exact=lambda ids: x[ids])
        assert recall(got, truth) >= 0.93
    assert vi.description.startswith(f"faiss-ivf{vi.nlist}-sq8 nprobe={vi.param} (recall@50 ")


def test_ivf_add_remove_save_load(tmp_path):
    x = clustered(8000)
    ids = np.arange(len(x)) + (7 << 32)
    vi = VectorIndex.build(x[:6000], ids[:6000], method="ivf")
    vi.add(x[6000:], ids[6000:])
    assert vi.n == 8000 and vi.trained_n == 6000 and not vi.stale()
    assert vi.remove_range(ids[7000], ids[7000] + 500) == 500 and vi.n == 7500
    vi.save(tmp_path / "a.faiss", {"what": "test"})
    back = VectorIndex.load(tmp_path / "a.faiss")
    assert (back.n, back.nlist, back.param, back.extra) == (7500, vi.nlist, vi.param, {"what": "test"})
    q = x[:5]
    assert (back.search(q, 10)[1] == vi.search(q, 10)[1]).all()
    assert not set(back.search(x[7000:7500], 5)[1].ravel()) & set(ids[7000:7500])
    big = VectorIndex.build(x[:1000], method="ivf")
    big.add(x[1000:], np.arange(1000, 8000))
    assert big.stale()  # 8x the vectors its 1,000-vector training saw
    (tmp_path / "b.faiss").write_bytes(b"not faiss")
    (tmp_path / "b.faiss.json").write_text("{}")
    with pytest.raises(ValueError, match="unreadable"):
        VectorIndex.load(tmp_path / "b.faiss")


@pytest.fixture()
def dates(tmp_path):
    from test_search import write_eolearn_dates

    return write_eolearn_dates(tmp_path)


def test_index_built_incrementally_equals_one_built_at_once(dates, tiny_models, tmp_path, monkeypatch):
    """Scenes added one run at a time give the same catalog, embeddings and (exhaustive) search results as all
    at once; the approximate index is updated in place, not retrained, and replaced scenes leave it."""
    monkeypatch.setattr(V, "EXACT_MAX", 40)  # 25 tiles per date: from the second date on, the IVF-SQ8 path
    monkeypatch.setattr(V, "TRAIN_PER_LIST", 5)
    kw = dict(model=str(tiny_models["aligned-s2"]), tile_px=20, runner="torch")
    at_once, step = tmp_path / "at-once", tmp_path / "step"
    build_index(dates, index=at_once, **kw)
    build_index(dates[:2], index=step, **kw)
    first = ann_state(step)
    r = build_index(dates[2:], index=step, **kw)
    assert r.computed == 75 and r.reused == 0 and r.search_method.startswith("faiss-ivf")
    grown = ann_state(step)
    assert grown["trained_n"] == first["trained_n"] == 50 and grown["n"] == 125  # added to the trained lists

    a, b = IndexStore.open(at_once), IndexStore.open(step)
    ra = {s.raster: s for s in a.scenes()}
    rb = {s.raster: s for s in b.scenes()}
    assert ra.keys() == rb.keys()
    for raster in ra:
        assert ra[raster].key == rb[raster].key
        np.testing.assert_array_equal(a.embeddings(ra[raster]), b.embeddings(rb[raster]))
        np.testing.assert_array_equal(a.tile_ids(ra[raster]), b.tile_ids(rb[raster]))
    va, vb = load_view(a), load_view(b)
    monkeypatch.setattr(V, "RERANK", 10)  # every vector a candidate, every list probed: both must be exact
    for v in (va, vb):
        v.vectors._set(v.vectors.nlist)
    q = l2_normalize(va.x16[::9].astype(np.float32))
    sa, ia = va.search(q, 20)
    sb, ib = vb.search(q, 20)
    np.testing.assert_allclose(sa, sb, atol=1e-6)
    def hits(view, rows, sims):  # (raster, tile id) above the last score (float16 embeddings tie there)
        pos, tiles = view.locate(rows)
        return {(view.scenes[p].raster, int(t)) for p, t, s in zip(pos, tiles, sims) if s > sims[-1]}
    assert all(hits(va, x, s) == hits(vb, y, s) for x, y, s in zip(ia, ib, sa))

    # a raster that changed on disk replaces its scene: its old vectors leave the approximate index
    import os
    os.utime(dates[0], ns=(1, 1))
    build_index(dates[:1], index=step, **kw)
    view = load_view(IndexStore.open(step))
    assert view.vectors.n == view.n == 125
    assert set(ann.rows_of(view.scenes, view.offsets, view.vectors.search(q, 125)[1]).ravel()) <= set(range(125))


def ann_state(index) -> dict:
    vi = VectorIndex.load(index / "vectors" / ann.ANN_FILE)
    return {"n": vi.n, "trained_n": vi.trained_n, "scene_ids": vi.extra["scene_ids"]}


def test_stale_or_foreign_ann_is_rebuilt(dates, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(V, "EXACT_MAX", 10)
    monkeypatch.setattr(V, "TRAIN_PER_LIST", 5)
    idx = tmp_path / "idx"
    kw = dict(model=str(tiny_models["aligned-s2"]), tile_px=20, runner="torch", index=idx)
    build_index(dates[:1], **kw)
    assert ann_state(idx)["trained_n"] == 25
    monkeypatch.setattr(V, "STALE_GROWTH", 2.0)
    build_index(dates[1:], **kw)  # 125 tiles > 2 x 25: retrained on everything
    assert ann_state(idx)["trained_n"] == 125
    (idx / "vectors" / ann.ANN_FILE).write_bytes(b"damaged")
    query._views.clear()  # as in a fresh process
    view = load_view(IndexStore.open(idx))  # a fresh process would find it damaged: rebuilt, search works
    assert view.vectors.n == 125 and ann_state(idx)["n"] == 125
