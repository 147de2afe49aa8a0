"""The dock's installer panel: what is installed, the Install / Update / Repair button, and a running
installation's progress bar, phase line, live log and Cancel.

Widgets only: it emits ``actionRequested`` and ``cancelRequested``; the plugin runs the installer task and calls
:meth:`show_state`, :meth:`started`, :meth:`log`, :meth:`set_progress` and :meth:`finished`. Hidden while the
installed backend is current and nothing runs.
"""

from __future__ import annotations

from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from .i18n import tr

LOG_LINES = 2000


class InstallPanel(QWidget):
    actionRequested = pyqtSignal()  # noqa: N815 (Qt naming): install, update or repair, as the button says
    cancelRequested = pyqtSignal()  # noqa: N815

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("tilepromptInstallPanel")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 4, 0, 0)
        self.message = QLabel(self)
        self.message.setWordWrap(True)
        layout.addWidget(self.message)
        self.gpu_check = QCheckBox(self)
        self.gpu_check.setToolTip(tr("PyTorch's CUDA build, for the NVIDIA driver found (several GB); without it, "
                                     "PyTorch's CPU wheels"))
        self.gpu_check.setVisible(False)
        layout.addWidget(self.gpu_check)
        row = QHBoxLayout()
        self.action_button = QPushButton(tr("Install backend"), self)
        self.action_button.setObjectName("tilepromptInstallButton")
        self.action_button.clicked.connect(self.actionRequested)
        self.cancel_button = QPushButton(tr("Cancel"), self)
        self.cancel_button.clicked.connect(self.cancelRequested)
        self.log_toggle = QToolButton(self)
        self.log_toggle.setText(tr("Log"))
        self.log_toggle.setCheckable(True)
        self.log_toggle.setToolTip(tr("Show the installer's output as it runs"))
        row.addWidget(self.action_button, 1)
        row.addWidget(self.cancel_button)
        row.addWidget(self.log_toggle)
        layout.addLayout(row)
        self.progress = QProgressBar(self)
        self.progress.setRange(0, 100)
        layout.addWidget(self.progress)
        self.phase = QLabel(self)
        self.phase.setWordWrap(True)
        layout.addWidget(self.phase)
        self.log_view = QPlainTextEdit(self)
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(LOG_LINES)
        self.log_view.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.log_view.setMinimumHeight(120)
        self.log_toggle.toggled.connect(self.log_view.setVisible)
        layout.addWidget(self.log_view)
        self.running = False
        self.show_state("", "", False)

    def show_state(self, message: str, action: str, needed: bool) -> None:
        """Idle: ``message`` and a button labelled ``action`` (hidden when ``needed`` is False and no log shows)."""
        self.running = False
        self.message.setText(message)
        self.action_button.setText(action or tr("Install backend"))
        self.action_button.setVisible(bool(action))
        self.action_button.setEnabled(True)
        self.cancel_button.setVisible(False)
        self.progress.setVisible(False)
        self.phase.setVisible(bool(self.phase.text()) and needed)
        self.log_view.setVisible(self.log_toggle.isChecked())
        self.log_toggle.setVisible(bool(self.log_view.toPlainText()))
        self.setVisible(needed)

    def offer_gpu(self, gpu: str | None, chosen: bool) -> None:
        """Offer the CUDA build when an NVIDIA driver answered (``gpu`` names the card), checked if ``chosen``."""
        self.gpu_check.setText(tr("use the GPU (CUDA): {gpu}").format(gpu=gpu) if gpu else "")
        self.gpu_check.setChecked(bool(gpu) and chosen)
        self.gpu_check.setVisible(bool(gpu) and not self.running)

    def started(self, message: str = "") -> None:
        self.running = True
        self.setVisible(True)
        self.message.setText(message)
        self.gpu_check.setVisible(False)
        self.log_view.clear()
        self.action_button.setEnabled(False)
        self.cancel_button.setVisible(True)
        self.cancel_button.setEnabled(True)
        self.log_toggle.setVisible(True)
        self.progress.setVisible(True)
        self.progress.setValue(0)
        self.phase.setVisible(True)
        self.phase.setText(tr("Starting the installation…"))

    def log(self, line: str) -> None:
        self.log_view.appendPlainText(line)
        bar = self.log_view.verticalScrollBar()
        bar.setValue(bar.maximum())  # follow the newest line

    def set_progress(self, percent: float) -> None:
        self.progress.setValue(int(round(percent)))

    def set_phase(self, text: str) -> None:
        self.phase.setText(text)

    def finished(self, message: str, action: str = "", keep_open: bool = False) -> None:
        """The installation ended: ``message`` stays; the panel hides unless ``keep_open`` (a failure)."""
        self.phase.setText("")
        self.show_state(message, action, keep_open)
