"""Retrieval adapter training, shared by HarMA and RDB: captioned data, the trainable adapted CLIP, image-text
evaluation (R@1/5/10, mR) with model selection on the validation split, and the adapted card.

A run: the base card (any open_clip ViT card) is loaded and frozen, the method's adapters are attached
(``models.adapters``), and only they and the method's own parameters train. Each training visit of an image
draws one of its captions; an epoch is, as in the references, one pass over the captions, i.e.
``captions per image`` passes over the images. After every epoch the validation split is embedded and ranked;
the adapters of the best validation mR are kept and written into the card (never selected on the test split -
the released HarMA code selects on test). The card is the base card plus an ``adapters`` entry and the adapter
weights; it lives in a new embedding space, and ``tileprompt classify``/``search --text`` use it as any card.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.adapters import adapter_state_dict, attach_adapters, has_adapters, parameter_counts
from ..models.adapters.common import MlpAdapter
from ..models.loading import encode_text_trimmed
from ..sentinel2.bands import RGB_BANDS
from ..sentinel2.composite import rgb_composite
from ..sentinel2.readers import RGB_NAMES
from .augment import RandAugment, apply_crop, rand_augment, random_resized_crop, with_flips
from .data.captions import PATTERNS, draw_caption, pre_caption
from .data.samples import Sample, take_bands
from .data.shards import DatasetSpec
from .distributed import Dist, barrier, broadcast_object
from .inputs import model_input
from .patch import steps_for as patch_steps_for
from .retrieval_eval import DEFAULT_EVAL_BATCH, embed_captioned, format_recall, retrieval_scores
from .runlog import append_event, json_safe

log = logging.getLogger(__name__)
AUGMENTS = ("reference", "flip", "none")
BEST = "best"


# --- data --------------------------------------------------------------------------------------------------------

def check_captioned(spec: DatasetSpec) -> None:
    """Retrieval training needs captions: an RSICD/RSITMD set or rasters with templated captions."""
    if not spec.manifest.get("captions"):
        raise ValueError(f"dataset {spec.root} has no captions: make one with `tileprompt prepare-data captions "
                         "FILES --images DIR` (RSICD / RSITMD) or `prepare-data rasters ... --captions templated`")
    spec.split("train")


def captions_per_image(spec: DatasetSpec, split: str = "train") -> float:
    """Mean captions per image of a split (the manifest's counts; templated captions: one per pattern)."""
    info = spec.manifest.get("captions", {})
    counts = info.get("per_split", {}).get(split)
    if counts and counts.get("images"):
        return counts["captions"] / counts["images"]
    return float(len(PATTERNS)) if info.get("templated") else 1.0


@dataclass
class CaptionItem:
    """One training pair: the image (raw, or its 8-bit RGB composite), what it is, one of its captions."""

    image: np.ndarray
    info: SimpleNamespace
    caption: str
    key: str
    label: int | None


@dataclass
class CaptionTransform:
    """Sample -> :class:`CaptionItem`: one caption drawn, the image augmented as the method's reference does.

    For an RGB card, Sentinel-2 tiles first become the card's 8-bit composite (exactly what its preprocessing
    would make of them), so augmentations act on 8-bit RGB as the references' PIL pipelines do. ``reference``:
    HarMA's RandomResizedCrop(scale 0.5-1) + horizontal flip + ALBEF RandomAugment(2, 7); ``flip``: horizontal
    flip; ``none``. Multispectral cards get the crop and flip only (colour operations are RGB operations).
    """

    rgb_card: bool
    composite: dict[str, float]
    augment: str = "none"
    max_words: int = 30
    crop_scale: tuple[float, float] = (0.5, 1.0)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> CaptionItem:
        image, info = sample.image, sample.info()
        if self.rgb_card and sample.kind == "s2":
            rgb = take_bands(np.asarray(image), sample.bands, RGB_BANDS, sample.key)
            image = rgb_composite(rgb, sample.level, self.composite)
            info = SimpleNamespace(kind="rgb", level="unknown", bands=RGB_NAMES, path=sample.key)
        if self.augment != "none":
            h, w = image.shape[1:]
            crop = random_resized_crop(h, w, rng, self.crop_scale) if self.augment == "reference" else \
                random_resized_crop(h, w, rng, (1.0, 1.0), (1.0, 1.0))
            image = apply_crop(np.asarray(image), with_flips(crop, rng, p_h=0.5, p_v=0.0))
            if self.augment == "reference" and info.kind == "rgb":
                image = rand_augment(np.asarray(image, dtype=np.uint8), rng, RandAugment())
        caption = pre_caption(draw_caption(sample.meta["captions"], rng), self.max_words)
        label = int(sample.target) if isinstance(sample.target, (int, np.integer)) else None
        return CaptionItem(np.asarray(image), info, caption, sample.key, label)


def key_ids(keys: Sequence[str], device: torch.device) -> torch.Tensor:
    """A number per image key (pairs of one image share it), to tell same-image pairs apart across ranks."""
    return torch.tensor([zlib.crc32(k.encode()) for k in keys], dtype=torch.long, device=device)


# --- the trainable model -----------------------------------------------------------------------------------------

class AdaptedClip(nn.Module):
    """What training changes: the adapters of an open_clip model (held by reference, frozen) and the method's own
    parameters (``extras``). Checkpoints therefore hold only these; ``forward`` runs the whole model."""

    def __init__(self, clip: nn.Module, extras: nn.Module):
        super().__init__()
        self._clip = (clip,)
        self.blocks = nn.ModuleList(m for m in clip.modules() if isinstance(m, MlpAdapter))
        self.shared = clip.adapters_shared
        self.extras = extras

    @property
    def clip(self) -> nn.Module:
        return self._clip[0]

    def forward(self, images: torch.Tensor | None, tokens: torch.Tensor | None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """L2-normalised (image, text) embeddings; either input may be None."""
        img = F.normalize(self.clip.encode_image(images), dim=-1) if images is not None else None
        txt = F.normalize(encode_text_trimmed(self.clip, tokens), dim=-1) if tokens is not None else None
        return img, txt


def freeze_and_adapt(clip: nn.Module, method: str, config: dict, seed: int) -> None:
    """Freeze every base parameter, then attach fresh adapters (the only trainable weights besides extras)."""
    if has_adapters(clip):
        raise ValueError("the base model already carries adapters: train from the card it was made from")
    for p in clip.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attach_adapters(clip, method, config)


def gather_batch(d: Dist, x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of ``x`` concatenated (with gradient to the local rows): the global batch, as HarMA's
    code gathers embeddings before its losses."""
    if not d.distributed:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)


# --- model selection -----------------------------------------------------------------------------------------------

class Selection:
    """The best validation mR so far and its weights (``RUN_DIR/best/``, written by rank 0, kept across resume)."""

    def __init__(self, run_dir: Path, d: Dist):
        self.dir = Path(run_dir) / BEST
        self.d = d
        meta = self.dir / "best.json"
        found = json.loads(meta.read_text()) if d.main and meta.is_file() else None
        self.best: dict[str, Any] | None = broadcast_object(d, found)  # rank 0's view, on every rank

    def clear(self) -> None:
        if self.d.main and self.dir.exists():
            import shutil

            shutil.rmtree(self.dir)
        self.best = None
        barrier(self.d)

    def offer(self, step: int, scores: dict[str, Any], module: AdaptedClip) -> bool:
        """Keep ``module``'s weights if ``scores`` beat the best validation mR (ties keep the earlier step)."""
        if self.best is not None and scores["mR"] <= self.best["mR"]:
            return False
        self.best = {"step": step, "mR": scores["mR"], "scores": scores}
        if self.d.main:
            from ..models.weights import write_weights

            self.dir.mkdir(parents=True, exist_ok=True)
            write_weights(module.state_dict(), self.dir / "weights.safetensors")
            tmp = self.dir / f".best.json.{os.getpid()}"
            tmp.write_text(json.dumps(json_safe(self.best)) + "\n")
            tmp.replace(self.dir / "best.json")
        return True

    def restore(self, module: AdaptedClip) -> int | None:
        """Load the best weights into ``module`` (every rank); returns their step, None without a selection."""
        barrier(self.d)
        path = self.dir / "weights.safetensors"
        if self.best is None or not path.is_file():
            return None
        from ..models.weights import read_weights

        module.load_state_dict(read_weights(path))
        return int(self.best["step"])


# --- the run -----------------------------------------------------------------------------------------------------

@dataclass
class MethodSpec:
    """What a method brings to the shared run."""

    name: str  # "harma" | "rdb"
    adapter_config: dict[str, Any]
    extras: nn.Module
    #: (module, inputs) -> (loss, metrics); inputs: img, txt, same, labels, labelled (the global batch), tokens
    #: (this rank's), gather (this rank's rows -> the global batch's)
    loss: Callable[[nn.Module, SimpleNamespace], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    no_decay: Callable[[str], bool]
    after_step: Callable[[AdaptedClip, int], None] | None = None
    prepare: Callable[[AdaptedClip], None] | None = None  # once the trained module exists (before any resume)
    logit_scale: Callable[[AdaptedClip], float | None] = lambda m: None
    paper_params: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)


def steps_for(spec: DatasetSpec, batch: int, epochs: float, max_steps: int | None, limit: int | None,
              world: int) -> tuple[int, int, int]:
    """(steps per pass over the images, steps per epoch over the captions, total steps)."""
    per_pass, _ = patch_steps_for(spec, batch, 1, None, limit, world)  # the checks: one global batch fits
    per_epoch = max(1, int(round(per_pass * captions_per_image(spec))))
    total = max(1, int(round(epochs * per_epoch)))
    return per_pass, per_epoch, min(total, max_steps) if max_steps else total


def batch_inputs(module: AdaptedClip, model, items: list[CaptionItem], d: Dist) -> SimpleNamespace:
    """Model input and labels of this rank's items."""
    x = model_input(model, [i.image for i in items], [i.info for i in items], d.device)
    tokens = model.tokenize([i.caption for i in items]).to(d.device)
    labels = torch.tensor([i.label if i.label is not None else -1 for i in items], device=d.device)
    return SimpleNamespace(x=x, tokens=tokens, labels=labels, ids=key_ids([i.key for i in items], d.device))


def make_loss_fn(method: MethodSpec, module: AdaptedClip, model, d: Dist) -> Callable:
    """The Trainer's ``loss_fn``: embed this rank's pairs, gather the global batch, apply the method's loss."""

    def loss_fn(trained: nn.Module, items: list[CaptionItem]):
        b = batch_inputs(module, model, items, d)
        img, txt = trained(b.x, b.tokens)
        ids, labels = gather_batch(d, b.ids), gather_batch(d, b.labels)
        inputs = SimpleNamespace(img=gather_batch(d, img), txt=gather_batch(d, txt), same=ids[:, None] == ids[None, :],
                                 labels=labels, labelled=labels >= 0, tokens=b.tokens,
                                 gather=lambda t: gather_batch(d, t))
        return method.loss(module, inputs)

    return loss_fn


def validation_hook(method: MethodSpec, module: AdaptedClip, model, spec: DatasetSpec, d: Dist, selection: Selection,
                    run_dir: Path, every: int, total: int, args: argparse.Namespace) -> Callable[[int], None]:
    """After-step hook: the method's own update (EMA), and every ``every`` steps the validation ranking."""
    has_val = "val" in spec.splits

    def hook(step: int) -> None:
        if method.after_step is not None:
            method.after_step(module, step)
        if not has_val or (step % every and step != total):
            return
        module.eval()
        try:
            emb = embed_captioned(model, spec, "val", d, args.eval_batch_size, args.limit, args.precision,
                                  args.max_words)
        finally:
            module.train()
        scores = broadcast_object(d, retrieval_scores(emb) if d.main else None)
        improved = selection.offer(step, scores, module)
        append_event(run_dir, d, "eval", step=step, split="val", **scores, best=improved)
        if d.main:
            log.info("step %d val: %s%s", step, format_recall(scores), " (best so far)" if improved else "")

    return hook


def write_adapted_card(base, out: Path, args: argparse.Namespace, method: MethodSpec, module: AdaptedClip,
                       report: dict[str, Any]):
    """The base card plus the adapters: weights file, config, logit scale, provenance; in its own space."""
    from ..models.card import CARD_FILE
    from ..models.registry import get_family
    from .cards import write_trained_card

    data = json.loads((base.path / CARD_FILE).read_text()) if base.path else base.to_json()
    base_files = get_family(base.family).weight_files(base)
    data.pop("space", None)
    name = {"harma": "HarMA", "rdb": "RDB"}[method.name]
    data.update(id=args.id or out.name, title=args.title or f"{base.title} + {name} retrieval adapters",
                adapters={"method": method.name, "config": method.adapter_config, "weights": "adapters.safetensors"},
                sources={k: v for k, v in base.sources.items() if k in base_files})
    scale = method.logit_scale(module)
    if scale is not None:
        data["logit_scale"] = scale
    data["provenance"] = {"method": method.name, "base": {"id": base.id, "card_hash": base.card_hash()},
                          **method.provenance, **report}
    copies = {f: base.file(f) for f in base_files}
    return write_trained_card(out, data, {"adapters.safetensors": adapter_state_dict(module.clip)}, copies,
                              overwrite=args.overwrite, own_space=True)


def describe_counts(module: AdaptedClip, method: MethodSpec) -> dict[str, Any]:
    """Trainable parameters beside the base model's, with the paper's figure."""
    counts = parameter_counts(module.clip)
    extras = sum(p.numel() for p in module.extras.parameters())
    trainable = counts["adapters"] + extras
    return {"trainable": trainable, "adapters": counts["adapters"], "method_parameters": extras,
            "image_adapters": counts["image"], "text_adapters": counts["text"], "shared": counts["shared"],
            "per_depth_module": counts["per_depth"], "base": counts["base"],
            "share_of_total": trainable / (counts["base"] + trainable), "paper": method.paper_params}


def add_retrieval_arguments(p: argparse.ArgumentParser, augment: str, model_help: str) -> None:
    """Options every retrieval adapter training has (besides the run options of ``command``)."""
    p.add_argument("--data", required=True, help="a captioned shard dataset: `tileprompt prepare-data captions` "
                                                 "(RSICD/RSITMD) or `prepare-data rasters ... --captions templated`")
    p.add_argument("--model", default="clip-vit-b32-openai", help=model_help)
    p.add_argument("--augment", choices=AUGMENTS, default=augment,
                   help=f"training augmentation (default: {augment}): reference = HarMA's RandomResizedCrop(0.5-1) "
                        "+ flip + RandomAugment(2, 7); flip; none")
    p.add_argument("--max-words", type=int, default=30, help="captions are cleaned and cut to this many words "
                                                             "(HarMA's pre_caption; default 30)")
    p.add_argument("--eval-every", type=int, help="steps between validation rankings (default: once per epoch); "
                                                  "the best validation mR is kept")
    p.add_argument("--eval-batch-size", type=int, default=DEFAULT_EVAL_BATCH,
                   help=f"images per evaluation batch (default: {DEFAULT_EVAL_BATCH})")


def run_retrieval(args: argparse.Namespace, build: Callable[[argparse.Namespace, DatasetSpec, Any, Dist], MethodSpec],
                  config_for_loop: Callable[[argparse.Namespace, int, int], Any]):
    """Train a method's adapters on a captioned dataset and write the adapted card (rank 0 returns it)."""
    from ..models import load_model, resolve_card
    from ..models.identity import weights_hash
    from .cards import check_card_output
    from .command import default_run_dir, positive
    from .data.shards import open_dataset
    from .data.stream import TrainStream, batches
    from .distributed import init_distributed, seed_everything
    from .loop import Trainer

    positive(args, "batch-size", "epochs", "max-steps", "limit", "lr", "eval-batch-size", "eval-every",
             "log-every", "checkpoint-every", "max-words")
    out = check_card_output(args.out, args.overwrite)
    run_dir = Path(args.run_dir).expanduser() if args.run_dir else default_run_dir(out)
    spec = open_dataset(args.data)
    check_captioned(spec)
    base = resolve_card(args.model)
    if base.family != "clip":
        raise ValueError(f"model {base.id!r} is a {base.family!r} card: retrieval adapters go on an open_clip "
                         "(clip family) card")
    if base.adapters:
        raise ValueError(f"model {base.id!r} already carries {base.adapters['method']} adapters: train from its "
                         f"base card ({base.provenance.get('base', {}).get('id', 'the card it was made from')})")
    if base.path is not None and out.resolve() == base.path.resolve():
        raise ValueError(f"--out {out} is the base card's own folder: the adapted card needs a folder of its own")

    d = init_distributed(args.device)
    seed_everything(args.seed)
    per_pass, per_epoch, total = steps_for(spec, args.batch_size, args.epochs, args.max_steps, args.limit, d.world)
    model = load_model(base, device=d.device.type)
    base = model.card  # the copy with downloaded weights, if a download happened
    method = build(args, spec, model, d)
    freeze_and_adapt(model.text_model, method.name, method.adapter_config, args.seed)
    module = AdaptedClip(model.text_model, method.extras)
    if method.prepare is not None:
        method.prepare(module)
    module.to(d.device)
    counts = describe_counts(module, method)

    run_dir.mkdir(parents=True, exist_ok=True)
    config = config_for_loop(args, total, per_epoch)
    resume_key = {"method": method.name, "data": {"root": str(spec.root.resolve()),
                                                  "created": spec.manifest.get("created")},
                  "model": base.id, "card_hash": base.card_hash(), "weights": weights_hash(base),
                  "adapters": method.adapter_config, "batch": args.batch_size, "total_steps": total,
                  "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed, "augment": args.augment,
                  "limit": args.limit, "max_words": args.max_words, **method.provenance}
    trainer = Trainer(module, config, d, run_dir, json_safe(resume_key), args.batch_size, desc=method.name,
                      quiet=args.quiet, no_decay=method.no_decay)
    start = trainer.start(resume=not args.no_resume)
    selection = Selection(run_dir, d)
    if selection.best is not None and selection.best["step"] > start:
        selection.clear()  # chosen after the checkpoint we resume from (or by an earlier run): start over
    transform = CaptionTransform(base.input.modality == "rgb", dict(base.input.composite), args.augment,
                                 args.max_words)
    stream = TrainStream(spec=spec, split="train", batch=args.batch_size // d.world, steps_per_epoch=per_pass,
                         transform=transform, start_step=start, rank=d.rank, world=d.world, seed=args.seed,
                         shuffle=True, buffer=args.shuffle_buffer, limit=args.limit)
    every = args.eval_every or per_epoch
    hook = validation_hook(method, module, model, spec, d, selection, run_dir, every, total, args)
    if d.main:
        print(f"{method.name}: {base.id} on {spec.root.name}, {total} steps of {args.batch_size} "
              f"({per_epoch} per epoch over the captions), {d.world} rank(s) on {d.device}; trainable "
              f"{counts['trainable']:,} parameters ({100 * counts['share_of_total']:.2f} % of the model; "
              f"{counts['per_depth_module']:,} per depth){'; ' + method.paper_params if method.paper_params else ''}")
    result = trainer.fit(batches(stream, args.workers), make_loss_fn(method, module, model, d), per_epoch, hook)

    best_step = selection.restore(module)
    module.eval()
    report: dict[str, Any] = {"steps": result.steps, "selected_step": best_step or result.steps,
                              "selection": "best validation mR" if best_step else
                              "last step (the dataset has no validation split)",
                              "parameters": counts, "data": {"root": str(spec.root), "name": spec.name,
                                                             "captions": spec.manifest.get("captions")},
                              "recipe": {"batch": args.batch_size, "epochs": args.epochs, "lr": args.lr,
                                         "weight_decay": args.weight_decay, "augment": args.augment,
                                         "schedule": config.schedule, "seed": args.seed}}
    for split in ("val", "test"):
        if split in spec.splits:
            emb = embed_captioned(model, spec, split, d, args.eval_batch_size, args.limit, args.precision,
                                  args.max_words)
            if d.main:
                report.setdefault("metrics", {})[split] = retrieval_scores(emb)
    if not d.main:
        barrier(d)
        return None
    written = write_adapted_card(base, out, args, method, module, report)
    append_event(run_dir, d, "card", step=result.steps, out=str(written.path), space=written.space,
                 selected_step=report["selected_step"])
    for split, scores in report.get("metrics", {}).items():
        print(f"{split:5s} {format_recall(scores)}")
    print(f"wrote {written.path} (space {written.space}; adapters from step {report['selected_step']}, "
          f"{report['selection']})")
    barrier(d)
    return written
