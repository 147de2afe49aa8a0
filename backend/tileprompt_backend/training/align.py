"""``tileprompt train align``: cross-modal alignment of a Sentinel-2 encoder to a (patched) CLIP (Mind the Modality
Gap, stage 2).

Student: a 13-band timm ViT (ViT-S/16 by default; SSL4EO-S12 MoCo backbone with --student-from, or random, or the
backbone of any aligned-s2 card such as a CMID export) + Linear(384 -> D). Teacher: the frozen image tower of a
``clip`` card (patched by ``train patch``, or the original) on the RGB composite of **the same tile and the same
crop** (the reference crops its two views independently; here one crop window is drawn per tile and both
encoders see it). Loss (Eq. 1): MSE(student, teacher) on the un-normalised embeddings + lambda x BCE (multi-label)
or CE (multi-class) of the student's zero-shot logits against the task's labels, with the frozen head of the
task's prompts (teacher's text tower); unlabelled tiles (or data) give MSE alone. When augmentation is off the
frozen teacher's embeddings are computed once per tile and cached (--teacher-cache).

Writes an ``aligned-s2`` card whose text tower is the teacher's and whose embedding ``space`` is the teacher's,
with the student's zero-shot score beside the teacher's on the same tiles and MS<->RGB Recall@K.

Paper recipe (defaults): batch 256, 5 epochs, lr 1e-4, weight decay 0.01, 2000 warm-up steps, cosine, grad clip
1.0, lambda 0.05, RandomResizedCrop scale (0.9, 1) to 224 px, student drop-path 0.2; seed 42.
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
from torch import nn

from ..models import load_model, resolve_card
from ..models.aligned_s2 import DEFAULT_ARCH
from ..models.card import ModelCard, card_from_dict, write_card
from ..models.checkpoints import convert_checkpoint, ssl4eo_checkpoint_filter
from ..models.downloads import file_sha256
from ..models.identity import space_of, weights_hash
from ..models.weights import read_weights, write_weights
from ..sentinel2.bands import BANDS
from .augment import apply_crop, random_resized_crop
from .cards import check_card_output, now, write_trained_card
from .command import add_run_arguments, default_run_dir, parser_for, positive, run_command
from .data.samples import Sample
from .data.shards import DatasetSpec, open_dataset
from .data.stream import TrainStream, batches
from .distributed import Dist, barrier, init_distributed, seed_everything
from .evaluate import DEFAULT_EVAL_BATCH, classification_scores, embed_split, retrieval_report
from .heads import task_head, task_templates
from .inputs import model_input
from .loop import LoopConfig, Trainer
from .losses import alignment_loss, zero_shot_logits
from .patch import check_bands, manifest_id, steps_for, targets_tensor
from .runlog import append_event, json_safe

log = logging.getLogger(__name__)
DEFAULT_LAMBDA = 0.05
STUDENT_INIT = "student_init"


# --- the student ---------------------------------------------------------------------------------------------------

def read_backbone_file(path: Path) -> dict[str, torch.Tensor]:
    """A backbone checkpoint -> timm keys: safetensors, or a torch file (loaded with ``weights_only=True``) such as
    SSL4EO-S12's MoCo ViT-S/16 (raw ``module.base_encoder.`` or torchgeo's flat file)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"student weights not found: {path}")
    if path.suffix == ".safetensors":
        return ssl4eo_checkpoint_filter(read_weights(path))
    return convert_checkpoint(path, "ssl4eo-moco")  # one clear ValueError for a foreign or damaged file


def text_tower_spec(teacher: ModelCard) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """The student's ``text_tower`` = the teacher's text tower: its open_clip tag, or its weights (a file to write)."""
    spec: dict[str, Any] = {}
    if teacher.image_tower.get("open_clip_config"):
        spec["open_clip_config"] = teacher.image_tower["open_clip_config"]
    else:
        spec["arch"] = teacher.image_tower["arch"]
    if teacher.pretrained:
        return dict(spec, pretrained=teacher.pretrained), None
    if not teacher.weights:
        raise ValueError(f"teacher {teacher.id!r} names no weights: an untrained teacher has nothing to teach")
    text = {k: v for k, v in read_weights(teacher.file(teacher.weights)).items() if not k.startswith("visual.")}
    return dict(spec, weights="text_tower.safetensors"), text


