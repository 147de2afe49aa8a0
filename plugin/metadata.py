"""The plugin's own ``metadata.txt``: version, home page, tracker (one reader for diagnostics, installer, Help)."""

from __future__ import annotations

import configparser
from functools import lru_cache

from .settings import PLUGIN_DIR

#: The documentation page the Help button opens, relative to the repository's web address.
DOCS_PATH = "blob/main/docs/plugin.md"


@lru_cache(maxsize=1)
def _general() -> dict:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(PLUGIN_DIR / "metadata.txt", encoding="utf-8")
        return dict(parser["general"])
    except (configparser.Error, KeyError):
        return {}


def plugin_version() -> str:
    return _general().get("version", "?")


def homepage() -> str:
    return _general().get("homepage", "")


def tracker() -> str:
    return _general().get("tracker", "")


def docs_url() -> str:
    """Where the Help button points: the plugin documentation in the repository named by metadata.txt."""
    repository = _general().get("repository", "").rstrip("/")
    return f"{repository}/{DOCS_PATH}" if repository else homepage()
