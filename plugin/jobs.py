"""Running backend jobs to the end: submit, poll, pass a cancel through; the outcome is one of three classes.

:func:`run_jobs` is the one polling loop, shared by the dock's QgsTask (tasks.py) and the Processing algorithms
(which poll from their own worker thread with the algorithm's feedback). It blocks, so it never runs on the UI
thread. Outcomes are tagged types - :class:`JobSucceeded`, :class:`JobFailed`, :class:`JobCancelled` - so
every caller handles all three.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Union

from .client import BackendClient, BackendError, with_fix
from .i18n import tr

TERMINAL_STATES = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class JobSucceeded:
    statuses: tuple  # the final JobStatus of every job, in order

    @property
    def status(self) -> dict:
        return self.statuses[-1]


@dataclass(frozen=True)
class JobFailed:
    message: str
    status: dict | None = None
    code: str | None = None  # the backend's name for a refused input (output_exists, no_georeference ...)
    fixes: dict | None = None  # its remedy per interface

    def message_for(self, interface: str) -> str:
        """The message with the remedy in ``interface``'s words ("dock", "processing")."""
        return with_fix(self.message, self.fixes or {}, interface)


@dataclass(frozen=True)
class JobCancelled:
    status: dict | None = None


JobOutcome = Union[JobSucceeded, JobFailed, JobCancelled]


#: Job stages in which ``bytes_done``/``bytes_total`` (not tiles) measure progress: the model's weights.
WEIGHT_STAGES = ("downloading weights", "checking weights", "converting weights", "loading the model")


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def describe_status(status: dict) -> str:
    """'classify: 120 / 288 tiles, 51 tiles/s, about 3 s left', 'fetch: downloading weights 120 / 605 MB, about
    40 s left' (or 'index: queued')."""
    kind, state = status.get("kind", "job"), status.get("state", "")
    done, total = int(status.get("done") or 0), int(status.get("total") or 0)
    if state == "queued":
        return tr("{kind}: queued").format(kind=kind)
    stage = status.get("stage")
    if state == "running" and stage in WEIGHT_STAGES:
        got, size = int(status.get("bytes_done") or 0), status.get("bytes_total")
        text = f"{kind}: {stage}"
        if size:
            text += f" {_megabytes(got)} / {_megabytes(int(size))}"
        elif got:
            text += f" {_megabytes(got)}"
        eta = status.get("eta_seconds")
        if eta is not None and stage == "downloading weights":
            text += tr(", about {eta:.0f} s left").format(eta=eta)
        return text
    if not total:
        if state == "running":  # before the first batch: loading the model, opening the raster, warming up
            return tr("{kind}: preparing (loading the model, reading the first tiles)").format(kind=kind)
        return tr("{kind}: {state}").format(kind=kind, state=state)
    text = tr("{kind}: {done} / {total} tiles").format(kind=kind, done=done, total=total)
    if status.get("rate"):
        text += tr(", {rate:.0f} tiles/s").format(rate=status["rate"])
    eta = status.get("eta_seconds")
    if eta is not None and state == "running":
        text += tr(", about {eta:.0f} s left").format(eta=eta)
    return text


def is_preparing(status: dict) -> bool:
    """Running, but no tile count yet: the progress is unknown (a bar at 0 % would look stuck)."""
    return status.get("state") == "running" and not int(status.get("total") or 0)


def job_warnings(statuses) -> list[str]:
    """What the backend wants the user to know about finished jobs (``result.warnings``), without repeats."""
    found: list[str] = []
    for status in statuses:
        for text in ((status or {}).get("result") or {}).get("warnings") or []:
            if text not in found:
                found.append(str(text))
    return found


def fraction_done(index: int, count: int, status: dict) -> float:
    """Overall progress in [0, 1] of job ``index`` of ``count`` at ``status`` (bytes while weights download)."""
    total = int(status.get("total") or 0)
    done = int(status.get("done") or 0)
    if status.get("stage") in WEIGHT_STAGES and status.get("bytes_total"):
        total, done = int(status["bytes_total"]), int(status.get("bytes_done") or 0)
    inner = 1.0 if status.get("state") == "succeeded" else (done / total if total else 0.0)
    return min(1.0, (index + min(inner, 1.0)) / max(count, 1))


def _sleep(seconds: float, is_canceled: Callable[[], bool]) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not is_canceled():
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))


def _cancel(client: BackendClient, status: dict, wait_s: float, poll_s: float) -> JobCancelled:
    """Ask the backend to cancel and wait (bounded) until the job has stopped writing."""
    try:
        answer = client.cancel(status["id"])
        if isinstance(answer, dict) and answer.get("state"):
            status = answer
        deadline = time.monotonic() + wait_s
        while status.get("state") not in TERMINAL_STATES and time.monotonic() < deadline:
            time.sleep(poll_s)
            status = client.job(status["id"])
    except BackendError:
        pass  # the backend went away: nothing is running there any more either
    return JobCancelled(status)


def run_jobs(
    client: BackendClient,
    requests: list,
    is_canceled: Callable[[], bool],
    report: Callable[[int, int, dict], None] = lambda i, n, status: None,
    poll_s: float = 0.25,
    cancel_wait_s: float = 15.0,
) -> JobOutcome:
    """Run ``requests`` one after the other (e.g. index, then search); stop at the first failure or a cancel.

    A request may be a function of the statuses so far, returning the request (the search takes the index
    folder the index job reports)."""
    statuses = []
    try:
        for index, request in enumerate(requests):
            if is_canceled():
                return JobCancelled(statuses[-1] if statuses else None)
            if callable(request):
                request = request(statuses)
            status = client.submit(request)
            while True:
                report(index, len(requests), status)
                state = status.get("state")
                if state == "succeeded":
                    statuses.append(status)
                    break
                if state == "failed":
                    return JobFailed(status.get("error") or tr("the {kind} job failed").format(
                        kind=status.get("kind", "")), status)
                if state == "cancelled":
                    return JobCancelled(status)
                if is_canceled():
                    return _cancel(client, status, cancel_wait_s, poll_s)
                _sleep(poll_s, is_canceled)
                if is_canceled():
                    return _cancel(client, status, cancel_wait_s, poll_s)
                status = client.job(status["id"])
    except BackendError as exc:
        return JobFailed(str(exc), code=exc.code, fixes=exc.fixes or None)
    except (KeyError, TypeError, ValueError) as exc:
        return JobFailed(tr("Unexpected answer from the backend: {error}").format(error=exc))
    return JobSucceeded(tuple(statuses))
