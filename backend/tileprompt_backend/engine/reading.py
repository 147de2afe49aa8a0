"""Tiles off a raster, fast and in bounded memory: block-aligned slabs read in parallel, tiles cut from them.

    for tile, raw in read_tiles(source, tiles, bands, workers=None, memory_mb=None): ...

Why not one read per grid row (:func:`read_tile_rows`, the serial reference): GDAL decodes whole storage blocks
(512 x 512 px in a typical GeoTIFF/COG), so a 120-row strip through 512-row blocks decodes every block about
four times, and a pixel-interleaved multiband GeoTIFF bypasses GDAL's block cache on such reads (measured:
caching did not help). Here the raster is read in **slabs**: windows whose rows are aligned to the storage
blocks, so each block is decoded once. A slab is split into column **chunks** (block-aligned), one per reader
thread; each thread has its own datasets (``RasterSource.reopen``), always reads the same columns (so a
resampled band's source blocks stay in its part of GDAL's block cache), and decoding runs in parallel (GDAL
releases the GIL). Tiles are cut from the slabs in grid order, views where a tile lies inside one chunk.

Memory: slabs in flight (the ones the current grid row needs plus one read ahead) and GDAL's block cache, sized
on purpose (:func:`plan_reading`) within ``memory_mb``. When a full-width slab does not fit, the grid is read in
vertical **stripes** of whole tile columns, one after the other, so memory does not grow with the raster's
width; tiles then come stripe by stripe (row-major within a stripe), and callers that need grid order sort by
tile id. Every value comes from ``RasterSource.read`` (band mapping, resampling, any scaling the reader does), so
tiles are byte-identical to the serial reader's.
"""

from __future__ import annotations

import math
import os
import threading
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from rasterio.windows import Window

from ..tiling import Tile

#: Memory the reader may hold (decoded slabs + GDAL block cache), in MB; TILEPROMPT_READ_MEMORY_MB overrides.
DEFAULT_MEMORY_MB = 256
#: Reader threads by default: one per core, at most this many; TILEPROMPT_READ_WORKERS overrides.
MAX_DEFAULT_WORKERS = 4
#: Slabs are at least this many rows (a striped TIFF has one-row blocks).
MIN_SLAB_ROWS = 64
#: Slabs read ahead of the one the current grid row needs.
READ_AHEAD_SLABS = 1
#: GDAL block cache bounds (bytes): never below the minimum, never above this share of the budget.
MIN_CACHE = 4 << 20
MAX_CACHE_SHARE = 0.5
_FLOAT = 4  # RasterSource.read delivers float32
#: Band-slabs of temporaries while a reader thread resamples a 20/60 m band (KFoldBilinear's passes).
RESAMPLE_TEMPORARIES = 4


def default_workers() -> int:
    env = os.environ.get("TILEPROMPT_READ_WORKERS")
    if env:
        return _positive(env, "TILEPROMPT_READ_WORKERS")
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))


def default_gdal_threads() -> int:
    env = os.environ.get("TILEPROMPT_GDAL_THREADS")
    return _positive(env, "TILEPROMPT_GDAL_THREADS") if env else max(1, os.cpu_count() or 1)


def default_memory_mb() -> int:
    env = os.environ.get("TILEPROMPT_READ_MEMORY_MB")
    return _positive(env, "TILEPROMPT_READ_MEMORY_MB") if env else DEFAULT_MEMORY_MB


