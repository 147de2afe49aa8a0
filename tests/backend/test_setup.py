"""scripts/setup --backend-only makes (or keeps) the backend environment without asking for QGIS."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_backend_only_needs_no_qgis():
    done = subprocess.run(["bash", str(REPO / "scripts" / "setup"), "--backend-only"], capture_output=True,
                          text=True, timeout=1800, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "backend only" in done.stdout and "backend venv (.venv)" in done.stdout
    assert "QGIS" not in done.stdout and ".venv-plugin" not in done.stdout  # neither step ran
    bad = subprocess.run(["bash", str(REPO / "scripts" / "setup"), "--frontend"], capture_output=True, text=True,
                         cwd=REPO)
    assert bad.returncode == 2 and "--backend-only" in bad.stderr
