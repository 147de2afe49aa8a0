"""The backend installer's parts: folders per platform, interpreters, the uv bootstrap, command lines, proxy,
progress, the installation record, and the QgsTask with a stand-in for uv (cancel, failure, no half environment).
The real installation (real uv, real packages, the backend started and used) is tests/e2e/test_installer.py."""

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import PLUGIN_DIR, wait_until
from tileprompt_plugin.plugin.installer import commands, interpreters, locations, progress, proxy, record, uv

UV_FILES = """uv-0.13.9-py3-none-linux_armv6l.whl
uv-0.13.9-py3-none-macosx_10_12_x86_64.whl
uv-0.13.9-py3-none-macosx_11_0_arm64.whl
uv-0.13.9-py3-none-manylinux_2_17_aarch64.manylinux2014_aarch64.musllinux_1_1_aarch64.whl
uv-0.13.9-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
uv-0.13.9-py3-none-manylinux_2_28_aarch64.whl
uv-0.13.9-py3-none-musllinux_1_1_x86_64.whl
uv-0.13.9-py3-none-win32.whl
uv-0.13.9-py3-none-win_amd64.whl
uv-0.13.9-py3-none-win_arm64.whl""".split()  # the uv 0.13.9 wheels PyPI lists (a selection)

# What `uv pip install` printed for the backend here (abridged), non-interactive.
UV_OUTPUT = """Using Python 3.11.7 environment at: /x/envs/20261128-101500
Resolved 78 packages in 1.93s
   Building tileprompt-backend @ file:///x/backend
Downloading pillow (6.8MiB)
Downloading rasterio (34.2MiB)
Downloading torch (200.0MiB)
 Downloaded pillow
 Downloaded rasterio
      Built tileprompt-backend @ file:///x/backend
 Downloaded torch
Prepared 78 packages in 14.02s
Installed 78 packages in 123ms
 + affine==3.0.1""".splitlines()


# --- folders ------------------------------------------------------------------------------------------------------
def test_the_installation_folder_is_the_users_data_folder_outside_the_plugin(tmp_path):
    home = Path("/home/ana")
    assert locations.default_root("Linux", {}, home) == home / ".local/share/tileprompt/backend"
    assert locations.default_root("Linux", {"XDG_DATA_HOME": "/data"}, home) == Path("/data/tileprompt/backend")
    assert locations.default_root("Windows", {"LOCALAPPDATA": "C:/Users/ana/AppData/Local"}, home) == \
        Path("C:/Users/ana/AppData/Local/TilePrompt/backend")
    assert locations.default_root("Darwin", {}, home) == home / "Library/Application Support/TilePrompt/backend"
    env = Path("/e")
    assert locations.venv_tileprompt(env, "Windows") == env / "Scripts" / "tileprompt.exe"
    assert locations.venv_python(env, "Linux") == env / "bin" / "python"
    assert not str(locations.default_root()).startswith(str(PLUGIN_DIR))


# --- interpreters -------------------------------------------------------------------------------------------------
def test_interpreter_candidates_per_platform():
    which = {"py": "C:/Windows/py.exe", "python3.12": "/usr/bin/python3.12", "python": "C:/Python311/python.exe"}.get
    windows = interpreters.candidates("Windows", {"LOCALAPPDATA": "C:/L"}, Path("C:/Users/a"), which)
    assert windows[0] == ["C:/Windows/py.exe", "-3.13"] and ["C:/Python311/python.exe"] in windows
    assert any("Programs" in c[0] and "Python311" in c[0] for c in windows)
    linux = interpreters.candidates("Linux", {}, Path("/home/a"), which)
    assert linux[0] == ["/usr/bin/python3.12"] and ["/usr/bin/python3.11"] in linux
    mac = interpreters.candidates("Darwin", {}, Path("/Users/a"), lambda n: None)
    assert ["/opt/homebrew/bin/python3.13"] in mac
    assert ["/Library/Frameworks/Python.framework/Versions/3.11/bin/python3.11"] in mac


