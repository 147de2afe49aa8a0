"""The plugin object QGIS creates through ``classFactory``; ``unload`` undoes everything ``initGui`` did.

initGui adds: the toolbar/Raster-menu action (shows the dock), the TilePrompt dock (right), two map tools and
the sketches they leave on the canvas, the Processing provider ``tileprompt``, the translator, connections to
the project's signals, and it may attach to a backend that is already running. Running jobs are QgsTasks kept
in a registry. unload cancels the tasks, stops the backend if this QGIS started it, and removes all of that.

The dock emits typed parameters; this class runs them: exports a layer when needed (UI thread), starts a
JobTask, and adds the styled result layers in the task's delegate (UI thread).
"""

from __future__ import annotations

from dataclasses import replace

from qgis.core import Qgis, QgsApplication, QgsProject
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QApplication, QFileDialog, QMessageBox

from .client import BackendUnavailable, Connection
from .compat import QAction
from .corrections import read_run, run_classes
from .diagnostics import report
from .dock import TilePromptDock
from .i18n import Translator, tr
from .jobs import JobCancelled, JobFailed, JobSucceeded, job_warnings
from .launcher import BackendLauncher, backend_environment
from .maptools import PolygonTool, RectangleTool, Sketches
from .parameters import ChangeParameters, ClassifyParameters, CorrectParameters, SearchParameters, correction_request
from .provider import TilePromptProvider
from .results import (
    CHANGE_LAYER,
    SIMILAR_LAYER,
    TILES_LAYER,
    add_to_group,
    load_heatmap,
    load_vector,
    style_categorized,
    style_graduated,
    summary_rows,
)
from .runs import new_output, plan_search, prepare_raster
from .session import BackendSession
from .settings import ICON_PATH, Key, ProjectState, Settings
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
        self._model_ids: list = []

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
        else:
            self.dock.hide()

    # -------------------------------------------------------------------------------------------- messages
    def _message(self, text: str, level=Qgis.MessageLevel.Info, duration: int = 8) -> None:
        self.iface.messageBar().pushMessage(PLUGIN_NAME, text, level=level, duration=duration)

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
        log = self.settings.cache_dir() / "logs" / "backend.log"
        try:
            self.launcher.start(self.settings.backend_executable(), state_file, log,
                                port=self.settings.get(Key.BACKEND_PORT),
                                timeout_s=self.settings.get(Key.START_TIMEOUT_S), env=backend_environment())
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
                self._message(str(error), Qgis.MessageLevel.Critical, 0)
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
        ids = [m.get("id") for m in session.models]
        if ids != self._model_ids:
            self._model_ids = ids
            self.dock.set_models(session.models)

    def _on_backend_lost(self, message: str):
        self._message(message, Qgis.MessageLevel.Critical, 0)

    def copy_diagnostics(self) -> str:
        text = report(self.session, self.launcher, self.settings)
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
        self.dock.set_busy(True, tr("Starting {title}…").format(title=title))
        self.current_task = self.tasks.start(task)
        return task

    def _exports_dir(self):
        return self.settings.cache_dir() / "exports"

    def run_classify(self, params: ClassifyParameters):
        if not self._can_run():
            return None
        model = self.session.model_info(params.model)
        try:
            raster = prepare_raster(params.raster, model.get("gsd_m"), self._exports_dir())
            params = replace(params, raster=raster)
            out = params.output or new_output(self.settings.cache_dir() / "results", raster.layer_name + "_tiles")
            request = params.classify_request(out, model.get("tile_px"))
        except ValueError as exc:
            self._message(str(exc), Qgis.MessageLevel.Critical)
            return None
        ProjectState().set_dock_state(params.to_state())
        classes = [line.split("|")[0].strip() for line in params.prompts.splitlines() if line.strip()]
        title = tr("TilePrompt: classify {layer}").format(layer=raster.layer_name)
        return self._start_task(title, [request], lambda outcome: self._classify_done(outcome, params, out, classes))

    def _classify_done(self, outcome, params: ClassifyParameters, out: str, classes: list):
        def retry(failed: JobFailed) -> bool:
            agreed = self._agreed_retry(failed, params, out)
            if agreed is not None:
                self.run_classify(agreed)
            return agreed is not None

        if not self._settle(outcome, retry):
            return
        try:
            name = tr("{layer} · classes").format(layer=params.raster.layer_name)
            layer = load_vector(out, TILES_LAYER, name)
        except ValueError as exc:
            self._message(str(exc), Qgis.MessageLevel.Critical)
            return
        counts = style_categorized(layer, classes)
        add_to_group([layer])
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
        try:
            raster = prepare_raster(params.raster, model.get("gsd_m"), self._exports_dir())
            params = replace(params, raster=raster)
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
        return self._start_task(title, plan.requests, lambda outcome: self._search_done(outcome, params, plan))

    def _search_done(self, outcome, params: SearchParameters, plan):
        if not self._settle(outcome):
            return
        label = f"“{params.query.text}”" if params.query.is_text else tr("similar")
        try:
            layer = load_vector(plan.out, SIMILAR_LAYER, tr("{layer} · {label} (top {k})").format(
                layer=params.raster.layer_name, label=label, k=params.k))
            style_graduated(layer)
            layers = [layer]
            if plan.heatmap:
                layers.append(load_heatmap(plan.heatmap, tr("{layer} · {label} heat map").format(
                    layer=params.raster.layer_name, label=label)))
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
            layer = load_vector(out, TILES_LAYER, tr("{layer} · corrected").format(layer=params.layer_name))
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
        name = f"{params.before.layer_name} → {params.after.layer_name}"
        try:
            layer = load_vector(out, CHANGE_LAYER, tr("{name} · {label}").format(name=name, label=label))
            style_graduated(layer, "score")
            layers = [layer]
            if heatmap:
                layers.append(load_heatmap(heatmap, tr("{name} · {label} heat map").format(name=name, label=label)))
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
