"""Top-k inner-product search over unit vectors (inner product = cosine): exact for small sets, IVF-SQ8 beyond.

A :class:`VectorIndex` holds N unit vectors of dimension D under int64 ids and answers top-k queries:

    vi = VectorIndex.build(x, ids=None, method="auto")   # exact up to EXACT_MAX vectors, else IVF-SQ8, tuned
    vi.add(x, ids); vi.remove(ids); vi.search(q, k, exact=None) -> (similarities (M, k), ids (M, k))
    vi.save(path); VectorIndex.load(path); vi.report() -> {"method", "n", "recall", "latency_ms", "bytes", ...}

Methods (chosen by size, :func:`choose_method`; measured in benchmarks/bench_search.py, docs/index.md):

- ``numpy``: exact, blocked matmul + argpartition, for N <= :data:`EXACT_MAX`. On the 2-core machine exact
  search is under 2 ms per query up to 50,000 vectors of 512 and about 7 ms at 100,000 (faster than FAISS's
  ``IndexFlatIP`` here, 2-3x per query); ``flat`` (FAISS ``IndexFlatIP``) is one setting away.
- ``ivf`` (beyond): FAISS ``IndexIVFScalarQuantizer``, 8-bit codes (a quarter of float32), ``nlist = 4 sqrt(N)``
  lists trained by k-means on a seeded sample. A query scans ``nprobe`` lists for ``k' = RERANK x k``
  candidates; when the caller passes ``exact`` (a function returning the stored vectors of ids: the index
  keeps float16 embeddings anyway) they are re-scored exactly and the top k kept, which lifts the 8-bit
  ranking to exact order. ``nprobe`` is the smallest power of two whose recall@:data:`RECALL_K` against exact
  search, on :data:`TUNE_QUERIES` probe queries (normalised sums of two stored vectors: between clusters, like
  the mean of several query tiles), reaches :data:`TARGET_RECALL`; recall and median latency are recorded.
  Vectors are added to the trained lists as scenes arrive and removed by id; an index that has grown past
  :data:`STALE_GROWTH` times what its lists were trained on is rebuilt (:meth:`VectorIndex.stale`).
- ``hnsw`` (on request): FAISS ``IndexHNSWFlat`` (M = 32), ``efSearch`` tuned the same way; no removal.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

#: Largest number of vectors searched exactly; beyond it, IVF-SQ8.
EXACT_MAX = 50_000
#: How exact search runs: "numpy" (measured faster on CPU, see the module doc) or "flat" (FAISS IndexFlatIP).
EXACT_METHOD = "numpy"
#: IVF training sample: this many vectors per list (FAISS warns below 39).
TRAIN_PER_LIST = 40
KMEANS_ITERATIONS = 10
#: nprobe / efSearch are raised until recall@RECALL_K against exact search reaches TARGET_RECALL.
TARGET_RECALL = 0.95
RECALL_K = 50
TUNE_QUERIES = 200
#: IVF candidates per result re-scored exactly when the caller can supply stored vectors.
RERANK = 4
#: An IVF index grown past this multiple of the vectors its lists were trained on is rebuilt.
STALE_GROWTH = 4.0
#: numpy search computes scores for at most this many (query, vector) pairs at once (128 MB of float32).
NUMPY_BLOCK = 1 << 25
METHODS = ("auto", "flat", "ivf", "hnsw", "numpy")
FORMAT_VERSION = 1

ExactFn = Callable[[np.ndarray], np.ndarray]  # ids -> their stored unit vectors (float32, (n, D))

try:  # FAISS is a dependency; the numpy path keeps search working where its wheel is missing
    import faiss
except ImportError:  # pragma: no cover - exercised only without faiss
    faiss = None


def choose_method(n: int, exact_max: int | None = None) -> str:
    """:data:`EXACT_METHOD` up to ``exact_max`` (default :data:`EXACT_MAX`) vectors, ``ivf`` beyond (``numpy``
    throughout without FAISS)."""
    if faiss is None:
        return "numpy"
    return EXACT_METHOD if n <= (EXACT_MAX if exact_max is None else exact_max) else "ivf"


def ivf_lists(n: int) -> int:
    """nlist = 4 sqrt(N), at least 1 and at most N / 39 (so each list gets trained)."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def numpy_topk(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (scores (M, k) descending, row indices (M, k)).

    Queries go in blocks so the score matrix stays under :data:`NUMPY_BLOCK` floats.
    """
    q = np.atleast_2d(q).astype(np.float32, copy=False)
    k = min(k, len(x))
    step = max(1, NUMPY_BLOCK // max(1, len(x)))
    if len(q) > step:
        parts = [numpy_topk(x, q[i:i + step], k) for i in range(0, len(q), step)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    s = q @ x.T
    if k < len(x):
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(len(x)), s.shape).copy()
    ps = np.take_along_axis(s, part, axis=1)
    order = np.argsort(-ps, axis=1, kind="stable")
    return np.take_along_axis(ps, order, axis=1), np.take_along_axis(part, order, axis=1)


def _unit32(x: np.ndarray) -> np.ndarray:
    """Float32 rows of unit length (stored embeddings are float16, unit before rounding)."""
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def blocked_topk(x: np.ndarray, q: np.ndarray, k: int, block: int = 131_072) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over ``x`` of any float dtype (float16 included), converted block by block: (scores, rows)."""
    q = np.atleast_2d(q).astype(np.float32)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_r = np.zeros((len(q), 0), np.int64)
    for i in range(0, len(x), block):
        s, r = numpy_topk(_unit32(x[i:i + block]), q, k)
        best_s, best_r = np.concatenate([best_s, s], axis=1), np.concatenate([best_r, r + i], axis=1)
        if best_s.shape[1] > k:
            order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
            best_s, best_r = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_r, order, 1)
    return best_s, best_r