def test_an_interpreter_counts_once_it_ran_and_is_new_enough(tmp_path):
    found = interpreters.probe([sys.executable])
    assert found is not None and found.version >= (3, 11) and Path(found.path).exists()
    old = tmp_path / "python-old"
    old.write_text("#!/bin/sh\necho /usr/bin/python3.9\necho 3 9 2\n")
    old.chmod(0o755)
    assert interpreters.probe([str(old)]) is None
    assert interpreters.find_python(str(tmp_path / "missing")) is None  # a named one that does not exist
    assert interpreters.find_python() is not None  # this machine has one
    assert interpreters.excluded("C:/OSGeo4W/apps/Python312/python.exe", ["C:/OSGeo4W"], "Windows")
    assert interpreters.excluded("C:/Users/a/AppData/Local/Microsoft/WindowsApps/python.exe", [], "Windows")
    assert not interpreters.excluded("/usr/bin/python3", ["/usr"], "Linux")  # Debian's QGIS Python is fine


def test_the_gpu_choice_needs_an_nvidia_driver():
    def smi(args, **kwargs):
        return subprocess.CompletedProcess(args, 0, "NVIDIA RTX A2000 12GB, 535.54.03\n", "")

    assert interpreters.nvidia_gpu("Linux", smi, lambda n: "/usr/bin/nvidia-smi") == \
        "NVIDIA RTX A2000 12GB (driver 535.54.03)"
    assert interpreters.nvidia_gpu("Linux", smi, lambda n: None) is None
    assert interpreters.nvidia_gpu("Darwin", smi, lambda n: "/usr/bin/nvidia-smi") is None
    failing = lambda args, **kwargs: subprocess.CompletedProcess(args, 9, "", "NVIDIA-SMI has failed")  # noqa: E731
    assert interpreters.nvidia_gpu("Linux", failing, lambda n: "/usr/bin/nvidia-smi") is None


# --- uv bootstrap -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("system, machine, libc, expected", [
    ("Linux", "x86_64", ("glibc", "2.36"), "uv-0.13.9-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"),
    ("Linux", "aarch64", ("glibc", "2.31"),
     "uv-0.13.9-py3-none-manylinux_2_17_aarch64.manylinux2014_aarch64.musllinux_1_1_aarch64.whl"),
    ("Linux", "x86_64", ("", ""), "uv-0.13.9-py3-none-musllinux_1_1_x86_64.whl"),
    ("Windows", "AMD64", None, "uv-0.13.9-py3-none-win_amd64.whl"),
    ("Windows", "ARM64", None, "uv-0.13.9-py3-none-win_arm64.whl"),
    ("Darwin", "arm64", None, "uv-0.13.9-py3-none-macosx_11_0_arm64.whl"),
    ("Darwin", "x86_64", None, "uv-0.13.9-py3-none-macosx_10_12_x86_64.whl"),
])
def test_the_wheel_for_each_platform(system, machine, libc, expected):
    files = [uv.WheelFile(name, f"https://files/{name}", "0" * 64) for name in UV_FILES]
    assert uv.pick_wheel(files, "0.13.9", uv.platform_tags(system, machine, libc)).filename == expected
    with pytest.raises(uv.BootstrapError, match="no uv 0.13.8 wheel"):
        uv.pick_wheel(files, "0.13.8", uv.platform_tags(system, machine, libc))


def test_the_simple_page_gives_urls_and_hashes():
    html = ('<html><body><a href="../../packages/ab/uv-0.13.9-py3-none-win_amd64.whl#sha256=' + "a" * 64 +
            '" data-requires-python="&gt;=3.8">uv-0.13.9-py3-none-win_amd64.whl</a><br/>'
            '<a href="https://files.example/uv-0.13.9.tar.gz">uv-0.13.9.tar.gz</a></body></html>')
    files = uv.parse_simple_page(html, "https://pypi.org/simple/uv/")
    assert files[0] == uv.WheelFile("uv-0.13.9-py3-none-win_amd64.whl",
                                    "https://pypi.org/packages/ab/uv-0.13.9-py3-none-win_amd64.whl", "a" * 64)
    assert files[1].sha256 is None


