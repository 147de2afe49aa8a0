"""``tileprompt train cmid``: CMID self-supervised pre-training of a Sentinel-2 ViT (Muhtar et al., TGRS 2023).

Student and EMA teacher on two views of each tile: masked image modelling (mean fill + mask token, focal L1 +
focal frequency loss), a global MoCo branch (queue, symmetric) and a local branch (position-matched features,
prototypes, centring, teacher temperature schedule). Input: a shard dataset (--data, labels ignored) or rasters
and folders of scenes cut into tiles on the fly (--rasters). Output (--out): the student backbone as
backbone.safetensors + backbone.json (timm keys; what `train align --student-from` starts from) inside an
aligned-s2 card whose projection is untrained (marked so): `tileprompt index --model OUT` can search similar tiles
with it before any alignment. Defaults: the paper's MillionAID recipe for transformers (Adan, lr 2e-3 at batch
256, weight decay 0.02, 200 epochs, 15 warm-up epochs, cosine to 1e-6) and the reference code's constants
(docs/cmid.md lists both).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ... import validation
from ...models import load_model, resolve_card
from ...models.aligned_s2 import DEFAULT_ARCH
from ...models.card import card_from_dict, write_card
from ...models.downloads import ensure_weights
from ...models.identity import weights_hash
from ...models.tiny import TINY_OPEN_CLIP
from ...sentinel2.bands import BANDS, SSL4EO_L1C_MEAN, SSL4EO_L1C_STD, normalize_band_name
from ..align import BACKBONE_FORMAT, text_tower_spec
from ..cards import check_card_output, now, write_trained_card
from ..command import add_run_arguments, default_run_dir, parser_for, positive, run_command
from ..data.scenes import DEFAULT_OPEN_SCENES, SceneStream, find_scenes
from ..data.shards import open_dataset
from ..data.stream import TrainStream, batches, split_size
from ..distributed import Dist, barrier, init_distributed, on_main, seed_everything
from ..loop import LoopConfig, Trainer
from ..probe import DEFAULT_K, band_statistics, dataset_features, probe
from ..runlog import append_event, json_safe
from .losses import ema_momentum, teacher_temperature
from .model import CMIDConfig, CMIDNet
from .views import SpectralAug, ViewMaker

log = logging.getLogger(__name__)
STUDENT_INIT = "student_init"
BACKBONE_FILE = "backbone.safetensors"
BACKBONE_META = "backbone.json"
#: The paper's MillionAID schedule for Swin-B (its transformer): 200 epochs, 15 of warm-up, batch 256, lr 0.002.
PAPER = {"batch": 256, "epochs": 200, "lr": 2e-3, "weight_decay": 0.02, "warmup_epochs": 15, "min_lr": 1e-6}
#: Reference code: the local teacher temperature warms up over 50 epochs (of its 400).
TEACHER_TEMP_WARMUP_EPOCHS = 50
#: The paper keeps N = 20 matched pairs of a 7 x 7 grid; other grids keep the same share.
PAIRS_SHARE = 20 / 49


# --- the student ---------------------------------------------------------------------------------------------------

def student_card_data(arch: str, timm_kwargs: dict[str, Any], bands: Sequence[str], image_size: int,
                      tile_px: int) -> dict[str, Any]:
    """The card the student is built from (through the models package, as serving builds it): an aligned-s2 card
    with a tiny seeded text tower that nothing uses, so that no text weights are needed to pre-train."""
    return {
        "id": "cmid-student", "family": "aligned-s2", "title": "CMID student at initialisation", "trained": False,
        "input": {"modality": "s2", "level": "any", "bands": list(bands),
                  "scale": {"divide": 10000.0, "clip": [0.0, 1.0]}, "image_size": image_size, "tile_px": tile_px,
                  "gsd_m": 10.0},
        "image_tower": {"arch": arch, "in_chans": len(bands), "proj_dim": TINY_OPEN_CLIP["embed_dim"],
                        "timm_kwargs": timm_kwargs},
        "text_tower": {"open_clip_config": TINY_OPEN_CLIP}, "embed_dim": TINY_OPEN_CLIP["embed_dim"],
    }


def reconstruction_stats(card) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std that standardise the MIM target per band: SSL4EO-S12's L1C band statistics in the card's
    scaled units, or identity when the card normalises its input itself (its input is then already standard)."""
    inp = card.input
    if inp.mean is not None or inp.std is not None:
        return torch.zeros(len(inp.bands)), torch.ones(len(inp.bands))
    divide = float(inp.scale.get("divide", 10000.0))
    mean = torch.tensor([SSL4EO_L1C_MEAN[b] / divide for b in inp.bands])
    std = torch.tensor([SSL4EO_L1C_STD[b] / divide for b in inp.bands])
    return mean, std


