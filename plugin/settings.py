"""Global preferences in QgsSettings (one prefix, one enum of keys with defaults) and per-project state.

Global (``QgsSettings``, under ``TilePrompt/``): where the backend venv is, which port it listens on, its state
file, the cache folder, the default model, network timeouts. Per project (``QgsProject`` entries, scope
``TilePrompt``): saved prompt sets and the dock's last run, so a project reopens with its own prompts.

Values come back with the type of their default (``QgsSettings`` stores bools and ints as strings in INI files;
Deepness once read bools through an ``int`` branch, so the round trip is tested for every key).
"""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path

from qgis.core import QgsProject, QgsSettings

from .installer.locations import Layout, default_root, venv_tileprompt
from .installer.record import read as installed

PREFIX = "TilePrompt"
PROJECT_SCOPE = "TilePrompt"
PLUGIN_DIR = Path(__file__).resolve().parent.parent
ICON_PATH = PLUGIN_DIR / "resources" / "icon.png"


class Key(Enum):
    """Setting name (below ``TilePrompt/``) and default; the default's type is the value's type."""

    BACKEND_VENV = ("backend/venv", "")  # "" = the installed backend, else the plugin folder's .venv (scripts/setup)
    INSTALL_DIR = ("install/folder", "")  # "" = the platform's user data folder (installer/locations.py)
    INSTALL_PYTHON = ("install/python", "")  # "" = a Python 3.11+ found on the system, else one uv provisions
    INSTALL_COMPUTE = ("install/compute", "cpu")  # "cpu" or "cuda" (offered when an NVIDIA driver answers)
    INDEX_URL = ("install/indexUrl", "")  # "" = PyPI
    EXTRA_INDEX_URLS = ("install/extraIndexUrls", "")  # space-separated
    FIND_LINKS = ("install/findLinks", "")  # space-separated folders or pages of wheels
    TORCH_BACKEND = ("install/torchBackend", "")  # "" = by compute (cpu / auto); "none" = from the indexes
    INSTALL_CACHE = ("install/cacheDir", "")  # "" = <install folder>/cache (uv's cache; keep it on the same disk)
    INDEX_STRATEGY = ("install/indexStrategy", "")  # "" = uv's first-index; "unsafe-best-match" for partial mirrors
    BACKEND_PORT = ("backend/port", 0)  # 0 = any free port
    STATE_FILE = ("backend/stateFile", "")  # "" = $TILEPROMPT_HOME/server.json or ~/.local/share/tileprompt/...
    AUTO_ATTACH = ("backend/autoAttach", True)  # attach at start-up to a backend that is already running
    START_TIMEOUT_S = ("backend/startTimeoutSeconds", 180)
    CACHE_DIR = ("cacheDir", "")  # "" = $XDG_CACHE_HOME/tileprompt-plugin
    DEFAULT_MODEL = ("defaultModel", "")  # the model the user last picked; "" = Automatic (the backend picks)
    REQUEST_TIMEOUT_S = ("network/timeoutSeconds", 10.0)
    POLL_INTERVAL_MS = ("network/pollMilliseconds", 250)

    @property
    def name_in_settings(self) -> str:
        return f"{PREFIX}/{self.value[0]}"

    @property
    def default(self):
        return self.value[1]


class Settings:
    """Typed access to the plugin's QgsSettings."""

    def __init__(self, settings: QgsSettings | None = None):
        self._settings = settings or QgsSettings()

    def get(self, key: Key):
        default = key.default
        value = self._settings.value(key.name_in_settings, default, type=type(default))
        # QSettings converts with the given type; a value that does not convert comes back as the type's zero.
        return type(default)(value) if value is not None else default

    def set(self, key: Key, value) -> None:
        default = key.default
        if not isinstance(value, type(default)) or (type(default) is int and isinstance(value, bool)):
            if type(default) is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            else:
                raise TypeError(f"{key.name} takes {type(default).__name__}, not {type(value).__name__}")
        self._settings.setValue(key.name_in_settings, value)

    def reset(self, key: Key) -> None:
        self._settings.remove(key.name_in_settings)

    # --- derived locations ---------------------------------------------------------------------------------
    def install_layout(self) -> Layout:
        """The installer's folder (outside the plugin folder, which QGIS replaces on every plugin update)."""
        configured = self.get(Key.INSTALL_DIR)
        return Layout(Path(configured).expanduser() if configured else default_root())

    def backend_venv(self) -> Path:
        """The backend environment the plugin starts: the one chosen in the settings, else the installed one,
        else a developer checkout's ``.venv`` (scripts/setup), else where the installer would put it."""
        configured = self.get(Key.BACKEND_VENV)
        if configured:
            return Path(configured).expanduser()
        layout = self.install_layout()
        installation = installed(layout)
        if installation is not None:
            return installation.env_path(layout)
        checkout = PLUGIN_DIR / ".venv"
        if venv_tileprompt(checkout).is_file():
            return checkout
        return layout.envs

    def backend_executable(self) -> Path:
        """The ``tileprompt`` console script of the backend venv (``Scripts/tileprompt.exe`` on Windows)."""
        return venv_tileprompt(self.backend_venv())

    def uses_installer(self) -> bool:
        """Whether the backend is (to be) the installer's, not an environment chosen or made by scripts/setup."""
        return not self.get(Key.BACKEND_VENV) and not (
            installed(self.install_layout()) is None and venv_tileprompt(PLUGIN_DIR / ".venv").is_file())

    def state_file(self) -> Path:
        configured = self.get(Key.STATE_FILE)
        if configured:
            return Path(configured).expanduser()
        return default_state_file()

    def cache_dir(self) -> Path:
        configured = self.get(Key.CACHE_DIR)
        if configured:
            path = Path(configured).expanduser()
        else:
            xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            path = Path(xdg) / "tileprompt-plugin"
        return path


def default_state_file() -> Path:
    """Where ``tileprompt serve`` writes its state file by default (same rule as the backend's paths.home_dir)."""
    home = os.environ.get("TILEPROMPT_HOME")
    if home:
        return Path(home).expanduser() / "server.json"
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "tileprompt" / "server.json"


class ProjectState:
    """Per-project entries: saved prompt sets (name -> text) and the dock's last parameters (a JSON object)."""

    PROMPT_SETS = "promptSets"
    DOCK_STATE = "dockState"

    def __init__(self, project: QgsProject | None = None):
        self._project = project or QgsProject.instance()

    def _read_json(self, key: str, default):
        text, ok = self._project.readEntry(PROJECT_SCOPE, key, "")
        if not ok or not text:
            return default
        try:
            value = json.loads(text)
        except ValueError:
            return default
        return value if isinstance(value, type(default)) else default

    def _write_json(self, key: str, value) -> None:
        self._project.writeEntry(PROJECT_SCOPE, key, json.dumps(value, sort_keys=True))

    def prompt_sets(self) -> dict[str, str]:
        sets = self._read_json(self.PROMPT_SETS, {})
        return {str(k): str(v) for k, v in sets.items()}

    def save_prompt_set(self, name: str, text: str) -> None:
        sets = self.prompt_sets()
        sets[name] = text
        self._write_json(self.PROMPT_SETS, sets)

    def delete_prompt_set(self, name: str) -> None:
        sets = self.prompt_sets()
        if sets.pop(name, None) is not None:
            self._write_json(self.PROMPT_SETS, sets)

    def dock_state(self) -> dict:
        return self._read_json(self.DOCK_STATE, {})

    def set_dock_state(self, state: dict) -> None:
        self._write_json(self.DOCK_STATE, state)
