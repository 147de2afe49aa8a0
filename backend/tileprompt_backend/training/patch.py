"""``tileprompt train patch``: PAINT patching of CLIP's image tower on RGB composites (Mind the Modality Gap, stage 1).

1. Fine-tune the CLIP visual tower on the patching task's RGB composites against the frozen zero-shot head of its
   class prompts (built once with the original text tower): logits = card logit_scale x cosine; BCE for
   multi-label tasks (BigEarthNet), cross-entropy for multi-class ones. AdamW, cosine schedule with linear
   warm-up, gradient clipping, bf16 autocast on CUDA.
2. Interpolate theta_alpha = (1 - alpha) theta_zs + alpha theta_ft for every alpha of the sweep (default 0.0 ...
   1.0 step 0.1; Ilharco et al. 2022, PAINT, Eq. 1; the paper's W_patch).
3. Evaluate the patching task and a supported task (--supported: any held-out dataset) per alpha on their
   validation splits (and test splits, reported), pick alpha by PAINT's rule: the best average of the two
   validation scores (ties: the smaller alpha, closer to zero-shot); without a supported task, the best patching
   score (nothing then guards against forgetting: say --alpha to fix it).
4. Write a ``clip`` card: the base card's weights plus the patched visual tower as an overlay, its metrics and
   provenance, in a new embedding space; and plot both scores against alpha (the paper's Fig. 4).

Paper recipe (defaults): batch 128, 1 epoch, lr 1e-5, weight decay 0.5, 200 warm-up steps, grad clip 1.0,
ColorJitter(0.4, 0.4, 0.4) p 0.8, RandomGrayscale p 0.2, GaussianBlur p 0.4, RandomResizedCrop scale (0.9, 1),
flips; seed 42.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models import load_model, resolve_card
from ..models.card import ModelCard
from ..models.identity import space_of, weights_hash
from ..sentinel2.bands import RGB_BANDS
from ..sentinel2.readers import RGB_NAMES
from .augment import ColorAug, apply_crop, color_augment, random_resized_crop, with_flips
from .cards import check_card_output, now, write_trained_card
from .command import add_run_arguments, default_run_dir, parser_for, positive, run_command
from .data.samples import Sample, take_bands
from .data.shards import DatasetSpec, open_dataset
from .data.stream import TrainStream, batches, split_size
from .distributed import Dist, barrier, init_distributed, seed_everything
from .evaluate import DEFAULT_EVAL_BATCH, classification_scores, embed_split
from .heads import task_head, task_templates
from .inputs import model_input
from .loop import LoopConfig, Trainer
from .losses import classification_loss, zero_shot_logits
from .runlog import append_event, json_safe

log = logging.getLogger(__name__)
DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def paint_interpolate(theta_zs: Mapping[str, torch.Tensor], theta_ft: Mapping[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """PAINT (Ilharco et al. 2022, Eq. 1) = the paper's W_patch: (1 - alpha) theta_zs + alpha theta_ft, per key.

    Written as the paper writes it (not as ``lerp``), so alpha = 0 gives theta_zs and alpha = 1 gives theta_ft
    exactly. Both state dicts must have the same keys and shapes; integer buffers must agree.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if set(theta_zs) != set(theta_ft):
        diff = sorted(set(theta_zs) ^ set(theta_ft))
        raise ValueError(f"zero-shot and fine-tuned weights have different keys: {', '.join(diff[:8])}")
    out = {}
    for k, zs in theta_zs.items():
        ft = theta_ft[k]
        if zs.shape != ft.shape:
            raise ValueError(f"{k}: zero-shot shape {tuple(zs.shape)} != fine-tuned {tuple(ft.shape)}")
        if zs.is_floating_point():
            out[k] = (1.0 - alpha) * zs + alpha * ft.to(zs.dtype)
        elif torch.equal(zs, ft):
            out[k] = zs.clone()
        else:
            raise ValueError(f"{k}: integer tensors differ between zero-shot and fine-tuned weights")
    return out


def parse_alphas(text: str | None) -> tuple[float, ...]:
    """``"0:1:0.1"`` (start:stop:step, inclusive) or ``"0,0.5,1"``."""
    if not text:
        return DEFAULT_ALPHAS
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            n = int(round((stop - start) / step))
            values = [round(start + i * step, 6) for i in range(n + 1)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--alphas takes start:stop:step or a comma-separated list, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"--alphas must lie in [0, 1], got {text!r}")
    return tuple(sorted(set(values)))


