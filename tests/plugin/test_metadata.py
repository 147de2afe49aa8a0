"""metadata.txt, icon and licence: what QGIS and plugins.qgis.org read before any plugin code runs."""

import configparser
import re

import pytest
from qgis.PyQt.QtGui import QImage

from conftest import PLUGIN_DIR

MANDATORY = ["name", "qgisMinimumVersion", "description", "about", "version", "author", "email", "repository"]
RECOMMENDED = [
    "qgisMaximumVersion", "tracker", "homepage", "tags", "category", "icon", "experimental", "deprecated",
    "changelog", "license", "hasProcessingProvider", "server",
]
EXPECTED = {
    "name": "TilePrompt",
    "qgisMinimumVersion": "3.22",
    "qgisMaximumVersion": "3.99",
    "version": "0.1.0",
    "author": "TilePrompt developers",
    "email": "tileprompt@users.noreply.github.com",
    "repository": "https://github.com/tileprompt/tileprompt",
    "tracker": "https://github.com/tileprompt/tileprompt/issues",
    "homepage": "https://github.com/tileprompt/tileprompt/tree/main/docs",
    "category": "Raster",
    "icon": "resources/icon.png",
    "experimental": "True",
    "deprecated": "False",
    "license": "GPL-2.0-or-later",
    "hasProcessingProvider": "yes",
    "server": "False",
}


@pytest.fixture(scope="module")
def metadata():
    # Parsed the way qgis.utils.findPlugins does it (default interpolation, so a stray percent sign fails here).
    parser = configparser.ConfigParser()
    with open(PLUGIN_DIR / "metadata.txt", encoding="utf-8") as f:
        parser.read_file(f)
    section = parser["general"]
    return {key: section.get(key) for key in section}


@pytest.mark.parametrize("key", MANDATORY + RECOMMENDED)
def test_field_is_present_and_not_empty(metadata, key):
    # configparser lower-cases keys; QGIS looks them up case-insensitively too.
    assert metadata.get(key.lower(), "").strip(), f"metadata.txt lacks {key}"


@pytest.mark.parametrize("key, value", EXPECTED.items())
def test_field_value(metadata, key, value):
    assert metadata[key.lower()] == value


def test_version_is_semantic(metadata):
    assert re.fullmatch(r"\d+\.\d+\.\d+", metadata["version"])


def test_about_names_the_backend_requirement(metadata):
    about = metadata["about"]
    assert "backend" in about and "Install backend" in about and "not the plugin folder" in about
    assert "No machine-learning library" in about


def test_icon_is_a_valid_png(metadata):
    icon = PLUGIN_DIR / metadata["icon"]
    assert icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = QImage(str(icon))
    assert not image.isNull() and image.width() >= 32 and image.width() == image.height()


def test_license_is_gpl2():
    text = (PLUGIN_DIR / "LICENSE").read_text(encoding="utf-8")
    assert "GNU GENERAL PUBLIC LICENSE" in text and "Version 2, June 1991" in text