def student_card_data(teacher: ModelCard, card_id: str, title: str, arch: str, timm_kwargs: dict[str, Any],
                      image_size: int, tile_px: int) -> dict[str, Any]:
    text, _ = text_tower_spec(teacher)
    return {
        "id": card_id, "family": "aligned-s2", "title": title, "trained": False,
        "input": {"modality": "s2", "level": "any", "bands": list(BANDS),
                  "scale": {"divide": 10000.0, "clip": [0.0, 1.0]}, "image_size": image_size, "tile_px": tile_px,
                  "gsd_m": 10.0},
        "image_tower": {"arch": arch, "in_chans": len(BANDS), "proj_dim": teacher.embed_dim,
                        "timm_kwargs": timm_kwargs},
        "text_tower": text, "embed_dim": teacher.embed_dim, "logit_scale": teacher.logit_scale,
        "templates": teacher.templates, "space": space_of(teacher),
    }


@dataclass
class StudentInit:
    folder: Path  # a card folder the loader builds the student from
    source: dict[str, Any]  # what it started from, for provenance and the resume key


def prepare_student(teacher: ModelCard, student_from: str | None, arch: str, timm_kwargs: dict[str, Any],
                    image_size: int, tile_px: int, folder: Path, d: Dist) -> StudentInit:
    """Write the untrained student card (rank 0) that ``load_model`` builds: backbone from a file, a card, or random.

    A trained aligned card of another embedding space than the teacher's is refused (its projection maps into
    that other space).
    """
    source: dict[str, Any] = {"kind": "random", "arch": arch, "timm_kwargs": timm_kwargs}
    data = student_card_data(teacher, "student-init", "student at initialisation", arch, timm_kwargs, image_size,
                             tile_px)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    _, text = text_tower_spec(teacher)
    if text is not None:
        tensors["text_tower.safetensors"] = text
    if student_from:
        path = Path(student_from).expanduser()
        if path.is_file():
            tensors["backbone.safetensors"] = read_backbone_file(path)
            data["image_tower"]["backbone_weights"] = "backbone.safetensors"
            source = {"kind": "file", "path": str(path.resolve()), "sha256": file_sha256(path), "arch": arch}
        else:
            card = resolve_card(student_from)
            if card.family != "aligned-s2":
                raise ValueError(f"--student-from {student_from!r} is a {card.family!r} card; the student starts from "
                                 "an aligned-s2 card (a Sentinel-2 backbone) or a backbone file")
            if tuple(card.input.bands) != BANDS:
                raise ValueError(f"--student-from card {card.id!r} takes bands {', '.join(card.input.bands)}; the "
                                 f"student takes all 13 ({', '.join(BANDS)})")
            loaded = load_model(card, device="cpu")
            data["image_tower"].update(arch=card.image_tower.get("arch", DEFAULT_ARCH),
                                       timm_kwargs=dict(card.image_tower.get("timm_kwargs", {})))
            source = {"kind": "card", "id": card.id, "card_hash": card.card_hash(), "weights": weights_hash(card),
                      "arch": data["image_tower"]["arch"]}
            tower = loaded.image_tower
            if card.trained and card.image_tower.get("weights"):
                if space_of(card) != space_of(teacher):
                    raise ValueError(f"teacher/student space mismatch: --student-from card {card.id!r} was aligned to "
                                     f"space {space_of(card)!r}, the teacher {teacher.id!r} is {space_of(teacher)!r}")
                if tower.proj.out_features != teacher.embed_dim:
                    raise ValueError(f"--student-from card {card.id!r} projects to {tower.proj.out_features} "
                                     f"dimensions, the teacher embeds into {teacher.embed_dim}")
                tensors["image_tower.safetensors"] = tower.state_dict()
                data["image_tower"]["weights"] = "image_tower.safetensors"
                data["trained"] = True  # a full tower: continue its alignment
                source["continues"] = True
            else:
                tensors["backbone.safetensors"] = tower.backbone.state_dict()
                data["image_tower"]["backbone_weights"] = "backbone.safetensors"
    if d.main:
        folder.mkdir(parents=True, exist_ok=True)
        for name, sd in tensors.items():
            write_weights(sd, folder / name)
        write_card(card_from_dict(data, folder), folder)
    barrier(d)
    return StudentInit(folder, source)


