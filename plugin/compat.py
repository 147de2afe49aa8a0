"""The few names that differ between QGIS 3.22 (what the tests run) and later 3.x / QGIS 4 (Qt6).

Everything else in the plugin uses API present in 3.22 and still present today, with fully qualified Qt enums
(``Qt.DockWidgetArea.RightDockWidgetArea``, never ``Qt.RightDockWidgetArea``), which PyQt5 5.15 and PyQt6 both
accept. Newer QGIS moved many enums into ``Qgis`` (``Qgis.LayerFilter``, ``Qgis.ProcessingSourceType`` ...) and
QGIS 4 drops the old spellings; each name below is resolved once, by trying the new spelling first.
"""

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsFeatureRequest,
    QgsMapLayerProxyModel,
    QgsMapLayerType,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsRasterFileWriter,
    QgsUnitTypes,
    QgsWkbTypes,
)


try:  # Qt6 moved QAction to QtGui; PyQt5 has it in QtWidgets
    from qgis.PyQt.QtGui import QAction  # noqa: F401
except ImportError:
    from qgis.PyQt.QtWidgets import QAction  # noqa: F401


def _first(*candidates):
    """The first ``(owner, "Dotted.path")`` that resolves; AttributeError when none does."""
    for owner, path in candidates:
        value = owner
        try:
            for part in path.split("."):
                value = getattr(value, part)
        except AttributeError:
            continue
        return value
    raise AttributeError("none of " + ", ".join(path for _, path in candidates) + " exists in this QGIS")


# Layer combo box filters (Qgis.LayerFilter from 3.34).
RASTER_LAYER_FILTER = _first((Qgis, "LayerFilter.RasterLayer"), (QgsMapLayerProxyModel, "Filter.RasterLayer"))
POLYGON_LAYER_FILTER = _first((Qgis, "LayerFilter.PolygonLayer"), (QgsMapLayerProxyModel, "Filter.PolygonLayer"))

# Layer and geometry types (Qgis.LayerType from 3.30, Qgis.GeometryType from 3.30).
RASTER_LAYER_TYPE = _first((Qgis, "LayerType.Raster"), (QgsMapLayerType, "RasterLayer"))
VECTOR_LAYER_TYPE = _first((Qgis, "LayerType.Vector"), (QgsMapLayerType, "VectorLayer"))
POLYGON_GEOMETRY = _first((Qgis, "GeometryType.Polygon"), (QgsWkbTypes, "GeometryType.PolygonGeometry"))

# Processing (Qgis.ProcessingSourceType / ProcessingAlgorithmFlag / ProcessingNumberParameterType from 3.36).
SOURCE_VECTOR_POLYGON = _first(
    (Qgis, "ProcessingSourceType.VectorPolygon"), (QgsProcessing, "SourceType.TypeVectorPolygon")
)
ALG_FLAG_CAN_CANCEL = _first(
    (Qgis, "ProcessingAlgorithmFlag.CanCancel"), (QgsProcessingAlgorithm, "Flag.FlagCanCancel")
)
ALG_FLAG_SUPPORTS_BATCH = _first(
    (Qgis, "ProcessingAlgorithmFlag.SupportsBatch"), (QgsProcessingAlgorithm, "Flag.FlagSupportsBatch")
)
NUMBER_INTEGER = _first(
    (Qgis, "ProcessingNumberParameterType.Integer"), (QgsProcessingParameterNumber, "Type.Integer")
)
NUMBER_DOUBLE = _first(
    (Qgis, "ProcessingNumberParameterType.Double"), (QgsProcessingParameterNumber, "Type.Double")
)
FILE_BEHAVIOR_FILE = _first(
    (Qgis, "ProcessingFileParameterBehavior.File"), (QgsProcessingParameterFile, "Behavior.File")
)
FILE_BEHAVIOR_FOLDER = _first(
    (Qgis, "ProcessingFileParameterBehavior.Folder"), (QgsProcessingParameterFile, "Behavior.Folder")
)
PARAM_FLAG_ADVANCED = _first(
    (Qgis, "ProcessingParameterFlag.Advanced"), (QgsProcessingParameterDefinition, "Flag.FlagAdvanced")
)

# Feature requests (Qgis.FeatureRequestFlag from 3.36).
NO_GEOMETRY = _first((Qgis, "FeatureRequestFlag.NoGeometry"), (QgsFeatureRequest, "Flag.NoGeometry"))

# Raster data types and writer results (Qgis.DataType is in 3.22; Qgis.RasterFileWriterResult from 3.38).
ARGB_DATA_TYPES = (Qgis.DataType.ARGB32, Qgis.DataType.ARGB32_Premultiplied)
WRITER_NO_ERROR = _first((Qgis, "RasterFileWriterResult.Success"), (QgsRasterFileWriter, "WriterError.NoError"))

# Distance units (Qgis.DistanceUnit from 3.30).
METERS = _first((Qgis, "DistanceUnit.Meters"), (QgsUnitTypes, "DistanceUnit.DistanceMeters"))

# CRS as WKT (Qgis.CrsWktVariant from 3.36).
WKT_PREFERRED = _first(
    (Qgis, "CrsWktVariant.Preferred"), (QgsCoordinateReferenceSystem, "WktVariant.WKT_PREFERRED")
)


def crs_to_string(crs):
    """A CRS as the backend's pyproj reads it: the authority id when there is one, else WKT."""
    authid = crs.authid()
    if authid and not authid.upper().startswith("USER:"):
        return authid
    return crs.toWkt(WKT_PREFERRED)


def exec_dialog(dialog):
    """QDialog.exec() (PyQt6, PyQt5 >= 5.15 both have it); exec_ only where exec is missing."""
    run = getattr(dialog, "exec", None) or getattr(dialog, "exec_")
    return run()