class VectorIndex:
    """A searchable set of unit vectors under int64 ids; ``method`` says (and :attr:`description` reports) how."""

    def __init__(self, dim: int, method: str = "numpy"):
        if method not in METHODS or method == "auto":
            raise ValueError(f"unknown search method {method!r} (valid: {', '.join(m for m in METHODS if m != 'auto')})")
        if method != "numpy" and faiss is None:
            raise ValueError("FAISS is not installed (pip install faiss-cpu); use method 'numpy'")
        self.dim = int(dim)
        self.method = method
        self.recall: float | None = None  # recall@RECALL_K against exact search, measured when tuned
        self.latency_ms: float | None = None  # median single-query latency, measured when tuned
        self.param: int | None = None  # nprobe (ivf) or efSearch (hnsw)
        self.nlist: int | None = None
        self.trained_n = 0  # vectors the IVF lists were trained on a sample of
        self.built = ""
        self.extra: dict = {}  # what save() was told about the contents (read back by load())
        self._x = np.zeros((0, dim), np.float32)  # numpy: the vectors; ids in self._ids
        self._ids = np.zeros(0, np.int64)
        self._index = None

    # -- building --
    @classmethod
    def build(cls, x: np.ndarray, ids: np.ndarray | None = None, method: str = "auto", exact_max: int | None = None,
              seed: int = 0, exact: ExactFn | None = None) -> VectorIndex:
        """Index ``x`` ((N, D) vectors, any float dtype, normalised here) under ``ids`` (default 0..N-1): train,
        add (in chunks: a float16 archive is never copied to float32 whole) and tune."""
        x = np.asarray(x)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"need a non-empty (N, D) matrix of vectors, got shape {x.shape}")
        if method not in METHODS:
            raise ValueError(f"unknown search method {method!r} (valid: {', '.join(METHODS)})")
        ids = np.arange(len(x), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        vi = cls(x.shape[1], choose_method(len(x), exact_max) if method == "auto" else method)
        if vi.method == "flat":
            vi._index = faiss.IndexIDMap2(faiss.IndexFlatIP(vi.dim))
        elif vi.method == "ivf":
            vi._train_ivf(x, seed)
        elif vi.method == "hnsw":
            hnsw = faiss.IndexHNSWFlat(vi.dim, 32, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = 80
            vi._index = faiss.IndexIDMap2(hnsw)
        vi.add(x, ids)
        vi.built = time.strftime("%Y-%m-%dT%H:%M:%S")
        if vi.method in ("ivf", "hnsw"):
            vi.tune(x, ids, seed, exact)
        return vi

    def _train_ivf(self, x: np.ndarray, seed: int) -> None:
        self.nlist = ivf_lists(len(x))
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, self.nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        n_train = min(len(x), TRAIN_PER_LIST * self.nlist)
        sample = _unit32(x if n_train == len(x) else x[np.sort(rng.choice(len(x), n_train, replace=False))])
        index.cp.seed = seed
        index.cp.niter = KMEANS_ITERATIONS
        index.train(sample)
        self._index = index  # no direct map: removals (a replaced scene) scan the lists, and are rare
        self.trained_n = len(x)

    # -- changing --
    @property
    def n(self) -> int:
        return len(self._ids) if self.method == "numpy" else int(self._index.ntotal)

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors (normalised here) under new ids."""
        x, ids = np.atleast_2d(x), np.asarray(ids, dtype=np.int64)
        if x.shape[1] != self.dim or len(x) != len(ids):
            raise ValueError(f"{x.shape} vectors for {len(ids)} ids, index dimension {self.dim}")
        if self.method == "numpy":
            self._x = np.concatenate([self._x, _unit32(x)]) if len(self._x) else _unit32(x)
            self._ids = np.concatenate([self._ids, ids])
        else:
            for i in range(0, len(x), 131_072):  # float32 one chunk at a time
                self._index.add_with_ids(_unit32(x[i:i + 131_072]), ids[i:i + 131_072])

    def remove(self, ids: np.ndarray) -> int:
        """Remove vectors by id; returns how many were removed (HNSW cannot: ValueError, rebuild instead)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.method == "numpy":
            keep = ~np.isin(self._ids, ids)
            removed = int((~keep).sum())
            self._x, self._ids = self._x[keep], self._ids[keep]
            return removed
        if self.method == "hnsw":
            raise ValueError("an HNSW index cannot remove vectors; rebuild it")
        return int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))

    def remove_range(self, lo: int, hi: int) -> int:
        """Remove every id in [lo, hi) (a scene's ids); returns how many were removed."""
        if self.method == "numpy":
            return self.remove(self._ids[(self._ids >= lo) & (self._ids < hi)])
        if self.method == "hnsw":
            raise ValueError("an HNSW index cannot remove vectors; rebuild it")
        return int(self._index.remove_ids(faiss.IDSelectorRange(int(lo), int(hi))))

    def stale(self) -> bool:
        """True when the IVF lists were trained on far fewer vectors than the index holds now."""
        return self.method == "ivf" and self.n > STALE_GROWTH * max(1, self.trained_n)

    # -- tuning --
    def tune(self, x: np.ndarray, ids: np.ndarray, seed: int = 0, exact: ExactFn | None = None) -> None:
        """Smallest nprobe/efSearch whose recall@RECALL_K against exact search over ``x`` (all the vectors,
        under ``ids``; any float dtype) reaches TARGET_RECALL; records recall and median single-query latency."""
        if self.method not in ("ivf", "hnsw"):
            return
        rng = np.random.default_rng(seed + 1)
        m = min(TUNE_QUERIES, len(x))
        pairs = rng.integers(0, len(x), size=(m, 2))
        q = _unit32(_unit32(x[pairs[:, 0]]) + _unit32(x[pairs[:, 1]]))
        k = min(RECALL_K, len(x))
        _, truth_rows = blocked_topk(x, q, k)
        truth = [set(ids[t]) for t in truth_rows]
        values = _powers_of_two(self.nlist) if self.method == "ivf" else [16, 32, 64, 128, 256, 512, 1024]
        for v in values:
            self._set(v)
            _, got = self.search(q, k, exact)
            self.recall = sum(len(t & set(g)) for t, g in zip(truth, got)) / (k * m)
            if self.recall >= TARGET_RECALL:
                break
        times = []
        for row in q[:50]:
            t0 = time.perf_counter()
            self.search(row[None, :], k, exact)
            times.append(time.perf_counter() - t0)
        self.latency_ms = 1e3 * float(np.median(times))

    def _set(self, value: int) -> None:
        if self.method == "ivf":
            self._index.nprobe = int(value)
        else:
            faiss.downcast_index(self._index.index).hnsw.efSearch = int(value)
        self.param = int(value)

    # -- searching --
    def search(self, q: np.ndarray, k: int, exact: ExactFn | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (M, k'), ids (M, k')) best first, k' = min(k, N); missing results have id -1 and
        similarity -inf. ``exact``: re-score IVF candidates with the stored vectors (see the module doc)."""
        q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"query vectors have dimension {q.shape[1]}, the index {self.dim}")
        k = max(1, min(int(k), self.n))
        if self.method == "numpy":
            sims, rows = numpy_topk(self._x, q, k)
            return sims, self._ids[rows]
        if self.method != "ivf" or exact is None:
            sims, ids = self._index.search(q, k)
            return np.where(ids < 0, -np.inf, sims), ids
        _, cand = self._index.search(q, min(self.n, max(RERANK * k, k + 64)))
        sims = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        for i, (row, c) in enumerate(zip(q, cand)):
            c = c[c >= 0]
            s = exact(c) @ row
            top = np.argsort(-s, kind="stable")[:k]
            sims[i, :len(top)], ids[i, :len(top)] = s[top], c[top]
        return sims, ids

    # -- reporting --
    @property
    def description(self) -> str:
        """What runs a query: ``numpy-exact``, ``faiss-ivf4000-sq8 nprobe=32 (recall@50 0.983, 1.2 ms)``."""
        if self.method == "numpy":
            return "numpy-exact"
        if self.method == "flat":
            return "faiss-flat-ip"
        measured = ""
        if self.recall is not None:
            measured = f" (recall@{RECALL_K} {self.recall:.3f}" + (
                f", {self.latency_ms:.1f} ms)" if self.latency_ms is not None else ")")
        if self.method == "ivf":
            return f"faiss-ivf{self.nlist}-sq8 nprobe={self.param}{measured}"
        return f"faiss-hnsw32-ip efSearch={self.param}{measured}"

    @property
    def nbytes(self) -> int:
        """Memory the search structure holds (codes, ids, graph or vectors), without the caller's embeddings."""
        if self.method == "numpy":
            return int(self._x.nbytes + self._ids.nbytes)
        if self.method == "ivf":  # 8-bit codes + ids + centroids
            return int(self.n * (self.dim + 8) + self.nlist * self.dim * 4)
        if self.method == "hnsw":
            return int(self.n * (self.dim * 4 + 8 + 32 * 2 * 4))
        return int(self.n * (self.dim * 4 + 8))

    def report(self) -> dict:
        return {"method": self.method, "description": self.description, "n": self.n, "dim": self.dim,
                "nlist": self.nlist, "param": self.param, "recall_at": RECALL_K, "recall": self.recall,
                "latency_ms": self.latency_ms, "bytes": self.nbytes, "trained_n": self.trained_n, "built": self.built}

    # -- persistence --
    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write ``path`` (the FAISS index) and ``path.json`` (method, tuning, measurements and ``extra``, the
        caller's record of what the index holds), each atomically, the record last."""
        if self.method not in ("ivf", "hnsw"):
            raise ValueError(f"only trained indexes are saved (this one is {self.method})")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        meta = path.with_name(path.name + ".json")
        meta_tmp = meta.with_name(f".{meta.name}.{os.getpid()}.tmp")
        try:
            faiss.write_index(self._index, str(tmp))
            meta_tmp.write_text(json.dumps({"format": FORMAT_VERSION, **self.report(), "extra": extra or {}}) + "\n")
            tmp.replace(path)
            meta_tmp.replace(meta)
        finally:
            tmp.unlink(missing_ok=True)
            meta_tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> VectorIndex:
        """Read what :meth:`save` wrote (its ``extra`` record in :attr:`extra`); a missing or damaged file is a
        ValueError."""
        path = Path(path)
        try:
            info = json.loads(path.with_name(path.name + ".json").read_text())
            if info.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {info.get('format')}")
            vi = cls(int(info["dim"]), info["method"])
            vi._index = faiss.read_index(str(path))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"vector index {path} is unreadable ({e})") from None
        if vi.n != info["n"] or vi._index.d != vi.dim:
            raise ValueError(f"vector index {path} does not match its record (n {vi.n} vs {info['n']})")
        vi.nlist, vi.recall, vi.latency_ms = info.get("nlist"), info.get("recall"), info.get("latency_ms")
        vi.trained_n, vi.built = int(info.get("trained_n") or 0), info.get("built", "")
        vi.extra = dict(info.get("extra") or {})
        if info.get("param"):
            vi._set(int(info["param"]))
        return vi


def _powers_of_two(limit: int) -> list[int]:
    out, p = [], 1
    while p < limit:
        out.append(p)
        p *= 2
    return out + [limit]
