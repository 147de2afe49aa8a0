"""Command-line conventions shared by every training command (see docs/training.md).

``tileprompt train METHOD ...`` and ``torchrun ... -m tileprompt_backend.training.METHOD ...`` run the same
parser and code. Every command: ``--help`` shows the paper's defaults; ``--max-steps`` / ``--limit`` make smoke
runs; ``--out`` is the card folder written at the end (atomically; an existing one only with ``--overwrite``
and only if a training run wrote it); ``--run-dir`` holds checkpoints, the metrics log and plots, and a run
started again with the same settings resumes from its newest checkpoint. Errors are one line
(``tileprompt: error: ...``, exit 2); Ctrl-C saves a checkpoint and exits 130.

This module imports nothing heavy: ``tileprompt train --help`` lists the methods without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_ERROR = 2
EXIT_CANCELLED = 130

#: ``tileprompt train METHOD``: the module that implements it (``main(argv, prog)``) and one line of help.
METHODS: dict[str, tuple[str, str]] = {
    "patch": ("tileprompt_backend.training.patch",
              "PAINT: fine-tune CLIP's image tower on RGB composites, interpolate with the zero-shot weights"),
    "align": ("tileprompt_backend.training.align",
              "cross-modal alignment: distil a patched CLIP image tower into a 13-band Sentinel-2 ViT"),
    "cmid": ("tileprompt_backend.training.cmid",
             "CMID: self-supervised pre-training of a Sentinel-2 ViT (MIM + global MoCo + local distillation)"),
    "harma": ("tileprompt_backend.training.harma",
              "HarMA: retrieval adapters (gated, shared across towers) on a frozen CLIP, from captioned images"),
    "rdb": ("tileprompt_backend.training.rdb",
            "RDB: asymmetric retrieval adapters (differential / hierarchical attention) with the dual-task loss"),
}


def train_main(argv: Sequence[str]) -> int:
    """``tileprompt train METHOD [options]``: dispatch to the method's own command."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: tileprompt train METHOD [options]   (tileprompt train METHOD --help for its options)\n")
        print("methods:")
        for name, (_, text) in METHODS.items():
            print(f"  {name:8s} {text}")
        return 0 if argv else EXIT_ERROR
    name = argv[0]
    if name not in METHODS:
        print(f"tileprompt: error: unknown training method {name!r} (valid: {', '.join(METHODS)})", file=sys.stderr)
        return EXIT_ERROR
    module = importlib.import_module(METHODS[name][0])
    return module.main(argv[1:], prog=f"tileprompt train {name}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks (they hold the paper's recipe)."""


def parser_for(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def add_run_arguments(p: argparse.ArgumentParser, *, batch: int, epochs: float, lr: float, weight_decay: float,
                      warmup: int | None, grad_clip: float = 1.0, paper: str = "paper", seed: int = 42) -> None:
    """The options every training has; the defaults given are the method's published recipe.

    ``warmup=None``: the method sizes its warm-up itself (CMID: ``--warmup-epochs``; others a share of the run)
    unless ``--warmup-steps`` is given.
    """
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="model card folder to write at the end")
    g.add_argument("--run-dir", help="checkpoints, metrics log and plots (default: OUT.run beside --out); "
                                     "a run started again with the same settings resumes here")
    g.add_argument("--id", help="id of the card written (default: the --out folder's name)")
    g.add_argument("--title", help="title of the card written")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing card at --out (only one a training run wrote)")
    g.add_argument("--no-resume", action="store_true", help="start over even if --run-dir holds checkpoints")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: a GPU when torch sees one (torchrun: one GPU per process)")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help=f"auto: bf16 autocast on GPUs ({paper}: bf16) and on CPUs with bf16 units "
                        "(AVX512-BF16/AMX), else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the trained module (the reference does)")
    g.add_argument("--seed", type=int, default=seed, help=f"random seed (default and {paper}: {seed})")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader processes decoding and augmenting samples per rank (0: none)")
    g.add_argument("--quiet", action="store_true", help="no progress bar (log lines still go to the metrics log)")
    g.add_argument("--log-every", type=int, default=10, help="steps between metrics log lines (default: 10)")
    g.add_argument("--checkpoint-every", type=int, default=500,
                   help="steps between checkpoints (default: 500; also at the end and on Ctrl-C)")
    o = p.add_argument_group("optimisation (defaults: the published recipe)")
    o.add_argument("--batch-size", type=int, default=batch,
                   help=f"global batch size, split over torchrun ranks (default and {paper}: {batch})")
    o.add_argument("--epochs", type=float, default=epochs, help=f"epochs over the training split "
                                                                 f"(default and {paper}: {epochs:g})")
    o.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (smoke runs); the "
                                                 "schedule is fitted to the shorter run")
    o.add_argument("--limit", type=int, help="use only the first N samples of each split (smoke runs)")
    o.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default and {paper}: {lr:g})")
    o.add_argument("--weight-decay", type=float, default=weight_decay,
                   help=f"weight decay (default and {paper}: {weight_decay:g})")
    o.add_argument("--warmup-steps", type=int, default=warmup,
                   help=f"linear warm-up steps before the decay (default and {paper}: {warmup})" if warmup is not None
                   else "linear warm-up steps before the decay (default: the method's own rule, see below)")
    o.add_argument("--grad-clip", type=float, default=grad_clip,
                   help=f"clip the gradient norm to this (0: off; default and {paper}: {grad_clip:g})")
    o.add_argument("--shuffle-buffer", type=int, default=1000,
                   help="samples in the shuffle buffer (the reference: 5000 for patching)")


def default_run_dir(out: str | Path) -> Path:
    out = Path(out).expanduser()
    return out.parent / f"{out.name}.run"


def positive(args: argparse.Namespace, *names: str) -> None:
    """Refuse zero or negative values of numeric options, naming the option."""
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be positive, got {value}")


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                fn: Callable[[argparse.Namespace], Any]) -> int:
    """Parse, run ``fn(args)``, and turn failures into one line and an exit code (on every torchrun rank)."""
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 and rank else ""
    previous = signal.getsignal(signal.SIGTERM)

    def terminate(signum, frame):  # a cluster's preemption: stop like Ctrl-C (a checkpoint is saved)
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (tests calling main in a thread)
        previous = None
    try:
        fn(args)
        return 0
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError) as e:
        print(f"{prefix}tileprompt: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prefix}tileprompt: cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        from .distributed import shutdown
        shutdown()
        sys.stdout.flush()
