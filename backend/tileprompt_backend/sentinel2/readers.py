"""Open Sentinel-2 products and plain RGB rasters as one kind of object: a :class:`RasterSource`.

CONTRACT (implemented by the sentinel2 work package; tiling, engine and outputs rely on it):

    src = open_raster(path, band_map=None, level=None)
    src.info           -> RasterInfo (grid = the finest band's grid, i.e. 10 m for S2 products)
    src.read(window, bands) -> np.ndarray float32? no: uint16/uint8 raw DN, shape (len(bands), window.height, window.width)
    src.close() / context manager

Layouts (see ../shared/data/README.md):
  * multiband GeoTIFF/COG: band identity from band descriptions (``B04``, ``B4``, ``B8A`` ...) or an explicit band map;
  * a folder of per-band files: BigEarthNet ``<patch>_B01.tif``, Major-TOM ``B01.tif``, SSL4EO ``B1.tif``;
  * a SAFE-style ``IMG_DATA`` folder of JP2 per band (``T33UUU_20170216T102101_B01.jp2``), including L2A's
    ``R10m/R20m/R60m`` sub-folders (``..._B02_10m.jp2``);
  * EuroSAT 13-band tifs (B8A last) -> re-ordered;
  * plain 8-bit RGB rasters (3 bands, uint8): kind "rgb", bands ("R", "G", "B").
20 m and 60 m bands are resampled onto the 10 m grid (bilinear). L2A's missing B10 is zero-filled on request.
"""
