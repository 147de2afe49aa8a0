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


# --- shared fixtures of the dock, client and Processing tests -------------------------------------------------

TEST_DATA_CRS = "EPSG:32633"
S2_BAND_NAMES = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]


def write_tiles_gpkg(path, layer_name="tiles", rows=3, cols=4, tile=320.0, origin=(330000.0, 5822040.0),
                     classes=("forest", "water", "farmland")):
    """A result GeoPackage like the backend's: one polygon per tile with the ClassifyRequest output columns."""
    from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransformContext, QgsFeature, QgsField,
                           QgsFields, QgsGeometry, QgsRectangle, QgsVectorFileWriter, QgsWkbTypes)
    from qgis.PyQt.QtCore import QVariant

    fields = QgsFields()
    for name, kind in (("id", QVariant.Int), ("row", QVariant.Int), ("col", QVariant.Int),
                       ("col_off", QVariant.Int), ("row_off", QVariant.Int), ("width", QVariant.Int),
                       ("height", QVariant.Int), ("class", QVariant.String), ("score", QVariant.Double),
                       ("second", QVariant.String), ("margin", QVariant.Double)):
        fields.append(QgsField(name, kind))
    for c in classes:
        fields.append(QgsField(f"s_{c}", QVariant.Double))
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = layer_name
    writer = QgsVectorFileWriter.create(str(path), fields, QgsWkbTypes.Type.Polygon,
                                        QgsCoordinateReferenceSystem(TEST_DATA_CRS), QgsCoordinateTransformContext(),
                                        options)
    x0, y0 = origin
    for r in range(rows):
        for c in range(cols):
            f = QgsFeature(fields)
            n = r * cols + c
            rect = QgsRectangle(x0 + c * tile, y0 - (r + 1) * tile, x0 + (c + 1) * tile, y0 - r * tile)
            f.setGeometry(QgsGeometry.fromRect(rect))
            klass = classes[n % len(classes)]
            f.setAttributes([n, r, c, c * 32, r * 32, 32, 32, klass, 0.8, classes[(n + 1) % len(classes)], 0.5]
                            + [0.8 if k == klass else 0.1 for k in classes])
            writer.addFeature(f)
    del writer
    return path


def write_similar_gpkg(path, k=5, tile=320.0, origin=(330000.0, 5822040.0)):
    from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransformContext, QgsFeature, QgsField,
                           QgsFields, QgsGeometry, QgsRectangle, QgsVectorFileWriter, QgsWkbTypes)
    from qgis.PyQt.QtCore import QVariant

    fields = QgsFields()
    for name, kind in (("id", QVariant.Int), ("scene", QVariant.String), ("row", QVariant.Int),
                       ("col", QVariant.Int), ("rank", QVariant.Int), ("similarity", QVariant.Double),
                       ("query", QVariant.String)):
        fields.append(QgsField(name, kind))
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = "similar"
    writer = QgsVectorFileWriter.create(str(path), fields, QgsWkbTypes.Type.Polygon,
                                        QgsCoordinateReferenceSystem(TEST_DATA_CRS), QgsCoordinateTransformContext(),
                                        options)
    x0, y0 = origin
    for rank in range(1, k + 1):
        f = QgsFeature(fields)
        r, c = rank // 4, rank % 4
        f.setGeometry(QgsGeometry.fromRect(QgsRectangle(x0 + c * tile, y0 - (r + 1) * tile, x0 + (c + 1) * tile,
                                                        y0 - r * tile)))
        f.setAttributes([r * 4 + c, "scene", r, c, rank, 1.0 - rank * 0.1, "like"])
        writer.addFeature(f)
    del writer
    return path


def write_raster(path, bands=13, width=128, height=96, descriptions=None, origin=(330000.0, 5822040.0), res=10.0,
                 dtype=None, crs=TEST_DATA_CRS):
    """A small GeoTIFF (GDAL, as QGIS ships it) with optional band descriptions."""
    from osgeo import gdal, osr

    dtype = dtype or gdal.GDT_UInt16
    ds = gdal.GetDriverByName("GTiff").Create(str(path), width, height, bands, dtype)
    ds.SetGeoTransform((origin[0], res, 0, origin[1], 0, -res))
    srs = osr.SpatialReference()
    srs.SetFromUserInput(crs)
    ds.SetProjection(srs.ExportToWkt())
    import numpy as np  # tests only: never in plugin/

    ramp = (np.add.outer(np.arange(height), np.arange(width)) % 200).astype("float64")
    for b in range(1, bands + 1):
        band = ds.GetRasterBand(b)
        band.WriteArray(ramp + 100 * b)
        if descriptions:
            band.SetDescription(descriptions[b - 1])
    ds = None
    return path


