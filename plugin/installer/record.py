"""``installation.json``: the environment in use, what it was built from, and whether it is still current.

The record is written last, atomically, once an environment has been built and checked: an installation that
failed or was cancelled never gets one, so the plugin never starts a half-made environment. A newer plugin (another
version, or another backend source in the same version) finds the record outdated and offers an update.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path

from .locations import Layout, venv_tileprompt

#: What the source stamp covers, relative to the plugin folder: everything the installer puts into an environment.
SOURCE_PARTS = ("backend/pyproject.toml", "backend/constraints.txt", "backend/tileprompt_backend", "resources")


@dataclass(frozen=True)
class Installation:
    env: str  # folder name under envs/
    version: str  # `tileprompt --version` of the environment
    source: str  # source_stamp() of the plugin that built it
    compute: str  # "cpu" or "cuda"
    python: str  # the interpreter the environment was made from
    python_version: str
    torch: str  # torch.__version__ in the environment
    cuda: bool  # torch saw a CUDA device when it was checked
    device: str  # the GPU's name, or "CPU"
    installed: str  # ISO time
    log: str  # the installer's log of that run

    def env_path(self, layout: Layout) -> Path:
        return layout.env(self.env)


class State(str, Enum):
    MISSING = "missing"  # nothing installed here
    BROKEN = "broken"  # a record whose environment is gone or lacks the backend
    OUTDATED = "outdated"  # installed by another plugin version or source
    CURRENT = "current"


def source_stamp(plugin_dir: Path) -> str:
    """A hash of the backend the plugin ships (package, pins, resources), so a changed source is an update even
    when the version number did not move."""
    digest = hashlib.sha256()
    plugin_dir = Path(plugin_dir)
    for part in SOURCE_PARTS:
        root = plugin_dir / part
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            digest.update(path.relative_to(plugin_dir).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def read(layout: Layout) -> Installation | None:
    """The record, or None when there is none or it cannot be read (then the folder counts as not installed)."""
    try:
        data = json.loads(layout.record.read_text(encoding="utf-8"))
        known = {f.name for f in fields(Installation)}
        return Installation(**{k: v for k, v in data.items() if k in known})
    except (OSError, ValueError, TypeError):
        return None


def write(layout: Layout, installation: Installation) -> None:
    """Replace the record atomically (a temporary file in the same folder, then a rename)."""
    layout.root.mkdir(parents=True, exist_ok=True)
    tmp = layout.record.with_name(f".{layout.record.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(installation), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, layout.record)


def state(layout: Layout, plugin_version: str, stamp: str) -> tuple[State, Installation | None]:
    installation = read(layout)
    if installation is None:
        return State.MISSING, None
    if not venv_tileprompt(installation.env_path(layout)).is_file():
        return State.BROKEN, installation
    if installation.version != plugin_version or installation.source != stamp:
        return State.OUTDATED, installation
    return State.CURRENT, installation
