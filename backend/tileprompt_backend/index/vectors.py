"""Top-k inner-product search over unit vectors (inner product = cosine): exact up to a million, IVF beyond.

``VectorIndex(x)`` chooses by size (:func:`choose_method`):

- exact, for N <= :data:`EXACT_MAX` (1,000,000) vectors: :data:`EXACT_METHOD`, ``numpy`` (blocked matmul +
  argpartition) by default. Measured on the 2-core CPU machine (benchmarks/bench_search.py, docs/index.md), it
  answers 2-3x faster than FAISS ``IndexFlatIP`` per query and 3-8x faster for batches of 100, with the same
  (exact) results; ``flat`` (FAISS ``IndexFlatIP``) is one setting away;
- ``ivf`` beyond: FAISS ``IndexIVFFlat`` (inner product) with ``nlist = 4 * sqrt(N)`` lists, k-means trained on a
  seeded sample of at most :data:`TRAIN_PER_LIST` vectors per list; ``nprobe`` is the smallest power of two whose
  recall@10 against exact search, measured on :data:`TUNE_QUERIES` probe queries (normalised sums of two random
  vectors of the data), reaches :data:`TARGET_RECALL`. The measured recall is part of the reported method;
- ``hnsw`` (on request): FAISS ``IndexHNSWFlat`` (M = 32), ``efSearch`` tuned the same way.

Vectors are float32 in memory (float16 on disk); queries should be unit vectors too.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

#: Largest number of vectors searched exactly; beyond it, IVF.
EXACT_MAX = 1_000_000
#: How exact search runs: "numpy" (measured faster on CPU, see the module doc) or "flat" (FAISS IndexFlatIP).
EXACT_METHOD = "numpy"
#: IVF training sample: at most this many vectors per list (FAISS warns below 39).
TRAIN_PER_LIST = 64
#: nprobe / efSearch are raised until recall@10 against exact search reaches this.
TARGET_RECALL = 0.95
TUNE_QUERIES = 200
#: numpy search computes scores for at most this many (query, vector) pairs at once (128 MB of float32).
NUMPY_BLOCK = 1 << 25
METHODS = ("auto", "flat", "ivf", "hnsw", "numpy")

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


class VectorIndex:
    """A searchable set of N unit vectors of dimension D; ``method`` says (and ``description`` reports) how."""

    def __init__(self, x: np.ndarray, method: str = "auto", exact_max: int | None = None, seed: int = 0,
                 cache_file: str | Path | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown search method {method!r} (valid: {', '.join(METHODS)})")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"need a non-empty (N, D) matrix of vectors, got shape {x.shape}")
        self.n, self.dim = x.shape
        self.method = choose_method(self.n, exact_max) if method == "auto" else method
        if self.method != "numpy" and faiss is None:
            raise ValueError("FAISS is not installed (pip install faiss-cpu); use method 'numpy'")
        self.recall: float | None = None
        self.param: int | None = None  # nprobe (ivf) or efSearch (hnsw)
        self.nlist: int | None = None
        self._x = None
        if self.method == "numpy":
            self._x = x
        elif self.method == "flat":
            self._index = faiss.IndexFlatIP(self.dim)
            self._index.add(x)
        elif not (cache_file and self._load(Path(cache_file))):
            if self.method == "ivf":
                self._build_ivf(x, seed)
            else:
                self._build_hnsw(x)
            if cache_file:
                self._save(Path(cache_file))

    # -- building --
    def _build_ivf(self, x: np.ndarray, seed: int) -> None:
        self.nlist = ivf_lists(self.n)
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        n_train = min(self.n, TRAIN_PER_LIST * self.nlist)
        sample = x if n_train == self.n else x[np.sort(rng.choice(self.n, n_train, replace=False))]
        index.cp.seed = seed
        index.cp.niter = 10
        index.train(sample)
        index.add(x)
        self._index = index
        self._tune(x, seed, "nprobe", [p for p in _powers_of_two(self.nlist)])

    def _build_hnsw(self, x: np.ndarray) -> None:
        index = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.add(x)
        self._index = index
        self._tune(x, 0, "efSearch", [16, 32, 64, 128, 256, 512, 1024])

    def _set(self, name: str, value: int) -> None:
        if name == "nprobe":
            self._index.nprobe = int(value)
        else:
            self._index.hnsw.efSearch = int(value)
        self.param = int(value)

    def _tune(self, x: np.ndarray, seed: int, name: str, values: list[int]) -> None:
        """Smallest setting whose recall@10 against exact search reaches TARGET_RECALL on probe queries.

        Probes are normalised sums of two random vectors of the data: like the mean of several query tiles,
        they fall between the data's clusters, which is harder for IVF than a query on a stored vector
        (measured: nprobe 4 gives 0.96 on such probes where stored vectors already reach 0.99).
        """
        rng = np.random.default_rng(seed + 1)
        m = min(TUNE_QUERIES, self.n)
        pairs = rng.integers(0, self.n, size=(m, 2))
        q = x[pairs[:, 0]] + x[pairs[:, 1]]
        q = np.ascontiguousarray(q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12), dtype=np.float32)
        k = min(10, self.n)
        _, truth = numpy_topk(x, q, k) if self.n * m <= 2e9 else faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
        truth_sets = [set(t) for t in truth]
        for v in values:
            self._set(name, v)
            _, got = self._index.search(q, k)
            self.recall = sum(len(ts & set(g)) for ts, g in zip(truth_sets, got)) / (k * m)
            if self.recall >= TARGET_RECALL:
                return

    # -- cache --
    def _save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            faiss.write_index(self._index, str(tmp))
            tmp.with_suffix(".json.tmp").write_text(json.dumps(
                {"method": self.method, "param": self.param, "recall": self.recall, "nlist": self.nlist,
                 "n": self.n, "dim": self.dim}))
            tmp.with_suffix(".json.tmp").replace(path.with_suffix(".json"))
            tmp.replace(path)
        except OSError:
            pass  # a read-only index folder: the trained index is simply not kept
        finally:
            tmp.unlink(missing_ok=True)
            tmp.with_suffix(".json.tmp").unlink(missing_ok=True)

    def _load(self, path: Path) -> bool:
        try:
            info = json.loads(path.with_suffix(".json").read_text())
            if (info["method"], info["n"], info["dim"]) != (self.method, self.n, self.dim):
                return False
            self._index = faiss.read_index(str(path))
        except (OSError, ValueError, KeyError, RuntimeError):
            return False
        self.nlist, self.recall = info.get("nlist"), info.get("recall")
        self._set("nprobe" if self.method == "ivf" else "efSearch", info["param"])
        return True

    # -- searching --
    @property
    def description(self) -> str:
        """What runs a query: ``numpy-exact``, ``faiss-flat-ip``, ``faiss-ivf4000-ip nprobe=32 (recall@10 0.960)``."""
        if self.method == "numpy":
            return "numpy-exact"
        if self.method == "flat":
            return "faiss-flat-ip"
        recall = f" (recall@10 {self.recall:.3f})" if self.recall is not None else ""
        if self.method == "ivf":
            return f"faiss-ivf{self.nlist}-ip nprobe={self.param}{recall}"
        return f"faiss-hnsw32-ip efSearch={self.param}{recall}"

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (M, k'), row indices (M, k')) best first, k' = min(k, N); missing results are dropped
        by callers (index -1, similarity -inf)."""
        q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"query vectors have dimension {q.shape[1]}, the index {self.dim}")
        k = max(1, min(int(k), self.n))
        if self.method == "numpy":
            return numpy_topk(self._x, q, k)
        sims, idx = self._index.search(q, k)
        sims = np.where(idx < 0, -np.inf, sims)
        return sims, idx


def _powers_of_two(limit: int) -> list[int]:
    out, p = [], 1
    while p < limit:
        out.append(p)
        p *= 2
    return out + [limit]
