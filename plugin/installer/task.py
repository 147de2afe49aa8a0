"""The installation as a QgsTask: bootstrap uv, find or provision Python, make the environment, install, check.

``run()`` (worker thread) runs uv and the new environment's own programs as child processes, streams every line to
the log file and to ``logLine``, reports progress and a phase line (``phaseChanged``), and polls for a cancel.
A cancel or a failure kills the child process tree and deletes the environment being built; the record
(``installation.json``) is written only after the new environment passed its checks, so the plugin never sees a
half environment. ``finished()`` (UI thread) hands an :class:`InstallSucceeded`, :class:`InstallFailed` or
:class:`InstallCancelled` to the delegate. A user's cancel is not a failure: ``run()`` returns True for it, so
QGIS's task manager does not announce "Task failed".
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
# Runs uv and the new environment's own programs, with argument lists, never through a shell.
import subprocess  # nosec B404
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from qgis.core import QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from ..i18n import tr
from ..launcher import backend_environment
from ..processes import no_window, pid_alive, windows_tool
from . import commands, record
from .interpreters import find_python
from .locations import Layout, env_resources, venv_python, venv_tileprompt
from .progress import PackageProgress, overall
from .proxy import redact
from .uv import UV_VERSION, BootstrapError, bootstrap

#: What the new environment's Python reports about torch (the device check of an installation).
TORCH_PROBE = ("import json, torch; cuda = torch.cuda.is_available(); "
               "print(json.dumps({'torch': torch.__version__, 'cuda': cuda, "
               "'device': torch.cuda.get_device_name(0) if cuda else 'CPU'}))")
_NOTHING = object()  # no line arrived within the poll interval


class InstallError(RuntimeError):
    """A step failed; the message names the step and the cause, the log has the rest."""


class _Cancelled(Exception):
    pass


@dataclass(frozen=True)
class InstallPlan:
    """Everything an installation needs, resolved on the UI thread (settings, proxy, QGIS's folders)."""

    layout: Layout
    plugin_dir: Path
    plugin_version: str
    source: str  # record.source_stamp(plugin_dir)
    compute: str  # "cpu" | "cuda"
    python: str = ""  # an interpreter the user named; "" = find one, else let uv provision one
    sources: commands.PackageSources = commands.PackageSources()
    proxies: tuple = ()  # (name, value) pairs of proxy variables
    qgis_prefixes: tuple = ()
    cache: Path | None = None  # uv's package cache; None = the folder's cache/ (keep it on the same disk)
    uv_version: str = UV_VERSION


@dataclass(frozen=True)
class InstallSucceeded:
    installation: record.Installation
    log: Path
    replaced: str | None = None  # the environment it replaced (to delete once nothing runs from it)
    warning: str = ""


@dataclass(frozen=True)
class InstallFailed:
    message: str
    log: Path


@dataclass(frozen=True)
class InstallCancelled:
    log: Path


def qgis_fetch(url: str) -> bytes:
    """GET ``url`` through QGIS's network access manager (QGIS's proxy, authentication and SSL settings)."""
    from qgis.core import QgsBlockingNetworkRequest
    from qgis.PyQt.QtCore import QUrl
    from qgis.PyQt.QtNetwork import QNetworkRequest

    request = QgsBlockingNetworkRequest()
    if request.get(QNetworkRequest(QUrl(url)), True) != QgsBlockingNetworkRequest.NoError:
        raise BootstrapError(f"cannot download {url}: {request.errorMessage()}")
    return bytes(request.reply().content())


class InstallTask(QgsTask):
    logLine = pyqtSignal(str)  # noqa: N815 (Qt naming)
    phaseChanged = pyqtSignal(str)  # noqa: N815

    def __init__(self, plan: InstallPlan, delegate: Callable | None = None,
                 fetch: Callable[[str], bytes] = qgis_fetch):
        super().__init__(tr("TilePrompt: install the backend"), QgsTask.Flag.CanCancel)
        self.plan = plan
        self.delegate = delegate
        self.fetch = fetch
        self.stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.log_path = plan.layout.logs / f"install-{self.stamp}.log"
        self.outcome = InstallCancelled(self.log_path)  # a task cancelled while queued never runs
        self._log = None
        self._lock: Path | None = None
        self._started = time.monotonic()

    # --- worker thread --------------------------------------------------------------------------------------
    def run(self) -> bool:
        layout = self.plan.layout
        env = layout.env(self.stamp)
        self._started = time.monotonic()
        try:
            layout.logs.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as self._log:
                try:
                    self._take_lock()
                    self.outcome = self._install(env)
                except _Cancelled:
                    self._say(tr("Cancelled; removing the unfinished environment"))
                    self._remove(env)
                    self.outcome = InstallCancelled(self.log_path)
                except (InstallError, BootstrapError, OSError) as exc:
                    self._fail(env, str(exc))
                except Exception as exc:  # noqa: BLE001 - any other surprise ends this installation, not QGIS
                    self._write(traceback.format_exc().rstrip())
                    self._fail(env, f"{type(exc).__name__}: {exc}")
                finally:
                    self._release_lock()
        except OSError as exc:  # the log itself cannot be written: the folder is not usable
            self.outcome = InstallFailed(tr("cannot write to {folder}: {error}").format(
                folder=layout.root, error=exc.strerror or exc), self.log_path)
        return not isinstance(self.outcome, InstallFailed)

    def _fail(self, env: Path, message: str) -> None:
        message = redact(message)
        self._write(f"ERROR: {message}")
        self._remove(env)
        self.outcome = InstallFailed(message, self.log_path)

    def _install(self, env: Path) -> InstallSucceeded:
        plan, layout = self.plan, self.plan.layout
        self._write(f"TilePrompt {plan.plugin_version} backend installation {self.stamp}")
        self._write(f"folder: {layout.root}; compute: {plan.compute}; sources: "
                    f"{redact(' '.join(commands.index_arguments(plan.sources))) or 'PyPI'}; "
                    f"torch backend: {commands.torch_backend(plan.compute, plan.sources) or 'from the indexes'}")
        previous = record.read(layout)
        self._sweep(previous)

        self._step("uv", 0, tr("Fetching uv {version} from the package sources").format(version=plan.uv_version))
        sources = plan.sources
        uv = bootstrap(layout.uv_dir(plan.uv_version), self.fetch, sources.index_url, sources.extra_index_urls,
                       sources.find_links, plan.uv_version)
        self._run([str(uv), "--version"], "uv")
        self._check_cancel()

        self._step("python", 0, tr("Looking for Python 3.11 or newer"))
        found = find_python(plan.python, plan.qgis_prefixes)
        if plan.python and found is None:
            raise InstallError(tr("{python} is not a Python 3.11 or newer that runs; choose another interpreter "
                                  "in the settings, or leave it empty").format(python=plan.python))
        if found is not None:
            self._write(f"Python {found.version_text} ({found.source}): {found.path}")
            python, managed = found.path, False
        else:
            self._say(tr("No Python 3.11+ on this system: uv installs one (Python {v})").format(
                v=commands.PROVISIONED_PYTHON))
            self._run(commands.python_install(uv), "python")
            python, managed = commands.PROVISIONED_PYTHON, True

        self._step("venv", 0, tr("Creating the environment {env}").format(env=env))
        self._run(commands.create_venv(uv, python, env, managed), "venv")

        self._step("packages", 0, tr("Installing the backend and its packages"))
        progress = PackageProgress()

        def packages(line: str) -> None:
            progress.feed(line)
            self.setProgress(overall("packages", progress.fraction()))
            self.phaseChanged.emit(tr("Installing packages: {phase}").format(phase=progress.phase()))

        self._run(commands.install_packages(uv, venv_python(env), plan.plugin_dir, plan.compute, plan.sources),
                  "packages", packages)

        self._step("resources", 0, tr("Copying the model cards and templates"))
        shutil.copytree(plan.plugin_dir / "resources", env_resources(env), dirs_exist_ok=True)

        self._step("verify", 0, tr("Checking the backend and PyTorch"))
        version = self._run([str(venv_tileprompt(env)), "--version"], "verify").strip().split()[-1]
        torch = json.loads(self._run([str(venv_python(env)), "-c", TORCH_PROBE], "verify").strip().splitlines()[-1])
        warning = ""
        if plan.compute == "cuda" and not torch.get("cuda"):
            warning = tr("PyTorch sees no CUDA device: the backend will run on the CPU (check the NVIDIA driver).")
            self._write("WARNING: " + warning)
        installation = record.Installation(
            env=env.name, version=version, source=plan.source, compute=plan.compute, python=python,
            python_version=self._run([str(venv_python(env)), "-c", "import platform; print(platform.python_version())"],
                                     "verify").strip(),
            torch=str(torch.get("torch")), cuda=bool(torch.get("cuda")), device=str(torch.get("device")),
            installed=datetime.now().isoformat(timespec="seconds"), log=str(self.log_path))
        self._check_cancel()
        record.write(layout, installation)
        self.setProgress(100)
        self._say(tr("Installed: backend {version}, PyTorch {torch} on {device}").format(
            version=version, torch=installation.torch, device=installation.device))
        replaced = previous.env if previous is not None and previous.env != env.name else None
        return InstallSucceeded(installation, self.log_path, replaced, warning)

    # --- child processes ------------------------------------------------------------------------------------
    def _run(self, command: list, step: str, on_line: Callable[[str], None] | None = None) -> str:
        """Run ``command``, streaming its lines; returns its output. Cancel kills its process tree."""
        self._write("$ " + redact(" ".join(command)))
        env = backend_environment(extra=commands.uv_environment(
            self.plan.cache or self.plan.layout.cache, self.plan.layout.pythons, dict(self.plan.proxies)))
        kwargs = {"start_new_session": True} if os.name != "nt" else {
            "creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | no_window().get("creationflags", 0)}
        try:
            process = subprocess.Popen(  # nosec B603
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                encoding="utf-8", errors="replace", env=env, cwd=str(self.plan.layout.root), **kwargs)
        except OSError as exc:
            raise InstallError(tr("{step}: cannot run {program}: {error}").format(
                step=step, program=command[0], error=exc.strerror or exc)) from None
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True)
        reader.start()
        output: list[str] = []
        while True:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                line = _NOTHING
            if self.isCanceled():
                _kill_tree(process)
                reader.join(5)
                raise _Cancelled()
            if line is None:  # the child closed its output
                break
            if line is not _NOTHING:
                output.append(line)
                self._write(line)
                if on_line is not None:
                    on_line(line)
        code = process.wait()
        if self.isCanceled():
            raise _Cancelled()
        if code != 0:
            raise InstallError(tr("{step} failed (exit code {code}): {cause}").format(
                step=step, code=code, cause=_cause(output)))
        return "\n".join(output)

    # --- bookkeeping ----------------------------------------------------------------------------------------
    def _step(self, step: str, fraction: float, text: str) -> None:
        self._check_cancel()
        self.setProgress(overall(step, fraction))
        self._say(text)

    def _say(self, text: str) -> None:
        self._write(f"== [{time.monotonic() - self._started:5.0f} s] {text}")
        self.phaseChanged.emit(text)

    def _write(self, line: str) -> None:
        line = redact(line.rstrip("\n"))
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()
        self.logLine.emit(line)

    def _check_cancel(self) -> None:
        if self.isCanceled():
            raise _Cancelled()

    def _take_lock(self) -> None:
        """One installation per folder at a time (two QGIS windows, a double click)."""
        lock = self.plan.layout.root / "install.lock"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            owner = lock.read_text(errors="replace").strip()
            if owner.isdigit() and pid_alive(int(owner)) is not False:
                raise InstallError(tr("another installation is running in {folder} (process {pid})").format(
                    folder=self.plan.layout.root, pid=owner)) from None
            lock.unlink(missing_ok=True)  # left by a QGIS that crashed
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        self._lock = lock

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)
            self._lock = None

    def _sweep(self, current: record.Installation | None) -> None:
        """Delete environments no record names (an interrupted installation, a replaced one) before building."""
        envs = self.plan.layout.envs
        if not envs.is_dir():
            return
        for folder in envs.iterdir():
            if folder.is_dir() and (current is None or folder.name != current.env):
                self._write(f"removing the unused environment {folder.name}")
                self._remove(folder)

    def _remove(self, folder: Path) -> None:
        for attempt in range(5):  # Windows may hold a file of a just-killed process for a moment
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                return
            time.sleep(0.5 * (attempt + 1))
        self._write(f"could not remove {folder}; no record names it, and the next installation removes it")

    # --- UI thread ------------------------------------------------------------------------------------------
    def finished(self, result: bool) -> None:  # noqa: ARG002
        delegate, self.delegate = self.delegate, None
        if delegate is not None:
            delegate(self.outcome)


def _pump(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line.rstrip("\r\n"))
    lines.put(None)


def _kill_tree(process: subprocess.Popen) -> None:
    """Stop ``process`` and what it started (uv's build backends, downloads)."""
    if process.poll() is not None:
        return
    if os.name == "nt":
        command = [windows_tool("taskkill.exe"), "/F", "/T", "/PID", str(process.pid)]
        subprocess.run(command, capture_output=True, check=False, **no_window())
    else:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


def _cause(output: list[str]) -> str:
    """The lines that say why a uv command failed (its 'error:' and cause lines), else the last lines."""
    marked = [line.strip() for line in output
              if line.strip().lower().startswith(("error", "cause:", "caused by", "×", "╰─▶"))]
    chosen = marked[-4:] if marked else [line.strip() for line in output if line.strip()][-3:]
    return " ".join(chosen)[:600] or "no output"
