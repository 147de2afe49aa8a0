"""The Diagnostics report: plugin, QGIS, Qt, Python and OS versions, backend health and device, the log tail.

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

from .launcher import tail
from .metadata import plugin_version
from .settings import PLUGIN_DIR

LOG_LINES = 40


def _redact(text: str) -> str:
    home = str(Path.home())
    return text.replace(home, "~") if home and home != "/" else text


def report(session, launcher, settings) -> str:
    lines = [
        f"TilePrompt diagnostics, {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        f"plugin: {plugin_version()} ({PLUGIN_DIR})",
        f"QGIS: {Qgis.QGIS_VERSION}; Qt {QT_VERSION_STR}; PyQt {PYQT_VERSION_STR}; "
        f"Python {platform.python_version()} ({sys.executable})",
        f"OS: {platform.platform()}",
        "",
        f"backend venv: {settings.backend_venv()} (tileprompt "
        f"{'found' if settings.backend_executable().is_file() else 'MISSING: run scripts/setup'})",
        f"state file: {settings.state_file()}",
        f"cache: {settings.cache_dir()}",
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
            f"device: {h.get('device')}; torch {h.get('torch')}; ONNX Runtime providers: "
            f"{', '.join(h.get('onnx_providers') or []) or '-'}",
            f"loaded models: {', '.join(h.get('loaded_models') or []) or '-'}; queue: {h.get('queue_length')}; "
            f"running job: {h.get('running_job') or '-'}",
        ]
        extra = {k: v for k, v in h.items() if k not in ("status", "version", "device", "torch", "onnx_providers",
                                                         "loaded_models", "queue_length", "running_job")}
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
    return _redact("\n".join(lines))