class FeatureTower(nn.Module):
    """A tower whose forward is its un-normalised embedding (DDP syncs gradients of ``forward`` only)."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tower.features(x)


# --- data --------------------------------------------------------------------------------------------------------

@dataclass
class AlignTransform:
    """One crop window per tile, applied to all its bands: teacher (RGB composite) and student see the same pixels."""

    augment: bool
    crop_scale: tuple[float, float] = (0.9, 1.0)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if not self.augment:
            return sample
        crop = random_resized_crop(sample.image.shape[1], sample.image.shape[2], rng, self.crop_scale)
        return Sample(sample.key, apply_crop(np.asarray(sample.image), crop), sample.bands, sample.level,
                      sample.target, {"crop": crop.as_dict()})


class TeacherCache:
    """The frozen teacher's un-normalised embedding of every (uncropped) training tile, computed once."""

    def __init__(self, keys: list[str], embeddings: torch.Tensor):
        self.index = {k: i for i, k in enumerate(keys)}
        self.embeddings = embeddings

    def lookup(self, keys: Sequence[str], device: torch.device) -> torch.Tensor:
        return self.embeddings[[self.index[k] for k in keys]].to(device, non_blocking=True)

    @classmethod
    def build(cls, teacher, spec: DatasetSpec, d: Dist, run_dir: Path, key: dict[str, Any], batch_size: int,
              limit: int | None, precision: str) -> TeacherCache:
        """Load ``run_dir/teacher_cache.safetensors`` if it was made for ``key``, else embed the split (all ranks)."""
        path, meta = run_dir / "teacher_cache.safetensors", run_dir / "teacher_cache.json"
        stamp = json.dumps(json_safe(key), sort_keys=True)
        if path.is_file() and meta.is_file():
            saved = json.loads(meta.read_text())
            if saved.get("key") == stamp:
                log.info("teacher cache: reusing %s", path)
                return cls(saved["keys"], read_weights(path)["embeddings"])
        log.info("teacher cache: embedding the training split once with %s", teacher.card.id)
        emb = embed_split([teacher], spec, "train", d, batch_size, limit, precision, raw=True, everywhere=True)[0]
        if d.main:
            write_weights({"embeddings": emb.embeddings}, path)
            meta.write_text(json.dumps({"key": stamp, "keys": emb.keys}))
        return cls(emb.keys, emb.embeddings)


# --- the command -----------------------------------------------------------------------------------------------------

