#!/usr/bin/env python
"""Training-step benchmark: samples/s of the trainings' steps and where a step's time goes.

    .venv/bin/python benchmarks/bench_train.py [--steps cmid] [--device auto] [--batch N] [--rounds N]
                                              [--out benchmarks/results/train-cpu.json]

Steps (one entry of ``STEPS`` each; other trainings add theirs):

- ``cmid``: one CMID optimizer step (``training.cmid``) of the default ViT-S/16 over 13 bands at 224 px with the
  reference's head sizes (projectors 2048 wide, 2048 prototypes, queue 65,536, 80 matched pairs of 14 x 14), Adan,
  the EMA update included: forward of the student on both masked views, the teacher on both views, the three
  losses, backward, optimizer, EMA. The batch is real: Major-TOM 120 px tiles made into views by the command's own
  ``ViewMaker`` (crop, flips, spectral augmentation, masks, the card's preprocessing). The same step is timed with
  each branch switched off (lambda = 0 removes its modules), so a branch's cost is the full step minus the step
  without it; the rest (both backbones, augmentation, mean fill, optimizer, EMA) is the shared part. The view
  pipeline's samples/s per DataLoader worker (crops, preprocessing, masks, drawing the augmentation) is measured on
  its own (it runs in workers, beside the step).

Method: one warm-up step per variant, then ``--rounds`` rounds in which every variant runs one step, the order
rotating each round (load from other jobs on the shared machine hits all variants alike); medians per variant of
wall seconds (samples/s) and, on CPUs, of this process's CPU seconds (the cost split: wall seconds on a loaded
2-core machine swing several-fold between rounds, CPU seconds hardly); the load average is recorded before and
after. CPU: fp32, all cores; CUDA: bf16 autocast (as the command's
``--precision auto``). Nothing is asserted: the figures are evidence.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CELL = REPO.parent / "shared/data/rico-hdl/integration_tests/tiffs/Major-TOM-Core/S2L2A/199U/199U_1099R"
T = time.perf_counter


def machine(device: str) -> dict:
    import timm
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads(),
            "device": device, "python": platform.python_version()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                        text=True).stdout.strip()
    except OSError:
        pass
    return info


def interleaved(steps: dict, rounds: int, sync) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds per call of each ``steps[name]()``, rounds interleaved with a rotating order, after one
    warm-up. CPU seconds (this process, all its threads) hardly move with other jobs' load on a shared machine,
    where wall seconds can swing several-fold between rounds."""
    names = list(steps)
    for name in names:
        steps[name]()
    sync()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0, c0 = T(), time.process_time()
            steps[name]()
            sync()
            wall[name].append(T() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


# --- CMID ----------------------------------------------------------------------------------------------------------

def bench_cmid(args: argparse.Namespace, device: str) -> dict:
    import torch

    from tileprompt_backend.models import load_model
    from tileprompt_backend.models.card import card_from_dict, write_card
    from tileprompt_backend.sentinel2 import BANDS
    from tileprompt_backend.training.cmid.losses import ema_momentum
    from tileprompt_backend.training.cmid.model import CMIDConfig, CMIDNet
    from tileprompt_backend.training.cmid.train import PAIRS_SHARE, reconstruction_stats, student_card_data
    from tileprompt_backend.training.cmid.views import ViewMaker
    from tileprompt_backend.training.data.scenes import find_scenes, interleave_scenes
    from tileprompt_backend.training.data.stream import sample_rng
    from tileprompt_backend.training.loop import LoopConfig, autocast, make_optimizer, resolve_precision

    size, tile = args.image_size, 120
    with tempfile.TemporaryDirectory(prefix="bench-cmid-") as tmp:
        folder = Path(tmp) / "student"
        write_card(card_from_dict(student_card_data("timm:vit_small_patch16_224", {}, BANDS, size, tile), folder),
                   folder)
        student = load_model(folder, device="cpu")
    patch = student.image_tower.backbone.patch_embed.patch_size[0]
    grid = (size // patch, size // patch)
    maker = ViewMaker(student, grid, mask_block=32 // patch, augment_in_worker=device == "cpu")
    scenes = find_scenes([CELL], tile).scenes
    samples = []
    for s in interleave_scenes(scenes, tile, None, student.required_bands, 1):
        samples.append(s)
        if len(samples) == args.batch:
            break
    maker(samples[0], sample_rng(0, 1, samples[0].key))  # warm-up (imports, first allocations)
    t0 = T()
    items = [maker(s, sample_rng(0, 0, s.key)) for s in samples]
    view_s = (T() - t0) / len(items)
    x, mask, crops = (torch.stack([it[k] for it in items]).to(device) for k in ("x", "mask", "crops"))

    precision = resolve_precision("auto", torch.device(device))
    mean, std = reconstruction_stats(student.card)
    base = CMIDConfig(local_pairs=round(PAIRS_SHARE * grid[0] * grid[1]))
    variants = {"full": base, "no_mim": replace(base, mim_weight=0.0), "no_global": replace(base, global_weight=0.0),
                "no_local": replace(base, local_weight=0.0)}
    nets, optimizers = {}, {}
    for name, cfg in variants.items():
        torch.manual_seed(0)
        backbone = copy.deepcopy(student.image_tower.backbone)  # every variant starts from the same weights
        nets[name] = CMIDNet(backbone, len(BANDS), cfg, target_mean=mean, target_std=std).to(device).train()
        optimizers[name] = make_optimizer(nets[name], LoopConfig(total_steps=1000, lr=2e-3, weight_decay=0.02,
                                                                 warmup_steps=0, optimizer="adan", decay_filter=True),
                                          torch.device(device))

    def step(name: str):
        def run():
            net, opt = nets[name], optimizers[name]
            views = x.clone()
            views[:, 1] = maker.augment(views[:, 1], items)  # in the step, as the command does
            with autocast(torch.device(device), precision):
                loss, _ = net(views, mask, crops, 0.04)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            net.update_teacher(ema_momentum(10, 1000))
        return run

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    load_before = os.getloadavg()
    times, cpu_times = interleaved({name: step(name) for name in variants}, args.rounds, sync)
    load_after = os.getloadavg()
    med = {name: statistics.median(t) for name, t in times.items()}
    cpu_med = {name: statistics.median(t) for name, t in cpu_times.items()}
    # the split: CPU seconds on the CPU (robust to other jobs' load), wall seconds on a GPU (the host waits there)
    basis = cpu_med if device == "cpu" else med
    split = {"mim": basis["full"] - basis["no_mim"], "global": basis["full"] - basis["no_global"],
             "local": basis["full"] - basis["no_local"]}
    split["shared"] = basis["full"] - sum(split.values())
    trainable = sum(p.numel() for p in nets["full"].parameters() if p.requires_grad)
    result = {
        "model": f"timm vit_small_patch16_224, 13 bands, {size} px ({grid[0]} x {grid[1]} tokens)", "batch": args.batch,
        "precision": precision, "rounds": args.rounds, "config": asdict(base), "trainable_params": trainable,
        "seconds_per_step": {k: round(v, 4) for k, v in med.items()},
        "cpu_seconds_per_step": {k: round(v, 4) for k, v in cpu_med.items()},
        "samples_per_s": round(args.batch / med["full"], 3),
        "cost_split_basis": "cpu_seconds_per_step" if device == "cpu" else "seconds_per_step",
        "cost_split_seconds": {k: round(v, 4) for k, v in split.items()},
        "cost_split_share": {k: round(v / basis["full"], 3) for k, v in split.items()},
        "view_pipeline": {"seconds_per_sample": round(view_s, 4), "samples_per_s_per_worker": round(1 / view_s, 2),
                          "input": f"Major-TOM 199U_1099R, {tile} px tiles -> two {size} px views"},
        "per_round_seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "per_round_cpu_seconds": {k: [round(x, 4) for x in v] for k, v in cpu_times.items()},
        "load_average": {"before": load_before, "after": load_after},
    }
    if device == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


STEPS = {"cmid": bench_cmid}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated steps (default: {','.join(STEPS)})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch", type=int, help="samples per step (default: 8 on CPU, 64 on CUDA, as the reference's "
                                             "per-GPU batch)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (default: 3)")
    p.add_argument("--out", type=Path, help="result JSON (default: benchmarks/results/train-<device>.json)")
    args = p.parse_args(argv)
    import torch

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    args.batch = args.batch or (64 if device == "cuda" else 8)
    out = args.out or REPO / "benchmarks" / "results" / f"train-{device}.json"
    if not CELL.is_dir():
        print(f"real samples not found at {CELL} (clone ../shared beside the repo)", file=sys.stderr)
        return 2
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(device)}
    for name in args.steps.split(","):
        if name not in STEPS:
            p.error(f"unknown step {name!r} (valid: {', '.join(STEPS)})")
        print(f"== {name} on {device}, batch {args.batch}", flush=True)
        report[name] = STEPS[name](args, device)
        r = report[name]
        print(json.dumps({k: r[k] for k in ("samples_per_s", "seconds_per_step", "cpu_seconds_per_step",
                                            "cost_split_share",
                                            "view_pipeline", "load_average")}, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
