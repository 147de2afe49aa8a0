"""What a training run reports while it runs: a progress bar (samples/s, ETA) and a metrics log.

``RUN_DIR/metrics.jsonl`` gets one JSON object per logged step (``{"kind": "train", "step", "epoch", "lr",
"loss", ..., "samples_per_s"}``) and one per event (evaluations, the alpha sweep, the card written); a resumed
run appends to it. When the ``tensorboard`` package is installed, the same scalars go to
``RUN_DIR/tensorboard/``. Only rank 0 writes or prints.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .distributed import Dist

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class RunLog:
    def __init__(self, run_dir: Path, d: Dist, total_steps: int, start_step: int, samples_per_step: int,
                 desc: str, log_every: int = 10, quiet: bool = False):
        self.d = d
        self.total, self.samples_per_step, self.log_every = total_steps, samples_per_step, max(1, log_every)
        self.path = Path(run_dir) / METRICS_FILE
        self._file = None
        self._tb = None
        self._bar = None
        self._t_last, self._step_last = time.perf_counter(), start_step
        self.rate = float("nan")  # samples per second over the last window
        if not d.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            pass
        else:
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", desc=desc, file=sys.stderr,
                             dynamic_ncols=True)

    def step(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        """Called after optimizer step ``step`` (1-based count of steps done) with this step's metrics."""
        if not self.d.main:
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
        if step % self.log_every and step != self.total:
            return
        now = time.perf_counter()
        steps = step - self._step_last
        if steps > 0 and now > self._t_last:
            self.rate = steps * self.samples_per_step / (now - self._t_last)
        self._t_last, self._step_last = now, step
        eta = (self.total - step) * self.samples_per_step / self.rate if self.rate > 0 else float("nan")
        row = {"kind": "train", "step": step, "epoch": epoch, **{k: float(v) for k, v in metrics.items()},
               "samples_per_s": self.rate, "eta_s": eta}
        self._write(row)
        for k, v in metrics.items():
            if self._tb is not None:
                self._tb.add_scalar(f"train/{k}", float(v), step)
        if self._tb is not None and math.isfinite(self.rate):
            self._tb.add_scalar("train/samples_per_s", self.rate, step)
        shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        if self._bar is not None:
            self._bar.set_postfix_str(f"{shown}  {self.rate:.1f} samples/s")
        else:
            log.info("step %d/%d  %s  %.1f samples/s  ETA %s", step, self.total, shown, self.rate,
                     format_seconds(eta))

    def event(self, kind: str, **data: Any) -> None:
        """A non-step record (evaluation, sweep row, card written)."""
        if not self.d.main:
            return
        self._write({"kind": kind, **data})
        step = data.get("step")
        if self._tb is not None and isinstance(step, int):
            for k, v in data.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(float(v)):
                    self._tb.add_scalar(f"{kind}/{k}", float(v), step)

    def _write(self, row: dict[str, Any]) -> None:
        row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **row}
        self._file.write(json.dumps(json_safe(row)) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
        self._bar = self._tb = self._file = None


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf as None, arrays and tensors as lists, paths as strings: valid JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def append_event(run_dir: Path, d: Dist, kind: str, **data: Any) -> None:
    """One event row in a run's metrics log, outside a training loop (rank 0 only)."""
    if not d.main:
        return
    path = Path(run_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "kind": kind, **data}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(json_safe(row)) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every row of a run's metrics log."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
