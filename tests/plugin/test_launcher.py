"""Starting the bundled backend as a child process: readiness by state file, failures with the log tail, env."""

import os

import pytest

from conftest import wait_until
from tileprompt_plugin.plugin.client import BackendUnavailable
from tileprompt_plugin.plugin.launcher import BackendLauncher, backend_environment, tail
from tileprompt_plugin.plugin.settings import Key


def test_start_and_stop(fake_venv, tmp_path):
    launcher = BackendLauncher()
    started = []
    launcher.started.connect(started.append)
    state, log = tmp_path / "state" / "server.json", tmp_path / "logs" / "backend.log"
    state.parent.mkdir()
    state.write_text('{"host": "127.0.0.1", "port": 1, "token": "stale", "pid": 1}')  # a crashed run's file
    launcher.start(fake_venv / "bin" / "tileprompt", state, log, port=0, timeout_s=20)
    assert launcher.starting and launcher.running
    assert wait_until(lambda: started, 20)
    connection = started[0]
    assert connection.pid == launcher.process.pid and connection.token != "stale"
    assert "fake serve listening" in tail(log)
    assert "serve --port 0 --state-file" in log.read_text()
    launcher.stop()
    assert not launcher.running and not state.exists()
    assert "fake serve: stopping" in tail(log)


def test_a_backend_that_exits_reports_the_log_tail(fake_venv, tmp_path, monkeypatch):
    launcher = BackendLauncher()
    failures = []
    launcher.failed.connect(failures.append)
    env = backend_environment(extra={"FAKE_SERVE_FAIL": "1"})
    launcher.start(fake_venv / "bin" / "tileprompt", tmp_path / "s.json", tmp_path / "b.log", env=env)
    assert wait_until(lambda: failures, 20)
    assert "exited with code 3" in failures[0] and "failing on purpose" in failures[0]
    assert not launcher.running


def test_a_backend_that_never_gets_ready_is_stopped(fake_venv, tmp_path):
    launcher = BackendLauncher()
    failures = []
    launcher.failed.connect(failures.append)
    env = backend_environment(extra={"FAKE_SERVE_DELAY": "30"})
    launcher.start(fake_venv / "bin" / "tileprompt", tmp_path / "s.json", tmp_path / "b.log", timeout_s=1, env=env)
    pid = launcher.process.pid
    assert wait_until(lambda: failures, 10)
    assert "did not become ready" in failures[0] and not launcher.running
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_missing_backend_says_to_run_setup(tmp_path):
    with pytest.raises(BackendUnavailable, match="scripts/setup"):
        BackendLauncher().start(tmp_path / "venv" / "bin" / "tileprompt", tmp_path / "s.json", tmp_path / "b.log")


def test_the_child_does_not_inherit_qgis_python_and_gdal_paths():
    env = backend_environment({"PYTHONPATH": "/usr/share/qgis/python", "GDAL_DATA": "/usr/share/gdal",
                               "PROJ_LIB": "/usr/share/proj", "PATH": "/usr/bin", "TILEPROMPT_HOME": "/h"})
    assert env == {"PATH": "/usr/bin", "TILEPROMPT_HOME": "/h", "PYTHONUNBUFFERED": "1"}


def test_start_from_the_dock_and_stop(plugin, fake_venv, qgis_iface):
    plugin.settings.set(Key.BACKEND_VENV, str(fake_venv))
    plugin.dock.start_button.click()
    assert plugin.dock.backend_state == "starting" and not plugin.dock.start_button.isEnabled()
    assert wait_until(lambda: plugin.dock.backend_state == "up" and plugin.dock.model_combo.count() == 3, 20)
    assert plugin.dock.stop_button.isEnabled()
    assert "started by this QGIS" in plugin.copy_diagnostics()
    plugin.dock.stop_button.click()
    assert plugin.dock.backend_state == "down" and not plugin.launcher.running


def test_start_attaches_when_a_backend_already_runs(plugin, fake_backend, isolated):
    fake_backend.write_state_file(isolated / "home" / "server.json", pid=os.getpid())
    plugin.start_backend()
    assert plugin.launcher.process is None
    assert wait_until(lambda: plugin.session.connected, 10)


def test_start_without_a_backend_venv_explains(plugin, qgis_iface, isolated):
    from qgis.core import Qgis

    plugin.settings.set(Key.BACKEND_VENV, str(isolated / "nowhere"))
    plugin.start_backend()
    assert plugin.dock.backend_state == "error"
    assert any("scripts/setup" in m for m in qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical))


def test_the_backend_gets_the_proxy_qgis_uses(plugin, fake_venv, monkeypatch):
    from qgis.core import QgsSettings

    from tileprompt_plugin.plugin.launcher import proxy_environment

    settings = QgsSettings()
    keys = ("proxy/proxyEnabled", "proxy/proxyType", "proxy/proxyHost", "proxy/proxyPort", "proxy/proxyUser",
            "proxy/proxyPassword", "proxy/noProxyUrls")
    before = {k: settings.value(k) for k in keys if settings.contains(k)}
    assert proxy_environment() == {}  # no proxy configured: the environment is left as it is
    for key, value in zip(keys, (True, "HttpProxy", "proxy.example", "3128", "ana", "p@ss:word",
                                 ["https://intranet.example/maps", "10.1.2.3"])):
        settings.setValue(key, value)
    try:
        env = proxy_environment()
        assert env["https_proxy"] == env["HTTP_PROXY"] == "http://ana:p%40ss%3Aword@proxy.example:3128"
        assert env["no_proxy"] == "127.0.0.1,localhost,::1,intranet.example,10.1.2.3" == env["NO_PROXY"]
        started = {}
        monkeypatch.setattr(plugin.launcher, "start", lambda *a, **kw: started.update(kw))
        plugin.settings.set(Key.BACKEND_VENV, str(fake_venv))
        plugin.start_backend()
        assert started["env"]["https_proxy"] == env["https_proxy"] and "PYTHONPATH" not in started["env"]
    finally:
        for key in keys:
            settings.remove(key)
        for key, value in before.items():
            settings.setValue(key, value)