def choose_alpha(rows: list[dict[str, Any]], supported: bool) -> float:
    """PAINT's rule on validation scores: best mean of patching and supported task (or patching alone).

    Ties go to the smaller alpha (closer to the zero-shot model, the safer choice for unseen tasks).
    """
    def score(r):
        return (r["patch_val"] + r["supported_val"]) / 2 if supported else r["patch_val"]

    best = max(score(r) for r in rows)
    return min(r["alpha"] for r in rows if score(r) >= best - 1e-12)


# --- data -------------------------------------------------------------------------------------------------------

@dataclass
class PatchTransform:
    """Raw sample -> its RGB bands cropped, flipped and colour-jittered as the reference augments composites."""

    composite: dict[str, float]
    augment: bool
    crop_scale: tuple[float, float] = (0.9, 1.0)
    color: ColorAug = ColorAug()

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        bands = RGB_NAMES if sample.kind == "rgb" else RGB_BANDS
        rgb = take_bands(np.asarray(sample.image, dtype=np.float32), sample.bands, bands, sample.key)
        if self.augment:
            crop = with_flips(random_resized_crop(rgb.shape[1], rgb.shape[2], rng, self.crop_scale), rng)
            rgb = apply_crop(rgb, crop)
            divisor = 255.0 if sample.kind == "rgb" else float(self.composite[str(sample.level).upper()])
            rgb = color_augment(rgb, divisor, rng, self.color)
        return Sample(sample.key, rgb, bands, sample.level, sample.target)


