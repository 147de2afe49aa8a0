"""backend/constraints.txt, the pins the in-QGIS installer installs, agrees with what the backend asks for."""

import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]


def pins() -> dict[str, list[tuple[str, object]]]:
    """name -> [(version, marker)] of the constraints file."""
    found: dict[str, list] = {}
    for line in (REPO / "backend" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", line
        found.setdefault(canonicalize_name(req.name), []).append((spec.version, req.marker))
    return found


def test_every_dependency_is_pinned_within_what_the_backend_asks_for():
    """A dependency added or raised in pyproject.toml needs `scripts/lock-backend`: the installer would install
    an unpinned or an excluded version otherwise."""
    project = tomllib.loads((REPO / "backend" / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["cpu"] + \
        project["optional-dependencies"]["gpu"]
    locked = pins()
    env = {**default_environment(), "python_full_version": "3.11.2", "python_version": "3.11", "sys_platform": "linux"}
    for text in wanted:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not in backend/constraints.txt: run scripts/lock-backend"
        versions = [v for v, marker in locked[name] if marker is None or marker.evaluate(env)]
        assert versions and all(req.specifier.contains(v, prereleases=True) for v in versions), \
            f"{text}: pinned {versions}; run scripts/lock-backend"


def test_torch_is_pinned_as_scripts_setup_pins_it():
    setup = (REPO / "scripts" / "setup").read_text()
    torch_pins = re.search(r'^TORCH_PINS="(.*)"$', setup, re.MULTILINE).group(1).split()
    locked = pins()
    for pin in torch_pins:
        name, version = pin.split("==")
        assert [v for v, _ in locked[name]] == [version], pin
