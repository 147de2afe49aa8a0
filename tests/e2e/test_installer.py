"""An analyst's install, end to end on QGIS 3.22: the release zip installed with QGIS's own "Install from ZIP"
code into a fresh profile, "Install backend" pressed in the dock, the real uv building the real backend
environment, the backend started, and the eo-box scene classified through the dock. On the way: a cancel in the
middle of the package installation leaves no environment the plugin would use, and an installation built from
another backend source is offered an update.

Package sources: the machine's local package cache (pip's configured extra indexes and wheel folders, and the uv
wheel scripts/setup keeps in .venv-plugin/wheels), with torch taken from those indexes ("PyTorch from: the
package indexes"): what lies on this disk is torch 2.14.1's CUDA build (CPU wheels come from PyTorch's own
index, which this machine cannot reach). uv's cache is kept between runs (TILEPROMPT_TEST_UV_CACHE, default
~/.cache/tileprompt-tests/uv) on the same disk, so an environment is hard links into it: about 20 s to install
cold, a few seconds warm, instead of minutes of unpacking 5.5 GB. Without a local torch 2.14.1 (a user's
clone), the test is skipped rather than downloading gigabytes.
"""

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from qgis.core import QgsCategorizedSymbolRenderer, QgsProject, QgsRasterLayer, QgsSettings

from conftest import REPO, TINY_MODEL, wait_until

TORCH = "torch-2.14.1-cp311"
INSTALL_TIMEOUT_S = 600


def pip_sources() -> tuple[list[str], list[str]]:
    """(extra index URLs, wheel folders) of pip's configuration on this machine."""
    done = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "pip", "config", "list"],
                          capture_output=True, text=True, check=False)
    values: dict[str, list[str]] = {"extra-index-url": [], "find-links": []}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in values:
            values[name] += [v for v in value.strip("'\"").split() if v not in values[name]]
    return values["extra-index-url"], values["find-links"]


def has_local_torch(indexes: list[str], folders: list[str]) -> bool:
    for url in indexes:
        page = Path(url.removeprefix("file://")) / "torch" / "index.html"
        if url.startswith("file://") and page.is_file() and TORCH in page.read_text(errors="replace"):
            return True
    return any(list(Path(f).glob(f"{TORCH}-*.whl")) for f in folders)


