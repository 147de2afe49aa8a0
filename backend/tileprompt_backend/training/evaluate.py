"""Zero-shot classification, cross-modal and image-text retrieval on a shard dataset; ``tileprompt evaluate``.

Mind the Modality Gap §IV-B: each class embedding is the normalised mean of its prompts' embeddings (the card's
text tower), each tile is scored by cosine with them; mAP (macro) for multi-label tasks, top-1 accuracy for
multi-class ones. Retrieval pairs each tile's multispectral embedding (an ``aligned-s2`` card) with its RGB
composite's embedding (the CLIP card of the same space) and ranks the whole split both ways (R@1/5/10/20/50).
On a captioned dataset (``prepare-data captions``, ``--captions templated``) the card's image and text towers
are also scored on image->text and text->image R@1/5/10 and mR (``retrieval_eval``: HarMA's and RDB's protocol).
Every split is embedded in parallel over torchrun ranks and gathered on rank 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.shards import DatasetSpec
from .data.stream import eval_batches
from .distributed import Dist, gather_objects
from .inputs import model_input
from .loop import autocast, resolve_precision
from .losses import zero_shot_logits
from .metrics import RECALL_KS, ClassScores, chance_recall, cross_modal_recall, mean_average_precision, top1_accuracy
from .retrieval_eval import embed_captioned, format_recall, text_retrieval_markdown, text_retrieval_report

log = logging.getLogger(__name__)
DEFAULT_EVAL_BATCH = 256  # the reference's evaluation batch


@dataclass
class Embedded:
    """A split's embeddings (gathered, in file order) with the samples' targets and keys; rank 0 only."""

    embeddings: torch.Tensor  # (N, D) float32, L2-normalised ... or raw when asked
    targets: list[Any]
    keys: list[str]


def embed_split(models: Sequence, spec: DatasetSpec, split: str, d: Dist, batch_size: int = DEFAULT_EVAL_BATCH,
                limit: int | None = None, precision: str = "auto", raw: bool = False,
                everywhere: bool = False) -> list[Embedded] | None:
    """Embed every sample of ``split`` with each of ``models`` (``LoadedModel``s) from the same raw tiles.

    Ranks embed positions r, r + world, ...; rank 0 gets the gathered result (others get None, or the same
    result with ``everywhere``). Unit-normalised embeddings unless ``raw`` (the towers' un-normalised features).
    """
    precision = resolve_precision(precision, d.device)
    towers = [m.image_tower for m in models]
    was_training = [t.training for t in towers]
    for t in towers:
        t.eval()
    positions: list[int] = []
    out: list[list[torch.Tensor]] = [[] for _ in models]
    targets: list[Any] = []
    keys: list[str] = []

    def embed(batch: list) -> None:
        images, infos = [s.image for _, s in batch], [s.info() for _, s in batch]
        with torch.inference_mode(), autocast(d.device, precision):
            for i, (m, t) in enumerate(zip(models, towers)):
                x = model_input(m, images, infos, d.device)
                emb = t.features(x) if raw else t(x)
                out[i].append(emb.float().cpu())
        positions.extend(p for p, _ in batch)
        targets.extend(s.target for _, s in batch)
        keys.extend(s.key for _, s in batch)

    try:
        for batch in eval_batches(spec, split, batch_size, rank=d.rank, world=d.world, limit=limit):
            embed(batch)
    finally:
        for t, was in zip(towers, was_training):
            t.train(was)
    dim = [m.embed_dim for m in models]
    mine = {"positions": positions, "targets": targets, "keys": keys,
            "emb": [torch.cat(o) if o else torch.zeros(0, dim[i]) for i, o in enumerate(out)]}
    parts = gather_objects(d, mine)
    if not d.main and not everywhere:
        return None
    order = np.argsort(np.concatenate([np.asarray(p["positions"], dtype=np.int64) for p in parts]), kind="stable")
    all_targets = [t for p in parts for t in p["targets"]]
    all_keys = [k for p in parts for k in p["keys"]]
    result = []
    for i in range(len(models)):
        emb = torch.cat([p["emb"][i] for p in parts])[torch.from_numpy(order)]
        result.append(Embedded(emb, [all_targets[j] for j in order], [all_keys[j] for j in order]))
    if not result[0].keys:
        raise ValueError(f"split {split!r} of dataset {spec.root} holds no samples")
    return result


def classification_scores(emb: torch.Tensor, targets: list[Any], head: torch.Tensor, logit_scale: float,
                          task: str) -> ClassScores:
    """mAP (multi-label) or top-1 accuracy (multi-class) of zero-shot logits; unlabelled samples left out."""
    keep = [i for i, t in enumerate(targets) if t is not None]
    if not keep:
        raise ValueError("no labelled samples to score")
    logits = zero_shot_logits(emb[keep], head.cpu(), logit_scale)
    if task == "multi-label":
        return mean_average_precision(logits, np.stack([np.asarray(targets[i]) for i in keep]))
    if task == "multi-class":
        return top1_accuracy(logits, [int(targets[i]) for i in keep], n_classes=head.shape[0])
    raise ValueError(f"task {task!r} has no classification metric")


def score_table(scores: ClassScores, classes: list[str]) -> list[dict[str, Any]]:
    return [{"class": c, scores.name: v, "support": n} for c, v, n in zip(classes, scores.per_class, scores.support)]


def retrieval_report(ms: torch.Tensor, rgb: torch.Tensor, ks: Sequence[int] = RECALL_KS) -> dict[str, Any]:
    recall = cross_modal_recall(ms, rgb, ks)
    return {"gallery": len(ms), "ms_to_rgb": recall["ms_to_rgb"], "rgb_to_ms": recall["rgb_to_ms"],
            "chance": chance_recall(len(ms), ks)}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


# --- the command -----------------------------------------------------------------------------------------------------

def build_parser(prog: str) -> argparse.ArgumentParser:
    from .command import parser_for

    p = parser_for(prog, "Zero-shot classification (mAP for multi-label tasks, top-1 accuracy for multi-class "
                         "ones, per class) of a card on a shard dataset, and with an RGB card of the same embedding "
                         "space, MS->RGB and RGB->MS Recall@1/5/10/20/50 over the whole split; on a captioned "
                         "dataset image->text and text->image Recall@1/5/10 and mR (an image's rank is its best "
                         "caption's).\n"
                         "Writes report.json, report.md and PNG plots into --out.")
    p.add_argument("--model", required=True, help="the card to evaluate (id or folder)")
    p.add_argument("--data", required=True, help="a shard dataset (tileprompt prepare-data)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--rgb-model", help="an RGB (clip) card of the same embedding space for cross-modal retrieval "
                                       "(default for an aligned card: its teacher, when installed)")
    p.add_argument("--templates", help="prompt templates (default: the dataset's, else the card's)")
    p.add_argument("--out", required=True, help="report folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a report folder evaluate wrote at --out")
    p.add_argument("--limit", type=int, help="only the first N samples of the split")
    p.add_argument("--batch-size", type=int, default=DEFAULT_EVAL_BATCH)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    return p


def _teacher_of(card):
    """The installed clip card whose space an aligned card lives in, or None."""
    from ..models import resolve_card
    from ..models.identity import space_of

    if card.family == "clip" or not card.space or "@" not in card.space:
        return None
    try:
        teacher = resolve_card(card.space.rsplit("@", 1)[0])
    except ValueError:
        return None
    return teacher if teacher.family == "clip" and space_of(teacher) == card.space else None


def evaluate(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run ``tileprompt evaluate``; returns the report on rank 0."""
    from ..models import load_model, resolve_card
    from ..models.identity import check_same_space
    from ..outputs import guard_folder_output
    from .data.shards import open_dataset
    from .distributed import init_distributed
    from .heads import task_head, task_templates

    for name in ("limit", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    spec = open_dataset(args.data)
    spec.split(args.split)
    card = resolve_card(args.model)
    rgb_card = resolve_card(args.rgb_model) if args.rgb_model else _teacher_of(card)
    out = guard_folder_output(args.out, lambda p: (p / "report.json").is_file(), args.overwrite,
                              [args.data, card.path, rgb_card.path if rgb_card else None, args.templates],
                              "report folder")
    if rgb_card is not None:
        if rgb_card.family != "clip":
            raise ValueError(f"--rgb-model {rgb_card.id!r} is not an RGB (clip) card")
        check_same_space(card, rgb_card, "cross-modal retrieval")
        if card.id == rgb_card.id:
            rgb_card = None
    d = init_distributed(args.device)
    models = [load_model(card, device=d.device.type)]
    if rgb_card is not None:
        models.append(load_model(rgb_card, device=d.device.type))
    emb = embed_split(models, spec, args.split, d, args.batch_size, args.limit, args.precision)
    captions = None
    if spec.manifest.get("captions"):  # the images are embedded above: only the captions here
        captions = embed_captioned(models[0], spec, args.split, d, args.batch_size, args.limit, args.precision,
                                   embed_images=False)
    if emb is None:
        return None
    report: dict[str, Any] = {"model": card.id, "model_space": card.space or None, "data": str(spec.root),
                              "split": args.split, "samples": len(emb[0].keys), "task": spec.task}
    labelled = spec.task != "none" and any(t is not None for t in emb[0].targets)
    if labelled:
        templates = task_templates(spec, models[0], args.templates)
        for m, e, role in zip(models, emb, ("model", "rgb_model")):
            head = task_head(m, spec.classes, templates)
            s = classification_scores(e.embeddings, e.targets, head, m.logit_scale, spec.task)
            report[f"{role}_zero_shot"] = {"card": m.card.id, "metric": s.name, "value": s.value,
                                           "ignored_classes": s.ignored, "per_class": score_table(s, spec.classes)}
        report["templates"] = templates
    if len(models) == 2:
        report["rgb_model"] = models[1].card.id
        report["retrieval"] = retrieval_report(emb[0].embeddings, emb[1].embeddings)
    if captions is not None:
        captions.images = emb[0].embeddings  # the same split, limit and file order
        report["text_retrieval"] = text_retrieval_report(captions, spec, args.split)
    write_report(report, out, spec)
    return report


def write_report(report: dict[str, Any], out: Path, spec: DatasetSpec) -> None:
    """report.json, report.md and plots (per-class scores, Recall@K) into ``out`` (written beside, then renamed)."""
    from ..outputs import staged_folder
    from .runlog import json_safe

    with staged_folder(out) as tmp:
        (tmp / "report.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
        plots = plot_report(report, tmp)
        (tmp / "report.md").write_text(markdown_report(report, plots))


def markdown_report(report: dict[str, Any], plots: list[str]) -> str:
    lines = [f"# Evaluation of `{report['model']}`", "",
             f"Dataset `{report['data']}`, split `{report['split']}`, {report['samples']} samples, task "
             f"{report['task']}.", ""]
    zs = [(k, v) for k, v in report.items() if k.endswith("_zero_shot")]
    if zs:
        lines += ["## Zero-shot classification", "", "| card | metric | value | classes left out (no positives) |",
                  "|---|---|---|---|"]
        lines += [f"| `{v['card']}` | {v['metric']} | {_pct(v['value'])} | {v['ignored_classes']} |" for _, v in zs]
        lines += ["", "| class | support | " + " | ".join(f"`{v['card']}`" for _, v in zs) + " |",
                  "|---|---|" + "---|" * len(zs)]
        metric = zs[0][1]["metric"]
        for i, row in enumerate(zs[0][1]["per_class"]):
            cells = " | ".join(_pct(v["per_class"][i][metric]) for _, v in zs)
            lines.append(f"| {row['class']} | {row['support']} | {cells} |")
        lines.append("")
    r = report.get("retrieval")
    if r:
        ks = list(r["ms_to_rgb"])
        lines += ["## Cross-modal retrieval", "",
                  f"`{report['model']}` (MS) and `{report['rgb_model']}` (RGB composite), gallery = the whole split "
                  f"({r['gallery']} tiles), one positive per query (the same tile).", "",
                  "| direction | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for name, key in (("MS -> RGB", "ms_to_rgb"), ("RGB -> MS", "rgb_to_ms"), ("chance", "chance")):
            lines.append(f"| {name} | " + " | ".join(_pct(r[key][k]) for k in ks) + " |")
        lines.append("")
    if report.get("text_retrieval"):
        lines += text_retrieval_markdown(report["text_retrieval"], report["model"])
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], folder: Path) -> list[str]:
    """Per-class zero-shot scores (bars) and Recall@K curves against chance; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    zs = [v for k, v in report.items() if k.endswith("_zero_shot")]
    if zs:
        classes = [r["class"] for r in zs[0]["per_class"]]
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(classes) + 2), 4), dpi=110)
        width = 0.8 / len(zs)
        for j, v in enumerate(zs):
            vals = [100 * (r[v["metric"]] or 0) for r in v["per_class"]]
            ax.bar(np.arange(len(classes)) + j * width, vals, width, label=f"{v['card']} ({v['metric']})")
        ax.set_xticks(np.arange(len(classes)) + width * (len(zs) - 1) / 2)
        ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("%")
        ax.legend(fontsize=7)
        ax.set_title("zero-shot score per class")
        fig.tight_layout()
        fig.savefig(folder / "per_class.png")
        plt.close(fig)
        names.append("per_class.png")
    r = report.get("retrieval")
    if r:
        ks = [int(k) for k in r["ms_to_rgb"]]
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
        for key, label in (("ms_to_rgb", "MS -> RGB"), ("rgb_to_ms", "RGB -> MS"), ("chance", "chance")):
            ax.plot(ks, [100 * r[key][k] for k in r[key]], "--" if key == "chance" else "-o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K (%)")
        ax.set_title(f"cross-modal retrieval, gallery {r['gallery']}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "recall_at_k.png")
        plt.close(fig)
        names.append("recall_at_k.png")
    return names


def _print_report(report: dict[str, Any] | None) -> None:
    if report is None:
        return
    for k, v in report.items():
        if k.endswith("_zero_shot"):
            print(f"{v['card']}: zero-shot {v['metric']} {_pct(v['value'])} on {report['split']} "
                  f"({report['samples']} samples)")
    r = report.get("retrieval")
    if r:
        for key in ("ms_to_rgb", "rgb_to_ms"):
            print(f"{key.replace('_to_', '->').upper():8s} " + "  ".join(f"R@{k} {_pct(v)}" for k, v in r[key].items()))
    if report.get("text_retrieval"):
        print(f"image-text retrieval: {format_recall(report['text_retrieval'])}")


def main(argv: Sequence[str] | None = None, prog: str = "tileprompt evaluate") -> int:
    from .command import run_command

    parser = build_parser(prog)
    return run_command(parser, argv, lambda args: _print_report(evaluate(args)))


if __name__ == "__main__":
    sys.exit(main(prog="python -m tileprompt_backend.training.evaluate"))
