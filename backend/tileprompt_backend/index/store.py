"""The on-disk embedding index: cache keys, the tile catalog, per-scene float16 embeddings, atomic commits.

Layout of an index directory (one model, tile size and stride; any number of scenes)::

    meta.json                    format version, model id + card hash + weights hash, tile size, stride, dim
    catalog.sqlite               table ``scenes`` (one row per COMPLETE scene) and table ``tiles``
    scenes/<scene key>/          embeddings.npy: (tiles, dim) float16, L2-normalised, in tile-id order
                                 scene.json: the scene's row, for people and recovery tools
    vectors/                     trained FAISS indexes (IVF) cached for large archives

A scene is complete exactly when its row is in ``scenes``. Writing one goes: embeddings into a temporary
folder ``scenes/.tmp-<key>-<host>-<pid>-<random>`` -> fsync files and folder -> under SQLite's write lock
(``BEGIN IMMEDIATE``) rename the folder to ``scenes/<key>`` and insert the tile rows, then the scene row, in
one transaction. A crash or a cancel before the commit leaves a temporary folder or a scene folder without
a row; both are ignored by readers and removed by the next writer. A scene is keyed by everything its
embeddings depend on (see :func:`scene_key`); a changed raster file gets a new key, and the old scene of
the same raster (same band map and level) is dropped when the new one commits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from affine import Affine

from .. import __version__
from ..models.identity import short_sha, weights_hash  # weights_hash: also imported from here by query, textcache
from ..outputs import fsync_dir, guard_gpkg_and_heatmap, host_name, pid_alive, resource_error
from ..paths import cache_dir

FORMAT = "tileprompt-index"
FORMAT_VERSION = 1
META_FILE = "meta.json"
CATALOG_FILE = "catalog.sqlite"
EMBEDDINGS_FILE = "embeddings.npy"
SCENE_FILE = "scene.json"
SCENES_DIR = "scenes"
VECTORS_DIR = "vectors"
#: Temporary folders of dead writers on another host are removed after this long.
STALE_TMP_SECONDS = 24 * 3600

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scenes (
    scene_id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    raster TEXT NOT NULL,
    band_map TEXT,
    level TEXT,
    crs TEXT,
    transform TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    n_rows INTEGER NOT NULL,
    n_cols INTEGER NOT NULL,
    tiles INTEGER NOT NULL,
    skipped_nodata INTEGER NOT NULL,
    info TEXT NOT NULL,
    runner TEXT,
    completed TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tiles (
    scene_id INTEGER NOT NULL,
    tile_id INTEGER NOT NULL,
    row INTEGER NOT NULL,
    col INTEGER NOT NULL,
    col_off INTEGER NOT NULL,
    row_off INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    vec INTEGER NOT NULL,
    geom BLOB NOT NULL,
    PRIMARY KEY (scene_id, tile_id)
);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_sha = short_sha


# --- keys ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelKey:
    """Everything an index's embeddings depend on besides the scene: the model version, tile size and stride."""

    model: str
    card_hash: str
    weights_hash: str
    embed_dim: int
    tile_px: int
    stride: int
    model_ref: str = ""  # how to find the card again (its directory, or its id)

    @property
    def key(self) -> str:
        return _sha([self.model, self.card_hash, self.weights_hash, self.tile_px, self.stride])

    def describe(self) -> str:
        return f"model {self.model!r} (card {self.card_hash}), tile {self.tile_px} px, stride {self.stride} px"


def model_key(card, tile_px: int, stride: int) -> ModelKey | None:
    """The key of (card, tile, stride); None when the card's weights are not on disk (nothing can be cached)."""
    w = weights_hash(card)
    if w is None:
        return None
    return ModelKey(model=card.id, card_hash=card.card_hash(), weights_hash=w, embed_dim=int(card.embed_dim),
                    tile_px=int(tile_px), stride=int(stride),
                    model_ref=str(card.path.resolve()) if card.path is not None else card.id)


