"""An admin's own rasters (+ labelled polygons) -> tiles with labels and a spatial split.

Each raster is cut into the grid classification uses (``tiling.make_grid``: tiles in the raster's own CRS and
pixel grid). With polygons (a GeoPackage or any vector file fiona reads, and the field holding the class), the
polygons are reprojected to the raster's CRS and burnt into a class raster on its grid; a tile's class shares
are the shares of its pixels under each class. Multi-class: the tile's label is the class with the largest share
(its *coverage*), kept when the coverage reaches ``min_coverage``. Multi-label: every class with a share of at
least ``multi_label_threshold``. Tiles without a label are dropped, or kept unlabelled on request (alignment
can use them). Mostly-nodata tiles are dropped by the engine's rule. Splits are spatial: blocks of
``block x block`` tiles go to one split together (``splits.spatial_split``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

from ...engine.reading import read_tile_rows
from ...sentinel2 import open_raster
from ...tiling import MAX_NODATA_FRACTION, Tile, make_grid, nodata_fraction, reproject_geometry
from .samples import Sample, multi_hot
from .splits import spatial_split

DEFAULT_MIN_COVERAGE = 0.5
DEFAULT_BLOCK = 4


@dataclass
class Polygons:
    geometries: list  # shapely geometries in the file's CRS
    values: list[str]
    crs: str | None
    path: Path
    field: str


def read_polygons(path: str | Path, field: str, layer: str | None = None) -> Polygons:
    """The polygons of a vector file and the values of ``field`` (as text); every problem is a ValueError."""
    import fiona
    from shapely.geometry import shape

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"labels file not found: {path}")
    try:
        layers = fiona.listlayers(str(path))
        if layer is not None and layer not in layers:
            raise ValueError(f"labels file {path} has no layer {layer!r} (layers: {', '.join(layers)})")
        with fiona.open(str(path), layer=layer) as src:
            fields = list(src.schema["properties"])
            if field not in fields:
                raise ValueError(f"labels file {path} has no field {field!r} (fields: {', '.join(fields)})")
            crs = src.crs.to_wkt() if src.crs else None
            geoms, values = [], []
            for feat in src:
                value = feat["properties"].get(field)
                if feat["geometry"] is None or value is None or str(value).strip() == "":
                    continue
                g = shape(feat["geometry"])
                if g.geom_type not in ("Polygon", "MultiPolygon") or g.is_empty:
                    continue
                geoms.append(g if g.is_valid else g.buffer(0))
                values.append(str(value).strip())
    except fiona.errors.FionaError as e:
        raise ValueError(f"cannot read labels file {path}: {e}") from None
    if not geoms:
        raise ValueError(f"labels file {path} has no polygons with a value in field {field!r}")
    return Polygons(geoms, values, crs, path, field)


def class_list(polygons: Polygons, classes: Sequence[str] | None = None) -> list[str]:
    """The classes in label order: ``classes`` if given (each must occur), else the field's values sorted."""
    present = sorted(set(polygons.values))
    if not classes:
        return present
    classes = [c.strip() for c in classes if c.strip()]
    absent = [c for c in classes if c not in present]
    if absent:
        raise ValueError(f"class(es) {', '.join(map(repr, absent))} do not occur in field {polygons.field!r} of "
                         f"{polygons.path} (values: {', '.join(present)})")
    return list(dict.fromkeys(classes))


def tile_shares(info, tiles: Sequence[Tile], polygons: Polygons, classes: list[str]) -> np.ndarray:
    """(tiles, classes) share of each tile's pixels under each class (pixels outside the raster count as none)."""
    from rasterio.features import rasterize

    index = {c: i + 1 for i, c in enumerate(classes)}
    shapes = []
    for geom, value in zip(polygons.geometries, polygons.values):
        if value not in index:
            continue
        if polygons.crs is not None and info.crs is not None:
            geom = reproject_geometry(geom, polygons.crs, info.crs)
        shapes.append((geom, index[value]))
    burnt = rasterize(shapes, out_shape=(info.height, info.width), transform=info.transform, fill=0,
                      dtype="uint16") if shapes else np.zeros((info.height, info.width), np.uint16)
    out = np.zeros((len(tiles), len(classes)), dtype=np.float64)
    for i, t in enumerate(tiles):
        w = t.window
        r0, c0 = int(w.row_off), int(w.col_off)
        patch = burnt[r0:r0 + int(w.height), c0:c0 + int(w.width)]
        counts = np.bincount(patch.ravel(), minlength=len(classes) + 1)[1:]
        out[i] = counts / float(int(w.height) * int(w.width))
    return out


