"""Starting and stopping the bundled backend: ``<venv>/bin/tileprompt serve --port N --state-file FILE``.

The backend runs in its own venv (torch, rasterio ...), never in QGIS's Python. It is a child process with a
cleaned environment (no PYTHONPATH/PYTHONHOME or QGIS's PROJ/GDAL paths, which would make the venv's own GDAL
read QGIS's data files) plus the proxy QGIS is configured with (``proxy_environment``: model downloads go through
it), its output goes to a log file, and it is ready when its state file appears (the server
writes it once it accepts connections). Nothing here blocks the UI thread except ``stop()``, which waits at most
a few seconds for the process to exit.
"""

from __future__ import annotations

import os
import signal
# Starts the user's own backend executable, with an argument list, never through a shell.
import subprocess  # nosec B404
import time
from pathlib import Path

from qgis.PyQt.QtCore import QObject, QTimer, pyqtSignal

from .client import BackendUnavailable, Connection
from .i18n import tr
from .installer.proxy import qgis_proxy_environment

#: Variables that point a Python or GDAL/PROJ at QGIS's own installation; the backend venv must not inherit them.
SCRUBBED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "QGIS_PREFIX_PATH", "PROJ_LIB",
                "PROJ_DATA", "GDAL_DATA", "GDAL_DRIVER_PATH", "GDAL_PLUGINS", "VIRTUAL_ENV", "QT_PLUGIN_PATH",
                "LD_PRELOAD")
POLL_MS = 200


def backend_environment(base: dict | None = None, extra: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    for name in SCRUBBED_ENV:
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


#: Hosts the backend never reaches through a proxy: the loopback it serves on.
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def proxy_environment() -> dict:
    """The proxy QGIS is configured with (Settings > Options > Network) for the backend's downloads:
    :func:`~.installer.proxy.qgis_proxy_environment` (what uv gets too), in both spellings (urllib reads lower case
    first), with the loopback never proxied. Nothing when QGIS uses no proxy or the system's (the environment
    already has that one).

    HTTP proxies work for every download; a SOCKS5 proxy (``ALL_PROXY``) reaches Hugging Face downloads when the
    backend venv has ``socksio``; plain-URL downloads need an HTTP proxy.
    """
    env = qgis_proxy_environment()
    if not env:
        return {}
    excluded = [h for h in env.pop("NO_PROXY", "").split(",") if h]
    env["NO_PROXY"] = ",".join(dict.fromkeys([*LOOPBACK, *excluded]))
    return {**env, **{name.lower(): value for name, value in env.items()}}


def tail(path: str | Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


class BackendLauncher(QObject):
    """One backend process started by the plugin. Signals: ``started(Connection)``, ``failed(str)``, ``stopped``."""

    started = pyqtSignal(object)
    failed = pyqtSignal(str)
    stopped = pyqtSignal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.process: subprocess.Popen | None = None
        self.state_file: Path | None = None
        self.log_file: Path | None = None
        self._log_handle = None
        self._deadline = 0.0
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._poll)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def starting(self) -> bool:
        return self._timer.isActive()

    def command(self, executable: Path, port: int, state_file: Path) -> list[str]:
        return [str(executable), "serve", "--port", str(int(port)), "--state-file", str(state_file)]

    def start(self, executable: Path, state_file: Path, log_file: Path, port: int = 0, timeout_s: float = 180,
              env: dict | None = None, cwd: Path | None = None) -> None:
        """Start the process; ``started``/``failed`` follow asynchronously. Raises BackendUnavailable at once when
        the executable is missing (scripts/setup not run) or the process cannot be created."""
        if self.running:
            raise BackendUnavailable(tr("The backend started by TilePrompt is already running."))
        executable = Path(executable)
        if not executable.is_file():
            raise BackendUnavailable(tr(
                "The backend is not installed: {exe} does not exist. Run scripts/setup in the plugin folder, or "
                "choose the backend's virtual environment in the TilePrompt settings.").format(exe=executable))
        state_file, log_file = Path(state_file), Path(log_file)
        state_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            state_file.unlink()  # a stale file from a crashed run would look like readiness
        except FileNotFoundError:
            pass
        self._log_handle = open(log_file, "ab")  # noqa: SIM115 (kept open for the child's lifetime)
        self._log_handle.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} "
                               f"{' '.join(self.command(executable, port, state_file))}\n".encode())
        self._log_handle.flush()
        try:
            self.process = subprocess.Popen(  # nosec B603
                self.command(executable, port, state_file),
                stdin=subprocess.DEVNULL, stdout=self._log_handle, stderr=subprocess.STDOUT,
                env=env if env is not None else backend_environment(),
                cwd=str(cwd or log_file.parent), start_new_session=(os.name != "nt"),
            )
        except OSError as exc:
            self._close_log()
            raise BackendUnavailable(tr("Cannot start the backend {exe}: {error}").format(
                exe=executable, error=exc)) from None
        self.state_file, self.log_file = state_file, log_file
        self._deadline = time.monotonic() + timeout_s
        self._timer.start()

    def _poll(self) -> None:
        code = self.process.poll() if self.process is not None else -1
        if code is not None:
            self._timer.stop()
            self._close_log()
            self.process = None
            self.failed.emit(tr("The backend exited with code {code} while starting. Last lines of {log}:\n{tail}")
                             .format(code=code, log=self.log_file, tail=tail(self.log_file, 15)))
            return
        if self.state_file is not None and self.state_file.is_file():
            try:
                connection = Connection.from_state_file(self.state_file)
            except BackendUnavailable:
                return  # being written; read it on the next tick
            if connection.pid not in (None, self.process.pid):
                return  # another server's file: wait for ours
            self._timer.stop()
            self.started.emit(connection)
            return
        if time.monotonic() > self._deadline:
            self._timer.stop()
            self.stop()
            self.failed.emit(tr("The backend did not become ready in time. Last lines of {log}:\n{tail}").format(
                log=self.log_file, tail=tail(self.log_file, 15)))

    def stop(self, wait_s: float = 5.0) -> None:
        """Terminate the process we started (SIGTERM, then SIGKILL after ``wait_s``); remove its state file."""
        self._timer.stop()
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                process.terminate()
                process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                if os.name != "nt":
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.kill()
                process.wait(timeout=wait_s)
            except ProcessLookupError:
                pass
        if process is not None:
            if self.state_file is not None:
                try:
                    # Only our own server's file: another server may have written the same path since.
                    if Connection.from_state_file(self.state_file).pid in (None, process.pid):
                        self.state_file.unlink()
                except (BackendUnavailable, OSError):
                    pass
            self._close_log()
            self.stopped.emit()

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