def _positive(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a positive whole number, got {text!r}")
    return value


# --- the serial reference ----------------------------------------------------------------------------------------

def read_tile_rows(source, tiles: Sequence[Tile], bands: Sequence[str]) -> Iterator[tuple[Tile, np.ndarray]]:
    """Yield (tile, raw (C, h, w)) reading one strip per grid row, in one thread: the reference reader."""
    by_row: dict[int, list[Tile]] = defaultdict(list)
    for t in tiles:
        by_row[t.row].append(t)
    for row in sorted(by_row):
        row_tiles = sorted(by_row[row], key=lambda t: t.col)
        c0 = int(row_tiles[0].window.col_off)
        c1 = int(max(t.window.col_off + t.window.width for t in row_tiles))
        r0, h = int(row_tiles[0].window.row_off), int(row_tiles[0].window.height)
        strip = source.read(Window(c0, r0, c1 - c0, h), bands)
        for t in row_tiles:
            x = int(t.window.col_off) - c0
            yield t, strip[:, :, x:x + int(t.window.width)]


# --- the plan ----------------------------------------------------------------------------------------------------

@dataclass
class Stripe:
    """Whole tile columns read together: their tiles by grid row, the pixel columns and the worker chunks."""

    rows: list[tuple[int, int, list[Tile]]]  # (first pixel row, last pixel row + 1, tiles left to right)
    x0: int
    x1: int
    chunks: list[tuple[int, int]] = field(default_factory=list)  # [x0, x1) per chunk, left to right


@dataclass
class ReadPlan:
    slab_rows: int
    stripes: list[Stripe]
    workers: int
    cache_bytes: int  # GDAL block cache asked for
    gdal_threads: int  # GDAL's own decoding threads within each read
    slab_bytes_per_col: int  # bytes held per pixel column of a stripe (slabs in flight)
    memory_bytes: int

    @property
    def held_bytes(self) -> int:
        """The most the reader holds at once: the widest stripe's slabs in flight plus the block cache."""
        width = max((s.x1 - s.x0 for s in self.stripes), default=0)
        return width * self.slab_bytes_per_col + self.cache_bytes

    def describe(self) -> str:
        return (f"{len(self.stripes)} stripe(s), slabs of {self.slab_rows} rows, {self.workers} reader thread(s) "
                f"x {self.gdal_threads} GDAL thread(s), "
                f"GDAL cache {self.cache_bytes >> 20} MB, at most {self.held_bytes >> 20} of {self.memory_bytes >> 20} MB")


def plan_reading(source, tiles: Sequence[Tile], bands: Sequence[str], workers: int | None = None,
                 memory_mb: int | None = None, gdal_threads: int | None = None) -> ReadPlan:
    """Slab height, stripes, worker chunks and block cache for reading ``tiles`` within ``memory_mb``.

    - slab height: a multiple of the storage block height of the files already on the grid (each block decoded
      once), at least :data:`MIN_SLAB_ROWS`;
    - held per pixel column: the slabs one grid row needs plus :data:`READ_AHEAD_SLABS`, float32, every band;
    - block cache: for files read through resampling (20/60 m bands) or not aligned to the slabs, one block row
      beyond a slab's worth of their rows, so a block shared by two slabs is decoded once;
    - stripes as wide as the rest of the budget allows (whole tile columns, at least one).
    """
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"reader threads must be at least 1, got {workers}")
    gdal_threads = default_gdal_threads() if gdal_threads is None else int(gdal_threads)
    if gdal_threads < 1:
        raise ValueError(f"GDAL decoding threads must be at least 1, got {gdal_threads}")
    memory = (default_memory_mb() if memory_mb is None else int(memory_mb)) << 20
    if memory <= 0:
        raise ValueError(f"reader memory must be positive, got {memory_mb} MB")
    layout = source.block_layout(bands)
    on_grid = [lay for lay in layout if lay.on_grid]
    block_h = max((lay.block_h for lay in on_grid), default=MIN_SLAB_ROWS)
    block_w = max((lay.block_w for lay in on_grid), default=MIN_SLAB_ROWS)
    slab = block_h * math.ceil(MIN_SLAB_ROWS / block_h)
    tile_h = max(int(t.window.height) for t in tiles)
    slabs_held = math.ceil((tile_h - 1) / slab) + 1 + READ_AHEAD_SLABS
    per_col = slabs_held * slab * len(bands) * _FLOAT
    if any(not lay.on_grid for lay in layout):  # resampling works on one band at a time: a few band-slabs more
        per_col += RESAMPLE_TEMPORARIES * slab * _FLOAT

    cache_per_col, cache_fixed = 0.0, 0.0
    for lay in layout:
        if lay.on_grid and slab % lay.block_h == 0:
            continue  # read in whole blocks, once each: no cache needed
        rows = lay.block_h + math.ceil(slab * lay.scale_y)
        cache_per_col += rows * lay.scale_x * lay.bytes_per_px  # threads read disjoint columns
        cache_fixed += rows * lay.block_w * lay.bytes_per_px * workers  # a block shared at each chunk edge
    cache_cap = max(MIN_CACHE, int(memory * MAX_CACHE_SHARE))

    def cache_for(width: int) -> int:
        return int(min(cache_cap, max(MIN_CACHE, cache_fixed + cache_per_col * width)))

    stride_x, tile_w = _grid_step(tiles)
    cols = sorted({t.col for t in tiles})
    span = cols[-1] - cols[0] + 1

    def fits(k: int) -> bool:  # k tile columns per stripe
        width = (k - 1) * stride_x + tile_w
        return width * per_col + cache_for(width) <= memory

    if not fits(1):
        need = (tile_w * per_col + cache_for(tile_w) + (1 << 20) - 1) >> 20
        raise ValueError(f"reader memory of {memory >> 20} MB is too small: one column of {tile_w} px tiles needs "
                         f"{need} MB (slabs of {slab} rows x {len(bands)} bands)")
    lo, hi = 1, span  # the widest stripe that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    n_stripes = math.ceil(span / lo)
    cols_per_stripe = math.ceil(span / n_stripes)  # balanced

    groups: dict[int, list[Tile]] = defaultdict(list)
    for t in tiles:
        groups[(t.col - cols[0]) // cols_per_stripe].append(t)
    stripes = [_stripe(groups[k], block_w, workers) for k in sorted(groups)]
    cache = cache_for(max(s.x1 - s.x0 for s in stripes))
    return ReadPlan(slab_rows=slab, stripes=stripes, workers=workers, cache_bytes=cache, gdal_threads=gdal_threads,
                    slab_bytes_per_col=per_col, memory_bytes=memory)


def _grid_step(tiles: Sequence[Tile]) -> tuple[int, int]:
    """(column stride, tile width) in pixels, from the tiles themselves (any subset of one grid)."""
    tile_w = max(int(t.window.width) for t in tiles)
    by_col = {t.col: int(t.window.col_off) for t in tiles}
    if len(by_col) < 2:
        return tile_w, tile_w
    (c_a, x_a), (c_b, x_b) = sorted(by_col.items())[:2]
    return max(1, (x_b - x_a) // (c_b - c_a)), tile_w


def _stripe(tiles: list[Tile], block_w: int, workers: int) -> Stripe:
    by_row: dict[int, list[Tile]] = defaultdict(list)
    for t in tiles:
        by_row[t.row].append(t)
    rows = []
    for r in sorted(by_row):
        row_tiles = sorted(by_row[r], key=lambda t: t.col)
        r0 = int(row_tiles[0].window.row_off)
        rows.append((r0, r0 + int(row_tiles[0].window.height), row_tiles))
    x0 = min(int(t.window.col_off) for t in tiles)
    x1 = max(int(t.window.col_off + t.window.width) for t in tiles)
    # chunk edges on block edges, as even as that allows; at most one chunk per worker
    edges = {x0, x1}
    for k in range(1, workers):
        edge = round((x0 + (x1 - x0) * k / workers) / block_w) * block_w
        if x0 < edge < x1:
            edges.add(edge)
    edges_sorted = sorted(edges)
    return Stripe(rows=rows, x0=x0, x1=x1, chunks=list(zip(edges_sorted[:-1], edges_sorted[1:])))


# --- GDAL settings while reading ------------------------------------------------------------------------------

_gdal_lock = threading.Lock()
_gdal_active: list[tuple[int, int]] = []  # (cache bytes, decoding threads) of each reader running now
_gdal_saved: dict[str, str | None] = {}
_GDAL_KEYS = ("GDAL_CACHEMAX", "GDAL_NUM_THREADS")


def _gdal_apply() -> None:
    from rasterio._env import del_gdal_config
    from rasterio.env import set_gdal_config

    if _gdal_active:
        set_gdal_config("GDAL_CACHEMAX", max(1, sum(c for c, _ in _gdal_active) >> 20))  # MB below 100,000
        set_gdal_config("GDAL_NUM_THREADS", str(max(t for _, t in _gdal_active)))
        return
    for key in _GDAL_KEYS:
        if _gdal_saved.get(key) is None:
            del_gdal_config(key)
        else:
            set_gdal_config(key, _gdal_saved[key])


@contextmanager
def gdal_reading(cache_bytes: int, threads: int) -> Iterator[None]:
    """GDAL's process-wide block cache and decoding threads set for the readers running now; restored after.

    The cache: GDAL's default is 5 % of physical memory (1.2 GB on a 24 GB machine), which a long scene fills
    with blocks it never reads again; each reader asks for what its plan needs and they are added up. Decoding
    threads (``GDAL_NUM_THREADS``): GDAL decodes the blocks of one request in parallel (GeoTIFF, JPEG 2000), which
    also measured cheaper in CPU per tile than decoding them one by one.
    """
    from rasterio._env import get_gdal_config

    with _gdal_lock:
        if not _gdal_active:
            _gdal_saved.update({key: get_gdal_config(key) for key in _GDAL_KEYS})
        _gdal_active.append((int(cache_bytes), int(threads)))
        _gdal_apply()
    try:
        yield
    finally:
        with _gdal_lock:
            _gdal_active.remove((int(cache_bytes), int(threads)))
            _gdal_apply()


# --- reading -----------------------------------------------------------------------------------------------------

class _Workers:
    """One thread per worker, each with its own RasterSource; chunk c of every slab goes to worker c % n."""

    def __init__(self, source, n: int):
        self._source = source
        self._pools = [ThreadPoolExecutor(1, thread_name_prefix=f"tileprompt-read{i}") for i in range(n)]
        self._sources: list[object | None] = [None] * n
        self._lock = threading.Lock()

    def submit(self, chunk_index: int, window: Window, bands: Sequence[str]) -> Future:
        w = chunk_index % len(self._pools)
        return self._pools[w].submit(self._read, w, window, bands)

    def _read(self, w: int, window: Window, bands: Sequence[str]) -> np.ndarray:
        src = self._sources[w]
        if src is None:
            src = self._sources[w] = self._source if w == 0 else self._source.reopen()
        return src.read(window, bands)

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
        for i, src in enumerate(self._sources):
            if src is not None and src is not self._source:
                src.close()
            self._sources[i] = None


def read_tiles(source, tiles: Sequence[Tile], bands: Sequence[str], workers: int | None = None,
               memory_mb: int | None = None, plan: ReadPlan | None = None,
               gdal_threads: int | None = None) -> Iterator[tuple[Tile, np.ndarray]]:
    """Yield (tile, raw (C, h, w) float32) for every tile, stripe by stripe, row-major within a stripe.

    The arrays are byte-identical to :func:`read_tile_rows`'s; they may be views into a slab, valid until the
    next tile of another grid row is requested (copy them to keep them). Closing the generator stops the
    reader threads.
    """
    if not tiles:
        return
    plan = plan or plan_reading(source, tiles, bands, workers, memory_mb, gdal_threads)
    pool = _Workers(source, plan.workers)
    try:
        with gdal_reading(plan.cache_bytes, plan.gdal_threads):
            for stripe in plan.stripes:
                yield from _read_stripe(pool, stripe, bands, plan.slab_rows)
    finally:
        pool.close()


def _read_stripe(pool: _Workers, stripe: Stripe, bands: Sequence[str], slab: int) -> Iterator[tuple[Tile, np.ndarray]]:
    needed = sorted({j for r0, r1, _ in stripe.rows for j in range(r0 // slab, (r1 - 1) // slab + 1)})
    pending = deque(needed)
    slabs: dict[int, list[Future]] = {}

    def submit_through(j_max: int) -> None:
        while pending and pending[0] <= j_max:
            j = pending.popleft()
            slabs[j] = [pool.submit(c, Window(x0, j * slab, x1 - x0, slab), bands)
                        for c, (x0, x1) in enumerate(stripe.chunks)]

    for i, (r0, r1, row_tiles) in enumerate(stripe.rows):
        first, last = r0 // slab, (r1 - 1) // slab
        submit_through(last)
        ahead = [j for j in pending][:READ_AHEAD_SLABS]
        if ahead:
            submit_through(ahead[-1])
        parts = {j: [f.result() for f in slabs[j]] for j in range(first, last + 1)}
        for t in row_tiles:
            yield t, _cut(t, parts, stripe.chunks, slab)
        next_first = stripe.rows[i + 1][0] // slab if i + 1 < len(stripe.rows) else math.inf
        for j in [j for j in slabs if j < next_first]:
            del slabs[j]  # no later grid row of this stripe reaches back into it


def _cut(tile: Tile, parts: dict[int, list[np.ndarray]], chunks: list[tuple[int, int]], slab: int) -> np.ndarray:
    """The tile's pixels from the slab chunks: a view when one chunk holds the whole tile, else a copy."""
    r0, c0 = int(tile.window.row_off), int(tile.window.col_off)
    h, w = int(tile.window.height), int(tile.window.width)
    pieces = []
    for j, arrays in parts.items():
        y0, y1 = max(r0, j * slab), min(r0 + h, (j + 1) * slab)
        if y0 >= y1:
            continue
        for (x0, x1), a in zip(chunks, arrays):
            xa, xb = max(c0, x0), min(c0 + w, x1)
            if xa < xb:
                pieces.append((y0 - r0, xa - c0, a[:, y0 - j * slab:y1 - j * slab, xa - x0:xb - x0]))
    if len(pieces) == 1:
        return pieces[0][2]
    out = np.empty((pieces[0][2].shape[0], h, w), dtype=np.float32)
    for dy, dx, p in pieces:
        out[:, dy:dy + p.shape[1], dx:dx + p.shape[2]] = p
    return out
