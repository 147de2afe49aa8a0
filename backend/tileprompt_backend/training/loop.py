"""The training loop every method shares: AdamW or Adan, cosine schedule with linear warm-up, gradient clipping,
bf16 autocast on CUDA, DDP, progress and metrics log, checkpoints every N steps, resume, and Ctrl-C.

A method supplies the trainable module and ``loss_fn(model, batch) -> (loss, metrics)``; the loop owns
everything else. Schedules (``LoopConfig.schedule``), all per optimizer step:

- ``cosine`` (Mind the Modality Gap / PAINT, method notes §2.7): lr = base x (step + 1) / warmup during warm-up,
  then base x 0.5 x (1 + cos(pi x e / E)) over the rest; ``min_lr`` raises the floor of the cosine (CMID decays
  to 1e-6);
- ``linear`` (HarMA's code, method notes §3.6): the same warm-up, then a linear decay to 0;
- ``step`` (RDB §4.2): base x gamma ** floor(step / step_every), after the warm-up if any.

Optimisers: AdamW, or Adan (timm; CMID). Parameters named by ``no_decay`` (biases, norms, loss weights), or with
``decay_filter`` timm's rule, get no weight decay; ``after_step(step)`` runs after every optimizer step (EMA
teachers, validation).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import Dist, all_reduce_mean, any_rank
from .runlog import RunLog

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "bf16", "fp32")
OPTIMIZERS = ("adamw", "adan")
SCHEDULES = ("cosine", "linear", "step")


@dataclass
class LoopConfig:
    """Optimisation settings shared by every training (a method's defaults come from its paper)."""

    total_steps: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float = 1.0
    precision: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    compile: bool = False
    optimizer: str = "adamw"  # "adamw" (torch) | "adan" (timm; CMID)
    decay_filter: bool = False  # no weight decay on biases, norms and the module's no_weight_decay() (timm's rule)
    min_lr: float = 0.0  # the cosine ends here instead of 0
    broadcast_buffers: bool = True  # DDP copies rank 0's buffers every forward; off when ranks update them alike
    schedule: str = "cosine"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    step_every: int = 0  # "step" schedule: steps between decays
    step_gamma: float = 1.0  # "step" schedule: factor per decay


def cosine_with_warmup(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """The learning-rate multiplier at optimizer step ``step`` (0-based): linear warm-up, then cosine to ``floor``.

    Warm-up: (step + 1) / warmup for step < warmup; then floor + (1 - floor) 0.5 (1 + cos(pi (step - warmup) /
    (total - warmup))). With floor 0 this is the reference's ``cosine_lr`` (MindTheModalityGap ``utils.py``, PAINT
    ``src/utils.py``); CMID's ends at min_lr, i.e. floor = min_lr / lr.
    """
    if step < warmup:
        return (step + 1) / warmup
    rest = max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, rest) / rest))


def make_optimizer(module: nn.Module, config: LoopConfig, device: torch.device,
                   no_decay: Callable[[str], bool] | None = None) -> torch.optim.Optimizer:
    """AdamW (torch) or Adan (timm, CMID's optimiser: betas 0.98/0.92/0.99, eps 1e-8) over the trainable parameters.

    ``decay_filter`` leaves biases, 1-D parameters (norms) and the names in ``module.no_weight_decay()`` out of
    weight decay, as timm's ``filter_bias_and_bn`` does (the CMID reference trains so); otherwise the parameters
    whose names ``no_decay`` accepts get none. ``betas``/``eps`` apply to AdamW.
    """
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {config.optimizer!r} (valid: {', '.join(OPTIMIZERS)})")
    if config.decay_filter:
        from timm.optim import param_groups_weight_decay

        skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else ()
        groups = [g for g in param_groups_weight_decay(module, config.weight_decay, no_weight_decay_list=skip)
                  if g["params"]]
    else:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if no_decay is None or not no_decay(n)],
                   "weight_decay": config.weight_decay}]
        plain = [p for n, p in named if no_decay is not None and no_decay(n)]
        if plain:
            groups.append({"params": plain, "weight_decay": 0.0})
    if config.optimizer == "adan":
        from timm.optim import Adan

        return Adan(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                             weight_decay=config.weight_decay, fused=device.type == "cuda")