def targets_tensor(samples: Sequence[Sample], task: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, labelled mask) of a batch: multi-hot float rows or class indices; unlabelled rows masked."""
    labelled = torch.tensor([s.target is not None for s in samples], device=device)
    if task == "multi-label":
        width = next((len(s.target) for s in samples if s.target is not None), 0)
        rows = [np.asarray(s.target, dtype=np.float32) if s.target is not None else np.zeros(width, np.float32)
                for s in samples]
        return torch.from_numpy(np.stack(rows)).to(device), labelled
    return torch.tensor([int(s.target) if s.target is not None else 0 for s in samples], device=device), labelled


def check_labelled(spec: DatasetSpec, what: str) -> None:
    if spec.task not in ("multi-label", "multi-class"):
        raise ValueError(f"{what} {spec.root} has no labels (task {spec.task!r}): patching needs a labelled task")
    if len(spec.classes) < 2:
        raise ValueError(f"{what} {spec.root} has {len(spec.classes)} class: a zero-shot head needs at least 2")
    counts = spec.manifest.get("splits", {}).get("train", {}).get("per_class")
    if counts and sum(1 for n in counts.values() if n) < 2:
        present = [c for c, n in counts.items() if n]
        raise ValueError(f"the training split of {what} {spec.root} has samples of {len(present)} class(es) "
                         f"({', '.join(present) or 'none'}): training against a zero-shot head needs at least 2")


def check_bands(spec: DatasetSpec, model, split: str = "train") -> None:
    """The first sample of ``split`` gives ``model`` every band it reads (before any training starts)."""
    from .data.stream import eval_samples

    first = next(eval_samples(spec, split, limit=1), None)
    if first is None:
        raise ValueError(f"the {split} split of {spec.root} holds no samples")
    sample = first[1]
    try:
        take_bands(np.asarray(sample.image), sample.bands, tuple(model.required_bands(sample.info())), sample.key)
    except ValueError as e:
        raise ValueError(f"dataset {spec.root} cannot feed model {model.card.id!r}: {e}") from None


def steps_for(spec: DatasetSpec, batch: int, epochs: float, max_steps: int | None, limit: int | None,
              world: int) -> tuple[int, int]:
    """(steps per epoch, total steps); a clear error when the split cannot fill one global batch."""
    if batch % world:
        raise ValueError(f"--batch-size {batch} is not divisible by the {world} torchrun processes")
    n = split_size(spec, "train", limit)
    spe = n // batch
    if spe == 0:
        raise ValueError(f"the training split of {spec.root} has {n} samples, fewer than one batch of {batch}: "
                         "lower --batch-size")
    total = max(1, int(round(epochs * spe)))
    return spe, min(total, max_steps) if max_steps else total


def manifest_id(spec: DatasetSpec) -> dict[str, Any]:
    """What identifies a dataset in a resume key and in provenance."""
    m = spec.manifest
    return {"root": str(spec.root.resolve()), "created": m.get("created"), "task": spec.task,
            "classes": spec.classes, "splits": {k: v.nsamples for k, v in spec.splits.items()}}


# --- the command ------------------------------------------------------------------------------------------------

def build_parser(prog: str) -> argparse.ArgumentParser:
    p = parser_for(prog, __doc__.split("\n", 2)[2])
    p.add_argument("--data", required=True, help="the patching task: a shard dataset with train (and val) splits "
                                                 "(tileprompt prepare-data)")
    p.add_argument("--model", default="clip-vit-b32-openai",
                   help="the CLIP card to patch (id or folder; default: clip-vit-b32-openai, the paper's ablation "
                        "model)")
    p.add_argument("--supported", help="a supported task: any held-out shard dataset whose zero-shot score must "
                                       "not drop (the paper: ImageNet)")
    p.add_argument("--templates", help="prompt templates (default: the dataset's, else the card's)")
    p.add_argument("--alphas", help="mixing coefficients: start:stop:step or a list (default and paper: 0:1:0.1)")
    p.add_argument("--alpha", type=float, help="use this alpha instead of choosing one (the sweep still runs)")
    p.add_argument("--no-augment", action="store_true",
                   help="no crop, flips or colour augmentation (the paper augments)")
    p.add_argument("--eval-batch-size", type=int, default=DEFAULT_EVAL_BATCH,
                   help=f"batch size of the evaluations (default and reference: {DEFAULT_EVAL_BATCH})")
    add_run_arguments(p, batch=128, epochs=1, lr=1e-5, weight_decay=0.5, warmup=200)
    return p


def run(args: argparse.Namespace) -> ModelCard | None:
    """Train, sweep, choose alpha and write the card (rank 0); returns the card on rank 0."""
    positive(args, "batch-size", "epochs", "max-steps", "limit", "lr", "eval-batch-size", "log-every",
             "checkpoint-every")
    alphas = parse_alphas(args.alphas)
    if args.alpha is not None and args.alpha not in alphas:
        alphas = tuple(sorted(set(alphas) | {args.alpha}))
    spec = open_dataset(args.data)
    check_labelled(spec, "dataset")
    supported = open_dataset(args.supported) if args.supported else None
    if supported is not None:
        check_labelled(supported, "supported dataset")
    card = resolve_card(args.model)
    out = check_card_output(args.out, args.overwrite, [args.data, args.supported, card.path, args.templates])
    run_dir = Path(args.run_dir).expanduser() if args.run_dir else default_run_dir(out)
    if card.family != "clip":
        raise ValueError(f"model {card.id!r} is a {card.family!r} card: patching fine-tunes a CLIP (clip family) "
                         "image tower")

    d = init_distributed(args.device)
    seed_everything(args.seed)
    spe, total = steps_for(spec, args.batch_size, args.epochs, args.max_steps, args.limit, d.world)
    model = load_model(card, device=d.device.type)
    card = model.card  # the copy with downloaded weights, if a download happened
    check_bands(spec, model)
    templates = task_templates(spec, model, args.templates)
    head = task_head(model, spec.classes, templates, d.device)
    supported_head = None
    if supported is not None:
        supported_head = task_head(model, supported.classes, task_templates(supported, model, args.templates),
                                   d.device)
    visual = model.image_tower.visual
    theta_zs = {k: v.detach().cpu().clone() for k, v in visual.state_dict().items()}
    for p in model.image_tower.parameters():
        p.requires_grad_(True)

    run_dir.mkdir(parents=True, exist_ok=True)
    config = LoopConfig(total_steps=total, lr=args.lr, weight_decay=args.weight_decay,
                        warmup_steps=min(args.warmup_steps, total), grad_clip=args.grad_clip,
                        precision=args.precision, log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                        compile=args.compile)
    resume_key = {"method": "patch", "data": manifest_id(spec), "model": card.id, "card_hash": card.card_hash(),
                  "weights": weights_hash(card), "batch": args.batch_size, "total_steps": total, "lr": args.lr,
                  "weight_decay": args.weight_decay, "warmup": config.warmup_steps, "seed": args.seed,
                  "augment": not args.no_augment, "limit": args.limit, "templates": templates}
    trainer = Trainer(model.image_tower, config, d, run_dir, json_safe(resume_key), args.batch_size,
                      desc="patch", quiet=args.quiet)
    start = trainer.start(resume=not args.no_resume)
    stream = TrainStream(spec=spec, split="train", batch=args.batch_size // d.world, steps_per_epoch=spe,
                         transform=PatchTransform(dict(card.input.composite), augment=not args.no_augment),
                         start_step=start, rank=d.rank, world=d.world, seed=args.seed, shuffle=True,
                         buffer=args.shuffle_buffer, limit=args.limit)

    def loss_fn(tower, batch: list[Sample]):
        x = model_input(model, [s.image for s in batch], [s.info() for s in batch], d.device)
        logits = zero_shot_logits(tower(x), head, card.logit_scale)
        targets, labelled = targets_tensor(batch, spec.task, d.device)
        return classification_loss(logits, targets, spec.task, labelled), {}

    log.info("patching %s on %s: %d steps of %d (%d per epoch), %d rank(s) on %s", card.id, spec.root, total,
             args.batch_size, spe, d.world, d.device)
    result = trainer.fit(batches(stream, args.workers), loss_fn, spe)
    theta_ft = {k: v.detach().cpu().clone() for k, v in visual.state_dict().items()}

    rows = sweep(model, theta_zs, theta_ft, alphas, spec, head, supported, supported_head, args, d, run_dir)
    if not d.main:
        barrier(d)
        return None
    chosen = args.alpha if args.alpha is not None else choose_alpha(rows, supported is not None)
    row = next(r for r in rows if r["alpha"] == chosen)
    plot = plot_sweep(rows, chosen, spec, supported, run_dir / "alpha_sweep.png")
    report = {"method": "patch", "alpha": chosen, "alpha_rule": _rule(args, supported), "rows": rows,
              "selection_splits": {"patch": _eval_split(spec),
                                   **({"supported": _eval_split(supported)} if supported else {})},
              "steps": result.steps, "plot": str(plot), "data": str(spec.root),
              "supported": str(supported.root) if supported else None}
    (run_dir / "patch_report.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
    visual.load_state_dict(paint_interpolate(theta_zs, theta_ft, chosen))
    written = write_patched_card(card, out, args, visual.state_dict(), report, row, spec, supported, templates)
    append_event(run_dir, d, "card", step=result.steps, out=str(written.path), alpha=chosen, space=written.space)
    print(f"patched {card.id} at alpha {chosen:g}: {_describe(row, spec, supported)}")
    print(f"wrote {written.path} (space {written.space}); sweep plot {plot}")
    barrier(d)
    return written


def _rule(args: argparse.Namespace, supported: DatasetSpec | None) -> str:
    if args.alpha is not None:
        return "given (--alpha)"
    if supported is not None:
        return "PAINT: best mean of patching and supported validation scores; ties to the smaller alpha"
    return "best patching validation score (no supported task given); ties to the smaller alpha"


def _describe(row: dict[str, Any], spec: DatasetSpec, supported: DatasetSpec | None) -> str:
    metric = "mAP" if spec.task == "multi-label" else "accuracy"
    text = f"patching {metric} (val) {100 * row['patch_val']:.2f}"
    if row.get("patch_test") is not None:
        text += f", test {100 * row['patch_test']:.2f}"
    if supported is not None:
        text += f"; supported (val) {100 * row['supported_val']:.2f}"
    return text


def _eval_split(spec: DatasetSpec) -> str:
    return "val" if "val" in spec.splits else "test"


def sweep(model, theta_zs, theta_ft, alphas, spec, head, supported, supported_head, args, d: Dist,
          run_dir: Path) -> list[dict[str, Any]]:
    """Score every alpha on the validation (and test) splits of both tasks; rows on rank 0."""
    visual = model.image_tower.visual
    rows: list[dict[str, Any]] = []
    tasks = [("patch", spec, head)] + ([("supported", supported, supported_head)] if supported is not None else [])
    for alpha in alphas:
        visual.load_state_dict(paint_interpolate(theta_zs, theta_ft, alpha))
        row: dict[str, Any] = {"alpha": alpha}
        for name, ds, h in tasks:
            select = _eval_split(ds)
            for split, label in ((select, "val"), ("test", "test")):
                if split not in ds.splits or (label == "test" and select == "test"):
                    continue
                emb = embed_split([model], ds, split, d, args.eval_batch_size, args.limit, args.precision)
                if emb is not None:
                    scores = classification_scores(emb[0].embeddings, emb[0].targets, h, model.logit_scale, ds.task)
                    row[f"{name}_{label}"] = scores.value
                    row[f"{name}_per_class"] = scores.per_class  # the test split's when there is one
        if d.main:
            rows.append(row)
            append_event(run_dir, d, "sweep", **{k: v for k, v in row.items() if not k.endswith("per_class")})
            log.info("alpha %.2f: %s", alpha, "  ".join(f"{k} {100 * v:.2f}" for k, v in row.items()
                                                       if isinstance(v, float) and k != "alpha"))
    return rows


def plot_sweep(rows: list[dict[str, Any]], chosen: float, spec: DatasetSpec, supported: DatasetSpec | None,
               path: Path) -> Path:
    """Both tasks' scores against alpha (Mind the Modality Gap, Fig. 4), validation solid, test dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = [r["alpha"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    series = [("patch", spec, "tab:blue")] + ([("supported", supported, "tab:orange")] if supported else [])
    for name, ds, color in series:
        metric = "mAP" if ds.task == "multi-label" else "accuracy"
        label = f"{'patching' if name == 'patch' else 'supported'}: {ds.name} ({metric})"
        ax.plot(a, [100 * r[f"{name}_val"] for r in rows], "-o", color=color, label=f"{label}, val")
        if all(f"{name}_test" in r for r in rows) and _eval_split(ds) != "test":
            ax.plot(a, [100 * r[f"{name}_test"] for r in rows], "--", color=color, alpha=0.6, label=f"{label}, test")
    ax.axvline(chosen, color="gray", linestyle=":", label=f"chosen alpha {chosen:g}")
    ax.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    ax.set_ylabel("score (%)")
    ax.set_title("PAINT weight interpolation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_patched_card(base: ModelCard, out: Path, args: argparse.Namespace, visual_sd: Mapping[str, torch.Tensor],
                       report: dict, row: dict, spec: DatasetSpec, supported: DatasetSpec | None,
                       templates: list[str]) -> ModelCard:
    """The base card with the patched visual tower as ``image_tower.weights`` (base weights kept or copied)."""
    data = base.to_json()
    data.pop("space", None)
    card_id = args.id or out.name
    data.update(id=card_id, trained=True,
                title=args.title or f"{base.title} patched on {spec.name} (PAINT, alpha {report['alpha']:g})")
    data["image_tower"] = dict(data["image_tower"], weights="image_tower.safetensors")
    copies = {}
    if base.weights:  # a full checkpoint beside the base card: the new card needs its own copy
        copies[base.weights] = base.file(base.weights)
    zero_shot = next(r for r in report["rows"] if r["alpha"] == 0.0) if any(
        r["alpha"] == 0.0 for r in report["rows"]) else None
    data["provenance"] = {
        "method": "PAINT patching (Ilharco et al. 2022), stage 1 of Mind the Modality Gap (Zavras et al. 2024)",
        "papers": ["arXiv:2208.05592", "arXiv:2402.09816"],
        "base_model": {"id": base.id, "card_hash": base.card_hash(), "weights_hash": weights_hash(base),
                       "space": space_of(base)},
        "data": {"patching": report["data"], "supported": report["supported"], "classes": spec.classes,
                 "templates": templates},
        "alpha": report["alpha"], "alpha_rule": report["alpha_rule"],
        "metrics": {"chosen": {k: v for k, v in row.items() if not k.endswith("per_class")},
                    "zero_shot": {k: v for k, v in zero_shot.items() if not k.endswith("per_class")}
                    if zero_shot else None,
                    "sweep": [{k: v for k, v in r.items() if not k.endswith("per_class")} for r in report["rows"]]},
        "config": {k: getattr(args, k) for k in ("batch_size", "epochs", "max_steps", "limit", "lr", "weight_decay",
                                                 "warmup_steps", "grad_clip", "seed", "precision", "no_augment")},
        "steps": report["steps"], "created": now(),
    }
    overlay = {f"visual.{k}": v for k, v in visual_sd.items()}  # open_clip keys, as the clip family loads them
    return write_trained_card(out, json_safe(data), {"image_tower.safetensors": overlay}, copies,
                              overwrite=args.overwrite, own_space=True)


def main(argv: Sequence[str] | None = None, prog: str = "tileprompt train patch") -> int:
    return run_command(build_parser(prog), argv, run)


if __name__ == "__main__":
    sys.exit(main(prog="python -m tileprompt_backend.training.patch"))