# --- options ---------------------------------------------------------------------------------------------------------

def build_parser(prog: str) -> argparse.ArgumentParser:
    p = parser_for(prog, __doc__.split("\n", 2)[2])
    i = p.add_argument_group("input (one of --data, --rasters)")
    i.add_argument("--data", help="a shard dataset (tileprompt prepare-data; labels are not used)")
    i.add_argument("--split", default="train", help="split of --data to train on (default: train)")
    i.add_argument("--rasters", nargs="+", metavar="PATH",
                   help="rasters, product folders (SAFE, band-file folders) or folders searched for them; tiles "
                        "are cut on the fly, mostly-nodata tiles skipped")
    i.add_argument("--tile", type=int, default=120,
                   help="tile size in pixels of --rasters (default: 120, BigEarthNet's 1.2 km); also the card's "
                        "default tile for --data without a manifest")
    i.add_argument("--stride", type=int, help="--rasters: pixels between tiles (default: the tile size)")
    i.add_argument("--band-map", help="--rasters: band names of multiband files without descriptions, in file "
                                       "order ('-' skips a band)")
    i.add_argument("--level", choices=["L1C", "L2A"], help="--rasters: processing level when it cannot be detected")
    i.add_argument("--open-scenes", type=int, default=DEFAULT_OPEN_SCENES,
                   help=f"--rasters: scenes each reader takes strips from in turn (default: {DEFAULT_OPEN_SCENES})")
    m = p.add_argument_group("model")
    m.add_argument("--arch", default=DEFAULT_ARCH, help=f"timm ViT of the student (default: {DEFAULT_ARCH})")
    m.add_argument("--timm-kwargs", default="{}", help='JSON of extra timm arguments, e.g. \'{"drop_path_rate": 0.1}\'')
    m.add_argument("--bands", default=",".join(BANDS), help="input bands in model order (default: all 13)")
    m.add_argument("--image-size", type=int, default=224, help="input size of the views (default and paper: 224)")
    m.add_argument("--global-pool", choices=["token", "avg"], default="token",
                   help="global feature: the CLS token (default; timm's ViT pooling, what cards use) or the mean "
                        "patch token (the paper's GAP); the exported backbone pools the same way")
    m.add_argument("--text-tower", default="clip-vit-b32-openai",
                   help="card whose text tower the exported card carries (its projection is untrained; default: "
                        "clip-vit-b32-openai, downloaded on first use)")
    v = p.add_argument_group("views and masking (defaults: paper / reference code)")
    v.add_argument("--crop-scale", default="0.5,1.0", help="RandomResizedCrop area share (paper: 0.5,1; code: 0.3,1)")
    v.add_argument("--flips", choices=["hv", "h", "none"], default="hv",
                   help="random flips of each view: horizontal and vertical (default), horizontal only (the "
                        "reference), none")
    v.add_argument("--mask-ratio", type=float, default=0.6, help="share of mask blocks masked (paper: 0.6)")
    v.add_argument("--mask-block", type=int, default=32, help="mask block size in pixels of the input (paper: 32)")
    v.add_argument("--no-spectral-aug", action="store_true", help="second view without brightness/contrast/blur/noise")
    b = p.add_argument_group("branches (defaults: reference code; docs/cmid.md)")
    b.add_argument("--mim-weight", type=float, default=1.0, help="lambda_1, MIM branch (0: off)")
    b.add_argument("--global-weight", type=float, default=1.0, help="lambda_2, global branch (0: off)")
    b.add_argument("--local-weight", type=float, default=1.0, help="lambda_3, local branch (0: off)")
    b.add_argument("--focal-alpha", type=float, default=0.2, help="focal L1 alpha (code: 0.2)")
    b.add_argument("--focal-gamma", type=float, default=1.0, help="focal L1 gamma (code: 1; 0: the paper's L1)")
    b.add_argument("--fft-weight", type=float, default=1.0, help="focal frequency loss weight (code: 1)")
    b.add_argument("--fft-alpha", type=float, default=1.0, help="focal frequency loss alpha (code: 1)")
    b.add_argument("--global-hidden", type=int, default=2048, help="global projector hidden width (code: 2048)")
    b.add_argument("--global-dim", type=int, default=256, help="global projection size (code: 256)")
    b.add_argument("--queue-size", type=int, default=65536, help="MoCo queue length (paper: 65536)")
    b.add_argument("--moco-temperature", type=float, default=0.2, help="InfoNCE temperature (paper: 0.2)")
    b.add_argument("--local-hidden", type=int, default=2048, help="local projector hidden width (code: 2048)")
    b.add_argument("--local-layers", type=int, default=3, help="local projector layers (paper/code: 3)")
    b.add_argument("--local-bottleneck", type=int, default=256, help="local projection size (code: 256)")
    b.add_argument("--prototypes", type=int, default=2048, help="K prototypes (paper: 2048)")
    b.add_argument("--local-pairs", type=int, help="N matched pairs per view pair (paper: 20 of a 7x7 grid; "
                                                   "default: the same share of the token grid, 80 of 14x14)")
    b.add_argument("--student-temperature", type=float, default=0.1, help="tau_s (code: 0.1; paper text: 0.2)")
    b.add_argument("--teacher-temperature", type=float, default=0.07, help="tau_t after warm-up (0.07)")
    b.add_argument("--teacher-temperature-start", type=float, default=0.04, help="tau_t at the start (code: 0.04)")
    b.add_argument("--teacher-temperature-epochs", type=float, default=TEACHER_TEMP_WARMUP_EPOCHS,
                   help=f"epochs of tau_t warm-up (code: {TEACHER_TEMP_WARMUP_EPOCHS})")
    b.add_argument("--center-momentum", type=float, default=0.9, help="local centring momentum (code: 0.9)")
    b.add_argument("--ema-momentum", type=float, default=0.996, help="teacher EMA momentum, cosine to 1 (0.996)")
    o = p.add_argument_group("optimiser and evaluation")
    o.add_argument("--optimizer", choices=["adan", "adamw"], default="adan", help="Adan (timm; paper) or AdamW")
    o.add_argument("--warmup-epochs", type=float, default=PAPER["warmup_epochs"],
                   help=f"learning-rate warm-up in epochs, unless --warmup-steps (paper: {PAPER['warmup_epochs']})")
    o.add_argument("--min-lr", type=float, default=PAPER["min_lr"], help="the cosine's end (code: 1e-6)")
    o.add_argument("--probe-data", help="a labelled shard dataset: kNN and linear-probe scores of the backbone "
                                        "before and after training (train split -> test split, else val)")
    o.add_argument("--probe-k", type=int, default=DEFAULT_K, help=f"neighbours of the kNN probe (default: {DEFAULT_K})")
    add_run_arguments(p, batch=PAPER["batch"], epochs=PAPER["epochs"], lr=PAPER["lr"],
                      weight_decay=PAPER["weight_decay"], warmup=None, grad_clip=0.0)
    return p