def linear_with_warmup(step: int, warmup: int, total: int) -> float:
    """The multiplier at step ``step``: (step + 1) / warmup during warm-up, then (total - step) / (total - warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    rest = max(1, total - warmup)
    return max(0.0, (total - step) / rest)


def step_decay(step: int, warmup: int, every: int, gamma: float) -> float:
    """The multiplier at step ``step``: the warm-up, then ``gamma ** floor(step / every)``."""
    if step < warmup:
        return (step + 1) / warmup
    return gamma ** (step // every) if every > 0 else 1.0


def lr_multiplier(config: LoopConfig) -> Callable[[int], float]:
    """The schedule of ``config`` as a function of the optimizer step."""
    if config.schedule == "cosine":
        floor = config.min_lr / config.lr if config.lr > 0 else 0.0
        return lambda s: cosine_with_warmup(s, config.warmup_steps, config.total_steps, floor)
    if config.schedule == "linear":
        return lambda s: linear_with_warmup(s, config.warmup_steps, config.total_steps)
    if config.schedule == "step":
        return lambda s: step_decay(s, config.warmup_steps, config.step_every, config.step_gamma)
    raise ValueError(f"unknown schedule {config.schedule!r} (valid: {', '.join(SCHEDULES)})")


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 autocast where the hardware has bf16 matrix units - a CUDA GPU that supports it (as the
    reference trains) or a CPU with AVX512-BF16/AMX (the check the runners use) - else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (valid: {', '.join(PRECISIONS)})")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        from ..models.runners import cpu_has_bf16

        return "bf16" if cpu_has_bf16() else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


LossFn = Callable[[nn.Module, list[Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class LoopResult:
    steps: int  # optimizer steps done in total (including before a resume)
    resumed_from: int  # 0 for a fresh run
    final: dict[str, float] = field(default_factory=dict)  # last logged metrics


class Trainer:
    """Train ``module`` (all its parameters with requires_grad) for ``config.total_steps`` optimizer steps."""

    def __init__(self, module: nn.Module, config: LoopConfig, d: Dist, run_dir: Path, resume_key: dict[str, Any],
                 samples_per_step: int, desc: str, quiet: bool = False,
                 no_decay: Callable[[str], bool] | None = None):
        self.module, self.config, self.d, self.run_dir = module, config, d, Path(run_dir)
        self.resume_key = resume_key
        self.samples_per_step, self.desc, self.quiet = samples_per_step, desc, quiet
        self.precision = resolve_precision(config.precision, d.device)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("nothing to train: the module has no trainable parameters")
        self.optimizer = make_optimizer(module, config, d.device, no_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(config))
        self.params = [p for _, p in named]
        self.step = 0

    # --- resume -------------------------------------------------------------------------------------------------
    def start(self, resume: bool) -> int:
        """Load the newest checkpoint of the run (same settings required) or clear old ones; returns the step."""
        path = latest_checkpoint(self.run_dir)
        if path is not None and not resume:
            if self.d.main:
                shutil.rmtree(checkpoint_dir(self.run_dir), ignore_errors=True)
            path = None
        if path is None:
            self.step = 0
            return 0
        weights, state = load_checkpoint(path)
        saved = state.get("resume_key", {})
        diff = sorted(k for k in set(saved) | set(self.resume_key) if saved.get(k) != self.resume_key.get(k))
        if diff:
            shown = "; ".join(f"{k}: {saved.get(k)!r} -> {self.resume_key.get(k)!r}" for k in diff[:6])
            raise ValueError(f"run folder {self.run_dir} holds a run with other settings ({shown}): give a new "
                             "--run-dir, or --no-resume to start over")
        missing, unexpected = self.module.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not fit the model (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        log.info("resuming %s from step %d (%s)", self.desc, self.step, path)
        return self.step

    def save(self) -> Path | None:
        if not self.d.main:
            return None
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "resume_key": self.resume_key, "loop": asdict(self.config), "torch_rng": torch.get_rng_state()}
        return save_checkpoint(self.run_dir, self.step, self.module.state_dict(), state,
                               keep=self.config.keep_checkpoints)

    # --- training -----------------------------------------------------------------------------------------------
    def fit(self, batches: Iterator[list[Any]], loss_fn: LossFn, steps_per_epoch: int,
            after_step: Callable[[int], None] | None = None) -> LoopResult:
        """Run optimizer steps ``self.step`` .. ``total_steps`` over ``batches`` (one per step, this rank's part);
        ``after_step(step)`` runs after each one (every rank)."""
        resumed_from = self.step
        total = self.config.total_steps
        if self.step >= total:
            return LoopResult(self.step, resumed_from)
        model: nn.Module = self.module
        if self.d.distributed:
            device_ids = [self.d.device.index] if self.d.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                        broadcast_buffers=self.config.broadcast_buffers)
        if self.config.compile:
            model = torch.compile(model)
        self.module.train()
        runlog = RunLog(self.run_dir, self.d, total, self.step, self.samples_per_step, self.desc,
                        self.config.log_every, self.quiet)
        last: dict[str, float] = {}
        try:
            while self.step < total:
                batch = next(batches)
                with autocast(self.d.device, self.precision):
                    loss, metrics = loss_fn(model, batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
                             if self.config.grad_clip > 0 else None)
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                if after_step is not None:
                    after_step(self.step)
                epoch = (self.step - 1) // steps_per_epoch
                if self.step % self.config.log_every == 0 or self.step == total:
                    values = {"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}}
                    if grad_norm is not None:
                        values["grad_norm"] = float(grad_norm)
                    values = all_reduce_mean(self.d, values)
                    if any_rank(self.d, not all(math.isfinite(v) for v in values.values())):
                        raise ValueError(f"the loss is not finite at step {self.step} ({values}): lower --lr, "
                                         "or try --precision fp32")
                    last = dict(values, lr=lr)
                    runlog.step(self.step, epoch, last)
                if self.step % self.config.checkpoint_every == 0 and self.step < total:
                    self.save()
        except KeyboardInterrupt:
            if self.step > resumed_from and self.d.main:
                where = self.save()
                log.warning("interrupted: checkpoint at step %d saved in %s; run the same command again to resume",
                            self.step, where)
            raise
        finally:
            runlog.close()
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # stops the DataLoader's workers now rather than when the process ends
        self.save()
        return LoopResult(self.step, resumed_from, last)
