"""initGui adds the action, dock, map tools and Processing provider; unload and reload leave nothing behind."""

import os
import sys

import qgis.utils
from qgis.core import QgsApplication
from qgis.gui import QgsRubberBand
from qgis.PyQt.QtWidgets import QDockWidget

from conftest import PLUGIN_DIR, connect, flush_deleted_objects, wait_until


def provider_ids():
    return [p.id() for p in QgsApplication.processingRegistry().providers()]


def tileprompt_docks(window):
    return [d for d in window.findChildren(QDockWidget, "TilePromptDock")]


def rubber_bands(canvas):
    return [item for item in canvas.scene().items() if isinstance(item, QgsRubberBand)]


def test_init_gui_adds_everything_and_unload_removes_it(plugin_package, qgis_iface, ui, docking, isolated,
                                                         qgis_new_project):
    canvas = qgis_iface.mapCanvas()
    bands_before = len(rubber_bands(canvas))
    plugin = plugin_package.classFactory(qgis_iface)
    plugin.initGui()

    assert ui.toolbar.actions() == [plugin.action]
    assert ui.submenu("TilePrompt").actions() == [plugin.action]
    assert not plugin.action.icon().isNull()
    assert tileprompt_docks(docking) == [plugin.dock]
    assert docking.dockWidgetArea(plugin.dock) == qgis.PyQt.QtCore.Qt.DockWidgetArea.RightDockWidgetArea
    assert "tileprompt" in provider_ids()
    algorithms = {a.id() for a in QgsApplication.processingRegistry().providerById("tileprompt").algorithms()}
    assert algorithms == {"tileprompt:classify", "tileprompt:buildindex", "tileprompt:findsimilar",
                          "tileprompt:textsearch", "tileprompt:change"}
    # Draw something so the sketches exist, and leave a map tool active: unload must clean both.
    plugin.start_drawing("query", "polygon")
    assert canvas.mapTool() is plugin.polygon_tool
    from qgis.core import QgsGeometry, QgsRectangle
    plugin.sketches.show("area", QgsGeometry.fromRect(QgsRectangle(0, 0, 1, 1)), canvas.mapSettings().destinationCrs())
    assert len(rubber_bands(canvas)) > bands_before

    plugin.unload()
    assert ui.toolbar.actions() == []
    assert ui.submenu("TilePrompt") is None
    assert "tileprompt" not in provider_ids()
    assert canvas.mapTool() is None or canvas.mapTool().objectName() not in ("tilepromptPolygonTool",
                                                                              "tilepromptRectangleTool")
    flush_deleted_objects()
    assert ui.tileprompt_actions() == []
    assert tileprompt_docks(docking) == []
    assert len(rubber_bands(canvas)) == bands_before


def test_action_shows_and_hides_the_dock(plugin):
    # isHidden, not isVisible: the test's main window is never shown on screen.
    assert plugin.dock.isHidden()
    plugin.action.trigger()
    assert not plugin.dock.isHidden() and plugin.action.isChecked()
    plugin.action.trigger()
    assert plugin.dock.isHidden()


def test_unload_without_init_gui_is_harmless(plugin_package, qgis_iface, ui):
    plugin_package.classFactory(qgis_iface).unload()
    assert ui.tileprompt_actions() == []


def test_unload_cancels_a_running_job_on_the_backend(plugin, fake_backend, isolated, sample_files):
    from qgis.core import QgsProject, QgsRasterLayer

    connect(plugin, fake_backend, isolated)
    layer = QgsRasterLayer(str(sample_files["s2"]), "s2")
    QgsProject.instance().addMapLayer(layer)
    plugin.dock.layer_combo.setLayer(layer)
    plugin.dock.prompt_edit.setPlainText("forest\nwater")
    fake_backend.hang = True
    plugin.dock.request_classify()
    assert wait_until(lambda: any(j["state"] == "running" for j in fake_backend.jobs.values()), 10)

    plugin.unload()
    assert len(plugin.tasks) == 0
    assert [j["state"] for j in fake_backend.jobs.values()] == ["cancelled"]
    assert ("DELETE", f"/v1/jobs/{next(iter(fake_backend.jobs))}") in fake_backend.calls
    plugin.initGui()  # the fixture unloads again


def test_unload_stops_the_backend_it_started(plugin, fake_venv, isolated):
    from tileprompt_plugin.plugin.settings import Key

    plugin.settings.set(Key.BACKEND_VENV, str(fake_venv))
    plugin.start_backend()
    assert wait_until(lambda: plugin.session.connected, 20), plugin.session.error
    pid = plugin.launcher.process.pid
    state_file = plugin.settings.state_file()
    assert state_file.is_file()

    plugin.unload()
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert not state_file.exists()
    plugin.initGui()


def test_unload_leaves_a_backend_it_only_attached_to_running(plugin, fake_backend, isolated):
    connect(plugin, fake_backend, isolated)
    plugin.unload()
    from tileprompt_plugin.plugin.client import BackendClient, Connection
    BackendClient(Connection("127.0.0.1", fake_backend.port, fake_backend.token)).health()
    plugin.initGui()


def test_qgis_load_reload_unload_twice_leaves_nothing(qgis_iface, ui, docking, isolated, monkeypatch):
    """Go through qgis.utils exactly as QGIS does: the package is imported by the plugin folder's name."""
    name = PLUGIN_DIR.name
    monkeypatch.syspath_prepend(str(PLUGIN_DIR.parent))
    # qgis.utils tracks (and on unload purges) the modules of plugins it found in its plugin paths.
    monkeypatch.setattr(qgis.utils, "available_plugins", [*qgis.utils.available_plugins, name])

    def count():
        flush_deleted_objects()
        return (len(ui.tileprompt_actions()), len(tileprompt_docks(docking)), provider_ids().count("tileprompt"))

    for _ in range(2):
        assert qgis.utils.loadPlugin(name)
        assert qgis.utils.startPlugin(name)
        assert count() == (1, 1, 1)

        assert qgis.utils.reloadPlugin(name)
        assert count() == (1, 1, 1)

        assert qgis.utils.unloadPlugin(name)
        assert count() == (0, 0, 0)
        assert [m for m in sys.modules if m == name or m.startswith(name + ".")] == []