def fake_uv_wheel(folder: Path, script: str, version: str = uv.UV_VERSION) -> Path:
    """A wheel laid out like uv's, for this platform, holding ``script`` as the uv executable."""
    name = f"uv-{version}-py3-none-{uv.platform_tags()[0]}.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / name, "w") as archive:
        archive.writestr(f"uv-{version}.data/scripts/uv", script)
        archive.writestr(f"uv-{version}.dist-info/METADATA", f"Name: uv\nVersion: {version}\n")
    return folder / name


def simple_index(root: Path, wheel: Path, sha256: str | None = None) -> str:
    page = root / "simple" / "uv"
    page.mkdir(parents=True)
    (page / wheel.name).write_bytes(wheel.read_bytes())
    digest = sha256 or hashlib.sha256(wheel.read_bytes()).hexdigest()
    (page / "index.html").write_text(f'<a href="{wheel.name}#sha256={digest}">{wheel.name}</a>')
    return (root / "simple").as_uri()


def test_uv_comes_from_the_package_sources_checked_and_executable(tmp_path):
    wheel = fake_uv_wheel(tmp_path / "wheels", "#!/bin/sh\necho uv 0.13.9\n")
    never = lambda url: pytest.fail(f"no download expected: {url}")  # noqa: E731
    index = simple_index(tmp_path / "index", wheel)
    exe = uv.bootstrap(tmp_path / "uv-a", never, index_url=index)
    assert subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout.strip() == "uv 0.13.9"
    assert uv.bootstrap(tmp_path / "uv-a", never, index_url="https://unused") == exe  # reused
    exe = uv.bootstrap(tmp_path / "uv-b", never, index_url="https://unused", find_links=(str(tmp_path / "wheels"),))
    assert exe.stat().st_mode & 0o111
    bad = simple_index(tmp_path / "bad", wheel, sha256="b" * 64)
    with pytest.raises(uv.BootstrapError, match="does not match"):
        uv.bootstrap(tmp_path / "uv-c", never, index_url=bad)
    assert not (tmp_path / "uv-c").exists()
    with pytest.raises(uv.BootstrapError, match="uv 0.13.9 could not be fetched: .*cannot read"):
        uv.bootstrap(tmp_path / "uv-d", never, index_url=(tmp_path / "nothing").as_uri())


# --- commands -----------------------------------------------------------------------------------------------------
def test_cpu_installs_take_pytorchs_cpu_wheels_and_cuda_lets_uv_match_the_driver(tmp_path):
    uvx, py = Path("/b/uv"), Path("/e/bin/python")
    cpu = commands.install_packages(uvx, py, tmp_path, "cpu", commands.PackageSources(), "Linux")
    assert cpu[:4] == ["/b/uv", "pip", "install", "--python"]
    assert f"{tmp_path / 'backend'}[cpu]" in cpu and cpu[cpu.index("--constraints") + 1].endswith("constraints.txt")
    assert cpu[-2:] == ["--torch-backend", "cpu"]
    cuda = commands.install_packages(uvx, py, tmp_path, "cuda", commands.PackageSources(), "Windows")
    assert f"{tmp_path / 'backend'}[gpu]" in cuda and cuda[-2:] == ["--torch-backend", "auto"]
    mac = commands.install_packages(uvx, py, tmp_path, "cpu", commands.PackageSources(), "Darwin")
    assert "--torch-backend" not in mac  # macOS wheels on PyPI have no CUDA
    mirror = commands.PackageSources.from_text("https://m/simple", "file:///a file:///b", "/w", "none",
                                               "unsafe-best-match")
    local = commands.install_packages(uvx, py, tmp_path, "cpu", mirror, "Linux")
    assert "--torch-backend" not in local and local[local.index("--index-strategy") + 1] == "unsafe-best-match"
    assert "--index-strategy" not in cpu  # uv's own first-index rule unless asked
    assert local[local.index("--index-url") + 1] == "https://m/simple"
    assert [local[i + 1] for i, a in enumerate(local) if a == "--extra-index-url"] == ["file:///a", "file:///b"]
    assert local[local.index("--find-links") + 1] == "/w"
    with pytest.raises(ValueError, match="compute"):
        commands.install_packages(uvx, py, tmp_path, "tpu", commands.PackageSources())
    assert commands.create_venv(uvx, "3.11", Path("/e"), managed=True) == \
        ["/b/uv", "venv", "--python", "3.11", "--managed-python", "/e"]
    env = commands.uv_environment(Path("/c"), Path("/p"), {"HTTPS_PROXY": "http://proxy:3128"})
    assert env["UV_CACHE_DIR"] == "/c" and env["UV_NO_CONFIG"] == "1" and env["HTTPS_PROXY"] == "http://proxy:3128"


