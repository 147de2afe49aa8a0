"""Result files: the output guard, atomic writes, GeoPackage tile layers with their run metadata.

Every output of every interface goes through :func:`guard_output` before any work: it refuses a path that is
one of the job's inputs (after resolving links) and an existing file TilePrompt did not write, unless the user
said ``overwrite``. Files are then written to a temporary name beside the target and renamed over it only
when complete (:func:`atomic_path`), so a crash, a cancel or a full disk never leaves a half-written file under
the name the user asked for; the temporaries of dead processes are swept by the next write into the folder.
This module imports no GIS library at import time: the CLI guards its outputs before loading the ML stack.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from . import validation
from .errors import InputError, ResourceError

RUNS_TABLE = "tileprompt_runs"
#: Metadata tag every GeoTIFF TilePrompt writes carries (its run id): how a raster output is recognised as ours.
WRITER_TAG = "tileprompt_run"
#: Files that mark a folder as TilePrompt's: an index (meta.json of format tileprompt-index) or a model card.
INDEX_META, MODEL_CARD = "meta.json", "model.json"
#: Temporaries of writers on another host (a shared folder) are swept only after this long.
STALE_PARTIAL_SECONDS = 24 * 3600
# .<stem>.<host>-<pid>.partial<suffix>, plus SQLite's -journal/-wal/-shm beside it
_PARTIAL_RE = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)\.partial(\.[^.]+)?(-journal|-wal|-shm)?$")

OVERWRITE_FIXES = {
    "cli": "pass --overwrite to replace it, or choose another name",
    "http": 'send "overwrite": true to replace it, or choose another name',
    "processing": 'tick "Replace an existing output", or choose another name',
    "dock": "confirm replacing it, or choose another name",
}


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


def guard_output(path: str | Path, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
                 suffixes: tuple[str, ...] = (".gpkg",), layer: str | None = None, what: str = "output",
                 input_dirs: Iterable[str | Path | None] = ()) -> Path:
    """The one check every output passes before a job does any work; returns the path (``~`` expanded).

    - ``path`` has one of ``suffixes`` and lies in an existing writable folder (:func:`check_output_path`);
    - it is none of ``inputs`` (files or folders the job reads: raster files, templates, index and model
      files) and lies inside none of ``input_dirs`` (folders the job reads as a whole: an index, a model
      card), compared after resolving links - never allowed, whatever ``overwrite`` says;
    - an existing file is replaced only when TilePrompt wrote it (:func:`written_by_tileprompt`) or when
      ``overwrite``; with ``layer``, an existing file must be a GeoPackage TilePrompt wrote, and it receives
      a new layer of that name instead of being replaced (an existing layer of that name needs ``overwrite``).

    Errors are :class:`~tileprompt_backend.errors.InputError` s whose remedy each interface phrases.
    """
    path = check_output_path(path, suffixes)
    target = path.resolve()
    for item in inputs:
        if item is not None and Path(item).expanduser().resolve() == target:
            raise InputError(f"the {what} {path} is an input of this job ({Path(item)}): writing it would destroy "
                             "the input", "output_is_input", {k: "choose another name" for k in OVERWRITE_FIXES})
    for folder in input_dirs:
        if folder is not None and Path(folder).expanduser().resolve() in target.parents:
            raise InputError(f"the {what} {path} lies inside {Path(folder)}, which this job reads", "output_is_input",
                             {k: "choose a path outside it" for k in OVERWRITE_FIXES})
    layer = validation.layer(layer)
    if not path.exists():
        return path
    ours = written_by_tileprompt(path)
    if layer is not None:
        if path.suffix.lower() != ".gpkg" or not ours:
            raise InputError(f"the {what} {path} exists and was not written by TilePrompt: a layer can be added only "
                             "to a result GeoPackage TilePrompt wrote", "output_exists",
                             {k: "choose another file" for k in OVERWRITE_FIXES})
        if layer in gpkg_layers(path) and not overwrite:
            raise InputError(f"the {what} {path} already has a layer {layer!r}", "layer_exists",
                             {"cli": "pass --overwrite to replace that layer, or choose another --layer name",
                              "http": 'send "overwrite": true to replace that layer, or choose another layer name',
                              "processing": 'tick "Replace an existing output", or choose another layer name',
                              "dock": "confirm replacing it, or choose another layer name"})
        return path
    if not ours and not overwrite:
        raise InputError(f"the {what} {path} exists and was not written by TilePrompt", "output_exists",
                         OVERWRITE_FIXES)
    return path


def guard_gpkg_and_heatmap(out: str | Path, heatmap: str | Path | None, inputs: Iterable[str | Path | None] = (),
                           overwrite: bool = False, layer: str | None = None,
                           input_dirs: Iterable[str | Path | None] = ()) -> tuple[Path, Path | None]:
    """:func:`guard_output` for a result GeoPackage and its optional heat map GeoTIFF (search, change search):
    both against the same inputs, and on different paths."""
    inputs, input_dirs = list(inputs), list(input_dirs)
    out = guard_output(out, inputs, overwrite, layer=layer, input_dirs=input_dirs)
    if heatmap is None:
        return out, None
    heatmap = guard_output(heatmap, inputs, overwrite, suffixes=(".tif", ".tiff"), what="heat map",
                           input_dirs=input_dirs)
    if heatmap.resolve() == out.resolve():
        raise ValueError("the heat map and the GeoPackage need different paths")
    return out, heatmap


def guard_folder_output(path: str | Path, ours, overwrite: bool = False, inputs: Iterable[str | Path | None] = (),
                        what: str = "output folder") -> Path:
    """The check of a *folder* output (a trained model card, a training dataset, an evaluation report).

    Like :func:`guard_output`: in an existing writable folder, and never one of ``inputs`` nor inside or around one
    (replacing a folder that holds an input would delete it) - whatever ``overwrite`` says. Stricter than it for
    an existing folder, which is replaced whole: only when ``ours(path)`` (this kind of output, written by
    TilePrompt) *and* ``overwrite``; a folder TilePrompt did not write is never replaced.
    """
    path = Path(path).expanduser()
    parent = path.parent.resolve()
    if not parent.is_dir():
        raise InputError(f"the {what}'s parent folder does not exist: {parent}", "output_folder_missing",
                         {k: "create it, or choose another place" for k in OVERWRITE_FIXES})
    if not os.access(parent, os.W_OK):
        raise InputError(f"the {what}'s parent folder is not writable: {parent}", "output_folder_read_only",
                         {k: "choose another place" for k in OVERWRITE_FIXES})
    target = path.resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).expanduser().resolve()
        if source == target or target in source.parents or source in target.parents:
            raise InputError(f"the {what} {path} is, holds or lies inside an input of this job ({Path(item)}): "
                             "writing it would destroy the input", "output_is_input",
                             {k: "choose another place" for k in OVERWRITE_FIXES})
    if path.exists() or path.is_symlink():
        if not path.is_dir() or not ours(path):
            raise InputError(f"the {what} {path} exists and is not one TilePrompt wrote", "output_exists",
                             {k: "choose another name (a folder TilePrompt did not write is never replaced)"
                              for k in OVERWRITE_FIXES})
        if not overwrite:
            raise InputError(f"the {what} {path} exists", "output_exists", OVERWRITE_FIXES)
    return path


@contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """An empty hidden folder beside ``out`` to write a folder output into: when the block ends without an error
    it replaces ``out`` whole (:func:`replace_folder`); it is removed in any case, so an error or Ctrl-C leaves
    ``out`` as it was. ``out`` must have passed :func:`guard_folder_output`."""
    out = Path(out)
    tmp = partial_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(staged: Path, out: Path) -> None:
    """Rename the complete folder ``staged`` to ``out`` (a sibling): an existing ``out``, already checked by
    :func:`guard_folder_output`, is renamed aside first and removed only once the new folder stands in its place
    (put back if the new one cannot be moved in), so ``out`` is the old folder or the new one, never a mix."""
    staged, out = Path(staged), Path(out)
    fsync_dir(staged)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        staged.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (renames into it) to disk; a no-op where the filesystem refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders
    finally:
        os.close(fd)


def written_by_tileprompt(path: str | Path) -> bool:
    """Whether TilePrompt wrote ``path``: a GeoPackage with a :data:`RUNS_TABLE`, a GeoTIFF tagged
    :data:`WRITER_TAG`, an index folder or a model card folder. Unreadable files are not ours."""
    path = Path(path)
    if path.is_dir():
        if (path / MODEL_CARD).is_file():
            return True
        try:
            return json.loads((path / INDEX_META).read_text()).get("format") == "tileprompt-index"
        except (OSError, ValueError, AttributeError):
            return False
    suffix = path.suffix.lower()
    if suffix == ".gpkg":
        return RUNS_TABLE in _sqlite_tables(path)
    if suffix in (".tif", ".tiff"):
        return _tiff_tagged(path)
    return False


def _read_only(path: Path) -> sqlite3.Connection:
    """A read-only SQLite connection (a URI, percent-encoded: names with ? or # stay names)."""
    return sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=5)


