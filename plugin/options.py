"""The "TilePrompt" page of QGIS's Settings > Options: the backend's installation and environment.

Installation: the folder (outside the plugin folder), the interpreter (found, named, or provisioned by uv), the
compute (CPU, or GPU (CUDA) when an NVIDIA driver answers), and the package sources (index, extra indexes, wheel
folders, where PyTorch comes from) for offline mirrors and company proxies. Environment: another backend
environment to start instead (a developer's ``.venv``), the port, the start timeout, the cache folder, attaching at
start-up. The page's Install/Update/Repair button saves the page and runs the installer, whose progress shows in
the dock.
"""

from __future__ import annotations

from qgis.gui import QgsCollapsibleGroupBox, QgsFileWidget, QgsOptionsPageWidget, QgsOptionsWidgetFactory
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from .i18n import tr
from .installer.interpreters import Interpreter, find_python, nvidia_gpu
from .settings import ICON_PATH, Key, Settings

PAGE_NAME = "TilePromptOptions"
TORCH_SOURCES = (("", "PyTorch's index for the compute (CPU wheels, or the CUDA build for the driver)"),
                 ("none", "the package indexes above, like every other package"))


class BackendOptionsPage(QgsOptionsPageWidget):
    def __init__(self, plugin=None, parent=None, settings: Settings | None = None,
                 python: Interpreter | None = None, gpu: str | None = None, detect: bool = True):
        super().__init__(parent)
        self.setObjectName(PAGE_NAME)
        self.plugin = plugin
        self.settings = settings or Settings()
        self._detect = detect  # on the first show: QGIS builds every page whenever its Options dialog opens
        layout = QVBoxLayout(self)

        install = QgsCollapsibleGroupBox(tr("Backend installation"), self)
        form = QFormLayout(install)
        self.folder_widget = QgsFileWidget(install)
        self.folder_widget.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.folder_widget.lineEdit().setPlaceholderText(str(self.settings.install_layout().root))
        self.folder_widget.setFilePath(self.settings.get(Key.INSTALL_DIR))
        form.addRow(tr("Folder"), self.folder_widget)
        self.python_widget = QgsFileWidget(install)
        self.python_widget.setStorageMode(QgsFileWidget.StorageMode.GetFile)
        self.python_widget.setFilePath(self.settings.get(Key.INSTALL_PYTHON))
        form.addRow(tr("Python"), self.python_widget)
        self.compute_combo = QComboBox(install)
        form.addRow(tr("Compute"), self.compute_combo)
        self.show_found(python, gpu)

        sources = QgsCollapsibleGroupBox(tr("Package sources (mirrors, offline installs)"), install)
        sources.setCollapsed(not any(self.settings.get(k) for k in (Key.INDEX_URL, Key.EXTRA_INDEX_URLS,
                                                                   Key.FIND_LINKS, Key.TORCH_BACKEND,
                                                                   Key.INDEX_STRATEGY)))
        sources_form = QFormLayout(sources)
        self.index_edit = QLineEdit(self.settings.get(Key.INDEX_URL), sources)
        self.index_edit.setPlaceholderText("https://pypi.org/simple")
        self.extra_edit = QLineEdit(self.settings.get(Key.EXTRA_INDEX_URLS), sources)
        self.extra_edit.setPlaceholderText(tr("more index URLs, separated by spaces"))
        self.links_edit = QLineEdit(self.settings.get(Key.FIND_LINKS), sources)
        self.links_edit.setPlaceholderText(tr("folders or pages of wheel files, separated by spaces"))
        self.torch_combo = QComboBox(sources)
        self.torch_combo.setEditable(True)
        for value, label in TORCH_SOURCES:
            self.torch_combo.addItem(tr(label), value)
        current = self.settings.get(Key.TORCH_BACKEND)
        index = self.torch_combo.findData(current)
        if index >= 0:
            self.torch_combo.setCurrentIndex(index)
        else:
            self.torch_combo.setEditText(current)  # a uv --torch-backend value such as cu126
        sources_form.addRow(tr("Index URL"), self.index_edit)
        sources_form.addRow(tr("Extra index URLs"), self.extra_edit)
        sources_form.addRow(tr("Find links"), self.links_edit)
        sources_form.addRow(tr("PyTorch from"), self.torch_combo)
        self.best_match_check = QCheckBox(tr("take the newest version from any index (a partial mirror beside "
                                             "PyPI)"), sources)
        self.best_match_check.setChecked(self.settings.get(Key.INDEX_STRATEGY) == "unsafe-best-match")
        sources_form.addRow(self.best_match_check)
        form.addRow(sources)
        self.status_label = QLabel(install)
        self.status_label.setWordWrap(True)
        form.addRow(self.status_label)
        self.install_button = QPushButton(tr("Install backend"), install)
        self.install_button.clicked.connect(self._install)
        self.install_button.setEnabled(plugin is not None)
        form.addRow(self.install_button)
        layout.addWidget(install)

        environment = QgsCollapsibleGroupBox(tr("Backend environment"), self)
        env_form = QFormLayout(environment)
        self.venv_widget = QgsFileWidget(environment)
        self.venv_widget.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.venv_widget.lineEdit().setPlaceholderText(tr("the installed backend"))
        self.venv_widget.setFilePath(self.settings.get(Key.BACKEND_VENV))
        env_form.addRow(tr("Use this environment instead"), self.venv_widget)
        self.port_spin = QSpinBox(environment)
        self.port_spin.setRange(0, 65535)
        self.port_spin.setSpecialValueText(tr("any free port"))
        self.port_spin.setValue(self.settings.get(Key.BACKEND_PORT))
        env_form.addRow(tr("Port"), self.port_spin)
        self.timeout_spin = QSpinBox(environment)
        self.timeout_spin.setRange(10, 3600)
        self.timeout_spin.setSuffix(" s")
        self.timeout_spin.setValue(self.settings.get(Key.START_TIMEOUT_S))
        env_form.addRow(tr("Start timeout"), self.timeout_spin)
        self.cache_widget = QgsFileWidget(environment)
        self.cache_widget.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.cache_widget.lineEdit().setPlaceholderText(str(self.settings.cache_dir()))
        self.cache_widget.setFilePath(self.settings.get(Key.CACHE_DIR))
        env_form.addRow(tr("Cache folder"), self.cache_widget)
        self.attach_check = QCheckBox(tr("Attach at start-up to a backend that is already running"), environment)
        self.attach_check.setChecked(self.settings.get(Key.AUTO_ATTACH))
        env_form.addRow(self.attach_check)
        layout.addWidget(environment)
        layout.addStretch(1)
        self.refresh_status()

    def show_found(self, python: Interpreter | None, gpu: str | None) -> None:
        """The interpreter the installer would use, and the compute choices (CUDA only with an NVIDIA driver)."""
        self.python_widget.lineEdit().setPlaceholderText(
            tr("found: {path} (Python {version})").format(path=python.path, version=python.version_text)
            if python else tr("none found: uv installs Python 3.11 into the folder"))
        wanted = self.compute_combo.currentData() or self.settings.get(Key.INSTALL_COMPUTE)
        self.compute_combo.clear()
        self.compute_combo.addItem(tr("CPU"), "cpu")
        if gpu:
            self.compute_combo.addItem(tr("GPU (CUDA): {gpu}").format(gpu=gpu), "cuda")
        elif wanted == "cuda":
            self.compute_combo.addItem(tr("GPU (CUDA): no NVIDIA driver answers now"), "cuda")
        self.compute_combo.setCurrentIndex(max(0, self.compute_combo.findData(wanted)))

    def showEvent(self, event):  # noqa: N802 (Qt API)
        if self._detect:
            self._detect = False
            self.show_found(find_python(), nvidia_gpu())
        super().showEvent(event)

    def refresh_status(self) -> None:
        if self.plugin is None:
            return
        text, action = self.plugin.install_status()
        self.status_label.setText(text)
        self.install_button.setText(action or tr("Reinstall backend"))

    def apply(self) -> None:
        s = self.settings
        s.set(Key.INSTALL_DIR, self.folder_widget.filePath().strip())
        s.set(Key.INSTALL_PYTHON, self.python_widget.filePath().strip())
        s.set(Key.INSTALL_COMPUTE, str(self.compute_combo.currentData() or "cpu"))
        s.set(Key.INDEX_URL, self.index_edit.text().strip())
        s.set(Key.EXTRA_INDEX_URLS, self.extra_edit.text().strip())
        s.set(Key.FIND_LINKS, self.links_edit.text().strip())
        text = self.torch_combo.currentText().strip()
        index = self.torch_combo.findText(text)
        s.set(Key.TORCH_BACKEND, str(self.torch_combo.itemData(index) if index >= 0 else text))
        s.set(Key.INDEX_STRATEGY, "unsafe-best-match" if self.best_match_check.isChecked() else "")
        s.set(Key.BACKEND_VENV, self.venv_widget.filePath().strip())
        s.set(Key.BACKEND_PORT, int(self.port_spin.value()))
        s.set(Key.START_TIMEOUT_S, int(self.timeout_spin.value()))
        s.set(Key.CACHE_DIR, self.cache_widget.filePath().strip())
        s.set(Key.AUTO_ATTACH, self.attach_check.isChecked())
        if self.plugin is not None:
            self.plugin.refresh_install_state()

    def _install(self) -> None:
        self.apply()
        self.plugin.install_backend()
        self.status_label.setText(tr("Installing: the progress and the log are in the TilePrompt dock."))
        self.install_button.setEnabled(False)


class BackendOptionsFactory(QgsOptionsWidgetFactory):
    def __init__(self, plugin):
        super().__init__(tr("TilePrompt"), QIcon(str(ICON_PATH)))
        self.plugin = plugin

    def createWidget(self, parent):  # noqa: N802 (QGIS API)
        return BackendOptionsPage(self.plugin, parent)
