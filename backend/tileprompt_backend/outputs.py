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
from fiona.crs import CRS as FionaCRS
from shapely.geometry import mapping

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


def write_tiles_gpkg(path: str | Path, crs, fields: dict[str, str], features: Iterable[tuple[Any, dict]],
                     run: dict[str, Any], layer: str = "tiles") -> Path:
    """Write polygon features and one run-metadata row to a new GeoPackage, atomically.

    ``fields`` maps attribute names to fiona types (``int``, ``float``, ``str``) in column order;
    ``features`` yields (shapely geometry, attributes); ``run`` is stored in :data:`RUNS_TABLE` with
    JSON-encoded values so the file explains itself.
    """
    path = Path(path)
    schema = {"geometry": "Polygon", "properties": dict(fields)}
    fcrs = None if crs is None else FionaCRS.from_wkt(crs.to_wkt()) if hasattr(crs, "to_wkt") \
        else FionaCRS.from_user_input(crs)  # None: a raster without georeferencing (pixel coordinates)
    with atomic_path(path) as tmp:
        with fiona.open(tmp, "w", driver="GPKG", layer=layer, schema=schema, crs=fcrs) as sink:
            sink.writerecords(
                {"geometry": mapping(geom), "properties": props} for geom, props in features
            )
        write_run_table(tmp, run)
    return path


def write_run_table(path: str | Path, run: dict[str, Any]) -> None:
    """Append the run's metadata as one row of the attributes table :data:`RUNS_TABLE` (key -> JSON text)."""
    row = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in run.items()}
    schema = {"geometry": "None", "properties": {k: "str" for k in row}}
    with fiona.open(path, "w", driver="GPKG", layer=RUNS_TABLE, schema=schema) as table:
        table.write({"geometry": None, "properties": row})


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
