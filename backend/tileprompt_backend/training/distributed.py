"""torchrun helpers: process group, device, rank-aware logging, seeding, collectives.

One process per GPU (``torchrun --nproc_per_node N``; add ``--nnodes``/``--rdzv-*`` for several machines), or
one process on a CPU. NCCL between GPUs, gloo on CPUs (tests run 2 CPU processes with gloo). Every rank builds
the same models from the same seed; data streams split the samples (see ``data.stream``).
"""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun job named by the environment (RANK, WORLD_SIZE, LOCAL_RANK), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {device!r} (valid: auto, cpu, cuda)")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA GPU")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    info = Dist(rank=rank, world=world, local_rank=local_rank, device=dev)
    configure_logging(info)
    return info


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.distributed:
        dist.barrier()


def all_reduce_mean(d: Dist, values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of a few scalars (for logging; gradients are averaged by DDP itself)."""
    if not d.distributed or not values:
        return dict(values)
    keys = list(values)  # the same order on every rank (the callers build the dicts alike)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return {k: float(v) / d.world for k, v in zip(keys, t.tolist())}


def broadcast_object(d: Dist, obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not d.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(d: Dist, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not d.distributed:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def any_rank(d: Dist, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop together)."""
    if not d.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return bool(t.item() > 0)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) alike on every rank: models start identical everywhere."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _RankFilter(logging.Filter):
    def __init__(self, d: Dist):
        super().__init__()
        self.d = d

    def filter(self, record: logging.LogRecord) -> bool:
        if self.d.distributed:
            record.msg = f"[rank {self.d.rank}] {record.msg}"
        # every rank reports problems; only rank 0 reports progress and results
        return self.d.main or record.levelno >= logging.WARNING


def configure_logging(d: Dist) -> None:
    """Log the training package's messages to stderr: INFO from rank 0, warnings and errors from every rank."""
    logger = logging.getLogger("tileprompt_backend.training")
    for h in list(logger.handlers):
        if getattr(h, "_tileprompt", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._tileprompt = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_RankFilter(d))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
