"""Fixtures for the plugin tests: the plugin package, and an iface whose toolbar and Raster menu are real.

The repo root is the QGIS plugin folder. QGIS imports it as a package named after the folder, which in a
fresh clone may be ``main`` or anything else, so tests register it under one fixed name instead.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
from qgis.PyQt.QtCore import QCoreApplication, QEvent
from qgis.PyQt.QtWidgets import QAction, QToolBar

PLUGIN_DIR = Path(__file__).resolve().parents[2]
PACKAGE_NAME = "tileprompt_plugin"


def import_plugin_package(name: str = PACKAGE_NAME):
    """Import the repo root as package ``name``; submodule_search_locations makes its relative imports work."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, PLUGIN_DIR / "__init__.py", submodule_search_locations=[str(PLUGIN_DIR)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def flush_deleted_objects():
    """Run pending deleteLater() calls now, so leftover QActions would show up in findChildren."""
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)


class MenusAndToolbar:
    """What QGIS does for addToolBarIcon / addPluginToRasterMenu and their removers.

    pytest-qgis's iface stub makes these calls no-ops, so a test could not see what initGui added.
    Like QGIS, the plugin's submenu under Raster disappears when its last action is removed.
    """

    def __init__(self, main_window):
        self.toolbar = QToolBar("Plugins Toolbar", main_window)
        self.raster_menu = main_window.menuBar().addMenu("&Raster")

    def submenu(self, name):
        for action in self.raster_menu.actions():
            if action.menu() is not None and action.text() == name:
                return action.menu()
        return None

    def addToolBarIcon(self, action):  # noqa: N802 (QgisInterface API)
        self.toolbar.addAction(action)

    def removeToolBarIcon(self, action):  # noqa: N802
        self.toolbar.removeAction(action)

    def addPluginToRasterMenu(self, name, action):  # noqa: N802
        menu = self.submenu(name) or self.raster_menu.addMenu(name)
        menu.addAction(action)

    def removePluginRasterMenu(self, name, action):  # noqa: N802
        menu = self.submenu(name)
        if menu is None:
            return
        menu.removeAction(action)
        if not menu.actions():
            self.raster_menu.removeAction(menu.menuAction())
            menu.deleteLater()

    def tileprompt_actions(self):
        """Every TilePrompt action still reachable: in the toolbar, in the menu, or alive in the main window."""
        window = self.toolbar.parent()
        found = set(self.toolbar.actions())
        for action in self.raster_menu.actions():
            if action.menu() is not None:
                found.update(action.menu().actions())
        found.update(window.findChildren(QAction, "tilepromptAction"))
        return [a for a in found if a.text() == "TilePrompt"]

    def close(self):
        self.toolbar.deleteLater()
        self.raster_menu.menuAction().deleteLater()
        self.raster_menu.deleteLater()


@pytest.fixture()
def plugin_package():
    return import_plugin_package()


@pytest.fixture()
def ui(qgis_iface, monkeypatch):
    """Install real menus and a toolbar on the session's iface stub for one test."""
    ui = MenusAndToolbar(qgis_iface.mainWindow())
    for name in ("addToolBarIcon", "removeToolBarIcon", "addPluginToRasterMenu", "removePluginRasterMenu"):
        monkeypatch.setattr(qgis_iface, name, getattr(ui, name), raising=False)
    qgis_iface.messageBar().clear_messages()
    yield ui
    ui.close()
    flush_deleted_objects()