# --- proxy --------------------------------------------------------------------------------------------------------
def test_qgis_proxy_settings_become_proxy_variables():
    env = proxy.proxy_environment(True, "HttpProxy", "proxy.corp", 3128, "ana", "p@ss:w",
                                    ["*.corp", "https://x.org/maps/"])
    assert env["HTTPS_PROXY"] == env["HTTP_PROXY"] == "http://ana:p%40ss%3Aw@proxy.corp:3128"
    assert env["NO_PROXY"] == "*.corp,x.org"
    assert proxy.proxy_environment(True, "Socks5Proxy", "s", 1080) == {"ALL_PROXY": "socks5://s:1080"}
    assert proxy.proxy_environment(True, "DefaultProxy", "ignored", 1) == {}  # the system's variables apply
    assert proxy.proxy_environment(False, "HttpProxy", "p", 1) == {}
    assert proxy.redact("$ uv pip install --index-url https://ana:secret@mirror/simple x") == \
        "$ uv pip install --index-url https://***@mirror/simple x"


def test_the_proxy_is_read_from_qgis_settings(isolated):
    from qgis.core import QgsSettings

    settings = QgsSettings()
    for key, value in {"proxyEnabled": True, "proxyType": "HttpProxy", "proxyHost": "p.corp", "proxyPort": "8080",
                       "proxyUser": "", "proxyPassword": ""}.items():
        settings.setValue(f"proxy/{key}", value)
    try:
        assert proxy.qgis_proxy_environment()["HTTPS_PROXY"] == "http://p.corp:8080"
    finally:
        settings.remove("proxy")


# --- progress -----------------------------------------------------------------------------------------------------
def test_progress_follows_uvs_lines_and_estimates_the_download_time():
    now = [100.0]
    tracker = progress.PackageProgress(clock=lambda: now[0])
    fractions = []
    for line in UV_OUTPUT:
        if line.startswith(" Downloaded"):
            now[0] += 10.0
        tracker.feed(line)
        fractions.append(tracker.fraction())
        if line == " Downloaded rasterio":
            # 41 of 241 MiB in 20 s: 200 MiB left at that rate
            assert abs(tracker.seconds_left() - 200 * 20 / 41) < 1
            assert "2 of 3 files, 41 of 241 MiB" in tracker.phase() and "min" in tracker.phase()
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert fractions[1] == progress.RESOLVED and tracker.resolved == 78
    assert progress.overall("packages", 0.5) == 52 and progress.overall("verify", 1) == 100


# --- the record ---------------------------------------------------------------------------------------------------
def make_env(layout: locations.Layout, name: str) -> Path:
    exe = locations.venv_tileprompt(layout.env(name))
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    return layout.env(name)


def installation(**changes):
    values = dict(env="e1", version="0.1.0", source="s", compute="cpu", python="/usr/bin/python3.11",
                  python_version="3.11.2", torch="2.14.1+cpu", cuda=False, device="CPU", installed="2026", log="l")
    values.update(changes)
    return record.Installation(**values)


def test_the_record_says_missing_broken_outdated_or_current(tmp_path):
    layout = locations.Layout(tmp_path / "backend")
    assert record.state(layout, "0.1.0", "s") == (record.State.MISSING, None)
    record.write(layout, installation())
    assert record.state(layout, "0.1.0", "s")[0] is record.State.BROKEN  # no environment behind it
    make_env(layout, "e1")
    assert record.state(layout, "0.1.0", "s")[0] is record.State.CURRENT
    assert record.state(layout, "0.2.0", "s")[0] is record.State.OUTDATED  # a newer plugin
    assert record.state(layout, "0.1.0", "other")[0] is record.State.OUTDATED  # another source, same version
    layout.record.write_text("{not json")
    assert record.read(layout) is None


