"""Exceptions shared by the engine, the index, the job queue and the CLI (light: imports nothing heavy)."""

from __future__ import annotations

#: The interfaces an error's remedy can be phrased for (the plugin's dock and Processing read it over HTTP).
INTERFACES = ("cli", "http", "dock", "processing")


class Cancelled(Exception):
    """The caller asked to stop; nothing was written."""


class InputError(ValueError):
    """A bad input whose remedy each interface says in its own syntax.

    ``problem`` names what is wrong (never file contents); ``fixes`` maps an interface (:data:`INTERFACES`) to
    the remedy in that interface's words, e.g. ``{"cli": "pass --overwrite", "http": 'send "overwrite": true'}``.
    ``str(error)`` is the problem with the CLI's remedy (the engine's callers are mostly the CLI and scripts);
    :meth:`message` picks another interface's. ``code`` is a stable name for clients that phrase it themselves.
    """

    def __init__(self, problem: str, code: str, fixes: dict[str, str] | None = None):
        self.problem = problem
        self.code = code
        self.fixes = dict(fixes or {})
        super().__init__(self.message("cli"))

    def message(self, interface: str) -> str:
        fix = self.fixes.get(interface) or self.fixes.get("cli")
        return f"{self.problem}; {fix}" if fix else self.problem


class ResourceError(OSError):
    """The machine refused a write (disk full, read-only or vanished folder); the message says which and where."""

    def __str__(self) -> str:
        return str(self.strerror)
