"""Unlabelled training tiles straight from rasters and folders of scenes, cut on the fly (no shards written).

``find_scenes`` turns the inputs into scenes: a raster file or a product folder the readers open (SAFE
``IMG_DATA``, a folder of band files such as a Major-TOM or SSL4EO date folder, a BigEarthNet patch) is one
scene; any other folder is searched, depth first in name order, for scenes. Scenes the model cannot read (an
RGB JPEG, a product lacking a band) are skipped and reported.

``SceneStream`` reads them during training without holding a scene in memory: each reader (one DataLoader
worker of one rank) opens a few scenes at a time and takes one strip of tiles (one grid row, one read) from
each in turn, drops mostly-nodata tiles by the engine's rule, and shuffles the tiles through a buffer. With at
least as many scenes as readers, the scenes of an epoch are shuffled and dealt to the readers; with fewer, every
reader reads every scene and keeps every R-th usable tile. A rank's stream is its workers' streams taken in turn
(what the DataLoader does), so it depends on (seed, epoch, rank, world size, workers); resuming skips the tiles
already trained on (reading them again, but not augmenting them). An epoch is nominal: as many tiles as the
scenes' grids have; a reader whose scenes give fewer usable tiles reads them again.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from torch.utils.data import IterableDataset, get_worker_info

from ...engine.reading import read_tile_rows
from ...sentinel2 import open_raster
from ...tiling import MAX_NODATA_FRACTION, make_grid, nodata_fraction
from .rasters import raster_slug
from .samples import Sample
from .stream import Transform, buffer_shuffle, sample_rng, stream_rng

log = logging.getLogger(__name__)
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt")
DEFAULT_OPEN_SCENES = 8


@dataclass(frozen=True)
class Scene:
    path: str
    tiles: int  # grid tiles at the stream's tile size and stride
    level: str
    band_map: tuple[str, ...] | None = None


@dataclass
class SceneSearch:
    scenes: list[Scene] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "path: reason"


def find_scenes(inputs: Sequence[str | Path], tile_px: int, stride: int | None = None,
                check: Callable[[Any], None] | None = None, band_map: Sequence[str] | None = None,
                level: str | None = None) -> SceneSearch:
    """The scenes among ``inputs`` (rasters, product folders, folders of them), each with its grid size.

    ``check(info)`` raises ValueError for a scene the caller cannot use (the model's band check); such scenes
    are skipped with the reason. A missing input is a ValueError; no scene at all is a ValueError too.
    """
    found = SceneSearch()
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise ValueError(f"raster or folder not found: {path}")
        _search(path, tile_px, stride, check, band_map, level, found, top=True)
    if not found.scenes:
        why = f" (skipped: {'; '.join(found.skipped[:5])})" if found.skipped else ""
        raise ValueError(f"no usable Sentinel-2 scene in {', '.join(map(str, inputs))}{why}")
    return found


def _search(path: Path, tile_px: int, stride, check, band_map, level, found: SceneSearch, top: bool) -> None:
    if path.is_file() and not top and path.suffix.lower() not in RASTER_SUFFIXES:
        return
    try:
        src = open_raster(path, band_map=band_map, level=level)
    except ValueError as e:
        if path.is_file():
            found.skipped.append(f"{path}: {e}")
            return
        for child in sorted(path.iterdir()):  # not a product folder: look inside
            _search(child, tile_px, stride, check, band_map, level, found, top=False)
        return
    with src:
        info = src.info
        try:
            if check is not None:
                check(info)
            tiles = len(make_grid(info, tile_px, stride))
        except ValueError as e:
            found.skipped.append(f"{path}: {e}")
            return
    found.scenes.append(Scene(str(path.resolve()), tiles, info.level, tuple(band_map) if band_map else None))


def scene_strips(scene: Scene, tile_px: int, stride: int | None,
                 bands_for: Callable[[Any], Sequence[str]]) -> Iterator[list[Sample]]:
    """The usable tiles of one scene, one grid row (one read) at a time."""
    with open_raster(scene.path, band_map=list(scene.band_map) if scene.band_map else None,
                     level=scene.level) as src:
        info = src.info
        bands = tuple(bands_for(info))
        grid = make_grid(info, tile_px, stride)
        slug = raster_slug(scene.path)
        for _, row in itertools.groupby(grid.tiles, key=lambda t: t.row):
            strip = []
            for tile, raw in read_tile_rows(src, list(row), bands):
                if nodata_fraction(raw, info.nodata) > MAX_NODATA_FRACTION:
                    continue
                w = tile.window
                meta = {"source": "raster", "raster": scene.path, "row": tile.row, "col": tile.col,
                        "transform": list(info.transform @ Affine.translation(int(w.col_off), int(w.row_off)))[:6]}
                strip.append(Sample(key=f"{slug}-r{tile.row:05d}-c{tile.col:05d}", image=np.array(raw),
                                    bands=bands, level=info.level, meta=meta))
            yield strip


def interleave_scenes(scenes: Sequence[Scene], tile_px: int, stride: int | None,
                      bands_for: Callable[[Any], Sequence[str]], open_scenes: int) -> Iterator[Sample]:
    """Tiles of ``scenes``, ``open_scenes`` at a time, one strip from each in turn (batches mix scenes)."""
    pending = iter(scenes)
    active: deque[Iterator[list[Sample]]] = deque()
    while True:
        while len(active) < open_scenes:
            scene = next(pending, None)
            if scene is None:
                break
            active.append(scene_strips(scene, tile_px, stride, bands_for))
        if not active:
            return
        strips = active.popleft()
        strip = next(strips, None)
        if strip is None:
            continue
        yield from strip
        active.append(strips)


def share(n: int, worker: int, workers: int) -> int:
    """How many of positions 0..n-1 fall to ``worker`` when positions go round-robin to ``workers``."""
    return max(0, (n - worker + workers - 1) // workers)


@dataclass
class SceneStream(IterableDataset):
    """Per-sample training items of one rank from scenes, epoch after epoch, from ``start_step`` on (infinite).

    ``bands_for(info)``: the bands to read (the model's ``required_bands``). Every epoch yields
    ``steps_per_epoch * batch`` items.
    """

    scenes: list[Scene]
    tile_px: int
    stride: int | None
    bands_for: Callable[[Any], Sequence[str]]
    batch: int  # per-rank batch size
    steps_per_epoch: int
    transform: Transform
    start_step: int = 0
    rank: int = 0
    world: int = 1
    seed: int = 0
    buffer: int = 256
    open_scenes: int = DEFAULT_OPEN_SCENES

    def __post_init__(self) -> None:
        super().__init__()

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, readers = self.rank * workers + worker, self.world * workers
        per_epoch = self.steps_per_epoch * self.batch
        epoch = self.start_step // self.steps_per_epoch
        skip = (self.start_step % self.steps_per_epoch) * self.batch
        while True:
            quota, done = share(per_epoch, worker, workers), share(skip, worker, workers)
            for k, sample in enumerate(itertools.islice(self.epoch_samples(epoch, reader, readers), quota)):
                if k >= done:
                    yield self.transform(sample, sample_rng(self.seed, epoch, sample.key))
            epoch, skip = epoch + 1, 0

    def epoch_samples(self, epoch: int, reader: int, readers: int) -> Iterator[Sample]:
        """Reader ``reader``'s tiles of ``epoch``, shuffled, read again as often as the epoch needs."""
        order = [self.scenes[i] for i in stream_rng(self.seed, epoch, 3).permutation(len(self.scenes))]
        mine = order[reader::readers] if len(order) >= readers else order
        for again in itertools.count():
            tiles: Iterator[Sample] = interleave_scenes(mine, self.tile_px, self.stride, self.bands_for,
                                                        self.open_scenes)
            if len(order) < readers:
                tiles = (s for j, s in enumerate(tiles) if j % readers == reader)
            produced = 0
            for sample in buffer_shuffle(tiles, self.buffer, stream_rng(self.seed, epoch, 4, reader, again)):
                produced += 1
                yield sample
            if produced == 0:
                raise ValueError(f"no usable tiles in {', '.join(s.path for s in mine[:3])}"
                                 f"{' ...' if len(mine) > 3 else ''} (every tile is mostly nodata)")
