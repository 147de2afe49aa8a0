"""QGIS entry point for the TilePrompt plugin.

QGIS imports this folder as a package and calls ``classFactory``. Keep it import-light: torch, numpy, rasterio
and the backend package never enter QGIS's interpreter; the plugin talks to the backend process instead.
"""


def classFactory(iface):  # noqa: N802 (name fixed by QGIS)
    # Imported here so that QGIS scanning the plugin folder costs nothing. The form matters: qgis.utils records
    # the modules named by each plugin import so it can purge them on unload, and "from .plugin import plugin"
    # names both plugin/ and plugin/plugin.py, so a reload re-executes both.
    from .plugin import plugin

    return plugin.TilePromptPlugin(iface)