def _pair(text: str, name: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--{name} must be two numbers 'low,high', got {text!r}") from None
    if not 0 < a <= b <= 1:
        raise ValueError(f"--{name} must satisfy 0 < low <= high <= 1, got {text!r}")
    return a, b


def _json_object(text: str, name: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--{name} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--{name} must be a JSON object")
    return value


def method_config(args: argparse.Namespace) -> CMIDConfig:
    return CMIDConfig(
        mim_weight=args.mim_weight, global_weight=args.global_weight, local_weight=args.local_weight,
        focal_alpha=args.focal_alpha, focal_gamma=args.focal_gamma, fft_weight=args.fft_weight,
        fft_alpha=args.fft_alpha, global_hidden=args.global_hidden, global_dim=args.global_dim,
        queue_size=args.queue_size, moco_temperature=args.moco_temperature, local_hidden=args.local_hidden,
        local_layers=args.local_layers, local_bottleneck=args.local_bottleneck, prototypes=args.prototypes,
        student_temperature=args.student_temperature, center_momentum=args.center_momentum)


def check_args(args: argparse.Namespace) -> None:
    validation.tile_px(args.tile)  # the same limits and words as classify and index
    validation.stride(args.stride)
    args.band_map = validation.band_map(args.band_map)
    positive(args, "batch-size", "epochs", "max-steps", "limit", "lr", "image-size", "log-every", "checkpoint-every",
             "open-scenes", "mask-block", "global-hidden", "global-dim", "queue-size",
             "local-hidden", "local-layers", "local-bottleneck", "prototypes", "local-pairs", "moco-temperature",
             "student-temperature", "teacher-temperature", "teacher-temperature-start", "probe-k")
    if bool(args.data) == bool(args.rasters):
        raise ValueError("give the training tiles as --data (a shard dataset) or --rasters (rasters or folders), "
                         "one of the two")
    for name in ("mim-weight", "global-weight", "local-weight", "focal-gamma", "fft-weight", "warmup-epochs",
                 "teacher-temperature-epochs", "min-lr", "weight-decay"):
        if getattr(args, name.replace("-", "_")) < 0:
            raise ValueError(f"--{name} must not be negative")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise ValueError("--warmup-steps must not be negative")
    for name in ("ema-momentum", "center-momentum", "mask-ratio"):
        if not 0.0 <= getattr(args, name.replace("-", "_")) <= 1.0:
            raise ValueError(f"--{name} must be in [0, 1]")


# --- the run ---------------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace):
    """Train and write the card; returns it (None on ranks other than 0)."""
    check_args(args)
    crop_scale = _pair(args.crop_scale, "crop-scale")
    timm_kwargs = _json_object(args.timm_kwargs, "timm-kwargs")
    if args.global_pool == "avg":
        timm_kwargs = dict(timm_kwargs, global_pool="avg", fc_norm=False)  # fc_norm off: the checkpoint keys stay
    bands = tuple(normalize_band_name(b) for b in args.bands.split(",") if b.strip())
    text_card = resolve_card(args.text_tower)
    out = check_card_output(args.out, args.overwrite, [args.data, args.probe_data, text_card.path,
                                                       *(args.rasters or [])])
    run_dir = Path(args.run_dir).expanduser() if args.run_dir else default_run_dir(out)
    if text_card.family != "clip":
        raise ValueError(f"--text-tower {text_card.id!r} is a {text_card.family!r} card; the text tower comes from a "
                         "clip card (as train align's teacher)")
    spec = open_dataset(args.data) if args.data else None
    probe_spec = open_dataset(args.probe_data) if args.probe_data else None
    if probe_spec is not None and probe_spec.task not in ("multi-class", "multi-label"):
        raise ValueError(f"--probe-data {probe_spec.root} is not labelled (task {probe_spec.task!r})")

    d = init_distributed(args.device)
    seed_everything(args.seed)
    init_dir = run_dir / STUDENT_INIT
    tile_px = args.tile if args.rasters else int((spec.manifest.get("tile_sizes") or [[args.tile]])[0][0])

    def prepare():
        text = ensure_weights(text_card)  # first use downloads now, not after hours of training
        init_dir.mkdir(parents=True, exist_ok=True)
        write_card(card_from_dict(student_card_data(args.arch, timm_kwargs, bands, args.image_size, tile_px),
                                  init_dir), init_dir)
        load_model(init_dir, device="cpu")  # an arch or timm argument that cannot build fails here, on every rank
        return text

    text_card = on_main(d, prepare)
    student = load_model(init_dir, device="cpu")
    backbone = student.image_tower.backbone
    grid = (args.image_size // backbone.patch_embed.patch_size[0],) * 2
    patch = backbone.patch_embed.patch_size[0]
    if args.mask_block % patch:
        raise ValueError(f"--mask-block {args.mask_block} px is not a whole number of {patch} px patches")
    pairs = args.local_pairs or max(1, round(PAIRS_SHARE * grid[0] * grid[1]))
    if pairs > grid[0] * grid[1]:
        raise ValueError(f"--local-pairs {pairs} exceeds the {grid[0]}x{grid[1]} token grid")
    config = replace(method_config(args), local_pairs=pairs)
    flips = {"hv": (0.5, 0.5), "h": (0.5, 0.0), "none": (0.0, 0.0)}[args.flips]
    views = ViewMaker(student, grid, args.mask_block // patch, args.mask_ratio, crop_scale, p_hflip=flips[0],
                      p_vflip=flips[1], aug=SpectralAug(p_jitter=0.0, p_blur=0.0, p_noise=0.0)
                      if args.no_spectral_aug else SpectralAug(), augment_in_worker=d.device.type == "cpu")

    # data and schedule
    if spec is not None:
        n_samples = split_size(spec, args.split, args.limit)
        data_id = {"kind": "shards", "root": str(spec.root.resolve()), "split": args.split,
                   "manifest": spec.manifest.get("created"), "samples": n_samples}
        scenes = None
    else:
        found = on_main(d, lambda: find_scenes(args.rasters, tile_px, args.stride, student.required_bands,
                                               args.band_map, args.level))
        for skipped in found.skipped[:10]:
            log.warning("skipped %s", skipped)
        scenes = found.scenes
        n_samples = sum(s.tiles for s in scenes)
        n_samples = min(n_samples, args.limit) if args.limit else n_samples
        data_id = {"kind": "rasters", "scenes": [[s.path, s.tiles] for s in scenes], "tile": tile_px,
                   "stride": args.stride, "workers": args.workers, "samples": n_samples}
        log.info("%d scene(s), %d grid tiles of %d px (%d skipped)", len(scenes), n_samples, tile_px,
                 len(found.skipped))
    if args.batch_size % d.world:
        raise ValueError(f"--batch-size {args.batch_size} does not split evenly over {d.world} processes")
    if n_samples < args.batch_size:
        raise ValueError(f"{n_samples} training tiles are fewer than one batch of {args.batch_size}")
    steps_per_epoch = n_samples // args.batch_size
    planned = max(1, round(args.epochs * steps_per_epoch))
    total = min(planned, args.max_steps) if args.max_steps else planned
    fraction = total / planned  # --max-steps shortens every schedule alike
    warmup = (args.warmup_steps if args.warmup_steps is not None
              else round(args.warmup_epochs * steps_per_epoch * fraction))
    temp_warmup = round(args.teacher_temperature_epochs * steps_per_epoch * fraction)
    if config.global_weight and config.queue_size > 2 * n_samples:
        log.warning("the MoCo queue (%d keys) is longer than two keys per training tile (%d tiles): keys of the "
                    "same tile will be among its negatives; consider --queue-size %d", config.queue_size, n_samples,
                    max(args.batch_size * 2, 2 ** int(math.log2(max(2, n_samples)))))

    target_mean, target_std = reconstruction_stats(student.card)
    torch.manual_seed(args.seed)
    net = CMIDNet(backbone, len(bands), config, d, target_mean, target_std).to(d.device)
    loop = LoopConfig(total_steps=total, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=min(warmup, total),
                      grad_clip=args.grad_clip, precision=args.precision, log_every=args.log_every,
                      checkpoint_every=args.checkpoint_every, compile=args.compile, optimizer=args.optimizer,
                      decay_filter=True, min_lr=args.min_lr, broadcast_buffers=False)
    resume_key = json_safe({
        "method": "cmid", "data": data_id, "arch": args.arch, "timm_kwargs": timm_kwargs, "bands": bands,
        "image_size": args.image_size, "config": asdict(config), "crop_scale": crop_scale, "flips": args.flips,
        "mask": [args.mask_ratio, args.mask_block], "spectral_aug": not args.no_spectral_aug,
        "teacher_temperature": [args.teacher_temperature_start, args.teacher_temperature, temp_warmup],
        "ema": args.ema_momentum, "batch": args.batch_size, "total_steps": total, "lr": args.lr,
        "min_lr": args.min_lr, "weight_decay": args.weight_decay, "warmup": loop.warmup_steps,
        "optimizer": args.optimizer, "seed": args.seed, "limit": args.limit})
    trainer = Trainer(net, loop, d, run_dir, resume_key, args.batch_size, desc="cmid", quiet=args.quiet)
    start = trainer.start(resume=not args.no_resume)

    probes: dict[str, Any] = {}
    if probe_spec is not None and start == 0:
        probes["init"] = run_probes(net, student, probe_spec, d, args.probe_k, with_baseline=True)
        append_event(run_dir, d, "probe", step=0, **_flat(probes["init"]))

    per_rank = args.batch_size // d.world
    if scenes is not None:
        stream = SceneStream(scenes, tile_px, args.stride, student.required_bands, per_rank, steps_per_epoch, views,
                             start_step=start, rank=d.rank, world=d.world, seed=args.seed,
                             buffer=args.shuffle_buffer, open_scenes=args.open_scenes)
    else:
        stream = TrainStream(spec=spec, split=args.split, batch=per_rank, steps_per_epoch=steps_per_epoch,
                             transform=views, start_step=start, rank=d.rank, world=d.world, seed=args.seed,
                             buffer=args.shuffle_buffer, limit=args.limit)

    def loss_fn(model, batch):
        x, mask, crops = (torch.stack([item[k] for item in batch]).to(d.device, non_blocking=True)
                          for k in ("x", "mask", "crops"))
        x[:, 1] = views.augment(x[:, 1], batch)
        tau = teacher_temperature(trainer.step, temp_warmup, args.teacher_temperature_start, args.teacher_temperature)
        return model(x, mask, crops, tau)

    def after_step(step: int) -> None:
        net.update_teacher(ema_momentum(step, total, args.ema_momentum))

    log.info("CMID: %d steps (%d per epoch, global batch %d, %d process(es)) from step %d", total, steps_per_epoch,
             args.batch_size, d.world, start)
    result = trainer.fit(batches(stream, args.workers), loss_fn, steps_per_epoch, after_step)
    if probe_spec is not None:
        probes["final"] = run_probes(net, student, probe_spec, d, args.probe_k)
        append_event(run_dir, d, "probe", step=result.steps, **_flat(probes["final"]))
    card = None
    if d.main:
        card = export(out, net, student.card, text_card, args, {
            "data": data_id, "steps": result.steps, "resumed_from": result.resumed_from, "final": result.final,
            "probes": probes, "config": resume_key})
        append_event(run_dir, d, "card", path=str(out), id=card.id)
        print(f"wrote {out}: CMID backbone ({args.arch}, {len(bands)} bands) after {result.steps} steps; "
              f"{BACKBONE_FILE} feeds `tileprompt train align --student-from {out}`")
    barrier(d)
    return card


def _flat(scores: dict[str, Any]) -> dict[str, Any]:
    return {f"{name}_{k}": v for name, s in scores.items() for k, v in s.items()}


def run_probes(net: CMIDNet, student, spec, d: Dist, k: int, with_baseline: bool = False) -> dict[str, Any]:
    """kNN and linear probes of the student backbone's pooled feature (and of per-band statistics) on rank 0."""
    if not d.main:
        return {}
    test_split = "test" if "test" in spec.splits else "val"
    backbone = net.student.backbone
    was_training = backbone.training
    backbone.eval()
    embedders = {"backbone": lambda x: backbone.forward_head(backbone.forward_features(x), pre_logits=True)}
    if with_baseline:
        embedders["band_stats"] = band_statistics
    out = {}
    try:
        for name, embed in embedders.items():
            train = dataset_features(embed, student, spec, "train", d.device)
            test = dataset_features(embed, student, spec, test_split, d.device)
            out[name] = probe(train, test, spec.task, spec.n_classes, k)
            log.info("probe %s: kNN %.3f, linear %.3f (%s, %d train / %d %s tiles)", name, out[name]["knn"],
                     out[name]["linear"], out[name]["metric"], out[name]["train"], out[name]["test"], test_split)
    finally:
        backbone.train(was_training)
    return out


# --- export ----------------------------------------------------------------------------------------------------------

def backbone_meta(card, arch: str, timm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``backbone.json``: what a consumer needs to rebuild and feed the backbone of ``backbone.safetensors``."""
    inp = card.input
    return {"format": BACKBONE_FORMAT, "version": 1, "weights": BACKBONE_FILE, "arch": arch,
            "in_chans": len(inp.bands), "timm_kwargs": timm_kwargs, "bands": list(inp.bands), "level": inp.level,
            "scale": inp.scale, "mean": inp.mean, "std": inp.std, "image_size": inp.image_size,
            "tile_px": inp.tile_px, "gsd_m": inp.gsd_m, "method": "cmid"}


def export(out: Path, net: CMIDNet, student_card, text_card, args: argparse.Namespace, provenance: dict[str, Any]):
    """Write the aligned-s2 card (backbone + untrained projection + the text tower of ``text_card``) atomically."""
    arch, timm_kwargs = student_card.image_tower["arch"], dict(student_card.image_tower.get("timm_kwargs", {}))
    text_spec, text_tensors = text_tower_spec(text_card)
    data = student_card.to_json()
    data.update(
        id=args.id or out.name,
        title=args.title or f"CMID-pre-trained {arch.split(':', 1)[-1]} ({len(student_card.input.bands)} bands); "
                            "projection untrained: similar-tile search only",
        trained=False, embed_dim=text_card.embed_dim, logit_scale=text_card.logit_scale,
        templates=text_card.templates, text_tower=text_spec,
        image_tower={"arch": arch, "in_chans": len(student_card.input.bands), "proj_dim": text_card.embed_dim,
                     "timm_kwargs": timm_kwargs, "backbone_weights": BACKBONE_FILE},
        provenance={"method": "CMID self-supervised pre-training", "created": now(),
                    "paper": "Muhtar et al., CMID: A Unified Self-Supervised Learning Framework for Remote Sensing "
                             "Image Understanding, IEEE TGRS 2023",
                    "projection": "seeded random init, not trained: text prompts score at random until "
                                  "`tileprompt train align --student-from` this card",
                    "text_tower_from": {"id": text_card.id, "weights": weights_hash(text_card)},
                    **provenance})
    tensors = {BACKBONE_FILE: {k: v.detach().cpu() for k, v in net.student.backbone.state_dict().items()}}
    if text_tensors is not None:
        tensors["text_tower.safetensors"] = text_tensors
    meta = out.parent / f".{out.name}.{BACKBONE_META}"
    meta.write_text(json.dumps(backbone_meta(student_card, arch, timm_kwargs), indent=2) + "\n")
    try:
        return write_trained_card(out, data, tensors, copies={BACKBONE_META: meta}, overwrite=args.overwrite)
    finally:
        meta.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None, prog: str = "tileprompt train cmid") -> int:
    return run_command(build_parser(prog), argv, run)

