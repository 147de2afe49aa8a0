"""The plugin object QGIS creates through ``classFactory``; ``unload`` undoes everything ``initGui`` did.

initGui adds: the toolbar/Raster-menu action (shows the dock), the TilePrompt dock (right), two map tools and
the sketches they leave on the canvas, the Processing provider ``tileprompt``, the translator, connections to
the project's signals, and it may attach to a backend that is already running. Running jobs are QgsTasks kept
in a registry. unload cancels the tasks, stops the backend if this QGIS started it, and removes all of that.

The dock emits typed parameters; this class runs them: exports a layer when needed (UI thread), starts a
JobTask, and adds the styled result layers in the task's delegate (UI thread).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

from qgis.core import Qgis, QgsApplication, QgsProject
from qgis.PyQt.QtCore import Qt, QUrl
from qgis.PyQt.QtGui import QDesktopServices, QIcon
from qgis.PyQt.QtWidgets import QApplication, QFileDialog, QMessageBox

from .client import BackendUnavailable, Connection
from .compat import QAction
from .corrections import read_run, run_classes
from .diagnostics import report
from .dock import TilePromptDock, needs_download
from .i18n import Translator, tr
from .installer import commands, record
from .installer.interpreters import nvidia_gpu
from .installer.proxy import qgis_proxy_environment
from .installer.task import InstallCancelled, InstallFailed, InstallPlan, InstallSucceeded, InstallTask
from .jobs import JobCancelled, JobFailed, JobSucceeded, job_warnings
from .launcher import BackendLauncher, backend_environment, proxy_environment
from .maptools import PolygonTool, RectangleTool, Sketches
from .metadata import docs_url, plugin_version
from .options import PAGE_NAME, BackendOptionsFactory
from .parameters import ChangeParameters, ClassifyParameters, CorrectParameters, SearchParameters, correction_request
from .provider import TilePromptProvider
from .results import (
    CHANGE_LAYER,
    SIMILAR_LAYER,
    TILES_LAYER,
    add_to_group,
    load_class_map,
    load_heatmap,
    load_vector,
    result_name,
    style_categorized,
    style_graduated,
    summary_rows,
)
from .runs import class_map_path, new_output, plan_search, prepare_raster
from .session import BackendSession
from .settings import ICON_PATH, PLUGIN_DIR, Key, ProjectState, Settings
from .tasks import JobTask, TaskRegistry

PLUGIN_NAME = "TilePrompt"


class TilePromptPlugin:
    """Symmetric lifecycle: ``unload`` removes exactly what ``initGui`` added, so reloading leaves no trace."""

    def __init__(self, iface):
        self.iface = iface
        self.action = None
        self.dock = None
        self.provider = None
        self.session = None
        self.launcher = None
        self.rectangle_tool = None
        self.polygon_tool = None
        self.sketches = None
        self.translator = Translator()
        self.tasks = TaskRegistry()
        self.current_task = None
        self.settings = Settings()
        self._draw_purpose = "area"
        self._connections: list = []
        self._models_shown: list = []
        self.install_task = None
        self.options_factory = None
        self.last_error = ""  # the last error the user was shown (Diagnostics)
        self._source_stamp = None
        self._dock_sized = False
        self._version_warned = ""
        self._gpu: str | None = None  # the NVIDIA GPU found ("" none), once asked

    # ------------------------------------------------------------------------------------------- lifecycle
    def _connect(self, signal, slot) -> None:
        signal.connect(slot)
        self._connections.append((signal, slot))

    def initGui(self):  # noqa: N802 (QGIS API)
        self.translator.install()
        window = self.iface.mainWindow()
        self.action = QAction(QIcon(str(ICON_PATH)), PLUGIN_NAME, window)
        self.action.setObjectName("tilepromptAction")
        self.action.setToolTip(tr("TilePrompt: classify and search raster tiles with text prompts"))
        self.action.setCheckable(True)
        self._connect(self.action.triggered, self.run)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToRasterMenu(PLUGIN_NAME, self.action)

        self.session = BackendSession(self.settings, window)
        self.launcher = BackendLauncher(window)
        self.dock = TilePromptDock(self.iface, window)
        self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        self.dock.hide()

        canvas = self.iface.mapCanvas()
        self.rectangle_tool = RectangleTool(canvas)
        self.polygon_tool = PolygonTool(canvas)
        self.sketches = Sketches(canvas)

        self.provider = TilePromptProvider(self.session)
        QgsApplication.processingRegistry().addProvider(self.provider)
        self.options_factory = BackendOptionsFactory(self)
        self.iface.registerOptionsWidgetFactory(self.options_factory)

        project = QgsProject.instance()
        for signal, slot in (
            (self.dock.visibilityChanged, self.action.setChecked),
            (self.dock.classifyRequested, self.run_classify),
            (self.dock.searchRequested, self.run_search),
            (self.dock.correctRequested, self.run_correction),
            (self.dock.changeRequested, self.run_change),
            (self.dock.cancelRequested, self.cancel),
            (self.dock.drawRequested, self.start_drawing),
            (self.dock.startBackendRequested, self.start_backend),
            (self.dock.stopBackendRequested, self.stop_backend),
            (self.dock.attachRequested, self.attach_backend),
            (self.dock.diagnosticsRequested, self.copy_diagnostics),
            (self.dock.refreshModelsRequested, self._refresh_models),
            (self.dock.downloadRequested, self.download_model),
            (self.dock.autoModelRequested, self._choose_model),
            (self.dock.settingsRequested, self.show_settings),
            (self.dock.helpRequested, self.open_help),
            (self.dock.clearSketchRequested, self._clear_sketch),
            (self.dock.install_panel.actionRequested, self.install_backend),
            (self.dock.install_panel.cancelRequested, self.cancel_install),
            (self.rectangle_tool.drawn, self._on_drawn),
            (self.polygon_tool.drawn, self._on_drawn),
            (self.session.changed, self._update_backend_panel),
            (self.session.lost, self._on_backend_lost),
            (self.launcher.started, self._on_launcher_started),
            (self.launcher.failed, self._on_launcher_failed),
            (self.launcher.stopped, self._update_backend_panel),
            (project.readProject, self._on_project_read),
            (project.cleared, self._on_project_cleared),
        ):
            self._connect(signal, slot)

        self.refresh_install_state()
        if self.settings.get(Key.AUTO_ATTACH) and self.settings.state_file().is_file():
            self.attach_backend(quiet=True)

    def unload(self):
        if self.action is None:
            return
        self.tasks.cancel_all()
        self.current_task = None
        for signal, slot in reversed(self._connections):
            try:
                signal.disconnect(slot)
            except (TypeError, RuntimeError):
                pass  # already gone with its object
        self._connections.clear()
        if self.launcher is not None:
            self.launcher.stop()
        if self.session is not None:
            self.session.disconnect()
        canvas = self.iface.mapCanvas()
        for tool in (self.rectangle_tool, self.polygon_tool):
            if tool is None:
                continue
            if canvas.mapTool() is tool:
                canvas.unsetMapTool(tool)
            if isinstance(tool, PolygonTool):
                tool.remove_band()
            tool.deleteLater()
        self.rectangle_tool = self.polygon_tool = None
        if self.sketches is not None:
            self.sketches.clear()
            self.sketches = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        if self.options_factory is not None:
            self.iface.unregisterOptionsWidgetFactory(self.options_factory)
            self.options_factory = None
        self.install_task = None
        if self.dock is not None:
            self.iface.removeDockWidget(self.dock)
            self.dock.hide()
            self.dock.setParent(None)
            self.dock.deleteLater()
            self.dock = None
        for obj in (self.launcher, self.session):
            if obj is not None:
                obj.setParent(None)
                obj.deleteLater()
        self.launcher = self.session = None
        self.iface.removePluginRasterMenu(PLUGIN_NAME, self.action)
        self.iface.removeToolBarIcon(self.action)
        # deleteLater, not del: the main window owns the action on the C++ side.
        self.action.deleteLater()
        self.action = None
        self.translator.remove()

    def run(self, checked: bool = True):
        """The toolbar/menu action: show (or hide) the dock."""
        if self.dock is None:
            return
        if checked:
            self.dock.setUserVisible(True)  # shows it, and brings it to the front when tabbed with other docks
            self.fit_dock_width()
        else:
            self.dock.hide()

    def fit_dock_width(self) -> None:
        """Open the dock wide enough for its content (QGIS gives a new dock about 300 px, which cut off its
        buttons), at most 45 % of the window; once per session, so the user's own width is kept."""
        window = self.iface.mainWindow()
        if self._dock_sized or self.dock is None or not hasattr(window, "resizeDocks") or \
                window.dockWidgetArea(self.dock) == Qt.DockWidgetArea.NoDockWidgetArea or self.dock.isFloating():
            return
        width = min(self.dock.preferred_width(), int(window.width() * 0.45))
        if self.dock.width() < width:
            window.resizeDocks([self.dock], [width], Qt.Orientation.Horizontal)
        self._dock_sized = True

    # -------------------------------------------------------------------------------------------- messages
    def _message(self, text: str, level=Qgis.MessageLevel.Info, duration: int = 8) -> None:
        if level == Qgis.MessageLevel.Critical:
            self.last_error = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
        self.iface.messageBar().pushMessage(PLUGIN_NAME, text, level=level, duration=duration)

    def show_settings(self) -> None:
        """QGIS's Options dialog at the TilePrompt page."""
        self.iface.showOptionsDialog(self.iface.mainWindow(), currentPage=PAGE_NAME)
        self.refresh_install_state()

    def open_help(self) -> bool:
        url = docs_url()
        return bool(url) and QDesktopServices.openUrl(QUrl(url))

    def _clear_sketch(self, purpose: str) -> None:
        if self.sketches is not None:
            self.sketches.hide(purpose)

    # --------------------------------------------------------------------------------------------- backend
    def start_backend(self):
        """Start ``<venv>/bin/tileprompt serve`` (or attach when a backend is already running)."""
        if self.launcher.running or self.launcher.starting:
            return
        state_file = self.settings.state_file()
        if state_file.is_file():
            try:
                existing = Connection.from_state_file(state_file)
            except BackendUnavailable:
                existing = None
            if existing is not None and existing.process_alive():
                self._message(tr("A backend is already running (pid {pid}); attaching to it.").format(
                    pid=existing.pid))
                self.attach_backend()
                return
        if self.settings.uses_installer() and not self.settings.backend_executable().is_file():
            self.refresh_install_state()
            self._message(tr("The backend is not installed yet: press Install backend in the TilePrompt dock."),
                          Qgis.MessageLevel.Warning, 8)
            return
        log = self.settings.cache_dir() / "logs" / "backend.log"
        try:
            self.launcher.start(self.settings.backend_executable(), state_file, log,
                                port=self.settings.get(Key.BACKEND_PORT),
                                timeout_s=self.settings.get(Key.START_TIMEOUT_S),
                                env=backend_environment(extra=proxy_environment()))
        except BackendUnavailable as exc:
            self.dock.set_backend_state("error", str(exc), False)
            self._message(str(exc), Qgis.MessageLevel.Critical, 0)
            return
        self.dock.set_backend_state("starting", tr("Starting the backend… (log: {log})").format(log=log), True)

    def _on_launcher_started(self, connection: Connection):
        self.session.connect_to(connection, self._on_attached)

    def _on_launcher_failed(self, message: str):
        self.dock.set_backend_state("error", message.splitlines()[0], False)
        self._message(message, Qgis.MessageLevel.Critical, 0)

    def stop_backend(self):
        self.session.disconnect()
        self.launcher.stop()
        self._update_backend_panel()

    def attach_backend(self, path=None, quiet: bool = False):
        """Connect to the backend whose state file is ``path`` (default: the configured one)."""
        if path is None or isinstance(path, bool):
            path = self.settings.state_file()
            if not path.is_file() and not quiet:
                chosen, _ = QFileDialog.getOpenFileName(self.dock, tr("Backend state file"), str(path.parent),
                                                        tr("State file (*.json)"))
                if not chosen:
                    return
                path = chosen
        try:
            connection = Connection.from_state_file(path)
        except BackendUnavailable as exc:
            if not quiet:
                self._message(str(exc), Qgis.MessageLevel.Warning)
            return
        if connection.process_alive() is False:
            if not quiet:
                self._message(tr("The backend in {path} (pid {pid}) is not running any more.").format(
                    path=path, pid=connection.pid), Qgis.MessageLevel.Warning)
            return
        self.dock.set_backend_state("starting", tr("Connecting to {address}…").format(address=connection.address),
                                    self.launcher.running)
        self.session.connect_to(connection, lambda error: self._on_attached(error, quiet))

    def _on_attached(self, error, quiet: bool = False):
        if error is not None:
            if not quiet:
                self._on_backend_lost(str(error), bool(getattr(error, "timed_out", False)))
            self._update_backend_panel()
            return
        self._message(tr("Connected to the backend: {what}").format(what=self.session.describe()),
                      Qgis.MessageLevel.Success, 4)

    def _refresh_models(self):
        if self.session.connection is None:
            self._message(tr("Start or attach a backend first."), Qgis.MessageLevel.Warning)
            return
        self.session.refresh_health()
        self.session.refresh_models(lambda error: error and self._message(str(error), Qgis.MessageLevel.Warning))

    def _update_backend_panel(self):
        if self.dock is None:
            return
        session, started_here = self.session, self.launcher.running
        if self.launcher.starting:
            state = "starting"
        elif session.connected:
            state = "up"
        elif session.connection is not None:
            state = "error" if session.error else "starting"
        else:
            state = "down"
        self.dock.set_backend_state(state, session.describe(), started_here)
        if session.models != self._models_shown:  # new ids, or a model's download state changed
            self._models_shown = list(session.models)
            self.dock.set_models(session.models)
        self._check_backend_version()

    def _check_backend_version(self) -> None:
        """A backend of another version than the plugin's: say so once per backend, and offer the update."""
        version = (self.session.health or {}).get("version")
        if not version or version == plugin_version() or version == self._version_warned:
            return
        self._version_warned = version
        self._message(tr("The backend is version {backend}, this plugin {plugin}: update the backend (dock: "
                         "Update backend, or Settings) so both speak the same API.").format(
            backend=version, plugin=plugin_version()), Qgis.MessageLevel.Warning, 10)
        self.refresh_install_state()

    # ------------------------------------------------------------------------------------------- installer
    def source_stamp(self) -> str:
        if self._source_stamp is None:
            self._source_stamp = record.source_stamp(PLUGIN_DIR)
        return self._source_stamp

    def install_status(self) -> tuple[str, str]:
        """(what the installer panel says, the action it offers or "") for the current settings."""
        if not self.settings.uses_installer():
            return tr("The backend runs from {venv} (chosen in the settings, or a developer checkout's .venv); "
                      "the installer leaves it alone.").format(venv=self.settings.backend_venv()), ""
        layout = self.settings.install_layout()
        state, installation = record.state(layout, plugin_version(), self.source_stamp())
        if state is record.State.MISSING:
            return tr("The backend is not installed yet. Install it here: about 1.5 GB for CPU (several GB with "
                      "CUDA) into {folder}, a few minutes.").format(folder=layout.root), tr("Install backend")
        if state is record.State.BROKEN:
            return tr("The installed backend in {folder} is incomplete.").format(folder=layout.root), \
                tr("Repair backend")
        if state is record.State.OUTDATED and installation.version == plugin_version():
            return tr("The installed backend {version} was built from another copy of this version's "
                      "source.").format(version=installation.version), tr("Update backend")
        if state is record.State.OUTDATED:
            return tr("Backend {installed} is installed; this plugin ships backend {version}.").format(
                installed=installation.version, version=plugin_version()), tr("Update backend")
        return tr("Backend {version} installed ({compute}, PyTorch {torch} on {device}) in {folder}.").format(
            version=installation.version, compute=installation.compute.upper(), torch=installation.torch,
            device=installation.device, folder=layout.root), ""

    def refresh_install_state(self) -> None:
        """Show the installer panel when there is something to install, repair or update, with the GPU (CUDA)
        choice when an NVIDIA driver answers."""
        if self.dock is None or self.dock.install_panel.running:
            return
        text, action = self.install_status()
        panel = self.dock.install_panel
        panel.show_state(text, action, bool(action))
        if action:
            if self._gpu is None:
                self._gpu = nvidia_gpu() or ""  # asked once per session
            panel.offer_gpu(self._gpu, self.settings.get(Key.INSTALL_COMPUTE) == "cuda")

    def install_plan(self) -> InstallPlan:
        settings = self.settings
        return InstallPlan(
            layout=settings.install_layout(), plugin_dir=PLUGIN_DIR, plugin_version=plugin_version(),
            source=self.source_stamp(), compute=settings.get(Key.INSTALL_COMPUTE),
            python=settings.get(Key.INSTALL_PYTHON),
            sources=commands.PackageSources.from_text(
                settings.get(Key.INDEX_URL), settings.get(Key.EXTRA_INDEX_URLS), settings.get(Key.FIND_LINKS),
                settings.get(Key.TORCH_BACKEND), settings.get(Key.INDEX_STRATEGY)),
            proxies=tuple(qgis_proxy_environment().items()),
            qgis_prefixes=(QgsApplication.prefixPath(), QgsApplication.pkgDataPath()),
            cache=Path(settings.get(Key.INSTALL_CACHE)).expanduser() if settings.get(Key.INSTALL_CACHE) else None)

    def install_backend(self, *_args) -> InstallTask:
        """Install (or update, or repair) the backend in a QgsTask; the dock's installer panel follows it."""
        if self.install_task is not None:
            return self.install_task
        panel = self.dock.install_panel
        if panel.gpu_check.isVisibleTo(panel):  # the panel's choice is the settings' choice
            self.settings.set(Key.INSTALL_COMPUTE, "cuda" if panel.gpu_check.isChecked() else "cpu")
        plan = self.install_plan()
        task = InstallTask(plan, self._install_done)
        panel.started(tr("Installing the backend ({compute}) into {folder}. QGIS stays usable meanwhile.").format(
            compute=plan.compute.upper(), folder=plan.layout.root))
        task.logLine.connect(lambda line: self.dock and self.dock.install_panel.log(line))
        task.phaseChanged.connect(lambda text: self.dock and self.dock.install_panel.set_phase(text))
        task.progressChanged.connect(lambda value: self.dock and self.dock.install_panel.set_progress(value))
        self.install_task = self.tasks.start(task)
        self.dock.setUserVisible(True)
        return task

    def cancel_install(self) -> None:
        if self.install_task is not None:
            self.dock.install_panel.set_phase(tr("Cancelling…"))
            self.install_task.cancel()

    def _install_done(self, outcome) -> None:
        self.install_task = None
        if self.dock is None:
            return
        panel = self.dock.install_panel
        if isinstance(outcome, InstallSucceeded):
            installation = outcome.installation
            self._message(tr("Backend {version} installed (PyTorch {torch} on {device}); starting it.").format(
                version=installation.version, torch=installation.torch, device=installation.device),
                Qgis.MessageLevel.Success, 6)
            if outcome.warning:
                self._message(outcome.warning, Qgis.MessageLevel.Warning, 0)
            if self.launcher.running:
                self.stop_backend()  # it runs the replaced environment
            if outcome.replaced:
                shutil.rmtree(self.settings.install_layout().env(outcome.replaced), ignore_errors=True)
            panel.finished(tr("Backend {version} installed.").format(version=installation.version))
            self.refresh_install_state()
            self.start_backend()
        elif isinstance(outcome, InstallFailed):
            _text, action = self.install_status()
            message = tr("Installing the backend failed: {error}. Log: {log}").format(error=outcome.message,
                                                                                     log=outcome.log)
            panel.finished(message, action or tr("Retry"), keep_open=True)
            self._message(message, Qgis.MessageLevel.Critical, 0)
        elif isinstance(outcome, InstallCancelled):
            text, action = self.install_status()
            panel.finished(tr("Installation cancelled; nothing was changed. {status}").format(status=text), action,
                           keep_open=bool(action))
            self._message(tr("Backend installation cancelled."), Qgis.MessageLevel.Info, 4)

    def _on_backend_lost(self, message: str, timed_out: bool = False):
        """The backend did not answer: an error, unless it only took too long and its process runs."""
        connection = self.session.connection
        if timed_out and connection is not None and connection.process_alive():
            # Its process runs: busy (a heavy job on a loaded machine), not gone. The checks go on and the light
            # turns green again when it answers; a sticky error would cry wolf.
            self._message(tr("The backend is slow to answer ({reason}); still checking.").format(
                reason=message.split("(", 1)[-1].split(")", 1)[0] if "(" in message else message),
                Qgis.MessageLevel.Warning, 6)
            return
        self._message(message, Qgis.MessageLevel.Critical, 0)

    def copy_diagnostics(self) -> str:
        text = report(self.session, self.launcher, self.settings, self.last_error)
        QApplication.clipboard().setText(text)
        self._message(tr("Diagnostics copied to the clipboard ({n} lines).").format(n=text.count("\n") + 1))
        return text

    # ------------------------------------------------------------------------------------------------ runs
    def _can_run(self) -> bool:
        if self.current_task is not None:
            self._message(tr("A job is running: wait for it or cancel it."), Qgis.MessageLevel.Warning)
            return False
        if not self.session.connected:
            reason = self.session.error or tr("no backend is connected")
            self._message(tr("Cannot run: {reason}. Start the backend in the TilePrompt dock (Backend: Start), or "
                             "attach to a running one.").format(reason=reason.rstrip(".")),
                          Qgis.MessageLevel.Critical, 10)
            return False
        return True

    def _start_task(self, title: str, requests: list, delegate) -> JobTask:
        task = JobTask(title, self.session.client(), requests, delegate,
                       self.settings.get(Key.POLL_INTERVAL_MS) / 1000.0)
        task.progressChanged.connect(lambda value: self.dock and self.dock.set_progress(value))
        task.statusChanged.connect(lambda text: self.dock and self.dock.set_status(text))
        task.preparingChanged.connect(lambda preparing: self.dock and self.dock.set_indeterminate(preparing))
        self.dock.set_busy(True, tr("Starting {title}…").format(title=title))
        self.current_task = self.tasks.start(task)
        return task

    def _exports_dir(self):
        return self.settings.cache_dir() / "exports"

    def _refuse_without_weights(self, model: dict) -> bool:
        """A model whose weights are not downloaded is never run blindly: say so and point at Download."""
        if not needs_download(model):
            return False
        self._message(tr("The weights of {model} are not downloaded ({state}): press Download next to the model in "
                         "the TilePrompt dock.").format(model=model["id"], state=model.get("weights", "")),
                      Qgis.MessageLevel.Warning, 10)
        return True

    def run_classify(self, params: ClassifyParameters):
        if not self._can_run():
            return None
        model = self.session.model_info(params.model)
        if self._refuse_without_weights(model):
            return None
        try:
            raster = prepare_raster(params.raster, model.get("gsd_m"), self._exports_dir())
            params = replace(params, raster=raster)
            out = params.output or new_output(self.settings.cache_dir() / "results", raster.layer_name + "_tiles")
            class_map = class_map_path(out) if params.class_map else None
            request = params.classify_request(out, model.get("tile_px"), class_map)
        except ValueError as exc:
            self._message(str(exc), Qgis.MessageLevel.Critical)
            return None
        ProjectState().set_dock_state(params.to_state())
        classes = [line.split("|")[0].strip() for line in params.prompts.splitlines() if line.strip()]
        title = tr("TilePrompt: classify {layer}").format(layer=raster.layer_name)
        self.dock.clear_summary()
        tile = request.get("tile_px") or model.get("tile_px")
        cells = (tile, request["stride"]) if params.centre_cells and tile and request.get("stride") else None
        return self._start_task(title, [request], lambda outcome: self._classify_done(
            outcome, params, out, classes, class_map, cells))

    def _classify_done(self, outcome, params: ClassifyParameters, out: str, classes: list,
                       class_map: str | None = None, cells: tuple[int, int] | None = None):
        def retry(failed: JobFailed) -> bool:
            agreed = self._agreed_retry(failed, params, out)
            if agreed is not None:
                self.run_classify(agreed)
            return agreed is not None

        if not self._settle(outcome, retry):
            return
        name = result_name(", ".join(classes))
        try:
            layer = load_vector(out, TILES_LAYER, name)
            layers = [layer]
            if class_map:
                layers.append(load_class_map(class_map, tr("{name} (raster)").format(name=name)))
        except ValueError as exc:
            self._message(str(exc), Qgis.MessageLevel.Critical)
            return
        counts = style_categorized(layer, classes, centre_cells=cells)
        add_to_group(layers)
        self._reveal(layer)
        self.dock.correct_panel.set_layer(layer)  # ready for corrections
        self.dock.progress.setValue(100)
        self.dock.show_summary(summary_rows(counts, classes), classes)
        total = sum(counts.values())
        self.dock.set_status(tr("{n} tiles classified; saved to {path}").format(n=total, path=out))
        top = ", ".join(f"{name} {count}" for name, count in counts.most_common(3))
        self._message(tr("{n} tiles classified ({top}).").format(n=total, top=top), Qgis.MessageLevel.Success, 5)

    def _settle(self, outcome, retry=None) -> bool:
        """A job ended: free the dock; True when it succeeded (its warnings are shown here). A failure is
        reported here unless ``retry(outcome)`` ran the job again (the user agreed to what was refused); a
        cancel too."""
        self.current_task = None
        if self.dock is None:
            return False
        self.dock.set_busy(False)
        if isinstance(outcome, JobSucceeded):
            self._warn(outcome)
            return True
        if retry is not None and isinstance(outcome, JobFailed) and retry(outcome):
            return False
        self._report_unsuccessful(outcome)
        return False

    #: What the backend refuses until the user agrees: (question title, question, the parameter that agrees).
    QUESTIONS = {
        "output_exists": (tr("Replace the file?"), tr("{path} exists and was not written by TilePrompt. Replace it "
                                                      "with the result?"), "overwrite"),
        "no_georeference": (tr("Classify in pixel coordinates?"),
                            tr("The raster has no georeference (no CRS, no geotransform). Classify it in pixel "
                               "coordinates? The tiles will overlay the image in QGIS, but not a map."), "pixel_space"),
    }

    def _agreed_retry(self, outcome: JobFailed, params: ClassifyParameters, out: str) -> ClassifyParameters | None:
        """Ask the question a refusal calls for; the parameters to run again with when the user agrees."""
        question = self.QUESTIONS.get(outcome.code or "")
        if question is None or getattr(params, question[2]):
            return None
        title, text, field = question
        if not self.ask(title, text.format(path=out)):
            return None
        return replace(params, output=out, **{field: True})

    def ask(self, title: str, text: str) -> bool:
        """A yes/no question in front of the main window (tests replace this method)."""
        answer = QMessageBox.question(self.iface.mainWindow(), title, text,
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def _warn(self, outcome: JobSucceeded) -> None:
        """The backend's warnings about a finished job (pixel space, a changed raster), one message each."""
        for text in job_warnings(outcome.statuses):
            self._message(text, Qgis.MessageLevel.Warning, 0)

    # ------------------------------------------------------------------------------------------- models
    def download_model(self, model_id: str):
        """Run the backend's download of ``model_id`` as a job: progress and Cancel in the dock."""
        if not self._can_run():
            return None
        title = tr("TilePrompt: download {model}").format(model=model_id)
        return self._start_task(title, [{"kind": "fetch", "model": model_id}],
                                lambda outcome: self._download_done(outcome, model_id))

    def _download_done(self, outcome, model_id: str):
        self.current_task = None
        if self.dock is None:
            return
        self.dock.set_busy(False)
        if isinstance(outcome, JobSucceeded):
            self.dock.progress.setValue(100)
            self.dock.set_status(tr("{model} downloaded.").format(model=model_id))
            self._message(tr("{model} downloaded.").format(model=model_id), Qgis.MessageLevel.Success, 5)
            self.session.refresh_models()
        else:
            self._report_unsuccessful(outcome)
            if isinstance(outcome, JobCancelled):
                self.dock.set_status(tr("Download cancelled; Download again continues where it stopped."))

    def _choose_model(self, raster_fields: dict):
        """Ask the backend which model it picks for the dock's layer (automatic mode) and show the answer."""
        if self.session is None or not self.session.connected:
            return

        def done(data, error, dock=self.dock):
            if dock is not None and dock is self.dock:
                dock.set_auto_choice(data, str(error) if error is not None else "", raster_fields)

        self.session.default_model(raster_fields, done)

    def _report_unsuccessful(self, outcome):
        if isinstance(outcome, JobFailed):
            message = outcome.message_for("dock")
            self.dock.set_status(message)
            self._message(message, Qgis.MessageLevel.Critical, 0)
        elif isinstance(outcome, JobCancelled):
            self.dock.set_status(tr("Cancelled."))
            self.dock.progress.setValue(0)
            self._message(tr("Job cancelled."), Qgis.MessageLevel.Info, 4)

    def run_search(self, params: SearchParameters):
        if not self._can_run():
            return None
        model = self.session.model_info(params.model)
        if self._refuse_without_weights(model):
            return None
        try:
            raster = prepare_raster(params.raster, model.get("gsd_m"), self._exports_dir())
            params = replace(params, raster=raster)
            if params.cross is not None:  # the query layer, readable by path too
                query_gsd = self.session.model_info(params.cross.model).get("gsd_m")
                params = replace(params, cross=replace(params.cross, raster=prepare_raster(
                    params.cross.raster, query_gsd, self._exports_dir())))
            results = self.settings.cache_dir() / "results"
            stem = raster.layer_name + ("_text" if params.query.is_text else "_similar")
            out = new_output(results, stem)
            heatmap = new_output(results, stem + "_heat", ".tif") if params.heatmap else None
            plan = plan_search(params, self.session, out, heatmap)
        except ValueError as exc:
            self._message(str(exc), Qgis.MessageLevel.Critical)
            return None
        what = tr("text search") if params.query.is_text else tr("similar tiles")
        title = tr("TilePrompt: {what} in {layer}").format(what=what, layer=raster.layer_name)
        self.dock.clear_search_results()
        return self._start_task(title, plan.requests, lambda outcome: self._search_done(outcome, params, plan))

    def _search_done(self, outcome, params: SearchParameters, plan):
        if not self._settle(outcome):
            return
        if params.query.is_text:
            label = f"“{params.query.text}”"
        else:
            count = len(params.query.wkts)
            label = tr("like the drawn area") if count == 1 else tr("like {n} areas").format(n=count)
        name = result_name(label, tr("top {k}").format(k=params.k))
        try:
            layer = load_vector(plan.out, SIMILAR_LAYER, name)
            style_graduated(layer)
            layers = [layer]
            if plan.heatmap:
                layers.append(load_heatmap(plan.heatmap, tr("{name}, heat map").format(name=name)))
        except ValueError as exc:
            self._message(str(exc), Qgis.MessageLevel.Critical)
            return
        add_to_group(layers)
        self._reveal(layer)
        self.dock.progress.setValue(100)
        self.dock.show_search_results(layer)
        self.dock.set_status(tr("{n} tiles found.").format(n=layer.featureCount()))
        self._message(tr("{n} tiles found.").format(n=layer.featureCount()), Qgis.MessageLevel.Success, 4)

    def run_correction(self, params: CorrectParameters):
        """Re-classify the raster of a classified layer with the tiles marked in it (a new layer)."""
        if not self._can_run():
            return None
        run = read_run(params.result)
        out = new_output(self.settings.cache_dir() / "results", params.layer_name + "_corrected")
        try:
            request = correction_request(run, params.result, out, params.context)
        except ValueError as exc:
            self._message(str(exc), Qgis.MessageLevel.Critical)
            return None
        title = tr("TilePrompt: correct {layer}").format(layer=params.layer_name)
        return self._start_task(title, [request], lambda outcome: self._correction_done(outcome, params, out))

    def _correction_done(self, outcome, params: CorrectParameters, out: str):
        if not self._settle(outcome):
            return
        classes = run_classes(read_run(out))
        try:
            layer = load_vector(out, TILES_LAYER, result_name(", ".join(classes), tr("corrected")))
        except ValueError as exc:
            self._message(str(exc), Qgis.MessageLevel.Critical)
            return
        counts = style_categorized(layer, classes)
        add_to_group([layer])
        self._reveal(layer)
        self.dock.correct_panel.set_layer(layer)  # further corrections continue on the new layer
        self.dock.progress.setValue(100)
        self.dock.show_summary(summary_rows(counts, classes), classes)
        correction = (outcome.status.get("result") or {}).get("correction") or {}
        text = tr("{n} tiles re-classified with {m} examples.").format(n=sum(counts.values()),
                                                                       m=correction.get("examples", "?"))
        self.dock.set_status(text)
        self._message(text, Qgis.MessageLevel.Success, 5)

    def run_change(self, params: ChangeParameters):
        """Index both dates and rank the after layer's tiles by change (layer + heat map)."""
        if not self._can_run():
            return None
        model = self.session.model_info(params.model)
        try:
            before = prepare_raster(params.before, model.get("gsd_m"), self._exports_dir())
            after = prepare_raster(params.after, model.get("gsd_m"), self._exports_dir())
            params = replace(params, before=before, after=after)
            results = self.settings.cache_dir() / "results"
            out = new_output(results, after.layer_name + "_change")
            heatmap = new_output(results, after.layer_name + "_change_heat", ".tif") if params.heatmap else None
            request = params.change_request(out, heatmap, model.get("tile_px"))
        except ValueError as exc:
            self._message(str(exc), Qgis.MessageLevel.Critical)
            return None
        title = tr("TilePrompt: what changed from {before} to {after}").format(before=before.layer_name,
                                                                               after=after.layer_name)
        return self._start_task(title, [request], lambda outcome: self._change_done(outcome, params, out, heatmap))

    def _change_done(self, outcome, params: ChangeParameters, out: str, heatmap: str | None):
        if not self._settle(outcome):
            return
        label = tr("became {cls}").format(cls=params.became.split("|")[0].strip()) if params.became else tr("change")
        name = result_name(f"{params.before.layer_name} → {params.after.layer_name}", label)
        try:
            layer = load_vector(out, CHANGE_LAYER, name)
            style_graduated(layer, "score")
            layers = [layer]
            if heatmap:
                layers.append(load_heatmap(heatmap, tr("{name}, heat map").format(name=name)))
        except ValueError as exc:
            self._message(str(exc), Qgis.MessageLevel.Critical)
            return
        add_to_group(layers)
        self._reveal(layer)
        self.dock.progress.setValue(100)
        text = tr("{n} tiles ranked by {label}.").format(n=layer.featureCount(), label=label)
        self.dock.set_status(text)
        self._message(text, Qgis.MessageLevel.Success, 5)

    def _reveal(self, layer):
        """Select the new layer in the Layers panel (which also expands the TilePrompt group)."""
        view = self.iface.layerTreeView()
        if hasattr(view, "setCurrentLayer") and hasattr(view, "scrollTo"):
            try:
                view.setCurrentLayer(layer)
                view.scrollTo(view.currentIndex())
            except (TypeError, RuntimeError):
                pass

    def cancel(self):
        if self.current_task is not None:
            self.dock.set_status(tr("Cancelling…"))
            self.current_task.cancel()

    # ---------------------------------------------------------------------------------------------- drawing
    def start_drawing(self, purpose: str, shape: str):
        self._draw_purpose = purpose
        tool = self.polygon_tool if shape == "polygon" else self.rectangle_tool
        tool.start()
        self._message(tr("Drag a rectangle on the map.") if shape != "polygon" else
                      tr("Click the polygon's corners on the map; right click (or Enter) closes it, Esc cancels."),
                      Qgis.MessageLevel.Info, 5)

    def _on_drawn(self, geometry, crs):
        if self.dock is None:
            return
        self.sketches.show(self._draw_purpose, geometry, crs)
        if self._draw_purpose == "area":
            self.dock.set_drawn_area(geometry, crs)
        else:
            self.dock.set_query([geometry], crs)
            self.dock.request_similar_search()

    # ---------------------------------------------------------------------------------------------- project
    def _on_project_read(self, *_args):
        if self.dock is not None:
            self.dock.reload_prompt_sets()
            self.dock.restore_state(ProjectState().dock_state())

    def _on_project_cleared(self):
        if self.dock is not None:
            self.dock.reload_prompt_sets()
        if self.sketches is not None:
            self.sketches.clear()
