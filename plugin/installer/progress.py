"""Installation progress from uv's output: overall percent, a phase line and, while downloading, time left.

uv (non-interactive) prints ``Resolved N packages``, one ``Downloading NAME (SIZE)`` per large download and
``Downloaded NAME`` when it is done, ``Built ...``, ``Prepared N packages`` once every wheel is unpacked into its
cache, and ``Installed N packages``. Downloads are weighed by size (they are most of an analyst's waiting: torch
alone is hundreds of MB); wheels already on disk show no download and are counted at ``Prepared``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

#: (start, end) percent of each step of an installation.
STEPS = {"uv": (0, 4), "python": (4, 10), "venv": (10, 12), "packages": (12, 92), "resources": (92, 93),
         "verify": (93, 100)}
#: Within "packages": resolved -> downloads -> prepared -> installed.
RESOLVED, DOWNLOADED, PREPARED = 0.08, 0.80, 0.90
_SIZE = re.compile(r"^Downloading (\S+) \(([\d.]+)\s*([KMG]i?B)\)")
_UNITS = {"KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "KB": 1e3, "MB": 1e6, "GB": 1e9}


@dataclass
class PackageProgress:
    """uv pip install's lines -> fraction of the step done, and a phase line for the user."""

    resolved: int = 0
    sizes: dict = field(default_factory=dict)  # name -> bytes of downloads announced
    done: set = field(default_factory=set)  # names downloaded
    prepared: bool = False
    installed: bool = False
    first_download: float | None = None
    clock: object = time.monotonic

    def feed(self, line: str) -> None:
        text = line.strip()
        if text.startswith("Resolved "):
            match = re.match(r"Resolved (\d+)", text)
            self.resolved = int(match.group(1)) if match else 0
        elif text.startswith("Downloading "):
            match = _SIZE.match(text)
            if match:
                self.sizes[match.group(1)] = float(match.group(2)) * _UNITS.get(match.group(3), 1)
                if self.first_download is None:
                    self.first_download = self.clock()
        elif text.startswith("Downloaded "):
            self.done.add(text.split()[1])
        elif text.startswith("Prepared "):
            self.prepared = True
        elif text.startswith("Installed "):
            self.installed = True

    @property
    def bytes_total(self) -> float:
        return sum(self.sizes.values())

    @property
    def bytes_done(self) -> float:
        return sum(size for name, size in self.sizes.items() if name in self.done)

    def fraction(self) -> float:
        if self.installed:
            return 1.0
        if self.prepared:
            return PREPARED
        if not self.resolved:
            return 0.0
        if not self.bytes_total:
            return RESOLVED
        return RESOLVED + (DOWNLOADED - RESOLVED) * self.bytes_done / self.bytes_total

    def seconds_left(self) -> float | None:
        """Time left for the downloads, from their rate so far (None before the first one completes)."""
        if self.first_download is None or not self.bytes_done or self.prepared:
            return None
        rate = self.bytes_done / max(self.clock() - self.first_download, 1e-3)
        return (self.bytes_total - self.bytes_done) / rate

    def phase(self) -> str:
        if self.installed:
            return "installed"
        if self.prepared:
            return "linking the packages into the environment"
        if self.sizes:
            text = (f"downloading: {len(self.done)} of {len(self.sizes)} files, "
                    f"{self.bytes_done / 2 ** 20:.0f} of {self.bytes_total / 2 ** 20:.0f} MiB")
            left = self.seconds_left()
            return text + (f", about {_duration(left)} left" if left is not None else "")
        if self.resolved:
            return f"{self.resolved} packages resolved; fetching and unpacking them"
        return "resolving the packages"


def overall(step: str, fraction: float = 0.0) -> float:
    """Percent of the whole installation at ``fraction`` of ``step``."""
    start, end = STEPS[step]
    return start + (end - start) * max(0.0, min(1.0, fraction))


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
