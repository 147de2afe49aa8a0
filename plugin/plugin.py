"""The plugin object QGIS creates through ``classFactory``: one action, in a toolbar and the Raster menu."""

from pathlib import Path

from qgis.core import Qgis
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

PLUGIN_NAME = "TilePrompt"
ICON_PATH = Path(__file__).resolve().parent.parent / "resources" / "icon.png"

# Until the dock lands, the action explains where things stand and how to use the backend directly.
NOT_YET_MESSAGE = (
    "The TilePrompt dock arrives with the UI work. Meanwhile, classify tiles with the backend CLI: "
    "run scripts/setup once in the plugin folder, then .venv/bin/tileprompt --help."
)


class TilePromptPlugin:
    """Symmetric lifecycle: ``unload`` removes exactly what ``initGui`` added, so reloading leaves no trace."""

    def __init__(self, iface):
        self.iface = iface
        self.action = None

    def initGui(self):  # noqa: N802 (QGIS API)
        self.action = QAction(QIcon(str(ICON_PATH)), PLUGIN_NAME, self.iface.mainWindow())
        self.action.setObjectName("tilepromptAction")
        self.action.setToolTip("TilePrompt: classify and search raster tiles with text prompts")
        self.action.triggered.connect(self.run)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToRasterMenu(PLUGIN_NAME, self.action)

    def unload(self):
        if self.action is None:
            return
        self.iface.removePluginRasterMenu(PLUGIN_NAME, self.action)
        self.iface.removeToolBarIcon(self.action)
        # deleteLater, not del: the main window owns the action on the C++ side.
        self.action.deleteLater()
        self.action = None

    def run(self):
        self.iface.messageBar().pushMessage(PLUGIN_NAME, NOT_YET_MESSAGE, level=Qgis.MessageLevel.Info, duration=15)