def default_index_dir(mk: ModelKey) -> Path:
    """``cache_dir()/index/<model>-t<tile>-s<stride>-<key>``: where classify and ``index`` put embeddings by default."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", mk.model).strip("-")[:60] or "model"
    return cache_dir() / "index" / f"{slug}-t{mk.tile_px}-s{mk.stride}-{mk.key[:12]}"


def raster_files(info) -> list[str]:
    """The files a raster's pixels come from (one multiband file or one per band)."""
    files = sorted(set(info.files.values())) if info.files else [info.path]
    return files


def scene_fingerprint(info, band_map: Sequence[str] | None, level: str | None) -> dict[str, Any]:
    """What identifies a scene's pixels: path, files with size and mtime, band map, level, detected bands, and the
    baseline offset subtracted (only when one is: scenes without an offset keep the keys they had before)."""
    files = []
    for f in raster_files(info):
        st = os.stat(f)
        files.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    fingerprint = {"raster": str(Path(info.path).resolve()), "files": files,
                   "band_map": list(band_map) if band_map is not None else None, "level": level,
                   "detected": [info.kind, info.level, list(info.bands), info.layout, info.width, info.height]}
    if info.offset.applied:
        fingerprint["offset_dn"] = {b: info.offset.dn[b] for b in sorted(info.offset.dn)}
    return fingerprint


def scene_key(fingerprint: dict[str, Any], mk: ModelKey) -> str:
    return _sha([fingerprint, mk.key], 24)


# --- records ---------------------------------------------------------------------------------------------------

@dataclass
class SceneRecord:
    """One complete scene of an index (a row of ``scenes``)."""

    key: str
    raster: str
    band_map: list[str] | None
    level: str | None
    crs: str | None  # WKT, None for rasters without georeferencing
    transform: tuple[float, ...]  # the 6 coefficients of the raster's affine geotransform (a, b, c, d, e, f)
    width: int
    height: int
    n_rows: int
    n_cols: int
    tiles: int  # embedded tiles (rows of embeddings.npy)
    skipped_nodata: int
    info: dict[str, Any] = field(default_factory=dict)  # fingerprint and reader facts
    runner: str | None = None
    completed: str = ""
    scene_id: int = 0

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform[:6])

    @property
    def name(self) -> str:
        return Path(self.raster).name

    def grid_info(self):
        """An object ``tiling.make_grid`` accepts (crs, transform, width, height), without opening the raster."""
        from types import SimpleNamespace

        from rasterio.crs import CRS

        crs = CRS.from_wkt(self.crs) if self.crs else None
        return SimpleNamespace(crs=crs, transform=self.affine, width=self.width, height=self.height)

    def rasterio_crs(self):
        from rasterio.crs import CRS

        return CRS.from_wkt(self.crs) if self.crs else None


# Whole SQL statements, never assembled from strings (Bandit B608): the scene row by column name, the IN lists as
# one JSON array parameter (json_each).
_INSERT_SCENE = ("INSERT INTO scenes (scene_id, key, raster, band_map, level, crs, transform, width, height, n_rows, "
                 "n_cols, tiles, skipped_nodata, info, runner, completed) VALUES (:scene_id, :key, :raster, :band_map, "
                 ":level, :crs, :transform, :width, :height, :n_rows, :n_cols, :tiles, :skipped_nodata, :info, :runner, "
                 ":completed)")
_JSON_COLUMNS = ("band_map", "transform", "info")


def _scene_records(cursor: sqlite3.Cursor) -> list[SceneRecord]:
    """The scene records of a ``SELECT * FROM scenes ...`` cursor (columns matched by name)."""
    names = [d[0] for d in cursor.description]
    records = []
    for row in cursor.fetchall():
        d = dict(zip(names, row))
        for c in _JSON_COLUMNS:
            d[c] = json.loads(d[c]) if d[c] is not None else None
        d["transform"] = tuple(d["transform"])
        records.append(SceneRecord(**d))
    return records