def test_the_source_stamp_covers_what_the_installer_installs(tmp_path):
    for part in ("backend/tileprompt_backend/x.py", "backend/pyproject.toml", "backend/constraints.txt",
                 "resources/models/a/model.json", "plugin/dock.py"):
        (tmp_path / part).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / part).write_text("1")
    first = record.source_stamp(tmp_path)
    (tmp_path / "plugin/dock.py").write_text("2")  # the plugin's own code is not in the environment
    assert record.source_stamp(tmp_path) == first
    (tmp_path / "resources/models/a/model.json").write_text("2")
    assert record.source_stamp(tmp_path) != first
    assert len(record.source_stamp(PLUGIN_DIR)) == 16


# --- the task, with a stand-in for uv -----------------------------------------------------------------------------
FAKE_UV = '''#!{python}
"""A stand-in for uv: --version, venv, python install, and pip install that hangs (FAKE_UV=hang) or fails."""
import os, sys, time
from pathlib import Path
args = sys.argv[1:]
if args == ["--version"]:
    print("uv {version}")
elif args[0] == "venv":
    env = Path(args[-1])
    (env / "bin").mkdir(parents=True)
    (env / "pyvenv.cfg").write_text("home = /usr/bin\\n")
    print("Creating virtual environment at:", env, flush=True)
elif args[:2] == ["pip", "install"]:
    print("Resolved 78 packages in 0.4s", flush=True)
    print("Downloading torch (200.0MiB)", flush=True)
    if os.environ.get("FAKE_UV") == "fail":
        print("  x No solution found when resolving dependencies:", flush=True)
        print("error: torch==2.14.1 has no wheel for this platform", flush=True)
        sys.exit(1)
    Path(os.environ["UV_CACHE_DIR"]).mkdir(parents=True, exist_ok=True)
    (Path(os.environ["UV_CACHE_DIR"]) / "started").write_text(str(os.getpid()))
    time.sleep(120)
else:
    sys.exit("unexpected: " + " ".join(args))
'''


@pytest.fixture()
def release_layout(plugin, monkeypatch, tmp_path):
    """The plugin as installed from a release zip (no developer .venv beside it), the fake uv in a wheel folder."""
    from tileprompt_plugin.plugin import settings as settings_module
    from tileprompt_plugin.plugin.settings import Key

    monkeypatch.setattr(settings_module, "PLUGIN_DIR", tmp_path / "plugin-folder")
    fake_uv_wheel(tmp_path / "wheels", FAKE_UV.format(python=sys.executable, version=uv.UV_VERSION))
    s = plugin.settings
    s.set(Key.INSTALL_DIR, str(tmp_path / "backend"))
    s.set(Key.FIND_LINKS, str(tmp_path / "wheels"))
    s.set(Key.INSTALL_PYTHON, sys.executable)
    s.set(Key.INSTALL_CACHE, str(tmp_path / "uv-cache"))
    plugin.refresh_install_state()
    return locations.Layout(tmp_path / "backend")


def test_first_use_offers_the_installation(plugin, release_layout):
    panel = plugin.dock.install_panel
    assert panel.isVisibleTo(plugin.dock) and panel.action_button.text() == "Install backend"
    assert "not installed" in panel.message.text() and str(release_layout.root) in panel.message.text()
    plugin.start_backend()  # Start before installing says what to do, and starts nothing
    assert not plugin.launcher.running and plugin.dock.backend_state == "down"