@pytest.fixture(scope="session")
def sample_files(tmp_path_factory, qgis_app):
    folder = tmp_path_factory.mktemp("samples")
    files = {
        "tiles": write_tiles_gpkg(folder / "tiles.gpkg"),
        "similar": write_similar_gpkg(folder / "similar.gpkg"),
        "heatmap": write_raster(folder / "heat.tif", bands=1, width=16, height=12, res=80.0,
                                dtype=__import__("osgeo.gdal", fromlist=["gdal"]).GDT_Float32),
        "classmap": write_raster(folder / "classmap.tif", bands=5, width=4, height=3, res=320.0,
                                 dtype=__import__("osgeo.gdal", fromlist=["gdal"]).GDT_UInt16),
        "s2": write_raster(folder / "s2_sample.tif", descriptions=S2_BAND_NAMES),
        "plain": write_raster(folder / "plain.tif", bands=3),
    }
    return files


@pytest.fixture()
def isolated(tmp_path, monkeypatch):
    """Settings, state file and cache in a temporary folder; the TilePrompt settings group is wiped after."""
    from qgis.core import QgsSettings

    monkeypatch.setenv("TILEPROMPT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))  # the installer's default folder
    QgsSettings().remove("TilePrompt")
    yield tmp_path
    QgsSettings().remove("TilePrompt")


@pytest.fixture()
def fake_backend(sample_files, isolated):
    from fake_backend import FakeBackend

    backend = FakeBackend(sample_files).start()
    yield backend
    backend.stop()


@pytest.fixture()
def docking(qgis_iface, monkeypatch):
    """Make iface.addDockWidget/removeDockWidget dock into pytest-qgis's real QMainWindow (the stub ignores them)."""
    window = qgis_iface.mainWindow()
    monkeypatch.setattr(qgis_iface, "addDockWidget", window.addDockWidget, raising=False)
    monkeypatch.setattr(qgis_iface, "removeDockWidget", window.removeDockWidget, raising=False)
    return window


@pytest.fixture()
def plugin(plugin_package, qgis_iface, ui, docking, isolated, qgis_new_project):
    """The plugin after initGui (unloaded after the test)."""
    instance = plugin_package.classFactory(qgis_iface)
    instance.initGui()
    yield instance
    instance.unload()
    flush_deleted_objects()


@pytest.fixture()
def task_statuses():
    """(task id, status) of every status change QGIS's task manager reports during a test (QGIS announces a
    Terminated task as "Task failed")."""
    from qgis.core import QgsApplication

    manager, seen = QgsApplication.taskManager(), []

    def record(task_id, status):
        seen.append((task_id, status))

    manager.statusChanged.connect(record)
    yield seen
    manager.statusChanged.disconnect(record)


def wait_until(predicate, timeout=10.0, step=0.02):
    """Spin the Qt event loop until ``predicate()`` (tasks' finished() and network replies need it)."""
    import time

    from qgis.PyQt.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        QApplication.processEvents()
        if predicate():
            return True
        time.sleep(step)
    QApplication.processEvents()
    return bool(predicate())


def connect(plugin, backend, tmp_path):
    """Attach the plugin to a (fake) backend through its state file and wait for health + models."""
    state = backend.write_state_file(tmp_path / "home" / "server.json")
    plugin.attach_backend(state)
    assert wait_until(lambda: plugin.session.connected and plugin.session.models, 10), plugin.session.error
    return state


import_plugin_package()  # so tests can import tileprompt_plugin.plugin.<module> at module level


FAKE_SERVE = '''#!{python}
"""A stand-in for `tileprompt serve --port N --state-file F` (the launcher tests need a real process)."""
import os, signal, sys, threading, time
sys.path.insert(0, {tests!r})
from fake_backend import FakeBackend
args = sys.argv[1:]
assert args[0] == "serve", args
state = args[args.index("--state-file") + 1]
if os.environ.get("FAKE_SERVE_FAIL"):
    print("fake serve: failing on purpose", flush=True)
    sys.exit(3)
backend = FakeBackend({{}}).start()
print("fake serve listening on", backend.port, flush=True)
time.sleep(float(os.environ.get("FAKE_SERVE_DELAY", "0")))
from pathlib import Path
backend.write_state_file(Path(state), pid=os.getpid())
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: done.set())
done.wait()
print("fake serve: stopping", flush=True)
'''


@pytest.fixture()
def fake_venv(tmp_path):
    """A folder laid out like a venv whose bin/tileprompt is the fake server above."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    exe = venv / "bin" / "tileprompt"
    exe.write_text(FAKE_SERVE.format(python=sys.executable, tests=str(Path(__file__).resolve().parent)))
    exe.chmod(0o755)
    return venv