def scene_record(info, fingerprint: dict[str, Any], key: str, grid, band_map, level) -> SceneRecord:
    """A record for a scene about to be embedded (tiles, skipped and runner are filled in when it completes)."""
    t = info.transform
    return SceneRecord(
        key=key, raster=fingerprint["raster"], band_map=list(band_map) if band_map is not None else None,
        level=level, crs=info.crs.to_wkt() if info.crs is not None else None,
        transform=(t.a, t.b, t.c, t.d, t.e, t.f), width=int(info.width), height=int(info.height),
        n_rows=grid.n_rows, n_cols=grid.n_cols, tiles=0, skipped_nodata=0,
        info={"fingerprint": fingerprint, "kind": info.kind, "detected_level": info.level,
              "bands": list(info.bands), "layout": info.layout, "nodata": info.nodata,
              "offset": info.offset.to_json()})


# --- file helpers ----------------------------------------------------------------------------------------------

def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        _fsync_file(tmp)
        tmp.replace(path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_tree(path: Path) -> None:
    """Remove a folder by first renaming it aside, so a half-removed folder never keeps a live name."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


# --- the store -------------------------------------------------------------------------------------------------

class IndexStore:
    """An index directory. ``IndexStore.open`` for an existing one, ``IndexStore.create_or_open`` to write."""

    def __init__(self, root: Path, meta: dict[str, Any]):
        self.root = root
        self.meta = meta

    # -- opening --
    @classmethod
    def open(cls, path: str | Path) -> IndexStore:
        """Open an existing index; anything else is a ValueError naming the path."""
        root = Path(path).expanduser()
        meta_file = root / META_FILE
        if not root.exists():
            raise ValueError(f"unknown index: {root} does not exist")
        if not meta_file.is_file():
            raise ValueError(f"not a TilePrompt index (no {META_FILE}): {root}")
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"index {root}: unreadable {META_FILE} ({e})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a TilePrompt index ({META_FILE} has format {meta.get('format')!r}): {root}")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"index {root} has format version {meta.get('version')}, this software reads "
                             f"{FORMAT_VERSION}: re-index into a new folder")
        store = cls(root.resolve(), meta)
        if not store.catalog_path.is_file():
            raise ValueError(f"index {root}: catalog {CATALOG_FILE} is missing")
        return store

    @classmethod
    def create_or_open(cls, path: str | Path, mk: ModelKey) -> IndexStore:
        """Open ``path`` for writing embeddings of ``mk``, creating it when it does not exist."""
        root = Path(path).expanduser()
        if root.exists() and not root.is_dir():
            raise ValueError(f"index path is not a folder: {root}")
        if (root / META_FILE).is_file():
            store = cls.open(root)
            store.check_model(mk)
            return store
        if root.is_dir() and any(p for p in root.iterdir() if not p.name.startswith(".")):
            raise ValueError(f"index folder {root} is not empty and holds no {META_FILE}: not a TilePrompt index")
        root.mkdir(parents=True, exist_ok=True)
        (root / SCENES_DIR).mkdir(exist_ok=True)
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "created": _now(), "software": f"tileprompt {__version__}",
                **asdict(mk), "model_key": mk.key}
        store = cls(root.resolve(), meta)
        with store._connect() as con:
            con.executescript(_SCHEMA)
        if not (root / META_FILE).is_file():  # another process may have created it meanwhile: keep theirs
            write_json_atomic(root / META_FILE, meta)
        return cls.open(root) if (root / META_FILE).is_file() else store

    def check_model(self, mk: ModelKey) -> None:
        if self.meta.get("model_key") != mk.key:
            m = self.meta
            raise ValueError(
                f"index {self.root} was built with model {m.get('model')!r} (card {m.get('card_hash')}, tile "
                f"{m.get('tile_px')} px, stride {m.get('stride')} px); asked for {mk.describe()} - use another "
                "index folder")

    # -- paths, connection --
    @property
    def catalog_path(self) -> Path:
        return self.root / CATALOG_FILE

    @property
    def tile_px(self) -> int:
        return int(self.meta["tile_px"])

    @property
    def stride(self) -> int:
        return int(self.meta["stride"])

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    def scene_dir(self, key: str) -> Path:
        return self.root / SCENES_DIR / key

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.catalog_path, timeout=120, isolation_level=None)
        try:
            con.execute("PRAGMA synchronous=FULL")
            yield con
        except (sqlite3.Error, OSError) as e:  # a full disk or read-only folder: say so, not SQLite's words
            clear = resource_error(e, self.catalog_path)
            if clear is not None:
                raise clear from None
            raise
        finally:
            con.close()

    @contextmanager
    def _write_lock(self) -> Iterator[sqlite3.Connection]:
        """One writer at a time across processes: an immediate SQLite transaction, committed on success."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                try:
                    con.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite already rolled back (a full disk does that)
                raise
            con.execute("COMMIT")

    # -- reading --
    def scenes(self) -> list[SceneRecord]:
        with self._connect() as con:
            return _scene_records(con.execute("SELECT * FROM scenes ORDER BY scene_id"))

    def scene(self, key: str) -> SceneRecord | None:
        with self._connect() as con:
            found = _scene_records(con.execute("SELECT * FROM scenes WHERE key = ?", (key,)))
        return found[0] if found else None

    def tile_ids(self, scene: SceneRecord) -> np.ndarray:
        """Tile id of each embedding row of ``scene`` (int64, in row order)."""
        with self._connect() as con:
            rows = con.execute("SELECT tile_id FROM tiles WHERE scene_id = ? ORDER BY vec", (scene.scene_id,))
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64)
        if len(ids) != scene.tiles:
            raise ValueError(f"index {self.root}: scene {scene.name} lists {len(ids)} tiles, expected {scene.tiles}")
        return ids

    def all_tile_ids(self, scenes: Sequence[SceneRecord]) -> list[np.ndarray]:
        """:meth:`tile_ids` of many scenes in one query (an archive has thousands)."""
        by_scene: dict[int, list[int]] = {s.scene_id: [] for s in scenes}
        with self._connect() as con:
            for scene_id, tile_id in con.execute("SELECT scene_id, tile_id FROM tiles ORDER BY scene_id, vec"):
                if scene_id in by_scene:
                    by_scene[scene_id].append(tile_id)
        out = []
        for s in scenes:
            ids = np.asarray(by_scene[s.scene_id], dtype=np.int64)
            if len(ids) != s.tiles:
                raise ValueError(f"index {self.root}: scene {s.name} lists {len(ids)} tiles, expected {s.tiles}")
            out.append(ids)
        return out

    def tile_rows(self, scene: SceneRecord, tile_ids: Sequence[int]) -> dict[int, tuple]:
        """{tile id: (row, col, col_off, row_off, width, height, WKB polygon)} for some tiles of a scene."""
        out: dict[int, tuple] = {}
        ids = [int(t) for t in tile_ids]
        with self._connect() as con:
            for r in con.execute("SELECT tile_id, row, col, col_off, row_off, width, height, geom FROM tiles "
                                 "WHERE scene_id = ? AND tile_id IN (SELECT value FROM json_each(?))",
                                 (scene.scene_id, json.dumps(ids))):
                out[int(r[0])] = tuple(r[1:])
        return out

    def embeddings(self, scene: SceneRecord) -> np.ndarray:
        """The scene's (tiles, dim) float16 embeddings, memory-mapped; a damaged file is a ValueError."""
        path = self.scene_dir(scene.key) / EMBEDDINGS_FILE
        try:
            emb = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ValueError(f"index {self.root}: embeddings of scene {scene.name} are damaged ({e}); "
                             "re-index it") from None
        if emb.dtype != np.float16 or emb.shape != (scene.tiles, self.embed_dim):
            raise ValueError(f"index {self.root}: embeddings of scene {scene.name} are {emb.dtype} {emb.shape}, "
                             f"expected float16 ({scene.tiles}, {self.embed_dim}); re-index it")
        return emb

    def find_scene(self, name: str, scenes: Sequence[SceneRecord] | None = None) -> SceneRecord:
        """A scene by raster path (as given or resolved), file name, key or numeric id; ValueError if none or many.

        ``scenes``: look among these (a loaded snapshot of the catalog) instead of the catalog now.
        """
        scenes = self.scenes() if scenes is None else list(scenes)
        if not scenes:
            raise ValueError(f"index {self.root} holds no complete scenes")
        text = str(name).strip()
        resolved = str(Path(text).expanduser().resolve()) if text else ""
        for test in (lambda s: s.key == text or s.raster == resolved or s.raster == text,
                     lambda s: text.isdigit() and s.scene_id == int(text),
                     lambda s: s.name == text):
            hits = [s for s in scenes if test(s)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise ValueError(f"scene {name!r} matches {len(hits)} scenes of index {self.root} (band maps or levels "
                                 f"differ); name it by key: {', '.join(s.key for s in hits)}")
        listed = ", ".join(s.raster for s in scenes[:5]) + (" ..." if len(scenes) > 5 else "")
        raise ValueError(f"scene {name!r} is not in index {self.root} (it holds: {listed})")

    # -- writing --
    def cleanup(self) -> None:
        """Remove what crashed or cancelled writers left: dead temporary folders and scene folders without a row."""
        scenes_dir = self.root / SCENES_DIR
        if not scenes_dir.is_dir():
            return
        with self._write_lock() as con:
            keys = {r[0] for r in con.execute("SELECT key FROM scenes")}
            host = host_name()
            for p in scenes_dir.iterdir():
                if p.name.startswith(".tmp-"):
                    parts = p.name.split("-")
                    try:
                        p_host, pid = parts[-3], int(parts[-2])
                    except (IndexError, ValueError):
                        p_host, pid = "", -1
                    age = time.time() - p.stat().st_mtime
                    if (p_host == host and not pid_alive(pid)) or age > STALE_TMP_SECONDS:
                        shutil.rmtree(p, ignore_errors=True)
                elif p.name.startswith(".trash-"):
                    shutil.rmtree(p, ignore_errors=True)
                elif p.is_dir() and p.name not in keys:
                    _remove_tree(p)  # renamed into place, but its row never committed: not complete

    def add_scene(self, record: SceneRecord, tiles: Sequence, embeddings: np.ndarray) -> SceneRecord:
        """Store a scene's embeddings and tile rows atomically; returns the committed record.

        ``tiles`` are the embedded :class:`~tileprompt_backend.tiling.Tile` objects in row order of
        ``embeddings`` ((n, dim), any float dtype; stored as float16). If another writer committed the same key
        first, its scene is kept and returned.
        """
        emb = np.ascontiguousarray(embeddings, dtype=np.float16)
        if emb.ndim != 2 or emb.shape[1] != self.embed_dim or len(emb) != len(tiles):
            raise ValueError(f"index {self.root}: {emb.shape} embeddings for {len(tiles)} tiles of dim "
                             f"{self.embed_dim}")
        order = np.argsort(np.fromiter((t.id for t in tiles), np.int64, len(tiles)), kind="stable")
        if np.any(order != np.arange(len(order))):  # the reader may go stripe by stripe: store in tile-id order
            tiles, emb = [tiles[i] for i in order], emb[order]
        record.tiles = len(tiles)
        record.completed = _now()
        tmp = self._tmp_dir(record.key)
        try:
            tmp.mkdir(parents=True)
            with open(tmp / EMBEDDINGS_FILE, "wb") as f:
                np.save(f, emb)
                f.flush()
                os.fsync(f.fileno())
            (tmp / SCENE_FILE).write_text(json.dumps(asdict(record), indent=2, default=str) + "\n")
            _fsync_file(tmp / SCENE_FILE)
            fsync_dir(tmp)
            rows = [(int(t.id), int(t.row), int(t.col), int(t.window.col_off), int(t.window.row_off),
                     int(t.window.width), int(t.window.height), i, t.polygon.wkb) for i, t in enumerate(tiles)]
            return self._commit(tmp, record, rows)
        except OSError as e:
            clear = resource_error(e, self.root / SCENES_DIR / record.key)
            if clear is not None:
                raise clear from None
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def adopt_scene(self, other: IndexStore, record: SceneRecord) -> SceneRecord | None:
        """Move a complete scene of another index on the same filesystem (a torchrun shard) into this one.

        Returns the new record, or None when this index already holds the scene.
        """
        if self.scene(record.key) is not None:
            return None
        other.embeddings(record)  # refuse a damaged shard scene before moving anything
        with other._connect() as con:
            rows = con.execute("SELECT tile_id, row, col, col_off, row_off, width, height, vec, geom FROM tiles "
                               "WHERE scene_id = ? ORDER BY vec", (record.scene_id,)).fetchall()
        tmp = self._tmp_dir(record.key)
        tmp.parent.mkdir(exist_ok=True)
        os.replace(other.scene_dir(record.key), tmp)
        try:
            rec = SceneRecord(**{**asdict(record), "scene_id": 0})
            committed = self._commit(tmp, rec, rows)
            return committed if committed is rec else None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _tmp_dir(self, key: str) -> Path:
        return self.root / SCENES_DIR / f".tmp-{key}-{host_name()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _commit(self, folder: Path, record: SceneRecord, rows: Sequence[tuple]) -> SceneRecord:
        """Rename a finished scene folder into place and write its tile rows and then its scene row, atomically.

        Holding SQLite's write lock makes check-rename-insert one step for every writer of this index.
        Returns the record already committed under the same key by another writer, if any.
        """
        stale_dirs: list[Path] = []
        scenes_dir = self.root / SCENES_DIR
        with self._write_lock() as con:
            existing = _scene_records(con.execute("SELECT * FROM scenes WHERE key = ?", (record.key,)))
            if existing:
                return existing[0]
            final = self.scene_dir(record.key)
            _remove_tree(final)  # left by a writer that crashed between rename and commit
            os.replace(folder, final)
            fsync_dir(scenes_dir)
            stale = con.execute(
                "SELECT scene_id, key FROM scenes WHERE raster = ? AND band_map IS ? AND level IS ?",
                (record.raster, json.dumps(record.band_map) if record.band_map is not None else None,
                 record.level)).fetchall()
            for scene_id, key in stale:  # the same raster before it changed on disk
                con.execute("DELETE FROM tiles WHERE scene_id = ?", (scene_id,))
                con.execute("DELETE FROM scenes WHERE scene_id = ?", (scene_id,))
                stale_dirs.append(self.scene_dir(key))
            record.scene_id = int(con.execute("SELECT COALESCE(MAX(scene_id), 0) FROM scenes").fetchone()[0]) + 1
            con.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [(record.scene_id, *r) for r in rows])
            values = asdict(record)
            for c in _JSON_COLUMNS:
                values[c] = json.dumps(values[c], default=str) if values[c] is not None else None
            # the scene row is the completion marker: written last, in the same transaction as its tiles
            con.execute(_INSERT_SCENE, values)
        for d in stale_dirs:
            _remove_tree(d)
        return record

    def total_tiles(self) -> int:
        with self._connect() as con:
            return int(con.execute("SELECT COALESCE(SUM(tiles), 0) FROM scenes").fetchone()[0])

    def state(self) -> str:
        """Changes whenever a scene is added or replaced (keys in-process caches of loaded vectors)."""
        with self._connect() as con:
            keys = [r[0] for r in con.execute("SELECT key FROM scenes ORDER BY scene_id")]
        return _sha(keys)


def guard_search_outputs(store: IndexStore, out: str | Path, heatmap: str | Path | None, overwrite: bool = False,
                         layer: str | None = None, inputs: Sequence[str | Path | None] = (),
                         query_raster: str | Path | None = None) -> tuple[Path, Path | None]:
    """``outputs.guard_output`` for the GeoPackage and heat map of a search or a change search: neither may be
    the index, any file in it, any raster file it was built from (the heat map of a scene must not replace the
    scene), any of ``inputs`` (a templates file), nor the query raster of a cross-modal search (a file, or a
    folder of band files)."""
    files = list(inputs)
    for s in store.scenes():
        files.append(s.raster)
        files.extend(f[0] for f in s.info.get("fingerprint", {}).get("files", []))
    dirs = [store.root]
    if query_raster is not None:
        files.append(query_raster)
        if Path(query_raster).expanduser().is_dir():
            dirs.append(query_raster)
    return guard_gpkg_and_heatmap(out, heatmap, files, overwrite, layer, input_dirs=dirs)
