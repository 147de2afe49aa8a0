"""Layers the backend cannot open by path are exported here (GeoTIFF at the model's GSD) before the job."""

from pathlib import Path

import pytest
from qgis.core import QgsProject, QgsRasterLayer
from qgis.PyQt.QtGui import QColor, QImage

from conftest import connect, wait_until, write_raster
from tileprompt_plugin.plugin.parameters import Extent, InputKind
from tileprompt_plugin.plugin.sources import MAX_EXPORT_PX, export_layer, inspect_layer, local_path


@pytest.fixture()
def vsimem_layer():
    """A GeoTIFF in GDAL's memory file system: QGIS reads it, the backend (another process) cannot."""
    from osgeo import gdal

    path = "/vsimem/tileprompt_test.tif"
    write_raster(path, bands=3, width=100, height=80, descriptions=["B04", "B03", "B02"])
    layer = QgsRasterLayer(path, "in memory")
    assert layer.isValid()
    yield layer
    gdal.Unlink(path)


@pytest.fixture()
def xyz_layer(tmp_path):
    """Web map tiles (XYZ), served from local files so the test needs no network."""
    for z in range(3):
        for x in range(2 ** z):
            for y in range(2 ** z):
                (tmp_path / "tiles" / str(z) / str(x)).mkdir(parents=True, exist_ok=True)
                image = QImage(256, 256, QImage.Format.Format_ARGB32)
                image.fill(QColor(40 + 60 * x, 40 + 60 * y, 120))
                image.save(str(tmp_path / "tiles" / str(z) / str(x) / f"{y}.png"))
    url = f"file://{tmp_path}/tiles/%7Bz%7D/%7Bx%7D/%7By%7D.png"
    layer = QgsRasterLayer(f"type=xyz&url={url}&zmax=2&zmin=0", "tiles", "wms")
    assert layer.isValid()
    return layer


def test_files_are_sent_by_path(sample_files):
    layer = QgsRasterLayer(str(sample_files["s2"]), "s2")
    assert local_path(layer) == str(sample_files["s2"])
    source = inspect_layer(layer)
    assert not source.needs_export and source.file_bands[:2] == ["B01", "B02"]


def test_a_memory_raster_is_exported_at_the_gsd(vsimem_layer, tmp_path):
    source = inspect_layer(vsimem_layer)
    assert source.needs_export and not source.web and not source.rendered
    assert source.file_bands == ["B04", "B03", "B02"]
    e = vsimem_layer.extent()
    extent = Extent(e.xMinimum(), e.yMinimum(), e.xMaximum(), e.yMaximum(), "EPSG:32633")
    out = export_layer(vsimem_layer, extent, 20.0, tmp_path)
    exported = QgsRasterLayer(str(out), "e")
    assert (exported.width(), exported.height(), exported.bandCount()) == (50, 40, 3)
    assert exported.rasterUnitsPerPixelX() == pytest.approx(20.0) and exported.crs().authid() == "EPSG:32633"
    # raw values, not colours: band 1 keeps its data
    assert exported.dataProvider().dataType(1) == vsimem_layer.dataProvider().dataType(1)
    assert export_layer(vsimem_layer, extent, 20.0, tmp_path) == out  # re-used, same path
    assert not list(tmp_path.glob("*.partial.tif"))


def test_a_layer_in_degrees_is_exported_in_its_utm_zone(tmp_path):
    path = write_raster(tmp_path / "geo.tif", bands=1, width=60, height=40, origin=(14.0, 52.0), res=0.001,
                        crs="EPSG:4326")
    layer = QgsRasterLayer(str(path), "geo")
    out = export_layer(layer, Extent(14.0, 51.96, 14.06, 52.0, "EPSG:4326"), 10.0, tmp_path / "exports")
    exported = QgsRasterLayer(str(out), "e")
    assert exported.crs().authid() == "EPSG:32633"
    assert exported.rasterUnitsPerPixelX() == pytest.approx(10.0)
    assert 380 < exported.width() < 430 and 420 < exported.height() < 470  # 0.06 deg x 0.04 deg at 52 N


def test_web_tiles_are_exported_as_rendered_rgba_in_metres(xyz_layer, tmp_path):
    source = inspect_layer(xyz_layer)
    assert source.needs_export and source.web and source.rendered
    out = export_layer(xyz_layer, Extent(1000000, 6000000, 1010000, 6008000, "EPSG:3857"), 100.0, tmp_path,
                       web=True)
    exported = QgsRasterLayer(str(out), "e")
    assert exported.bandCount() == 4 and exported.crs().authid() == "EPSG:32632"
    assert exported.rasterUnitsPerPixelX() == pytest.approx(100.0)
    # web mercator metres are not ground metres: 10 km of EPSG:3857 at 47 N is about 6.8 km
    assert 60 < exported.width() < 75


def test_too_large_or_outside_areas_are_refused(vsimem_layer, tmp_path):
    e = vsimem_layer.extent()
    with pytest.raises(ValueError, match="too large"):
        export_layer(vsimem_layer, Extent(e.xMinimum(), e.yMinimum(), e.xMaximum(), e.yMaximum(), "EPSG:32633"),
                     e.width() / (MAX_EXPORT_PX + 10), tmp_path)
    with pytest.raises(ValueError, match="does not overlap"):
        export_layer(vsimem_layer, Extent(0, 0, 10, 10, "EPSG:32633"), 10.0, tmp_path)


def test_the_dock_run_exports_before_the_job(plugin, fake_backend, isolated, vsimem_layer):
    connect(plugin, fake_backend, isolated)
    QgsProject.instance().addMapLayer(vsimem_layer)
    plugin.dock.layer_combo.setLayer(vsimem_layer)
    plugin.dock.model_combo.setCurrentIndex(plugin.dock.model_combo.findData("tiny-aligned-s2"))
    plugin.dock.prompt_edit.setPlainText("a\nb")
    assert "exported to a GeoTIFF" in plugin.dock.input_label.text()
    params = plugin.dock.classify_parameters()
    assert params.raster.kind is InputKind.EXPORT and params.raster.export_extent is not None
    plugin.run_classify(params)
    assert wait_until(lambda: plugin.current_task is None, 15)
    request = fake_backend.requests[-1]
    exported = Path(request["raster"])
    assert exported.parent == plugin.settings.cache_dir() / "exports" and exported.suffix == ".tif"
    assert request["band_map"] == ["B04", "B03", "B02"]
    assert QgsRasterLayer(str(exported), "e").rasterUnitsPerPixelX() == pytest.approx(10.0)  # the model's GSD