def test_cancel_mid_install_leaves_no_environment_the_plugin_would_use(plugin, release_layout, monkeypatch,
                                                                      qgis_iface, task_statuses, tmp_path):
    from qgis.core import Qgis, QgsApplication, QgsTask

    monkeypatch.setenv("FAKE_UV", "hang")
    task = plugin.install_backend()
    task_id = QgsApplication.taskManager().taskId(task)
    panel = plugin.dock.install_panel
    assert panel.running and not panel.cancel_button.isHidden() and not panel.action_button.isEnabled()
    started = tmp_path / "uv-cache" / "started"
    # the lines and phases arrive as queued signals from the task's thread
    assert wait_until(lambda: started.is_file() and "torch" in panel.log_view.toPlainText()
                      and "Installing packages" in panel.phase.text(), 30), panel.log_view.toPlainText()
    env = next(release_layout.envs.iterdir())
    assert env.is_dir()
    assert 12 <= panel.progress.value() < 92

    panel.cancel_button.click()
    assert wait_until(lambda: plugin.install_task is None, 30)
    assert not env.exists() and not release_layout.record.exists()  # nothing half-made, nothing recorded
    pid = int(started.read_text())
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10)  # uv itself was stopped
    assert "Installation cancelled; nothing was changed" in panel.message.text()
    assert panel.action_button.text() == "Install backend" and panel.action_button.isEnabled()
    assert (task_id, QgsTask.TaskStatus.Complete) in task_statuses  # QGIS announces "Task failed" for Terminated
    assert (task_id, QgsTask.TaskStatus.Terminated) not in task_statuses
    assert not qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical)
    assert not (release_layout.root / "install.lock").exists()
    assert "Cancelled" in Path(task.log_path).read_text()


def test_a_failed_install_says_why_and_keeps_nothing(plugin, release_layout, monkeypatch, qgis_iface):
    from qgis.core import Qgis

    monkeypatch.setenv("FAKE_UV", "fail")
    plugin.install_backend()
    assert wait_until(lambda: plugin.install_task is None, 30)
    critical = " ".join(qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical))
    assert "failed" in critical and "has no wheel for this platform" in critical and ".log" in critical
    assert plugin.last_error and "has no wheel" in plugin.last_error
    assert not release_layout.record.exists() and not any(release_layout.envs.iterdir())
    panel = plugin.dock.install_panel
    assert panel.isVisibleTo(plugin.dock) and panel.action_button.text() == "Install backend"
    assert "has no wheel" in panel.message.text()


def test_with_an_nvidia_driver_the_dock_offers_the_cuda_build(plugin, release_layout, monkeypatch):
    from tileprompt_plugin.plugin import plugin as plugin_module
    from tileprompt_plugin.plugin.settings import Key

    panel = plugin.dock.install_panel
    assert not panel.gpu_check.isVisibleTo(panel)  # this machine has no NVIDIA driver
    monkeypatch.setattr(plugin_module, "nvidia_gpu", lambda: "NVIDIA T4 (driver 550.54)")
    monkeypatch.setenv("FAKE_UV", "fail")  # only the command line matters here
    plugin._gpu = None
    plugin.refresh_install_state()
    assert panel.gpu_check.isVisibleTo(panel) and "NVIDIA T4" in panel.gpu_check.text()
    assert not panel.gpu_check.isChecked()  # CPU unless chosen
    panel.gpu_check.setChecked(True)
    task = plugin.install_backend()
    assert plugin.settings.get(Key.INSTALL_COMPUTE) == "cuda" and not panel.gpu_check.isVisibleTo(panel)
    assert wait_until(lambda: plugin.install_task is None, 30)
    log = Path(task.log_path).read_text()
    assert "compute: cuda" in log and "--torch-backend auto" in log and "backend[gpu]" in log


def test_an_older_or_broken_installation_is_offered_an_update_or_repair(plugin, release_layout):
    from tileprompt_plugin.plugin.metadata import plugin_version

    panel = plugin.dock.install_panel
    make_env(release_layout, "old")
    record.write(release_layout, installation(env="old", version="0.0.9", source=plugin.source_stamp()))
    plugin.refresh_install_state()
    assert panel.isVisibleTo(plugin.dock) and panel.action_button.text() == "Update backend"
    assert "0.0.9" in panel.message.text() and plugin_version() in panel.message.text()
    record.write(release_layout, installation(env="old", version=plugin_version(), source=plugin.source_stamp()))
    plugin.refresh_install_state()
    assert not panel.isVisibleTo(plugin.dock)  # current: nothing to offer
    assert plugin.settings.backend_executable() == locations.venv_tileprompt(release_layout.env("old"))
    record.write(release_layout, installation(env="gone", version=plugin_version(), source=plugin.source_stamp()))
    plugin.refresh_install_state()
    assert panel.action_button.text() == "Repair backend"


