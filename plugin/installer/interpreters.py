"""Which Python the backend environment is made from, and whether an NVIDIA driver is there.

The way the installers that work do it (GeoAI, TerraLab): a Python >= 3.11 the user names, else one found on the
system, else (the caller's choice) one that uv provisions. An interpreter counts only after it has been run and
has said its version. Never QGIS's own interpreter on Windows or macOS (its folder holds QGIS's DLLs and Qt, which
a backend must not load), nor the Microsoft Store's ``python.exe`` stub (it opens the Store).
"""

from __future__ import annotations

import os
import platform
import shutil
# Runs the interpreters found on this machine and nvidia-smi, with argument lists, never through a shell.
import subprocess  # nosec B404
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..processes import no_window
from .locations import MACOS, WINDOWS

MIN_PYTHON = (3, 11)
#: Versions looked for, newest first; the backend's dependencies are pinned for these.
VERSIONS = ("3.13", "3.12", "3.11")
PROBE = "import sys; print(sys.executable); print(*sys.version_info[:3])"
PROBE_TIMEOUT_S = 15


@dataclass(frozen=True)
class Interpreter:
    path: str
    version: tuple[int, int, int]
    source: str  # "named", "system"

    @property
    def version_text(self) -> str:
        return ".".join(str(v) for v in self.version)


def candidates(system: str | None = None, environ: dict | None = None, home: Path | None = None,
               which: Callable[[str], str | None] = shutil.which) -> list[list[str]]:
    """Command prefixes that may start a Python, most likely first, per platform."""
    system = system or platform.system()
    environ = os.environ if environ is None else environ
    home = home or Path.home()
    found: list[list[str]] = []
    if system == WINDOWS:
        launcher = which("py")
        if launcher:
            found += [[launcher, f"-{v}"] for v in VERSIONS]
        local = Path(environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
        program_files = Path(environ.get("ProgramFiles") or "C:\\Program Files")
        for v in VERSIONS:
            folder = "Python" + v.replace(".", "")
            found += [[str(local / "Programs" / "Python" / folder / "python.exe")],
                      [str(program_files / folder / "python.exe")]]
        for name in ("python3", "python"):
            path = which(name)
            if path:
                found.append([path])
        return found
    for v in VERSIONS:
        path = which(f"python{v}")
        if path:
            found.append([path])
    folders = ["/usr/bin", "/usr/local/bin"]
    if system == MACOS:
        folders = ["/opt/homebrew/bin", "/usr/local/bin"] + \
            [f"/Library/Frameworks/Python.framework/Versions/{v}/bin" for v in VERSIONS]
    for folder in folders:
        for v in VERSIONS:
            found.append([f"{folder}/python{v}"])
    path = which("python3")
    if path:
        found.append([path])
    return found


def probe(command: Sequence[str], source: str = "system",
          run: Callable = subprocess.run) -> Interpreter | None:
    """Run ``command -c PROBE``: the interpreter it starts, if it runs and is new enough."""
    if len(command) == 1 and not Path(command[0]).is_file():
        return None
    try:
        done = run([*command, "-c", PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False,
                   stdin=subprocess.DEVNULL, **no_window())
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (done.stdout or "").strip().splitlines()
    if done.returncode != 0 or len(lines) < 2:
        return None
    try:
        version = tuple(int(v) for v in lines[-1].split()[:3])
    except ValueError:
        return None
    if len(version) != 3 or version < MIN_PYTHON:
        return None
    return Interpreter(lines[-2].strip(), version, source)


def excluded(path: str, qgis_prefixes: Sequence[str] = (), system: str | None = None) -> bool:
    """QGIS's own interpreter (Windows, macOS) and the Store stub are never used."""
    system = system or platform.system()

    def norm(p: str) -> str:
        p = p.replace("\\", "/").rstrip("/")
        return p.lower() if system == WINDOWS else p

    target = norm(path)
    if system == WINDOWS and "/microsoft/windowsapps/" in target:
        return True
    if system in (WINDOWS, MACOS):
        return any(prefix and (target == norm(prefix) or target.startswith(norm(prefix) + "/"))
                   for prefix in qgis_prefixes)
    return False


def find_python(named: str = "", qgis_prefixes: Sequence[str] = (), system: str | None = None,
                run: Callable = subprocess.run, which: Callable[[str], str | None] = shutil.which,
                environ: dict | None = None) -> Interpreter | None:
    """The named interpreter (None if it does not run or is too old: the caller says so), else the newest found
    on the system, else None (then uv provisions one)."""
    if named:
        return probe([named], "named", run)
    best: Interpreter | None = None
    seen: set[str] = set()
    for command in candidates(system, environ, which=which):
        key = " ".join(command)
        if key in seen:
            continue
        seen.add(key)
        found = probe(command, "system", run)
        if found is None or excluded(found.path, qgis_prefixes, system):
            continue
        if best is None or found.version > best.version:
            best = found
    return best


def nvidia_gpu(system: str | None = None, run: Callable = subprocess.run,
               which: Callable[[str], str | None] = shutil.which) -> str | None:
    """'NVIDIA RTX A2000 (driver 535.54)' when an NVIDIA driver answers, else None (macOS: never)."""
    system = system or platform.system()
    if system == MACOS:
        return None
    smi = which("nvidia-smi")
    if smi is None and system == WINDOWS:
        fallback = Path(os.environ.get("SystemRoot", "C:\\Windows")) / "System32" / "nvidia-smi.exe"
        smi = str(fallback) if fallback.is_file() else None
    if smi is None:
        return None
    try:
        done = run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True,
                   text=True, timeout=PROBE_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL, **no_window())
    except (OSError, subprocess.SubprocessError):
        return None
    first = (done.stdout or "").strip().splitlines()[:1]
    if done.returncode != 0 or not first:
        return None
    name, _, driver = first[0].partition(",")
    return f"{name.strip()} (driver {driver.strip()})" if driver.strip() else name.strip()
