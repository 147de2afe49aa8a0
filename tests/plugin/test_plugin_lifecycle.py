"""initGui adds one action to the toolbar and the Raster menu; unload and reload leave nothing behind."""

import sys

import qgis.utils
from qgis.core import Qgis

from conftest import PLUGIN_DIR, flush_deleted_objects


def test_init_gui_adds_one_action_and_unload_removes_it(plugin_package, qgis_iface, ui):
    plugin = plugin_package.classFactory(qgis_iface)
    plugin.initGui()

    assert ui.toolbar.actions() == [plugin.action]
    assert ui.submenu("TilePrompt").actions() == [plugin.action]
    assert not plugin.action.icon().isNull()

    plugin.unload()
    # Checked before the deferred delete runs: deleting the action would hide it from toolbar and menu anyway.
    assert ui.toolbar.actions() == []
    assert ui.submenu("TilePrompt") is None

    flush_deleted_objects()
    assert ui.tileprompt_actions() == []


def test_action_explains_how_to_use_the_backend(plugin_package, qgis_iface, ui):
    plugin = plugin_package.classFactory(qgis_iface)
    plugin.initGui()
    try:
        plugin.action.trigger()
        messages = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Info)
        assert len(messages) == 1
        assert "scripts/setup" in messages[0] and "tileprompt" in messages[0]
    finally:
        plugin.unload()


def test_unload_without_init_gui_is_harmless(plugin_package, qgis_iface, ui):
    plugin_package.classFactory(qgis_iface).unload()
    assert ui.tileprompt_actions() == []


def test_qgis_load_reload_unload_twice_leaves_no_actions(qgis_iface, ui, monkeypatch):
    """Go through qgis.utils exactly as QGIS does: the package is imported by the plugin folder's name."""
    name = PLUGIN_DIR.name
    monkeypatch.syspath_prepend(str(PLUGIN_DIR.parent))
    # qgis.utils tracks (and on unload purges) the modules of plugins it found in its plugin paths.
    monkeypatch.setattr(qgis.utils, "available_plugins", [*qgis.utils.available_plugins, name])

    for _ in range(2):
        assert qgis.utils.loadPlugin(name)
        assert qgis.utils.startPlugin(name)
        assert len(ui.tileprompt_actions()) == 1

        assert qgis.utils.reloadPlugin(name)
        flush_deleted_objects()
        assert len(ui.tileprompt_actions()) == 1

        assert qgis.utils.unloadPlugin(name)
        flush_deleted_objects()
        assert ui.tileprompt_actions() == []
        assert [m for m in sys.modules if m == name or m.startswith(name + ".")] == []
