"""Progress and cancel for long model operations (downloads, checks, conversions), without passing callbacks down.

Whoever starts the work - the CLI's progress bar, a job's status - sets :func:`download_hooks` around it; code
deep inside (``hf_hub_download``'s progress class, the HTTP Range loop, hashing) calls :func:`report`, which
forwards ``(stage, done, total)`` and raises :class:`~tileprompt_backend.errors.Cancelled` when asked to stop.
The hooks live in a context variable, so they follow the thread that set them (one job at a time per worker).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import Cancelled

#: Stages the downloads report (job statuses show them).
DOWNLOADING, CHECKING, CONVERTING = "downloading weights", "checking weights", "converting weights"

Progress = Callable[[str, int, "int | None"], None]


@dataclass(frozen=True)
class Hooks:
    progress: Progress | None = None
    cancel: Callable[[], bool] | None = None


_HOOKS: contextvars.ContextVar[Hooks] = contextvars.ContextVar("tileprompt_download_hooks", default=Hooks())


@contextlib.contextmanager
def download_hooks(progress: Progress | None = None, cancel: Callable[[], bool] | None = None) -> Iterator[None]:
    """Work in this block reports ``progress(stage, done, total)`` and stops (Cancelled) when ``cancel()``."""
    token = _HOOKS.set(Hooks(progress, cancel))
    try:
        yield
    finally:
        _HOOKS.reset(token)


def current_hooks() -> Hooks:
    return _HOOKS.get()


@contextlib.contextmanager
def using_hooks(hooks: Hooks) -> Iterator[None]:
    """Report to ``hooks`` from another thread (a download library's worker) than the one that set them."""
    token = _HOOKS.set(hooks)
    try:
        yield
    finally:
        _HOOKS.reset(token)


def report(stage: str, done: int, total: int | None) -> None:
    """Tell the current hooks where the work stands; raise Cancelled when they ask to stop."""
    hooks = _HOOKS.get()
    if hooks.progress is not None:
        hooks.progress(stage, int(done), None if total is None else int(total))
    if hooks.cancel is not None and hooks.cancel():
        raise Cancelled("download cancelled; what arrived so far is kept for the next try")