@pytest.fixture(scope="module")
def release_zip(tmp_path_factory):
    loader = importlib.machinery.SourceFileLoader("tileprompt_package", str(REPO / "scripts" / "package"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    package = importlib.util.module_from_spec(spec)
    loader.exec_module(package)
    path = package.build(tmp_path_factory.mktemp("dist"))
    assert package.check(path) == []
    return path


@pytest.fixture()
def fresh_profile(tmp_path, monkeypatch, qgis_iface, ui, docking, isolated, qgis_new_project):
    """A QGIS profile with no plugin in it: QGIS's plugin installer unzips into its python/plugins folder."""
    import qgis.utils
    from qgis.core import QgsApplication

    # QGIS's own Python modules (pyplugin_installer), on sys.path in the desktop
    monkeypatch.syspath_prepend(os.path.join(QgsApplication.pkgDataPath(), "python"))
    plugins = tmp_path / "profile" / "python" / "plugins"
    plugins.mkdir(parents=True)
    monkeypatch.setattr(qgis.utils, "home_plugin_path", str(plugins), raising=False)
    monkeypatch.setattr(qgis.utils, "plugin_paths", [str(plugins)])
    monkeypatch.syspath_prepend(str(plugins))
    settings = QgsSettings()
    settings.setValue("app/plugin_installer/checkOnStart", False)  # no network fetch of the repositories
    yield plugins
    if "tileprompt" in qgis.utils.plugins:
        qgis.utils.unloadPlugin("tileprompt")  # stops the backend it started
    for name in [m for m in sys.modules if m == "tileprompt" or m.startswith("tileprompt.")]:
        del sys.modules[name]
    settings.remove("PythonPlugins/tileprompt")


def test_install_from_zip_then_install_the_backend_from_the_dock(fresh_profile, release_zip, eo_box, tmp_path,
                                                                   qgis_iface):
    import pyplugin_installer
    import qgis.utils

    indexes, folders = pip_sources()
    if not has_local_torch(indexes, folders):
        pytest.skip("no local copy of torch 2.14.1 in pip's configured sources: the installation would download "
                    "several GB")
    uv_wheels = REPO / ".venv-plugin" / "wheels"
    assert list(uv_wheels.glob("uv-*.whl")), "scripts/setup keeps the uv wheel in .venv-plugin/wheels"

    # 1. QGIS's own installer code, as Plugins > Manage and Install Plugins > Install from ZIP.
    pyplugin_installer.instance().installFromZipFile(str(release_zip))
    assert (fresh_profile / "tileprompt" / "metadata.txt").is_file()
    plugin = qgis.utils.plugins.get("tileprompt")
    assert plugin is not None and "tileprompt" in qgis.utils.active_plugins
    assert type(plugin).__module__ == "tileprompt.plugin.plugin"  # the zip's copy, not the repository
    from tileprompt.plugin.installer import locations, record
    from tileprompt.plugin.settings import Key

    # 2. First use: the dock offers to install the backend.
    plugin.run(True)
    panel = plugin.dock.install_panel
    assert panel.isVisibleTo(plugin.dock) and panel.action_button.text() == "Install backend"
    settings = plugin.settings
    base_python = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c",
                                  "import sys; print(sys._base_executable)"], capture_output=True, text=True)
    for key, value in {Key.INSTALL_DIR: str(tmp_path / "backend"), Key.INSTALL_PYTHON: base_python.stdout.strip(),
                       Key.EXTRA_INDEX_URLS: " ".join(indexes), Key.FIND_LINKS: " ".join([str(uv_wheels), *folders]),
                       Key.TORCH_BACKEND: "none", Key.INDEX_STRATEGY: "unsafe-best-match", Key.AUTO_ATTACH: False,
                       Key.INSTALL_CACHE: os.environ.get("TILEPROMPT_TEST_UV_CACHE",
                                                         str(Path.home() / ".cache" / "tileprompt-tests" / "uv"))
                       }.items():
        settings.set(key, value)
    layout = settings.install_layout()

    # 3. Cancel in the middle of the package installation: nothing half-made stays, nothing is recorded.
    panel.action_button.click()
    assert wait_until(lambda: "Installing packages" in panel.phase.text(), 120), panel.log_view.toPlainText()
    env = next(layout.envs.iterdir())
    panel.cancel_button.click()
    assert wait_until(lambda: plugin.install_task is None, 60)
    assert not env.exists() and not layout.record.exists()
    assert "cancelled" in panel.message.text() and panel.action_button.text() == "Install backend"

    # 4. Install for real, with the progress and the log in the dock; the backend starts when it is done.
    panel.action_button.click()
    assert wait_until(lambda: plugin.install_task is None, INSTALL_TIMEOUT_S), panel.log_view.toPlainText()[-3000:]
    installation = record.read(layout)
    assert installation is not None, panel.message.text() + panel.log_view.toPlainText()[-3000:]
    assert installation.version == "0.1.0" and installation.compute == "cpu" and installation.torch.startswith("2.14.1")
    assert installation.python_version.startswith("3.11") and installation.device == "CPU"
    env = installation.env_path(layout)
    assert not str(env).startswith(str(fresh_profile))  # outside the plugin folder QGIS replaces on updates
    assert (locations.env_resources(env) / "styles" / "palette.json").is_file()
    log = panel.log_view.toPlainText()
    assert "Resolved" in log and "Installed" in log and "tileprompt-backend" in log
    assert not panel.isVisibleTo(plugin.dock)  # current: nothing more to offer
    # a tiny untrained model for the run, made with the installed environment's own command-line tool
    made = subprocess.run([str(locations.venv_tileprompt(env)), "models", "tiny", "aligned-s2", "--out",
                           os.path.join(os.environ["TILEPROMPT_HOME"], "models", "tiny-s2")],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert wait_until(lambda: plugin.session.connected, 120), plugin.dock.backend_label.text()
    assert plugin.launcher.running and plugin.settings.backend_executable() == locations.venv_tileprompt(env)
    assert plugin.session.health["version"] == "0.1.0" and plugin.session.health["device"] == "cpu"
    plugin._refresh_models()
    assert wait_until(lambda: plugin.dock.model_combo.findData(TINY_MODEL) >= 0, 30)

    # 5. Classify the eo-box scene through the dock.
    dock = plugin.dock
    layer = QgsRasterLayer(str(eo_box / "T33UUU_20170216T102101_B04.jp2"), "eo-box B04")
    QgsProject.instance().addMapLayer(layer)
    dock.layer_combo.setLayer(layer)
    dock.model_combo.setCurrentIndex(dock.model_combo.findData(TINY_MODEL))
    dock.tile_spin.setValue(64)
    dock.prompt_edit.setPlainText("forest\nwater\nfarmland\nurban area")
    dock.run_button.click()
    assert wait_until(lambda: plugin.current_task is None, 180), dock.status_label.text()
    group = QgsProject.instance().layerTreeRoot().findGroup("TilePrompt")
    (tiles,) = [node.layer() for node in group.findLayers()]
    assert tiles.featureCount() == 288 and isinstance(tiles.renderer(), QgsCategorizedSymbolRenderer)
    assert wait_until(lambda: "device cpu" in dock.backend_label.text(), 30), dock.backend_label.text()
    assert "installed backend: 0.1.0 (cpu)" in plugin.copy_diagnostics()

    # 6. A plugin that ships another backend source finds the installation outdated and offers the update.
    record.write(layout, record.Installation(**{**installation.__dict__, "source": "an older source"}))
    plugin.refresh_install_state()
    assert panel.isVisibleTo(plugin.dock) and panel.action_button.text() == "Update backend"