def build_parser(prog: str) -> argparse.ArgumentParser:
    p = parser_for(prog, __doc__.split("\n", 2)[2])
    p.add_argument("--data", required=True,
                   help="paired data: a shard dataset of Sentinel-2 tiles (labelled or not; tileprompt prepare-data)")
    p.add_argument("--teacher", default="clip-vit-b32-openai",
                   help="the clip card to align to: a patched one (tileprompt train patch) or the original "
                        "(default: clip-vit-b32-openai)")
    p.add_argument("--student-from", help="student backbone: SSL4EO-S12 MoCo ViT-S/16 file (.pth, read with "
                                          "weights_only), a backbone .safetensors, or an aligned-s2 card "
                                          "(e.g. s2-vits16-ssl4eo-moco, a CMID export); default: random init")
    p.add_argument("--student-arch", default=DEFAULT_ARCH, help=f"timm arch of a random student "
                                                                f"(default: {DEFAULT_ARCH})")
    p.add_argument("--student-timm-kwargs", default='{"drop_path_rate": 0.2}',
                   help='JSON of extra timm arguments (default and reference: {"drop_path_rate": 0.2})')
    p.add_argument("--image-size", type=int, default=224,
                   help="input size of both towers' training crops (default and paper: 224)")
    p.add_argument("--lambda", dest="lam", type=float, default=DEFAULT_LAMBDA,
                   help=f"weight of the classification term (default and paper: {DEFAULT_LAMBDA}; 0: MSE only)")
    p.add_argument("--no-augment", action="store_true", help="no random crop (the paper crops, scale 0.9-1)")
    p.add_argument("--teacher-cache", choices=["auto", "on", "off"], default="auto",
                   help="embed each tile with the frozen teacher once (auto: when --no-augment)")
    p.add_argument("--templates", help="prompt templates of the task (default: the dataset's, else the teacher's)")
    p.add_argument("--eval-batch-size", type=int, default=DEFAULT_EVAL_BATCH,
                   help=f"batch size of the evaluations (default and reference: {DEFAULT_EVAL_BATCH})")
    add_run_arguments(p, batch=256, epochs=5, lr=1e-4, weight_decay=0.01, warmup=2000)
    return p


