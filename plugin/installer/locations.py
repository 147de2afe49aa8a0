"""Where the installed backend lives, per platform, and the paths inside an environment.

The installation folder is outside the plugin folder, because QGIS deletes the plugin folder on every plugin
update (and "Install from ZIP" replaces it):

* Linux and other Unix: ``$XDG_DATA_HOME/tileprompt/backend`` (``~/.local/share/tileprompt/backend``);
* Windows: ``%LOCALAPPDATA%\\TilePrompt\\backend``;
* macOS: ``~/Library/Application Support/TilePrompt/backend``.

The user can choose another folder in the settings. Inside it::

    installation.json   the record of the environment in use (record.py)
    envs/<stamp>/       one virtual environment per installation; a reinstall builds a new one beside it
    uv/<version>/       the uv executable the installer bootstrapped
    python/             interpreters uv provisions when the system has no Python 3.11+
    cache/              uv's package cache, on the same disk so environments are hard links into it
    logs/               one log per installation run
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

WINDOWS = "Windows"
MACOS = "Darwin"


def default_root(system: str | None = None, environ: dict | None = None, home: Path | None = None) -> Path:
    """The installation folder for this user on ``system`` (``platform.system()`` names)."""
    system = system or platform.system()
    environ = os.environ if environ is None else environ
    home = home or Path.home()
    if system == WINDOWS:
        base = environ.get("LOCALAPPDATA") or str(home / "AppData" / "Local")
        return Path(base) / "TilePrompt" / "backend"
    if system == MACOS:
        return home / "Library" / "Application Support" / "TilePrompt" / "backend"
    data = environ.get("XDG_DATA_HOME") or str(home / ".local" / "share")
    return Path(data) / "tileprompt" / "backend"


def executable_name(name: str, system: str | None = None) -> str:
    return f"{name}.exe" if (system or platform.system()) == WINDOWS else name


def venv_bin(env: Path, system: str | None = None) -> Path:
    """The folder of a virtual environment's executables (``Scripts`` on Windows)."""
    return Path(env) / ("Scripts" if (system or platform.system()) == WINDOWS else "bin")


def venv_python(env: Path, system: str | None = None) -> Path:
    return venv_bin(env, system) / executable_name("python", system)


def venv_tileprompt(env: Path, system: str | None = None) -> Path:
    """The backend's console script in an environment: what the launcher runs."""
    return venv_bin(env, system) / executable_name("tileprompt", system)


def env_resources(env: Path) -> Path:
    """Where the installer copies the plugin's ``resources/`` (model cards, templates) inside an environment; the
    backend finds them there (``tileprompt_backend.paths.resources_dir``)."""
    return Path(env) / "share" / "tileprompt" / "resources"


@dataclass(frozen=True)
class Layout:
    """The paths of one installation folder."""

    root: Path

    @property
    def record(self) -> Path:
        return self.root / "installation.json"

    @property
    def envs(self) -> Path:
        return self.root / "envs"

    def env(self, name: str) -> Path:
        return self.envs / name

    def uv_dir(self, version: str) -> Path:
        return self.root / "uv" / version

    @property
    def pythons(self) -> Path:
        return self.root / "python"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def logs(self) -> Path:
        return self.root / "logs"
