"""The Processing provider ``tileprompt``: the dock's operations as algorithms (toolbox, batch, models, scripts)."""

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .algorithms import ALGORITHMS
from .i18n import tr
from .settings import ICON_PATH

PROVIDER_ID = "tileprompt"


class TilePromptProvider(QgsProcessingProvider):
    def __init__(self, session):
        super().__init__()
        self.session = session

    def id(self):
        return PROVIDER_ID

    def name(self):
        return tr("TilePrompt")

    def longName(self):  # noqa: N802
        return tr("TilePrompt: classify and search raster tiles with text prompts")

    def icon(self):
        return QIcon(str(ICON_PATH))

    def loadAlgorithms(self):  # noqa: N802
        for algorithm in ALGORITHMS:
            self.addAlgorithm(algorithm(self.session))

    def supportedOutputVectorLayerExtensions(self):  # noqa: N802
        # The backend writes GeoPackages (layer + run table); other formats would need a conversion step.
        return ["gpkg"]

    def supportedOutputRasterLayerExtensions(self):  # noqa: N802
        return ["tif"]
