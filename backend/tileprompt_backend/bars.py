"""Command-line progress bars (on stderr): tiles for classify/index, bytes for each stage of a download."""

from __future__ import annotations

import sys


def tile_bar(desc: str, quiet: bool):
    """(progress(done, total) for tiles, close()): a bar drawn from the first tile on, after any download bars."""
    state = {"bar": None}

    def progress(done: int, total: int) -> None:
        if quiet:
            return
        if state["bar"] is None:
            from tqdm import tqdm
            state["bar"] = tqdm(total=total, unit="tile", desc=desc, file=sys.stderr, dynamic_ncols=True)
        state["bar"].total, state["bar"].n = total, done
        state["bar"].refresh()

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()

    return progress, close


class StageBars:
    """Command-line bars (bytes, on stderr) for the stages downloads report (``models.progress``), one at a time."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar = None
        self.stage: str | None = None

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if self.quiet:
            return
        if stage != self.stage:
            from tqdm import tqdm

            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=stage, file=sys.stderr, dynamic_ncols=True)
        if total is not None:
            self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
