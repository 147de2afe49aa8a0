"""Deterministic sample streams over shard datasets, split across torchrun ranks and DataLoader workers.

For an epoch, a rank's stream is fixed by (seed, epoch, rank, world size) alone:

- ``sample`` mode (fewer shards than ranks, or ``limit`` set): every rank reads all shards in order, the same
  seeded buffer shuffle runs on every rank, and rank r keeps positions r, r + world, ... So the union of the
  ranks' k-th batches is exactly the k-th global batch of a 1-process run: DDP equals one process.
- ``shard`` mode (at least as many shards as ranks): shard order is shuffled with the epoch's seed and rank r
  reads shards r, r + world, ...; each rank shuffles its own stream (the usual webdataset recipe at scale).

DataLoader workers then take positions w, w + W, ... of the rank's stream and only they decode (and augment)
those samples; the loader hands items back round-robin, so the rank's order does not depend on the number of
workers. Resuming at step s skips s's batches of the epoch without decoding them.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .samples import Sample
from .shards import DatasetSpec, decode_sample, iter_raw

#: Samples held by the shuffle buffer (the reference uses 5000 for patching; BigEarthNet tiles are ~0.35 MB).
DEFAULT_SHUFFLE_BUFFER = 1000


def split_mode(n_files: int, world: int, limit: int | None) -> str:
    return "shard" if n_files >= world > 1 and limit is None else "sample"


def stream_rng(*parts: int) -> np.random.Generator:
    """A generator seeded by a tuple of integers (seed, epoch, ...): the same on every rank and worker."""
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


def buffer_shuffle(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items (webdataset's recipe, with a seeded generator)."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(len(buf)))
        buf[j], item = item, buf[j]
        yield item
    order = rng.permutation(len(buf))
    for j in order:
        yield buf[j]


def rank_stream(spec: DatasetSpec, split: str, *, epoch: int, rank: int, world: int, shuffle: bool,
                seed: int, buffer: int = DEFAULT_SHUFFLE_BUFFER, limit: int | None = None) -> Iterator[dict]:
    """The raw (undecoded) samples rank ``rank`` of ``world`` sees in ``epoch`` of ``split``, in order."""
    files = list(spec.split(split).files)
    mode = split_mode(len(files), world, limit)
    if mode == "shard":
        if shuffle:
            files = [files[i] for i in stream_rng(seed, epoch, 1).permutation(len(files))]
        raw: Iterator[dict] = iter_raw(files[rank::world])
        if shuffle:
            raw = buffer_shuffle(raw, buffer, stream_rng(seed, epoch, 2, rank))
        return raw
    raw = iter_raw(files)
    if limit is not None:
        raw = itertools.islice(raw, limit)
    if shuffle:
        raw = buffer_shuffle(raw, buffer, stream_rng(seed, epoch, 2))
    if world > 1:
        raw = (r for i, r in enumerate(raw) if i % world == rank)
    return raw


def split_size(spec: DatasetSpec, split: str, limit: int | None = None) -> int:
    n = spec.split(split).nsamples
    return min(n, limit) if limit is not None else n


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The augmentation generator of one sample in one epoch: the same on any rank and worker."""
    return stream_rng(seed, epoch, zlib.crc32(key.encode()))


Transform = Callable[[Sample, np.random.Generator], Any]


@dataclass
class TrainStream(IterableDataset):
    """Per-sample training items of one rank, epoch after epoch, from ``start_step`` on (infinite).

    Every epoch yields exactly ``steps_per_epoch * batch`` items (a rank whose shards run short starts its own
    stream of that epoch again); ``transform(sample, rng)`` turns a decoded sample into an item.
    """

    spec: DatasetSpec
    split: str
    batch: int  # per-rank batch size
    steps_per_epoch: int
    transform: Transform
    start_step: int = 0
    rank: int = 0
    world: int = 1
    seed: int = 0
    shuffle: bool = True
    buffer: int = DEFAULT_SHUFFLE_BUFFER
    limit: int | None = None

    def __post_init__(self) -> None:
        super().__init__()

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        per_epoch = self.steps_per_epoch * self.batch
        epoch = self.start_step // self.steps_per_epoch
        skip = (self.start_step % self.steps_per_epoch) * self.batch
        while True:
            for position, raw in enumerate(self._epoch_raw(epoch, per_epoch)):
                if position < skip or position % workers != worker:
                    continue
                sample = decode_sample(raw, self.spec)
                yield self.transform(sample, sample_rng(self.seed, epoch, sample.key))
            epoch, skip = epoch + 1, 0

    def _epoch_raw(self, epoch: int, n: int) -> Iterator[dict]:
        def once() -> Iterator[dict]:
            return rank_stream(self.spec, self.split, epoch=epoch, rank=self.rank, world=self.world,
                               shuffle=self.shuffle, seed=self.seed, buffer=self.buffer, limit=self.limit)

        out = 0
        while out < n:
            before = out
            for raw in once():
                yield raw
                out += 1
                if out == n:
                    return
            if out == before:
                raise ValueError(f"rank {self.rank} has no samples of split {self.split!r} "
                                 f"(dataset {self.spec.root}); use fewer ranks or more shards")


def _identity(item: Any) -> Any:
    return item


def batches(stream: TrainStream, workers: int = 0) -> Iterator[list[Any]]:
    """Lists of ``stream.batch`` items, read by ``workers`` DataLoader processes (0: in this process)."""
    # Its own generator: starting a loader draws a seed, which from torch's global generator would shift every
    # later random draw (dropout) of a resumed run against the uninterrupted one.
    loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_identity,
                        persistent_workers=False, prefetch_factor=4 if workers else None,
                        generator=torch.Generator().manual_seed(stream.seed))
    it = iter(loader)
    while True:
        yield [next(it) for _ in range(stream.batch)]


def eval_samples(spec: DatasetSpec, split: str, *, rank: int = 0, world: int = 1,
                 limit: int | None = None) -> Iterator[tuple[int, Sample]]:
    """(position, decoded sample) of a split in file order, positions r, r + world, ... for rank r."""
    raw = iter_raw(spec.split(split).files)
    if limit is not None:
        raw = itertools.islice(raw, limit)
    for i, r in enumerate(raw):
        if i % world == rank:
            yield i, decode_sample(r, spec)



def eval_batches(spec: DatasetSpec, split: str, batch_size: int, *, rank: int = 0, world: int = 1,
                 limit: int | None = None) -> Iterator[list[tuple[int, Sample]]]:
    """:func:`eval_samples` in lists of up to ``batch_size`` (the last one may be shorter)."""
    it = eval_samples(spec, split, rank=rank, world=world, limit=limit)
    while batch := list(itertools.islice(it, batch_size)):
        yield batch
