"""The Diagnostics report: plugin, QGIS, Qt, Python and OS versions, the installation (folder, state, versions, the
installer's log), backend health and device (GPU name or CPU model), the last error shown, the log tails.

Made for pasting into an issue; the home folder is written as ``~``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

from qgis.core import Qgis
from qgis.PyQt.QtCore import PYQT_VERSION_STR, QT_VERSION_STR

from .installer import record
from .installer.proxy import redact as redact_proxy
from .launcher import tail
from .metadata import plugin_version
from .settings import PLUGIN_DIR

LOG_LINES = 40


def _redact(text: str) -> str:
    home = str(Path.home())
    return text.replace(home, "~") if home and home != "/" else text


def installer_lines(settings) -> tuple[list[str], Path | None]:
    """What the installer knows (folder, record, state) and the log of its last run."""
    layout = settings.install_layout()
    state, installation = record.state(layout, plugin_version(), record.source_stamp(PLUGIN_DIR))
    lines = [f"installer: folder {layout.root}; {state.value}"
             + ("" if settings.uses_installer() else " (not used: the settings or a checkout's .venv choose)")]
    if installation is not None:
        lines.append(f"installed backend: {installation.version} ({installation.compute}), env {installation.env}, "
                     f"Python {installation.python_version} ({installation.python}), PyTorch {installation.torch} "
                     f"on {installation.device}, {installation.installed}")
    logs = sorted(layout.logs.glob("install-*.log")) if layout.logs.is_dir() else []
    return lines, logs[-1] if logs else None


def report(session, launcher, settings, last_error: str = "") -> str:
    installer, install_log = installer_lines(settings)
    lines = [
        f"TilePrompt diagnostics, {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        f"plugin: {plugin_version()} ({PLUGIN_DIR})",
        f"QGIS: {Qgis.QGIS_VERSION}; Qt {QT_VERSION_STR}; PyQt {PYQT_VERSION_STR}; "
        f"Python {platform.python_version()} ({sys.executable})",
        f"OS: {platform.platform()}",
        "",
        f"backend venv: {settings.backend_venv()} (tileprompt "
        f"{'found' if settings.backend_executable().is_file() else 'MISSING: install the backend from the dock'})",
        *installer,
        f"state file: {settings.state_file()}",
        f"cache: {settings.cache_dir()}",
        f"last error: {last_error or '-'}",
    ]
    connection = session.connection
    if connection is None:
        lines.append("backend: not connected")
    else:
        started = launcher is not None and launcher.process is not None
        lines.append(f"backend: {connection.address}, pid {connection.pid}, "
                     f"{'started by this QGIS' if started else 'attached'}")
    if session.health:
        h = session.health
        lines += [
            f"backend version: {h.get('version')}",
            f"device: {h.get('device')} ({h.get('device_name') or '?'}); torch {h.get('torch')}; "
            f"ONNX Runtime providers: "
            f"{', '.join(h.get('onnx_providers') or []) or '-'}",
            f"loaded models: {', '.join(h.get('loaded_models') or []) or '-'}; queue: {h.get('queue_length')}; "
            f"running job: {h.get('running_job') or '-'}",
        ]
        extra = {k: v for k, v in h.items() if k not in ("status", "version", "device", "device_name", "torch",
                                                         "onnx_providers", "loaded_models", "queue_length",
                                                         "running_job", "default_model")}
        if extra:
            lines.append("health (other): " + json.dumps(extra, sort_keys=True, default=str))
    elif session.error:
        lines.append(f"backend error: {session.error}")
    if session.models:
        lines.append("models: " + ", ".join(
            f"{m.get('id')} ({m.get('modality')}, {'trained' if m.get('trained') else 'untrained'})"
            for m in session.models))
    log = launcher.log_file if launcher is not None and launcher.log_file else \
        settings.cache_dir() / "logs" / "backend.log"
    lines += ["", f"--- last {LOG_LINES} lines of {log} ---", tail(log, LOG_LINES) or "(empty)"]
    # The service's own rotating log sits beside its state file (<TILEPROMPT_HOME>/logs/server.log).
    state_file = Path(connection.state_file) if connection is not None and connection.state_file else \
        settings.state_file()
    server_log = state_file.parent / "logs" / "server.log"
    if server_log.is_file():
        lines += ["", f"--- last {LOG_LINES} lines of {server_log} ---", tail(server_log, LOG_LINES)]
    if install_log is not None:
        lines += ["", f"--- last {LOG_LINES} lines of {install_log} ---", tail(install_log, LOG_LINES)]
    return redact_proxy(_redact("\n".join(lines)))
