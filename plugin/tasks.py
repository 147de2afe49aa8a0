"""A QgsTask that runs backend jobs off the UI thread and hands the outcome to a delegate on the UI thread.

``run()`` (worker thread) only talks HTTP through :func:`jobs.run_jobs`; it touches no layer, project or widget.
``finished()`` (UI thread) calls the delegate with a JobSucceeded / JobFailed / JobCancelled; the delegate adds
layers. Cancelling the task (dock button or the task manager) cancels the backend job too.

Keep a Python reference to a task until its delegate ran (the plugin's ``TaskRegistry`` does): a QgsTask whose
Python wrapper is garbage-collected while queued takes its ``run`` override with it.
"""

from __future__ import annotations

from typing import Callable

from qgis.core import QgsApplication, QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from .client import BackendClient
from .jobs import JobCancelled, JobFailed, JobOutcome, describe_status, fraction_done, is_preparing, run_jobs


class JobTask(QgsTask):
    """Runs ``requests`` on the backend; ``delegate(outcome)`` runs in the UI thread when done."""

    statusChanged = pyqtSignal(str)  # noqa: N815 (Qt naming)
    preparingChanged = pyqtSignal(bool)  # noqa: N815  the job runs but its progress is not known yet

    def __init__(self, title: str, client: BackendClient, requests: list, delegate: Callable[[JobOutcome], None],
                 poll_s: float = 0.25):
        super().__init__(title, QgsTask.Flag.CanCancel)
        self.client = client
        self.requests = list(requests)
        self.delegate = delegate
        self.poll_s = poll_s
        # A task cancelled while still queued never runs: finished() then reports this.
        self.outcome: JobOutcome = JobCancelled(None)
        self._preparing = False

    def run(self) -> bool:  # worker thread
        self.outcome = run_jobs(self.client, self.requests, self.isCanceled, self._report, self.poll_s)
        # A cancel the backend honoured is not a failure: returning False would make QGIS announce "Task failed".
        return not isinstance(self.outcome, JobFailed)

    def _report(self, index: int, count: int, status: dict) -> None:
        self.setProgress(100.0 * fraction_done(index, count, status))
        preparing = is_preparing(status)
        if preparing != self._preparing:
            self._preparing = preparing
            self.preparingChanged.emit(preparing)
        self.statusChanged.emit(describe_status(status))

    def finished(self, result: bool) -> None:  # noqa: ARG002 (UI thread)
        delegate, self.delegate = self.delegate, None
        if delegate is not None:
            delegate(self.outcome)


class TaskRegistry:
    """The plugin's running tasks: referenced until done, cancelled (and detached) on unload."""

    def __init__(self):
        self._tasks: list[JobTask] = []

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self):
        return iter(list(self._tasks))

    def start(self, task: JobTask) -> JobTask:
        delegate = task.delegate

        def done(outcome, task=task, delegate=delegate):
            self.discard(task)
            if delegate is not None:
                delegate(outcome)

        task.delegate = done
        self._tasks.append(task)
        QgsApplication.taskManager().addTask(task)
        return task

    def discard(self, task: JobTask) -> None:
        if task in self._tasks:
            self._tasks.remove(task)

    def cancel_all(self, wait_ms: int = 3000) -> None:
        """Cancel every task, drop its delegate (the UI it would update is going away) and wait, bounded."""
        for task in list(self._tasks):
            task.delegate = None
            task.cancel()
        for task in list(self._tasks):
            try:
                task.waitForFinished(wait_ms)
            except RuntimeError:  # the C++ task is already gone
                pass
        self._tasks.clear()
