"""Zero-shot classification of every model card on a labelled image folder, the CLIP_benchmark way.

    .venv/bin/python benchmarks/zero_shot_eval.py --data EuroSAT_MS [--data-rgb EuroSAT_RGB] \
        [--models all|ID,ID] [--out benchmarks/results/zero-shot-eurosat.json]

Protocol (LAION-AI/CLIP_benchmark, zero-shot classification): one class embedding per class from the mean of
the L2-normalised text embeddings of every template (EuroSAT: CLIP_benchmark's three "a centered satellite photo
of ..." templates and its class names), images through each card's own preprocessing at the card's image size,
logits = logit_scale x cosine, then top-1 accuracy (micro) and macro mean average precision (one-vs-rest AP of
each class's softmax score, averaged over classes; torchmetrics' MulticlassAveragePrecision, scikit-learn's
``average_precision_score`` semantics). Everything goes through the project's own code: the readers (EuroSAT's
B8A-last order, the baseline offset), ``LoadedModel.preprocess``, ``engine.head``.

Data: one folder per class holding the images (EuroSAT_MS: 13-band GeoTIFFs; EuroSAT_RGB: JPEGs). Multispectral
cards read ``--data``; RGB cards read ``--data-rgb`` when given (the published RGB protocol), else the RGB
composite of ``--data``. Other datasets: ``--classes FILE`` (JSON {folder: class name}) and ``--templates FILE``.

``--few-shot``: the few-shot correction measurement of docs/corrections.md on the same embeddings
(``bench_fewshot_change.fewshot_eval``): half of each class's images (every other one, in file order) are the
pool examples are drawn from, the other half the test set; zero-shot against the prototype blend and the probe
with 1, 5 and 10 examples per class, ``--draws`` random example sets each. Images have no grid neighbours, so
context-aware refinement is not measured here (bench_fewshot_change.py measures it on eo-box tiles).

Weights: each card's are downloaded on first use (``tileprompt models fetch``); ``--skip-missing`` evaluates only
the cards already downloaded. This needs the real weights and the full EuroSAT (27,000 images); it has not been
run on the project's machines, which cannot download them (see docs/models.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from rasterio.windows import Window

from tileprompt_backend.engine.head import logits, softmax, zero_shot_head
from tileprompt_backend.engine.prompts import parse_prompts
from tileprompt_backend.models import list_models, load_model, make_runner, resolve_card
from tileprompt_backend.models.downloads import weights_state
from tileprompt_backend.sentinel2 import open_raster

#: CLIP_benchmark's EuroSAT class names (en_zeroshot_classification_classnames.json), by EuroSAT folder.
EUROSAT_CLASSES = {
    "AnnualCrop": "annual crop land", "Forest": "forest", "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road", "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments", "River": "river", "SeaLake": "lake or sea",
}
#: CLIP_benchmark's EuroSAT templates (en_zeroshot_classification_templates.json).
EUROSAT_TEMPLATES = ["a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                     "a centered satellite photo of the {}."]
IMAGE_SUFFIXES = {".tif", ".tiff", ".jpg", ".jpeg", ".png", ".jp2"}


def dataset(root: Path, classes: dict[str, str], limit: int | None = None) -> tuple[list[Path], np.ndarray]:
    """(image paths, label indices in ``classes`` order) of a folder-per-class dataset."""
    folders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir()}
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise ValueError(f"{root}: class folders without a class name: {', '.join(unknown)} (give --classes)")
    paths, labels = [], []
    for index, folder in enumerate(classes):
        if folder not in folders:
            continue
        images = sorted(p for p in folders[folder].iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for image in images[:limit]:
            paths.append(image)
            labels.append(index)
    if not paths:
        raise ValueError(f"no images under {root}")
    return paths, np.asarray(labels, dtype=np.int64)


def embed_images(model, runner, paths: list[Path], batch: int, offset: str) -> np.ndarray:
    """(N, D) embeddings: each image read whole by the project's reader and preprocessed by the card."""
    out = []
    for start in range(0, len(paths), batch):
        tiles, info = [], None
        for path in paths[start:start + batch]:
            with open_raster(path, offset=offset) as source:
                info = source.info
                tiles.append(source.read(Window(0, 0, info.width, info.height), model.required_bands(info)))
        if len({t.shape for t in tiles}) > 1:
            raise ValueError(f"images of different sizes in one batch ({paths[start]}...): use --batch 1")
        out.append(runner(model.preprocess(np.stack(tiles), info)))
    return np.concatenate(out)


def metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy (micro) and macro mean average precision over the classes present."""
    from torchmetrics.classification import MulticlassAccuracy, MulticlassAveragePrecision

    n_classes = scores.shape[1]
    preds, target = torch.from_numpy(scores), torch.from_numpy(labels)
    accuracy = MulticlassAccuracy(num_classes=n_classes, average="micro", top_k=1)(preds, target)
    present = np.unique(labels)
    per_class = MulticlassAveragePrecision(num_classes=n_classes, average=None)(preds, target)
    return {"accuracy": float(accuracy), "macro_map": float(per_class[present].mean()),
            "per_class_ap": {int(c): float(per_class[c]) for c in present}}


def evaluate(card_id: str, data: Path, data_rgb: Path | None, classes: dict[str, str], templates: list[str],
             limit: int | None, batch: int, device: str, offset: str, few_shot_draws: int = 0) -> dict:
    t0 = time.perf_counter()
    model = load_model(card_id, device=device)
    root = data_rgb if (model.card.input.modality == "rgb" and data_rgb is not None) else data
    paths, labels = dataset(root, classes, limit)
    prompt_classes = parse_prompts(list(classes.values()))
    head = zero_shot_head(model.encode_text, prompt_classes, templates)
    emb = embed_images(model, make_runner(model, "torch"), paths, batch, offset)
    scores = softmax(logits(emb, head, model.logit_scale))
    result = metrics(scores, labels)
    result.update(model=model.card.id, card_hash=model.card.card_hash(), data=str(root), images=len(paths),
                  modality=model.card.input.modality, image_size=model.image_size,
                  seconds=round(time.perf_counter() - t0, 2))
    if few_shot_draws:
        result["few_shot"] = few_shot(emb, labels, head, model.logit_scale, few_shot_draws)
    return result


def few_shot(emb: np.ndarray, labels: np.ndarray, head: np.ndarray, logit_scale: float, draws: int) -> dict:
    """Few-shot correction accuracy on these embeddings (every other image of a class: the example pool)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_fewshot_change",
                                                  Path(__file__).resolve().parent / "bench_fewshot_change.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pool = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        pool[np.flatnonzero(labels == c)[::2]] = True
    if pool.all() or not pool.any():
        return {"skipped": "needs at least 2 images of a class (one example, one to test)"}
    return bench.fewshot_eval(emb, labels, pool, head, logit_scale, draws=draws)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="folder of class folders (EuroSAT_MS for MS cards)")
    p.add_argument("--data-rgb", type=Path, help="folder of class folders for RGB cards (EuroSAT_RGB JPEGs)")
    p.add_argument("--models", default="all", help="'all' (every trained card) or comma-separated ids/folders")
    p.add_argument("--classes", type=Path, help="JSON {folder: class name} (default: EuroSAT's)")
    p.add_argument("--templates", type=Path, help="templates file, one per line with {} (default: EuroSAT's)")
    p.add_argument("--limit", type=int, help="at most this many images per class")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--offset", default="auto", help="Sentinel-2 baseline offset: auto, none or DN")
    p.add_argument("--few-shot", action="store_true",
                   help="also measure few-shot correction (1/5/10 examples per class) on the same embeddings")
    p.add_argument("--draws", type=int, default=20, help="random example sets per count for --few-shot")
    p.add_argument("--skip-missing", action="store_true", help="only cards whose weights are downloaded")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "zero-shot.json")
    args = p.parse_args(argv)

    classes = json.loads(args.classes.read_text()) if args.classes else EUROSAT_CLASSES
    templates = EUROSAT_TEMPLATES
    if args.templates:
        from tileprompt_backend.engine.prompts import load_templates
        templates = load_templates(args.templates)
    if args.models == "all":
        cards = [c.id for c in list_models() if c.trained]
    else:
        cards = [resolve_card(m.strip()).id if "/" not in m else m.strip() for m in args.models.split(",")]
    if args.skip_missing:
        cards = [c for c in cards if weights_state(resolve_card(c)).downloaded]
    results, load = [], [os.getloadavg()]
    print(f"{'model':28s} {'images':>7s} {'top-1':>7s} {'mAP':>7s} {'s':>7s}")
    for card in cards:
        try:
            r = evaluate(card, args.data, args.data_rgb, classes, templates, args.limit, args.batch, args.device,
                         args.offset, args.draws if args.few_shot else 0)
        except ValueError as e:
            print(f"{card:28s} skipped: {e}", file=sys.stderr)
            results.append({"model": card, "error": str(e)})
            continue
        results.append(r)
        print(f"{r['model']:28s} {r['images']:7d} {100 * r['accuracy']:6.2f}% {100 * r['macro_map']:6.2f}% "
              f"{r['seconds']:7.1f}")
        for k, methods in r.get("few_shot", {}).get("few_shot", {}).items():
            print(f"{'':28s} {k:2d} examples per class: " + ", ".join(
                f"{name} {100 * m['acc']['mean']:.2f}%" for name, m in methods.items()))
    load.append(os.getloadavg())
    record = {"protocol": "CLIP_benchmark zero-shot classification (top-1 micro accuracy, macro mAP)",
              "classes": classes, "templates": templates, "offset": args.offset, "results": results,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": _git_commit(),
              "load_average": load, "machine": {"cpu": platform.processor() or platform.machine(),
                                                "cores": os.cpu_count(), "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
