"""scripts/package: the release zip holds what the plugin and its installer need, passes the plugin repository's
validator rules, and Bandit finds nothing of medium or high severity in it (the plugin repository's own scan)."""

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import zipfile

import pytest

from conftest import PLUGIN_DIR


def load_package_script():
    loader = importlib.machinery.SourceFileLoader("tileprompt_package", str(PLUGIN_DIR / "scripts" / "package"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def package():
    return load_package_script()


@pytest.fixture(scope="module")
def release(package, tmp_path_factory):
    return package.build(tmp_path_factory.mktemp("dist"))


def test_the_zip_passes_the_plugin_repository_checks(package, release):
    assert release.name == "tileprompt-0.1.0.zip"
    assert package.check(release) == []


def test_the_zip_holds_the_plugin_and_the_backend_source_only(release):
    with zipfile.ZipFile(release) as archive:
        infos = archive.infolist()
    names = [i.filename for i in infos]
    assert {n.split("/")[0] for n in names} == {"tileprompt"}
    for needed in ("__init__.py", "metadata.txt", "LICENSE", "plugin/plugin.py", "plugin/installer/task.py",
                   "resources/icon.png", "resources/styles/palette.json", "backend/pyproject.toml",
                   "backend/constraints.txt", "backend/tileprompt_backend/cli.py"):
        assert f"tileprompt/{needed}" in names, needed
    for unwanted in ("tests/", "benchmarks/", "scripts/", ".ci/", "docs/", ".venv", "__pycache__", ".pyc"):
        assert not any(unwanted in n for n in names), unwanted
    assert all((i.external_attr >> 16) & 0o777 == 0o644 for i in infos)  # no executable bits to rely on


def test_the_checks_catch_what_the_repository_refuses(package, release, tmp_path):
    def variant(name, edit):
        out = tmp_path / name
        with zipfile.ZipFile(release) as src, zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                data = edit(info.filename, src.read(info.filename))
                if data is not None:
                    dst.writestr(info, data)
        return package.check(out)

    def placeholder(name, data):
        return data.replace(b"users.noreply.github.com", b"example.org") if name.endswith("metadata.txt") else data

    assert any("email" in p for p in variant("email.zip", placeholder))
    assert any("LICENSE is missing" in p for p in variant("nolicense.zip",
                                                          lambda n, d: None if n.endswith("/LICENSE") else d))
    broken = tmp_path / "extra.zip"
    with zipfile.ZipFile(release) as src, zipfile.ZipFile(broken, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info.filename))
        dst.writestr("tileprompt/plugin/__pycache__/x.cpython-311.pyc", b"\0")
        dst.writestr("other/readme.txt", b"x")
    problems = package.check(broken)
    assert any("forbidden folder" in p for p in problems) and any("compiled" in p for p in problems)
    assert any("one top folder" in p for p in problems)


def test_bandit_finds_no_medium_or_high_issue(release, tmp_path):
    with zipfile.ZipFile(release) as archive:
        archive.extractall(tmp_path)
    done = subprocess.run([sys.executable, "-m", "bandit", "-r", str(tmp_path / "tileprompt"), "-ll", "-f", "json",
                           "-q"], capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(done.stdout)
    findings = [f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}" for r in report["results"]]
    assert findings == [] and done.returncode == 0, findings