def _slug(path: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).name).strip("_")[:40] or "raster"
    return f"{name}-{hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:6]}"


@dataclass
class RasterPlan:
    raster: str
    tiles: list[Tile]
    targets: list  # per tile: class index, multi-hot, or None
    shares: np.ndarray | None
    splits: list[str]


def iter_raster_tiles(rasters: Sequence[str | Path], tile_px: int, *, polygons: Polygons | None = None,
                      classes: list[str] | None = None, stride: int | None = None,
                      min_coverage: float = DEFAULT_MIN_COVERAGE, multi_label_threshold: float | None = None,
                      keep_unlabelled: bool = False, block: int = DEFAULT_BLOCK,
                      fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0,
                      band_map: Sequence[str] | None = None, level: str | None = None,
                      limit: int | None = None) -> Iterator[tuple[str, Sample]]:
    """(split, sample) for the usable tiles of every raster, raster after raster, in grid order."""
    if not 0.0 < min_coverage <= 1.0:
        raise ValueError(f"--min-coverage must be in (0, 1], got {min_coverage}")
    if multi_label_threshold is not None and not 0.0 < multi_label_threshold <= 1.0:
        raise ValueError(f"--multi-label-threshold must be in (0, 1], got {multi_label_threshold}")
    plans = [_plan(str(r), tile_px, stride, polygons, classes, min_coverage, multi_label_threshold, keep_unlabelled,
                   block, fractions, seed, band_map, level) for r in rasters]
    if not any(p.tiles for p in plans):
        raise ValueError("no labelled tiles: no tile reaches --min-coverage under the polygons (lower it, check "
                         "that polygons and rasters overlap, or use --keep-unlabelled)" if polygons is not None
                         else "the rasters have no tiles")
    emitted = 0
    for plan in plans:
        with open_raster(plan.raster, band_map=band_map, level=level) as src:
            info = src.info
            slug = _slug(plan.raster)
            where = {t.id: i for i, t in enumerate(plan.tiles)}
            for tile, raw in read_tile_rows(src, plan.tiles, info.bands):
                if nodata_fraction(raw, info.nodata) > MAX_NODATA_FRACTION:
                    continue
                i = where[tile.id]
                w = tile.window
                meta = {"source": "raster", "raster": plan.raster, "row": tile.row, "col": tile.col,
                        "window": [int(w.col_off), int(w.row_off), int(w.width), int(w.height)],
                        "crs": info.crs.to_string() if info.crs else None,
                        "transform": list(info.transform @ Affine.translation(int(w.col_off), int(w.row_off)))[:6]}
                if plan.shares is not None:
                    meta["shares"] = {c: round(float(s), 4) for c, s in zip(classes, plan.shares[i]) if s > 0}
                    meta["coverage"] = round(float(plan.shares[i].max()), 4)
                yield plan.splits[i], Sample(key=f"{slug}-r{tile.row:05d}-c{tile.col:05d}", image=np.array(raw),
                                             bands=tuple(info.bands), level=info.level, target=plan.targets[i],
                                             meta=meta)
                emitted += 1
                if limit is not None and emitted >= limit:
                    return


def _plan(raster: str, tile_px: int, stride: int | None, polygons: Polygons | None, classes: list[str] | None,
          min_coverage: float, threshold: float | None, keep_unlabelled: bool, block: int,
          fractions: Sequence[float], seed: int, band_map, level) -> RasterPlan:
    with open_raster(raster, band_map=band_map, level=level) as src:
        info = src.info
        grid = make_grid(info, tile_px, stride)
        tiles = list(grid.tiles)
        shares = tile_shares(info, tiles, polygons, classes) if polygons is not None else None
    targets: list = []
    keep: list[int] = []
    for i in range(len(tiles)):
        target = None
        if shares is not None:
            if threshold is not None:
                on = np.flatnonzero(shares[i] >= threshold)
                target = multi_hot(list(on), len(classes)) if len(on) else None
            elif shares[i].max() >= min_coverage:
                target = int(shares[i].argmax())
        if target is not None or shares is None or keep_unlabelled:
            keep.append(i)
            targets.append(target)
    tiles = [tiles[i] for i in keep]
    kept_shares = shares[keep] if shares is not None else None
    weights = [1.0 if t is not None or shares is None else 0.0 for t in targets]
    splits = spatial_split([t.row for t in tiles], [t.col for t in tiles], weights, fractions, block, seed,
                           scene=raster) if tiles else []
    return RasterPlan(raster, tiles, targets, kept_shares, splits)