def test_a_running_backend_of_another_version_is_reported(plugin, fake_backend, isolated, qgis_iface):
    from qgis.core import Qgis

    from conftest import connect

    connect(plugin, fake_backend, isolated)
    warnings = " ".join(qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning))
    assert "The backend is version 0.0-fake, this plugin 0.1.0" in warnings


def test_the_settings_page_saves_the_installation_choices(plugin, isolated, tmp_path):
    from tileprompt_plugin.plugin.installer.interpreters import Interpreter
    from tileprompt_plugin.plugin.options import BackendOptionsPage
    from tileprompt_plugin.plugin.settings import Key

    page = BackendOptionsPage(plugin, python=Interpreter("/usr/bin/python3.11", (3, 11, 2), "system"),
                              gpu="NVIDIA RTX A2000 (driver 535.54)", detect=False)
    assert "found: /usr/bin/python3.11 (Python 3.11.2)" in page.python_widget.lineEdit().placeholderText()
    assert page.compute_combo.count() == 2 and "RTX A2000" in page.compute_combo.itemText(1)
    page.folder_widget.setFilePath(str(tmp_path / "tp"))
    page.compute_combo.setCurrentIndex(1)
    page.extra_edit.setText("file:///mirror/simple")
    page.torch_combo.setEditText("cu126")
    page.apply()
    s = plugin.settings
    assert (s.get(Key.INSTALL_DIR), s.get(Key.INSTALL_COMPUTE), s.get(Key.EXTRA_INDEX_URLS),
            s.get(Key.TORCH_BACKEND)) == (str(tmp_path / "tp"), "cuda", "file:///mirror/simple", "cu126")
    assert plugin.install_plan().sources.torch_backend == "cu126" and plugin.install_plan().compute == "cuda"
    no_gpu = BackendOptionsPage(plugin, python=None, gpu=None, detect=False)
    assert "uv installs Python 3.11" in no_gpu.python_widget.lineEdit().placeholderText()
    assert "no NVIDIA driver answers now" in no_gpu.compute_combo.itemText(1)  # the saved choice stays visible
    page.deleteLater()
    no_gpu.deleteLater()


def test_the_settings_page_looks_for_python_only_when_shown(plugin, isolated, monkeypatch):
    """QGIS builds every Options page whenever its dialog opens, for whatever page the user wants."""
    from tileprompt_plugin.plugin import options

    calls = []
    monkeypatch.setattr(options, "find_python", lambda: calls.append("python"))
    monkeypatch.setattr(options, "nvidia_gpu", lambda: calls.append("gpu") or "NVIDIA T4 (driver 550)")
    page = options.BackendOptionsPage(plugin)
    assert calls == []
    page.show()
    assert calls == ["python", "gpu"] and "NVIDIA T4" in page.compute_combo.itemText(1)
    page.hide()
    page.show()
    assert len(calls) == 2  # once
    page.deleteLater()


def test_an_update_switches_to_the_new_environment_and_starts_it(plugin, release_layout, fake_venv):
    """What happens when an update succeeded: the backend this QGIS ran from the old environment is stopped,
    the old environment deleted, the new one (already recorded by the task) started."""
    import shutil

    from tileprompt_plugin.plugin.installer.task import InstallSucceeded

    old = make_env(release_layout, "20261101-090000")
    new = release_layout.env("20261128-101500")
    shutil.copytree(fake_venv, new)  # its bin/tileprompt is a stand-in for `tileprompt serve`
    record.write(release_layout, installation(env=new.name, source=plugin.source_stamp()))
    log = new / "install.log"
    plugin.launcher.start(locations.venv_tileprompt(new), plugin.settings.state_file(), log)  # as if running
    first = plugin.launcher.process.pid
    plugin._install_done(InstallSucceeded(installation(env=new.name, source=plugin.source_stamp()), log,
                                          replaced=old.name))
    assert not old.exists() and new.is_dir()
    assert wait_until(lambda: plugin.session.connected, 20) and plugin.launcher.process.pid != first
    assert not plugin.dock.install_panel.isVisibleTo(plugin.dock)  # current now
