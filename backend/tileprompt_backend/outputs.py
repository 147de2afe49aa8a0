"""Result files: GeoPackage tile layers with their run metadata, always written atomically.

A result is written to a temporary file beside the target and renamed over it only when complete, so a
crash, a cancel or a full disk never leaves a half-written GeoPackage under the name the user asked for.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import fiona
import numpy as np
import shapely

RUNS_TABLE = "tileprompt_runs"


def check_output_path(path: str | Path, suffixes: tuple[str, ...] = (".gpkg",)) -> Path:
    """Validate an output path before any work is done: known suffix, existing writable folder."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"output must be a {' or '.join(suffixes)} file, got {path.name!r}")
    folder = path.parent.resolve()
    if not folder.is_dir():
        raise ValueError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"output folder is not writable: {folder}")
    if path.is_dir():
        raise ValueError(f"output path is a folder: {path}")
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


#: numpy dtype of each field type a layer declares.
_DTYPES = {"int": np.int64, "float": np.float64, "str": object}


def write_layer(path: str | Path, crs, fields: dict[str, str], geometries, columns: dict[str, Any],
                run: dict[str, Any], layer: str = "tiles") -> Path:
    """Write polygons with column-wise attributes and one run-metadata row to a new GeoPackage, atomically.

    ``fields`` maps attribute names to ``int``, ``float`` or ``str`` in column order; ``columns`` holds one
    sequence per field (None in a float or str column is a NULL); ``geometries`` are shapely polygons. The run
    is stored in :data:`RUNS_TABLE` with JSON-encoded values so the file explains itself. Written in one pass
    through GDAL (pyogrio): 100,000 tiles take well under a second, where a feature-by-feature writer took ten.
    """
    from pyogrio.raw import write

    path = Path(path)
    wkb = shapely.to_wkb(np.asarray(geometries, dtype=object))
    data = []
    for name, kind in fields.items():
        values = columns[name]
        if kind == "float":
            values = np.array([np.nan if v is None else v for v in values], dtype=np.float64) \
                if isinstance(values, list) else np.asarray(values, dtype=np.float64)
        else:
            values = np.asarray(values, dtype=_DTYPES[kind])
        if len(values) != len(wkb):
            raise ValueError(f"field {name}: {len(values)} values for {len(wkb)} geometries")
        data.append(values)
    with atomic_path(path) as tmp:
        write(tmp, wkb, data, list(fields), layer=layer, driver="GPKG", geometry_type="Polygon",
              crs=_crs_text(crs))
        write_run_table(tmp, run)
    return path


def write_tiles_gpkg(path: str | Path, crs, fields: dict[str, str], features: Iterable[tuple[Any, dict]],
                     run: dict[str, Any], layer: str = "tiles") -> Path:
    """:func:`write_layer` for features given row by row: (shapely geometry, attributes) pairs."""
    geometries: list = []
    columns: dict[str, list] = {name: [] for name in fields}
    for geom, props in features:
        geometries.append(geom)
        for name in fields:
            columns[name].append(props.get(name))
    return write_layer(path, crs, fields, geometries, columns, run, layer)


def _crs_text(crs) -> str | None:
    """WKT of a rasterio/pyproj CRS or a CRS string as is; None for rasters without georeferencing."""
    if crs is None:
        return None
    return crs.to_wkt() if hasattr(crs, "to_wkt") else str(crs)


def write_run_table(path: str | Path, run: dict[str, Any]) -> None:
    """Add the run's metadata as one row of the attributes table :data:`RUNS_TABLE` (key -> JSON text)."""
    from pyogrio.raw import write

    row = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in run.items()}
    write(path, None, [np.array([v], dtype=object) for v in row.values()], list(row), layer=RUNS_TABLE,
          driver="GPKG")


def read_run_table(path: str | Path) -> list[dict[str, Any]]:
    """The run rows stored in a result GeoPackage, JSON values decoded."""
    rows = []
    with fiona.open(path, layer=RUNS_TABLE) as table:
        for feat in table:
            row = {}
            for k, v in dict(feat["properties"]).items():
                try:
                    row[k] = json.loads(v)
                except (TypeError, ValueError):
                    row[k] = v
            rows.append(row)
    return rows