def _sqlite_tables(path: Path) -> set[str]:
    try:
        con = _read_only(path)
    except sqlite3.Error:
        return set()
    try:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
    except sqlite3.Error:  # not a database (an OSM file is one; a text file named .gpkg is not)
        return set()
    finally:
        con.close()


def gpkg_layers(path: str | Path) -> list[str]:
    """Feature and attribute tables a GeoPackage lists in gpkg_contents (empty for anything else)."""
    try:
        con = _read_only(path)
    except sqlite3.Error:
        return []
    try:
        return [r[0] for r in con.execute("SELECT table_name FROM gpkg_contents")]
    except sqlite3.Error:
        return []
    finally:
        con.close()


def _tiff_tagged(path: Path) -> bool:
    import rasterio  # only when a .tif output already exists
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(path) as ds:
            return WRITER_TAG in ds.tags()
    except (RasterioError, OSError):
        return False


# --- writing ------------------------------------------------------------------------------------------------


def host_name() -> str:
    """This machine's name, letters and digits only (it names temporaries, so writers on a shared folder differ)."""
    return re.sub(r"[^A-Za-z0-9]+", "", socket.gethostname())[:32] or "host"


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this host (a pid we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def partial_path(path: Path) -> Path:
    """The temporary name a write to ``path`` uses: hidden, and naming its host and process."""
    return path.with_name(f".{path.stem}.{host_name()}-{os.getpid()}.partial{path.suffix}")


def sweep_partials(folder: str | Path) -> list[Path]:
    """Remove the temporaries (and SQLite side files) that dead TilePrompt processes left in ``folder``.

    A temporary belongs to a dead process when its host is this one and its pid is not running, or when it
    is older than :data:`STALE_PARTIAL_SECONDS` (a writer on another host). Returns what was removed.
    """
    removed = []
    host = host_name()
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _PARTIAL_RE.match(p.name)
        if not m or not p.is_file():
            continue
        try:
            age = time.time() - p.stat().st_mtime
        except OSError:
            continue
        if (m.group("host") == host and not pid_alive(int(m.group("pid")))) or age > STALE_PARTIAL_SECONDS:
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def _sidecars(tmp: Path) -> list[Path]:
    return [tmp.with_name(tmp.name + s) for s in ("-journal", "-wal", "-shm")]


def resource_error(exc: BaseException, path: Path) -> ResourceError | None:
    """A clear one-line error for the machine refusing a write, or None for anything else."""
    if isinstance(exc, ResourceError):
        return exc
    text = str(exc)
    code = getattr(exc, "errno", None)
    folder = path.parent
    if code == errno.ENOSPC or "No space left" in text or "disk is full" in text or "database or disk is full" in text:
        return ResourceError(errno.ENOSPC, f"the disk is full: {path.name} could not be written in {folder}; "
                                           "nothing was written (free some space and run again)")
    if code == errno.EROFS or "Read-only file system" in text:
        return ResourceError(errno.EROFS, f"the output folder is on a read-only file system: {folder}; "
                                          "nothing was written")
    if code in (errno.EACCES, errno.EPERM) or "Permission denied" in text:
        return ResourceError(errno.EACCES, f"no permission to write in the output folder {folder}; nothing was written")
    if not folder.is_dir():
        return ResourceError(errno.ENOENT, f"the output folder disappeared while {path.name} was being written: "
                                           f"{folder}; nothing was written")
    return None


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it over ``path`` only if the block succeeds.

    Temporaries of dead processes in the folder are swept first. A write the machine refuses (disk full,
    read-only or vanished folder, no permission) becomes one :class:`~tileprompt_backend.errors.ResourceError`
    naming it; nothing is left under either name.
    """
    path = Path(path)
    sweep_partials(path.parent)
    tmp = partial_path(path)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as e:
        clear = resource_error(e, path)
        if clear is not None:
            raise clear from None
        raise
    finally:
        for p in (tmp, *_sidecars(tmp)):
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass


#: numpy dtype of each field type a layer declares.
_DTYPES = {"int": "int64", "float": "float64", "str": object}


def write_layer(path: str | Path, crs, fields: dict[str, str], geometries, columns: dict[str, Any],
                run: dict[str, Any], layer: str = "tiles", add_layer: bool = False) -> Path:
    """Write polygons with column-wise attributes and one run-metadata row to a GeoPackage, atomically.

    ``fields`` maps attribute names to ``int``, ``float`` or ``str`` in column order; ``columns`` holds one
    sequence per field (None in a float or str column is a NULL); ``geometries`` are shapely polygons. The run
    is stored in :data:`RUNS_TABLE` with JSON-encoded values (and the layer it wrote) so the file explains
    itself. ``add_layer``: an existing file keeps its layers and runs and receives ``layer`` (replacing a layer
    of that name); the copy is written and renamed like a new file, so a failure leaves the file as it was.
    Written in one pass through GDAL (pyogrio): 100,000 tiles take about a second, a feature-by-feature writer ten.
    """
    import shutil
    import warnings

    import numpy as np
    import shapely
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
    runs = [{**run, "layer": layer}]
    with atomic_path(path) as tmp:
        if add_layer and path.exists():
            shutil.copyfile(path, tmp)
            runs = read_run_table(path) + runs
        with warnings.catch_warnings():  # no CRS is what a raster without georeference means (pixel space)
            warnings.filterwarnings("ignore", message="'crs' was not provided")
            write(tmp, wkb, data, list(fields), layer=layer, driver="GPKG", geometry_type="Polygon",
                  crs=_crs_text(crs))
        write_run_table(tmp, runs)
    return path


def write_tiles_gpkg(path: str | Path, crs, fields: dict[str, str], features: Iterable[tuple[Any, dict]],
                     run: dict[str, Any], layer: str = "tiles", add_layer: bool = False) -> Path:
    """:func:`write_layer` for features given row by row: (shapely geometry, attributes) pairs."""
    geometries: list = []
    columns: dict[str, list] = {name: [] for name in fields}
    for geom, props in features:
        geometries.append(geom)
        for name in fields:
            columns[name].append(props.get(name))
    return write_layer(path, crs, fields, geometries, columns, run, layer, add_layer)


def _crs_text(crs) -> str | None:
    """WKT of a rasterio/pyproj CRS or a CRS string as is; None for rasters without georeferencing."""
    if crs is None:
        return None
    return crs.to_wkt() if hasattr(crs, "to_wkt") else str(crs)


def write_run_table(path: str | Path, runs: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
    """(Re)write the attributes table :data:`RUNS_TABLE`: one row per run (key -> JSON text), keys united."""
    import numpy as np
    from pyogrio.raw import write

    runs = [runs] if isinstance(runs, dict) else list(runs)
    rows = [{k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in run.items()} for run in runs]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    write(path, None, [np.array([row.get(k) for row in rows], dtype=object) for k in keys], keys,
          layer=RUNS_TABLE, driver="GPKG")


def read_run_table(path: str | Path) -> list[dict[str, Any]]:
    """The run rows stored in a result GeoPackage, JSON values decoded (keys a row lacks are left out)."""
    import fiona

    rows = []
    with fiona.open(path, layer=RUNS_TABLE) as table:
        for feat in table:
            row = {}
            for k, v in dict(feat["properties"]).items():
                if v is None:
                    continue
                try:
                    row[k] = json.loads(v)
                except (TypeError, ValueError):
                    row[k] = v
            rows.append(row)
    return rows
