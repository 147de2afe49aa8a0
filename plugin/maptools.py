"""Map tools: drag a rectangle, or click a polygon (right click or Enter closes it, Esc cancels).

Each tool emits ``drawn(QgsGeometry, QgsCoordinateReferenceSystem)`` in the canvas CRS and hands the canvas back
to the tool that was active before. :class:`Sketches` keeps what was drawn visible (the classify area and the
search query, in two colours) and removes its rubber bands from the canvas on ``clear``/unload.
"""

from __future__ import annotations

from qgis.core import QgsGeometry, QgsPointXY, QgsRectangle
from qgis.gui import QgsMapTool, QgsMapToolExtent, QgsRubberBand
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor, QCursor

from . import compat


def _rubber_band(canvas, color: QColor) -> QgsRubberBand:
    band = QgsRubberBand(canvas, compat.POLYGON_GEOMETRY)
    band.setStrokeColor(color)
    fill = QColor(color)
    fill.setAlpha(40)
    band.setFillColor(fill)
    band.setWidth(2)
    return band


class _Restoring:
    """Mixin: remember the canvas's previous tool on activation, hand the canvas back after drawing."""

    def start(self):
        current = self.canvas().mapTool()
        self._previous = current if current is not self else None
        self.canvas().setMapTool(self)

    def finish(self):
        canvas = self.canvas()
        if canvas.mapTool() is self:
            previous = getattr(self, "_previous", None)
            if previous is not None:
                canvas.setMapTool(previous)
            else:
                canvas.unsetMapTool(self)
        self._previous = None


class RectangleTool(_Restoring, QgsMapToolExtent):
    """Drag a rectangle; emits ``drawn`` with the rectangle as a polygon geometry."""

    drawn = pyqtSignal(QgsGeometry, object)

    def __init__(self, canvas):
        super().__init__(canvas)
        self.setObjectName("tilepromptRectangleTool")
        self._previous = None
        self.extentChanged.connect(self._on_extent)

    def _on_extent(self, rect: QgsRectangle):
        if rect.isEmpty():
            return
        crs = self.canvas().mapSettings().destinationCrs()
        self.clearRubberBand()
        self.finish()
        self.drawn.emit(QgsGeometry.fromRect(rect), crs)


class PolygonTool(_Restoring, QgsMapTool):
    """Left click adds a vertex, right click or Enter closes the polygon (3+ vertices), Backspace undoes, Esc
    cancels."""

    drawn = pyqtSignal(QgsGeometry, object)

    def __init__(self, canvas):
        super().__init__(canvas)
        self.setObjectName("tilepromptPolygonTool")
        self._previous = None
        self.points: list[QgsPointXY] = []
        self.band = None
        self.setCursor(QCursor(Qt.CursorShape.CrossCursor))

    def _ensure_band(self):
        if self.band is None:
            self.band = _rubber_band(self.canvas(), QColor(255, 140, 0))
        return self.band

    def _redraw(self, moving: QgsPointXY | None = None):
        band = self._ensure_band()
        points = list(self.points) + ([moving] if moving is not None else [])
        band.reset(compat.POLYGON_GEOMETRY)
        if points:
            band.setToGeometry(QgsGeometry.fromPolygonXY([points]), None)

    def canvasMoveEvent(self, event):  # noqa: N802 (QGIS API)
        if self.points:
            self._redraw(self.toMapCoordinates(event.pos()))

    def canvasReleaseEvent(self, event):  # noqa: N802
        if event.button() == Qt.MouseButton.RightButton:
            self.close_polygon()
        elif event.button() == Qt.MouseButton.LeftButton:
            self.points.append(self.toMapCoordinates(event.pos()))
            self._redraw()

    def keyPressEvent(self, event):  # noqa: N802
        key = event.key()
        if key == Qt.Key.Key_Escape:
            self.reset()
            self.finish()
        elif key in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
            self.close_polygon()
        elif key == Qt.Key.Key_Backspace and self.points:
            self.points.pop()
            self._redraw()

    def close_polygon(self):
        if len(self.points) < 3:
            return
        geometry = QgsGeometry.fromPolygonXY([list(self.points)])
        crs = self.canvas().mapSettings().destinationCrs()
        self.reset()
        self.finish()
        if geometry.isGeosValid() or not geometry.makeValid().isEmpty():
            self.drawn.emit(geometry if geometry.isGeosValid() else geometry.makeValid(), crs)

    def reset(self):
        self.points = []
        if self.band is not None:
            self.band.reset(compat.POLYGON_GEOMETRY)

    def deactivate(self):
        self.reset()
        super().deactivate()

    def remove_band(self):
        if self.band is not None:
            self.canvas().scene().removeItem(self.band)
            self.band = None


class Sketches:
    """The drawn area (blue) and search query (orange) kept on the canvas until replaced or cleared."""

    COLORS = {"area": QColor(30, 120, 255), "query": QColor(255, 140, 0)}

    def __init__(self, canvas):
        self.canvas = canvas
        self.bands: dict[str, QgsRubberBand] = {}

    def show(self, key: str, geometry: QgsGeometry, crs) -> None:
        band = self.bands.get(key)
        if band is None:
            band = self.bands[key] = _rubber_band(self.canvas, self.COLORS.get(key, QColor(255, 0, 0)))
        band.reset(compat.POLYGON_GEOMETRY)
        band.setToGeometry(geometry, crs)

    def hide(self, key: str) -> None:
        band = self.bands.pop(key, None)
        if band is not None:
            self.canvas.scene().removeItem(band)

    def clear(self) -> None:
        for key in list(self.bands):
            self.hide(key)
