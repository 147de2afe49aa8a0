"""Where TilePrompt finds its bundled resources and keeps user data.

scripts/setup installs the backend in editable mode from the plugin folder, whose `resources/` folder is the
repository root's; the plugin's installer builds a normal (wheel) install outside the plugin folder and copies
`resources/` into the environment. Every location can be overridden by environment:

- ``TILEPROMPT_RESOURCES``: bundled templates, prompt sets, model cards and styles (default: ``<repo>/resources``
  for a checkout's editable install, else ``<environment>/share/tileprompt/resources``, where the plugin's
  installer copies them)
- ``TILEPROMPT_HOME``: user model cards (``models/``) and state (default: ``$XDG_DATA_HOME/tileprompt``)
- ``TILEPROMPT_CACHE``: downloaded weights and exported ONNX files (default: ``$XDG_CACHE_HOME/tileprompt``)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else default


def resources_dir() -> Path:
    """The bundled resources folder (templates, prompt sets, model cards, styles)."""
    checkout = Path(__file__).resolve().parents[2] / "resources"
    installed = Path(sys.prefix) / "share" / "tileprompt" / "resources"
    return _env_path("TILEPROMPT_RESOURCES", checkout if checkout.is_dir() or not installed.is_dir() else installed)


def home_dir() -> Path:
    """User data: model cards the user adds, server state."""
    xdg = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return _env_path("TILEPROMPT_HOME", xdg / "tileprompt")


def cache_dir() -> Path:
    """Downloaded weights and derived files (ONNX exports); safe to delete."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return _env_path("TILEPROMPT_CACHE", xdg / "tileprompt")


def user_models_dir() -> Path:
    return home_dir() / "models"


def bundled_models_dir() -> Path:
    return resources_dir() / "models"


#: The bundled templates file (relative to the resources folder).
DEFAULT_TEMPLATES = "templates/satellite.txt"


def templates_path(path: str | Path | None = None) -> Path:
    """The templates file a path names: as given, else relative to the bundled resources (cards name
    ``templates/...``); None is the bundled default. A missing file is a ValueError."""
    path = Path(path if path is not None else DEFAULT_TEMPLATES).expanduser()
    if not path.is_absolute() and not path.exists():
        path = resources_dir() / path
    if not path.is_file():
        raise ValueError(f"templates file not found: {path}")
    return path


def templates_dir() -> Path:
    return resources_dir() / "templates"
