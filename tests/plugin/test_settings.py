"""QgsSettings under one prefix, typed by each key's default; per-project state survives saving the project."""

import pytest
from qgis.core import QgsProject, QgsSettings

from tileprompt_plugin.plugin.settings import PREFIX, Key, ProjectState, Settings, default_state_file

VALUES = {
    Key.BACKEND_VENV: "/opt/tileprompt/.venv",
    Key.BACKEND_PORT: 8765,
    Key.STATE_FILE: "/tmp/tp/server.json",
    Key.AUTO_ATTACH: False,
    Key.START_TIMEOUT_S: 30,
    Key.CACHE_DIR: "/tmp/tp-cache",
    Key.DEFAULT_MODEL: "clip-vit-b16-openai",
    Key.REQUEST_TIMEOUT_S: 2.5,
    Key.POLL_INTERVAL_MS: 100,
    Key.INSTALL_DIR: "/srv/tileprompt/backend",
    Key.INSTALL_PYTHON: "/usr/bin/python3.12",
    Key.INSTALL_COMPUTE: "cuda",
    Key.INDEX_URL: "https://mirror.example.org/simple",
    Key.EXTRA_INDEX_URLS: "https://a.example.org/simple https://b.example.org/simple",
    Key.FIND_LINKS: "/srv/wheels",
    Key.TORCH_BACKEND: "none",
    Key.INSTALL_CACHE: "/srv/uv-cache",
    Key.INDEX_STRATEGY: "unsafe-best-match",
}


def test_every_key_is_covered_and_prefixed():
    assert set(VALUES) == set(Key)
    assert all(k.name_in_settings.startswith(PREFIX + "/") for k in Key)
    assert len({k.name_in_settings for k in Key}) == len(Key)


@pytest.mark.parametrize("key", list(Key), ids=lambda k: k.name)
def test_defaults_come_back_with_their_type(isolated, key):
    value = Settings().get(key)
    assert value == key.default and type(value) is type(key.default)


@pytest.mark.parametrize("key", list(Key), ids=lambda k: k.name)
def test_round_trip_through_a_fresh_qgssettings(isolated, key):
    Settings().set(key, VALUES[key])
    QgsSettings().sync()
    value = Settings(QgsSettings()).get(key)
    assert value == VALUES[key] and type(value) is type(key.default)


def test_bools_survive_as_bools_not_ints_or_strings(isolated):
    settings = Settings()
    for flag in (False, True, False):
        settings.set(Key.AUTO_ATTACH, flag)
        assert settings.get(Key.AUTO_ATTACH) is flag
    # what an INI file holds after a restart: the text "false"
    QgsSettings().setValue(Key.AUTO_ATTACH.name_in_settings, "false")
    assert Settings().get(Key.AUTO_ATTACH) is False


def test_wrong_types_are_refused(isolated):
    settings = Settings()
    with pytest.raises(TypeError):
        settings.set(Key.BACKEND_PORT, "8765")
    with pytest.raises(TypeError):
        settings.set(Key.BACKEND_PORT, True)  # a bool is an int in Python, not a port
    with pytest.raises(TypeError):
        settings.set(Key.AUTO_ATTACH, 1)
    settings.set(Key.REQUEST_TIMEOUT_S, 3)  # an int where a float is wanted is fine
    assert settings.get(Key.REQUEST_TIMEOUT_S) == 3.0


def test_reset_returns_to_the_default(isolated):
    settings = Settings()
    settings.set(Key.BACKEND_PORT, 9000)
    settings.reset(Key.BACKEND_PORT)
    assert settings.get(Key.BACKEND_PORT) == 0


def test_derived_locations(isolated, monkeypatch, tmp_path):
    from tileprompt_plugin.plugin.settings import PLUGIN_DIR

    settings = Settings()
    assert settings.backend_executable() == PLUGIN_DIR / ".venv" / "bin" / "tileprompt"
    settings.set(Key.BACKEND_VENV, str(tmp_path / "venv"))
    assert settings.backend_executable() == tmp_path / "venv" / "bin" / "tileprompt"
    assert settings.state_file() == tmp_path / "home" / "server.json" == default_state_file()
    monkeypatch.delenv("TILEPROMPT_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert settings.state_file() == tmp_path / "data" / "tileprompt" / "server.json"
    settings.set(Key.STATE_FILE, str(tmp_path / "s.json"))
    assert settings.state_file() == tmp_path / "s.json"
    assert settings.cache_dir() == tmp_path / "cache" / "tileprompt-plugin"
    settings.set(Key.CACHE_DIR, str(tmp_path / "c"))
    assert settings.cache_dir() == tmp_path / "c"


def test_project_state_survives_save_and_reopen(qgis_new_project, tmp_path):
    state = ProjectState()
    state.save_prompt_set("Rivers", "river | stream\nlake")
    state.save_prompt_set("Towns", "town\nvillage")
    state.delete_prompt_set("Towns")
    state.set_dock_state({"prompts": "a\nb", "tile_px": 64, "multi_label": True})
    path = str(tmp_path / "p.qgz")
    assert QgsProject.instance().write(path)
    QgsProject.instance().clear()
    assert ProjectState().prompt_sets() == {}
    assert QgsProject.instance().read(path)
    state = ProjectState()
    assert state.prompt_sets() == {"Rivers": "river | stream\nlake"}
    assert state.dock_state() == {"prompts": "a\nb", "tile_px": 64, "multi_label": True}


def test_project_state_ignores_garbage(qgis_new_project):
    QgsProject.instance().writeEntry("TilePrompt", "promptSets", "{not json")
    QgsProject.instance().writeEntry("TilePrompt", "dockState", "[1, 2]")
    assert ProjectState().prompt_sets() == {}
    assert ProjectState().dock_state() == {}
