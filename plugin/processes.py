"""Small helpers about child processes that must behave on Linux, macOS and Windows alike."""

from __future__ import annotations

import os
# Runs Windows' tasklist only, with an argument list.
import subprocess  # nosec B404


def no_window() -> dict:
    """subprocess keyword arguments that keep Windows from flashing a console window for each child."""
    if os.name == "nt":
        return {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0)}
    return {}


def windows_tool(name: str) -> str:
    """A Windows system program by its full path (never whatever ``PATH`` finds first)."""
    return os.path.join(os.environ.get("SystemRoot", "C:\\Windows"), "System32", name)


def pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` runs (None when it cannot be told). Never ``os.kill(pid, 0)`` on Windows, where
    it *terminates* the process."""
    if pid <= 0:
        return None
    if os.name == "nt":
        command = [windows_tool("tasklist.exe"), "/FI", f"PID eq {int(pid)}", "/NH", "/FO", "CSV"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False,  # nosec B603
                                  **no_window())
        except (OSError, subprocess.SubprocessError):
            return None
        return f'"{int(pid)}"' in done.stdout
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return None
    return True
