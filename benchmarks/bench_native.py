"""Native tile size against the papers' 224 px upsampling: retrieval of the same place on other dates, and cost.

    python benchmarks/bench_native.py [--out benchmarks/results/native-cpu.json]

For each real multi-date sample in ../shared/data (eo-learn: 5 summer dates of a 1 km2 patch in Slovenia;
SSL4EO-S12: 2 seasons of one place in Punjab, L1C) and each untrained full-size card (aligned-s2: ViT-S/16 over 13
bands; clip: ViT-B/32 on the RGB composite), every date is indexed twice with the same seeded weights: tiles
upsampled to 224 px (the papers' input) and at the tile's own size rounded to the patch size (fewer tokens).
For every tile of every date the other dates are searched (the query's own date left out): recall@K is the share
of other dates whose tile with the same id is in the top K. Also saved: encoder seconds per tile for each input.

The weights are random (no trained weights can be downloaded here), so these figures say how much the input
size changes what a random ViT sees, not how a trained encoder ranks; they are the harness to re-run with
trained cards (``--model DIR`` for an installed card).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "backend"))  # the eo-learn dates as GeoTIFFs, as the search tests write them
KS = (1, 5, 10)


def dates(work: Path) -> dict[str, tuple[list[str], int]]:
    from test_search import write_eolearn_dates

    shared = Path(os.environ.get("TILEPROMPT_SHARED_DATA", REPO.parent / "shared" / "data"))
    ssl = shared / "rico-hdl/integration_tests/tiffs/SSL4EO-S12/s2c/0000200"
    return {"eo-learn (5 dates, 32 px tiles)": (write_eolearn_dates(work), 32),
            "SSL4EO-S12 (2 seasons, 64 px tiles)": ([str(p) for p in sorted(ssl.iterdir()) if p.is_dir()], 64)}


def recall_at_k(index: Path) -> tuple[dict[int, float], int]:
    """Same place, other dates: recall@K over every tile of every date (its own date left out)."""
    from tileprompt_backend.index import IndexStore
    from tileprompt_backend.index.query import load_view, rank

    view = load_view(IndexStore.open(index))
    common = sorted(set.intersection(*[set(map(int, ids)) for ids in view.tile_ids]))
    hits, pairs = dict.fromkeys(KS, 0), 0
    for s in range(len(view.scenes)):
        own = np.arange(view.offsets[s], view.offsets[s + 1])
        for t in common:
            rows, _, _ = rank(view, view.vectors_of(s, [t]), max(KS), own)
            pos, tiles = view.locate(rows)
            for o in range(len(view.scenes)):
                if o == s:
                    continue
                pairs += 1
                found = [i for i, (p, tid) in enumerate(zip(pos, tiles)) if p == o and tid == t]
                for k in KS:
                    hits[k] += bool(found and found[0] < k)
    return {k: hits[k] / pairs for k in KS}, view.n - len(common)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "benchmarks/results/native-cpu.json"))
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tileprompt-native-"))
    os.environ["TILEPROMPT_CACHE"] = str(work / "cache")
    from tileprompt_backend.index import build_index
    from tileprompt_backend.models import write_untrained

    rows = []
    for data, (rasters, tile) in dates(work / "data").items():
        for family in ("aligned-s2", "clip"):
            patch = 16 if family == "aligned-s2" else 32
            native = max(patch, round(tile / patch) * patch)
            for size in (224, native):
                card = write_untrained(family, work / f"{family}-{size}", image_size=size,
                                       input={"tile_px": tile})
                t0 = time.perf_counter()
                r = build_index(rasters, model=str(card.path), tile_px=tile, index=work / f"idx-{family}-{size}-{tile}",
                                runner="torch")
                recall, candidates = recall_at_k(r.index)
                row = {"data": data, "family": family, "image_size": size, "tile_px": tile,
                       "tokens": (size // patch) ** 2, "tiles": r.tiles, "index_seconds": time.perf_counter() - t0,
                       "seconds_per_tile": (time.perf_counter() - t0) / max(r.tiles, 1),
                       "recall": recall, "chance": {k: k / candidates for k in KS}, "load": os.getloadavg()[0]}
                rows.append(row)
                print(f"{data:38s} {family:10s} {size:>3} px ({row['tokens']:>3} tokens): recall@1/5/10 "
                      + " / ".join(f"{recall[k]:.3f}" for k in KS) + f"  (chance @10 {row['chance'][10]:.3f}), "
                      f"{1e3 * row['seconds_per_tile']:.1f} ms per tile", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows,
                               "note": "untrained (seeded random) weights; see the module doc"}, indent=1) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