def _timm_kwargs(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--student-timm-kwargs is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("--student-timm-kwargs must be a JSON object")
    return value


def run(args: argparse.Namespace) -> ModelCard | None:
    positive(args, "batch-size", "epochs", "max-steps", "limit", "lr", "eval-batch-size", "image-size",
             "log-every", "checkpoint-every")
    if args.lam < 0:
        raise ValueError(f"--lambda must be non-negative, got {args.lam}")
    spec = open_dataset(args.data)
    teacher_card = resolve_card(args.teacher)
    out = check_card_output(args.out, args.overwrite, [args.data, teacher_card.path, args.templates,
                                                       args.student_from if args.student_from and
                                                       Path(args.student_from).expanduser().exists() else None])
    run_dir = Path(args.run_dir).expanduser() if args.run_dir else default_run_dir(out)
    if teacher_card.family != "clip":
        raise ValueError(f"--teacher {teacher_card.id!r} is a {teacher_card.family!r} card: the teacher is a CLIP "
                         "(clip family) image tower on RGB composites")
    use_cache = args.teacher_cache == "on" or (args.teacher_cache == "auto" and args.no_augment)
    if use_cache and not args.no_augment:
        raise ValueError("--teacher-cache on needs --no-augment: with random crops the teacher sees a new crop "
                         "every epoch, so one embedding per tile would be wrong")
    kwargs = _timm_kwargs(args.student_timm_kwargs)
    if args.student_from:
        path = Path(args.student_from).expanduser()
        if not path.exists() and (path.suffix in (".pth", ".pt", ".bin", ".safetensors") or "/" in args.student_from):
            raise ValueError(f"student weights not found: {path}")
        if not path.is_file():
            resolve_card(args.student_from)  # an unknown card fails here, before any model loads

    d = init_distributed(args.device)
    seed_everything(args.seed)
    spe, total = steps_for(spec, args.batch_size, args.epochs, args.max_steps, args.limit, d.world)
    teacher = load_model(teacher_card, device=d.device.type, image_size=args.image_size)
    teacher_card = teacher.card
    for p in teacher.image_tower.parameters():
        p.requires_grad_(False)
    tile_px = (spec.manifest.get("tile_sizes") or [[teacher_card.input.tile_px]])[0][0]
    init = prepare_student(teacher_card, args.student_from, args.student_arch, kwargs, args.image_size, tile_px,
                           run_dir / STUDENT_INIT, d)
    student = load_model(init.folder, device=d.device.type)
    check_bands(spec, student)
    check_bands(spec, teacher)
    labelled = spec.task in ("multi-label", "multi-class") and args.lam > 0
    templates = task_templates(spec, teacher, args.templates) if labelled else []
    head = task_head(teacher, spec.classes, templates, d.device) if labelled else None
    module = FeatureTower(student.image_tower)
    for p in module.parameters():
        p.requires_grad_(True)

    config = LoopConfig(total_steps=total, lr=args.lr, weight_decay=args.weight_decay,
                        warmup_steps=min(args.warmup_steps, total), grad_clip=args.grad_clip, precision=args.precision,
                        log_every=args.log_every, checkpoint_every=args.checkpoint_every, compile=args.compile)
    teacher_id = {"id": teacher_card.id, "card_hash": teacher_card.card_hash(), "weights": weights_hash(teacher_card),
                  "space": space_of(teacher_card)}
    resume_key = {"method": "align", "data": manifest_id(spec), "teacher": teacher_id, "student": init.source,
                  "image_size": args.image_size, "batch": args.batch_size, "total_steps": total, "lr": args.lr,
                  "weight_decay": args.weight_decay, "warmup": config.warmup_steps, "seed": args.seed,
                  "augment": not args.no_augment, "lambda": args.lam, "limit": args.limit, "templates": templates}
    trainer = Trainer(module, config, d, run_dir, json_safe(resume_key), args.batch_size, desc="align",
                      quiet=args.quiet)
    start = trainer.start(resume=not args.no_resume)
    cache = None
    if use_cache and start < total:
        cache = TeacherCache.build(teacher, spec, d, run_dir, {k: resume_key[k] for k in
                                   ("data", "teacher", "image_size", "limit")}, args.eval_batch_size, args.limit,
                                   args.precision)
    stream = TrainStream(spec=spec, split="train", batch=args.batch_size // d.world, steps_per_epoch=spe,
                         transform=AlignTransform(augment=not args.no_augment), start_step=start, rank=d.rank,
                         world=d.world, seed=args.seed, shuffle=True,
                         buffer=args.shuffle_buffer, limit=args.limit)

    def loss_fn(model, batch: list[Sample]):
        images, infos = [s.image for s in batch], [s.info() for s in batch]
        s_feat = model(model_input(student, images, infos, d.device))
        if cache is not None:
            t_feat = cache.lookup([s.key for s in batch], d.device)
        else:
            with torch.no_grad():
                t_feat = teacher.image_tower.features(model_input(teacher, images, infos, d.device))
        if head is None:
            return alignment_loss(s_feat, t_feat)
        targets, mask = targets_tensor(batch, spec.task, d.device)
        logits = zero_shot_logits(s_feat, head, teacher_card.logit_scale)
        return alignment_loss(s_feat, t_feat, logits, targets, spec.task, args.lam, mask)

    log.info("aligning a %s student to %s (space %s) on %s: %d steps of %d, %d rank(s) on %s%s",
             student.card.image_tower["arch"], teacher_card.id, teacher_id["space"], spec.root, total,
             args.batch_size, d.world, d.device, "; teacher embeddings cached" if cache is not None else "")
    result = trainer.fit(batches(stream, args.workers), loss_fn, spe)

    report = evaluate_alignment(student, teacher, spec, head, templates, args, d)
    if not d.main:
        barrier(d)
        return None
    report.update(steps=result.steps, teacher=teacher_id, student_init=init.source, data=str(spec.root))
    (run_dir / "align_report.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
    written = write_aligned_card(teacher_card, student, out, args, report, init, spec)
    append_event(run_dir, d, "card", step=result.steps, out=str(written.path), space=written.space,
                 **{k: v for k, v in report.items() if k in ("student", "teacher_score")})
    print(f"aligned student written to {written.path} (space {written.space})")
    for line in describe_report(report):
        print("  " + line)
    barrier(d)
    return written


def evaluate_alignment(student, teacher, spec: DatasetSpec, head, templates, args, d: Dist) -> dict[str, Any]:
    """Student vs teacher zero-shot on the same tiles, and MS<->RGB Recall@K, on the test (else val) split."""
    split = "test" if "test" in spec.splits else "val" if "val" in spec.splits else "train"
    emb = embed_split([student, teacher], spec, split, d, args.eval_batch_size, args.limit, args.precision)
    if emb is None:
        return {}
    ms, rgb = emb
    report: dict[str, Any] = {"split": split, "samples": len(ms.keys),
                              "retrieval": retrieval_report(ms.embeddings, rgb.embeddings)}
    if head is not None and any(t is not None for t in ms.targets):
        s = classification_scores(ms.embeddings, ms.targets, head, teacher.logit_scale, spec.task)
        t = classification_scores(rgb.embeddings, rgb.targets, head, teacher.logit_scale, spec.task)
        report.update(metric=s.name, student=s.value, teacher_score=t.value,
                      per_class=[{"class": c, "student": a, "teacher": b, "support": n}
                                 for c, a, b, n in zip(spec.classes, s.per_class, t.per_class, s.support)])
    return report


def describe_report(report: dict[str, Any]) -> list[str]:
    lines = []
    if "student" in report:
        lines.append(f"zero-shot {report['metric']} on {report['split']} ({report['samples']} tiles): student (MS) "
                     f"{100 * report['student']:.2f}, teacher (RGB) {100 * report['teacher_score']:.2f}")
    r = report.get("retrieval")
    if r:
        for direction in ("ms_to_rgb", "rgb_to_ms"):
            lines.append(f"{direction.replace('_to_', '->').upper():8s} R@K " + "  ".join(
                f"@{k} {100 * v:.1f}" for k, v in r[direction].items()) + f"  (chance @1 {100 * r['chance'][1]:.2f})")
    return lines


def write_aligned_card(teacher: ModelCard, student, out: Path, args, report: dict, init: StudentInit,
                       spec: DatasetSpec) -> ModelCard:
    card_id = args.id or out.name
    data = student.card.to_json()
    data.update(id=card_id, trained=True,
                title=args.title or f"Sentinel-2 {data['image_tower']['arch'].split(':')[-1]} aligned to "
                                    f"{teacher.id} on {spec.name}")
    data["image_tower"] = {k: v for k, v in data["image_tower"].items() if k != "backbone_weights"}
    data["image_tower"]["weights"] = "image_tower.safetensors"
    tensors = {"image_tower.safetensors": student.image_tower.state_dict()}
    _, text = text_tower_spec(teacher)
    if text is not None:
        tensors["text_tower.safetensors"] = text
    data["space"] = space_of(teacher)
    data["provenance"] = {
        "method": "cross-modal alignment (Mind the Modality Gap, Zavras et al. 2024, stage 2, Eq. 1)",
        "papers": ["arXiv:2402.09816"], "teacher": report["teacher"], "student_init": init.source,
        "data": {"root": str(spec.root), "task": spec.task, "classes": spec.classes},
        "lambda": args.lam, "same_crop_for_both_views": True,
        "metrics": {k: v for k, v in report.items() if k not in ("teacher", "student_init", "data")},
        "config": {k: getattr(args, k) for k in ("batch_size", "epochs", "max_steps", "limit", "lr", "weight_decay",
                                                 "warmup_steps", "grad_clip", "seed", "precision", "no_augment",
                                                 "image_size", "student_timm_kwargs")},
        "created": now(),
    }
    return write_trained_card(out, json_safe(data), tensors, overwrite=args.overwrite)


def main(argv: Sequence[str] | None = None, prog: str = "tileprompt train align") -> int:
    return run_command(build_parser(prog), argv, run)


if __name__ == "__main__":
    sys.exit(main(prog="python -m tileprompt_backend.training.align"))
