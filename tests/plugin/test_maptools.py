"""The map tools, driven by mouse and key events as QGIS sends them; they hand the canvas back when done."""

import pytest
from qgis.core import QgsCoordinateReferenceSystem, QgsPointXY, QgsRectangle
from qgis.gui import QgsMapMouseEvent, QgsMapToolPan
from qgis.PyQt.QtCore import QEvent, QPoint, Qt
from qgis.PyQt.QtGui import QKeyEvent

from tileprompt_plugin.plugin.maptools import PolygonTool, RectangleTool, Sketches


@pytest.fixture()
def canvas(qgis_canvas):
    qgis_canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:32633"))
    qgis_canvas.resize(600, 600)
    qgis_canvas.setExtent(QgsRectangle(330000, 5815000, 336000, 5821000))
    qgis_canvas.refresh()
    pan = QgsMapToolPan(qgis_canvas)
    qgis_canvas.setMapTool(pan)
    yield qgis_canvas
    qgis_canvas.unsetMapTool(pan)


def mouse(canvas, kind, x, y, button=Qt.MouseButton.LeftButton):
    return QgsMapMouseEvent(canvas, kind, QPoint(x, y), button, button, Qt.KeyboardModifier.NoModifier)


def capture(tool):
    got = []
    tool.drawn.connect(lambda geometry, crs: got.append((geometry, crs)))
    return got


def map_point(canvas, x, y) -> QgsPointXY:
    return canvas.getCoordinateTransform().toMapCoordinates(x, y)


def test_rectangle_tool_emits_the_dragged_rectangle_and_restores_the_previous_tool(canvas):
    previous = canvas.mapTool()
    tool = RectangleTool(canvas)
    got = capture(tool)
    tool.start()
    assert canvas.mapTool() is tool
    tool.canvasPressEvent(mouse(canvas, QEvent.Type.MouseButtonPress, 100, 100))
    tool.canvasMoveEvent(mouse(canvas, QEvent.Type.MouseMove, 250, 300))
    tool.canvasReleaseEvent(mouse(canvas, QEvent.Type.MouseButtonRelease, 250, 300))
    assert len(got) == 1
    geometry, crs = got[0]
    a, b = map_point(canvas, 100, 100), map_point(canvas, 250, 300)
    box = geometry.boundingBox()
    assert box.xMinimum() == pytest.approx(a.x()) and box.xMaximum() == pytest.approx(b.x())
    assert box.yMaximum() == pytest.approx(a.y()) and box.yMinimum() == pytest.approx(b.y())
    assert crs.authid() == "EPSG:32633"
    assert canvas.mapTool() is previous


def test_polygon_tool_clicks_closes_and_undoes(canvas):
    previous = canvas.mapTool()
    tool = PolygonTool(canvas)
    got = capture(tool)
    tool.start()
    for x, y in ((100, 100), (300, 120), (999, 999), (280, 320)):
        tool.canvasReleaseEvent(mouse(canvas, QEvent.Type.MouseButtonRelease, x, y))
        if (x, y) == (999, 999):
            tool.keyPressEvent(QKeyEvent(QEvent.Type.KeyPress, Qt.Key.Key_Backspace, Qt.KeyboardModifier.NoModifier))
    tool.canvasMoveEvent(mouse(canvas, QEvent.Type.MouseMove, 150, 300))
    assert tool.band is not None and tool.band.numberOfVertices() >= 4
    tool.canvasReleaseEvent(mouse(canvas, QEvent.Type.MouseButtonRelease, 0, 0, Qt.MouseButton.RightButton))
    assert len(got) == 1
    geometry, _crs = got[0]
    ring = geometry.asPolygon()[0]
    assert len(ring) == 4  # 3 vertices, closed
    assert ring[1] == map_point(canvas, 300, 120)
    assert canvas.mapTool() is previous
    tool.remove_band()


def test_polygon_tool_needs_three_vertices_and_esc_cancels(canvas):
    tool = PolygonTool(canvas)
    got = capture(tool)
    tool.start()
    tool.canvasReleaseEvent(mouse(canvas, QEvent.Type.MouseButtonRelease, 100, 100))
    tool.canvasReleaseEvent(mouse(canvas, QEvent.Type.MouseButtonRelease, 200, 100))
    tool.keyPressEvent(QKeyEvent(QEvent.Type.KeyPress, Qt.Key.Key_Return, Qt.KeyboardModifier.NoModifier))
    assert got == [] and canvas.mapTool() is tool
    tool.keyPressEvent(QKeyEvent(QEvent.Type.KeyPress, Qt.Key.Key_Escape, Qt.KeyboardModifier.NoModifier))
    assert got == [] and tool.points == [] and canvas.mapTool() is not tool
    tool.remove_band()


def test_sketches_show_replace_and_clear(canvas):
    from qgis.core import QgsGeometry
    from qgis.gui import QgsRubberBand

    def bands():
        return [i for i in canvas.scene().items() if isinstance(i, QgsRubberBand)]

    before = len(bands())
    sketches = Sketches(canvas)
    crs = canvas.mapSettings().destinationCrs()
    sketches.show("area", QgsGeometry.fromRect(QgsRectangle(330000, 5815000, 331000, 5816000)), crs)
    sketches.show("area", QgsGeometry.fromRect(QgsRectangle(331000, 5815000, 332000, 5816000)), crs)
    sketches.show("query", QgsGeometry.fromRect(QgsRectangle(332000, 5815000, 333000, 5816000)), crs)
    assert len(bands()) == before + 2
    sketches.clear()
    assert len(bands()) == before
