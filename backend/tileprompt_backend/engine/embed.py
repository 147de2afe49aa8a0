"""Tiles in, embeddings out: read tile batches ahead in a thread while the encoder works on the last one."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import Cancelled
from ..sentinel2.bands import FILLABLE_BANDS
from ..tiling import MAX_NODATA_FRACTION, Tile, nodata_fraction
from .reading import read_tiles

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
READ_AHEAD_BATCHES = 2


@dataclass(frozen=True)
class ReadOptions:
    """Reader threads and memory (MB) for :func:`.reading.read_tiles`; None: the defaults (environment)."""

    workers: int | None = None
    memory_mb: int | None = None


@dataclass
class EmbedStats:
    tiles_total: int = 0
    tiles_encoded: int = 0
    skipped_nodata: int = 0
    encode_seconds: float = 0.0  # preprocessing + encoder forward passes
    wait_seconds: float = 0.0  # time the encoder waited for the reader
    wall_seconds: float = 0.0
    skipped_ids: list[int] = field(default_factory=list)


def check_bands(info, bands: Sequence[str], model_id: str) -> None:
    """Fail before any work when the raster lacks bands the model needs (B10 may be zero-filled)."""
    missing = [b for b in bands if b not in info.bands and b not in FILLABLE_BANDS]
    if missing:
        raise ValueError(
            f"raster has {len(info.bands)} band(s) ({', '.join(info.bands)}); model {model_id!r} also needs "
            f"{', '.join(missing)} - give a raster with those bands or a band map (--band-map)")


def iter_batches(source, tiles: Sequence[Tile], bands: Sequence[str], batch_size: int, stats: EmbedStats,
                 stop: threading.Event, read: ReadOptions | None = None) -> Iterator[tuple[list[Tile], np.ndarray]]:
    """(tiles, raw (N, C, h, w)) batches of usable tiles in reading order (see :func:`.reading.read_tiles`);
    mostly-nodata tiles are counted in ``stats`` and dropped."""
    read = read or ReadOptions()
    batch_tiles: list[Tile] = []
    batch_raw: list[np.ndarray] = []
    for tile, raw in read_tiles(source, tiles, bands, workers=read.workers, memory_mb=read.memory_mb):
        if stop.is_set():
            return
        if nodata_fraction(raw, source.info.nodata) > MAX_NODATA_FRACTION:
            stats.skipped_nodata += 1
            stats.skipped_ids.append(tile.id)
            continue
        batch_tiles.append(tile)
        batch_raw.append(raw)
        if len(batch_tiles) == batch_size:
            yield batch_tiles, np.stack(batch_raw)
            batch_tiles, batch_raw = [], []
    if batch_tiles:
        yield batch_tiles, np.stack(batch_raw)


def _read_ahead(batches: Iterator, stop: threading.Event) -> Iterator:
    """Run a batch iterator in a background thread, keeping up to READ_AHEAD_BATCHES ready."""
    q: queue.Queue = queue.Queue(maxsize=READ_AHEAD_BATCHES)
    done = object()

    def put(item) -> bool:
        """Hand an item over unless the consumer has stopped; never block past a stop."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in batches:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # hand reader errors to the consumer, which re-raises them
            put(e)

    worker = threading.Thread(target=produce, name="tileprompt-reader", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


def embed_tiles(source, tiles: Sequence[Tile], model, runner, batch_size: int = 32,
                progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                stats: EmbedStats | None = None, read: ReadOptions | None = None,
                ) -> Iterator[tuple[list[Tile], np.ndarray]]:
    """Yield (tiles, (N, D) L2-normalised embeddings) for every usable tile, in reading order: grid order, or
    stripe by stripe when a full-width slab does not fit the reader's memory (:mod:`.reading`).

    ``progress(done, total)`` is called after each batch (done counts skipped tiles too); ``cancel()``
    returning True raises :class:`Cancelled` between batches.
    """
    stats = stats if stats is not None else EmbedStats()
    stats.tiles_total = len(tiles)
    bands = model.required_bands(source.info)
    stop = threading.Event()
    start = time.perf_counter()
    batches = _read_ahead(iter_batches(source, tiles, bands, batch_size, stats, stop, read), stop)
    try:
        while True:
            if cancel is not None and cancel():
                raise Cancelled("cancelled by the user")
            t0 = time.perf_counter()
            try:
                batch_tiles, raw = next(batches)
            except StopIteration:
                break
            t1 = time.perf_counter()
            emb = runner(model.preprocess(raw, source.info))
            t2 = time.perf_counter()
            stats.wait_seconds += t1 - t0
            stats.encode_seconds += t2 - t1
            stats.tiles_encoded += len(batch_tiles)
            if progress is not None:
                progress(stats.tiles_encoded + stats.skipped_nodata, stats.tiles_total)
            yield batch_tiles, emb
    finally:
        batches.close()
        stats.wall_seconds = time.perf_counter() - start
    if progress is not None:
        progress(stats.tiles_total, stats.tiles_total)
