"""Indexing: embed every tile of many scenes once, into an index directory (see :mod:`.store`).

Single process by default. Bulk indexing shards the scene list across ``torchrun`` ranks::

    torchrun --nproc_per_node 4 -m tileprompt_backend.index.build SCENE... --index DIR [--model M] [--tile N]

Rank r takes scenes r, r + world, r + 2 world, ... (those not already in the index), writes them into its own
shard index ``DIR/shards/<run>-rank<r>``, and after a barrier (gloo on CPU) rank 0 moves every complete shard
scene into ``DIR`` with the same atomic commit a single process uses, then removes the shards. Shards left by a
killed run hold only complete scenes or nothing; the next run's merge adopts or discards them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np

from .. import validation
from ..engine.classify import check_georeference
from ..engine.embed import Cancelled, EmbedStats, embed_tiles
from ..models import cached_model, cached_runner, choose_model, resolve_card
from ..models.downloads import ensure_weights
from ..models.loading import DEVICES, LoadedModel
from ..models.runners import BACKENDS
from ..sentinel2 import open_raster
from ..tiling import make_grid
from .store import IndexStore, ModelKey, SceneRecord, default_index_dir, model_key, scene_fingerprint, scene_key
from .store import scene_record
from .vectors import choose_method

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
SHARDS_DIR = "shards"


@dataclass
class IndexResult:
    index: Path
    scenes: int  # distinct scenes asked for (all complete in the index now)
    tiles: int  # embedded tiles of those scenes
    computed: int  # tiles encoded by this run
    reused: int  # tiles found complete in the index
    skipped_nodata: int  # mostly-nodata tiles of those scenes (not embedded)
    seconds: float
    search_method: str  # how a search over the whole index runs now
    index_scenes: int = 0  # scenes in the whole index
    index_tiles: int = 0  # tiles in the whole index
    scene_keys: list[str] = field(default_factory=list)
    model: str = ""  # the card used
    model_reason: str | None = None  # why, when no model was named (the first raster's default)


@dataclass
class _Planned:
    raster: str
    band_map: list[str] | None
    level: str | None
    offset: str | float | None
    key: str
    fingerprint: dict[str, Any]
    grid_tiles: int


RASTER_FIELDS = ("raster", "band_map", "date", "level", "offset")


def raster_inputs(rasters: Sequence[Any]) -> list[tuple[str, list[str] | None, str | None, str | float | None]]:
    """(raster, band_map, level, offset) for each item: a path, a dict or a ``schemas.RasterInput``."""
    if isinstance(rasters, (str, os.PathLike, dict)) or not rasters:
        rasters = [rasters] if rasters else []
    out = []
    for item in rasters:
        if isinstance(item, (str, os.PathLike)):
            out.append((os.fspath(item), None, None, None))
            continue
        d = item.model_dump() if hasattr(item, "model_dump") else dict(item) if isinstance(item, dict) else None
        if d is None or not d.get("raster"):
            raise ValueError(f"a raster to index must be a path or {{'raster': path, 'band_map', 'level', 'offset'}}, "
                             f"got {item!r}")
        unknown = set(d) - set(RASTER_FIELDS)
        if unknown:
            raise ValueError(f"unknown raster field(s) {sorted(unknown)} (valid: {', '.join(sorted(RASTER_FIELDS))})")
        band_map = validation.select_date(validation.band_map(d.get("band_map") or None), d.get("date"))
        out.append((os.fspath(d["raster"]), band_map, d.get("level"), validation.offset(d.get("offset"))))
    if not out:
        raise ValueError("no rasters to index")
    return out


def required_bands(card, info) -> tuple[str, ...]:
    """The bands a card's model reads from a raster (the loader's own rule), checked before any model loads."""
    return LoadedModel.required_bands(SimpleNamespace(card=card), info)


def _model_key_or_fail(card, tile_px: int, stride: int) -> ModelKey:
    mk = model_key(card, tile_px, stride)
    if mk is None:
        raise ValueError(f"model {card.id!r}: weights are not available, cannot key an index")
    return mk


def _tile_params(card, tile_px: int | None, stride: int | None) -> tuple[int, int]:
    tile = int(tile_px or card.input.tile_px)
    if tile < 1:
        raise ValueError(f"tile size must be a positive number of pixels, got {tile}")
    step = tile if stride is None else int(stride)
    if step < 1:
        raise ValueError(f"stride must be a positive number of pixels, got {step}")
    return tile, step


def search_method_for(store: IndexStore) -> str:
    """How a search over the whole index runs now. Above the exact limit this loads the index for search,
    which brings its approximate vector index in step with the scenes just added (:mod:`.ann`)."""
    method = choose_method(store.total_tiles())
    if method in ("ivf", "hnsw"):
        from .query import load_view

        return load_view(store).vectors.description
    return {"flat": "faiss-flat-ip", "numpy": "numpy-exact"}[method]


def build_index(rasters: Sequence[Any], model: str | None = None, tile_px: int | None = None,
                stride: int | None = None, index: str | Path | None = None, device: str = "auto",
                runner: str = "auto", progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                batch_size: int = 32, pixel_space: bool = False) -> IndexResult:
    """Embed every tile of ``rasters`` into an index (default: the cache's index for model + tile + stride).

    Scenes already complete in the index are reused; every input is validated before the model loads.
    ``cancel()`` returning True raises :class:`~tileprompt_backend.engine.Cancelled`; scenes finished before it
    stay complete, the one in progress leaves nothing. A raster without georeference is refused unless
    ``pixel_space`` (as in classify).
    """
    return _build(rasters, model, tile_px, stride, index, device, runner, progress, cancel, batch_size,
                  pixel_space=pixel_space)


def _build(rasters, model, tile_px, stride, index, device, runner, progress, cancel, batch_size,
           also_in: IndexStore | None = None, pixel_space: bool = False) -> IndexResult:
    t0 = time.perf_counter()
    inputs = raster_inputs(rasters)
    batch_size = validation.batch_size(batch_size)
    tile_px, stride = validation.tile_px(tile_px), validation.stride(stride)
    if runner not in BACKENDS:
        raise ValueError(f"unknown runner backend {runner!r} (valid: {', '.join(BACKENDS)})")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r} (valid: {', '.join(DEVICES)})")
    card, choice = index_card(model, inputs)
    card = ensure_weights(card)
    tile, step = _tile_params(card, tile_px, stride)
    mk = _model_key_or_fail(card, tile, step)
    root = Path(index).expanduser() if index is not None else default_index_dir(mk)
    store = IndexStore.create_or_open(root, mk)
    store.cleanup()

    # 1. validate every raster and key it (cheap: opens headers only)
    planned: dict[str, _Planned] = {}
    for raster, band_map, level, offset in inputs:
        with open_raster(raster, band_map=band_map, level=level, offset=offset) as source:
            info = source.info
            check_georeference(info, pixel_space)
            required_bands(card, info)  # a raster the model cannot read fails here, before any work
            grid = make_grid(info, tile, step)
            fp = scene_fingerprint(info, band_map, level)
            key = scene_key(fp, mk)
            planned.setdefault(key, _Planned(raster, band_map, level, offset, key, fp, len(grid)))

    complete = {s.key: s for s in store.scenes()}
    if also_in is not None:
        complete.update({s.key: s for s in also_in.scenes() if s.key in planned})
    todo = [p for p in planned.values() if p.key not in complete]
    reused = sum(complete[k].tiles for k in planned if k in complete)

    # 2. embed what is missing
    computed = 0
    records = {k: complete[k] for k in planned if k in complete}
    if todo:
        loaded = cached_model(card, device=device)
        run_engine = cached_runner(loaded, backend=runner)
        total, done_before = sum(p.grid_tiles for p in todo), 0
        for p in todo:
            def scene_progress(done: int, _total: int, base=done_before) -> None:
                if progress is not None:
                    progress(base + done, total)

            rec, n = embed_scene(store, p, tile, step, loaded, run_engine, batch_size, scene_progress, cancel)
            records[p.key] = rec
            computed += n
            done_before += p.grid_tiles
        if progress is not None:
            progress(total, total)

    index_tiles = store.total_tiles()
    return IndexResult(
        index=store.root, scenes=len(planned), tiles=sum(r.tiles for r in records.values()), computed=computed,
        reused=reused, skipped_nodata=sum(r.skipped_nodata for r in records.values()),
        seconds=time.perf_counter() - t0, search_method=search_method_for(store),
        index_scenes=len(store.scenes()), index_tiles=index_tiles, scene_keys=list(planned), model=card.id,
        model_reason=choice.reason if choice is not None else None)


def index_card(model: str | None, inputs: Sequence[tuple]) -> tuple[Any, Any]:
    """(card, choice): the named model, or the best card for the first raster (``models.choose_model``)."""
    if model:
        return resolve_card(model), None
    raster, band_map, level, offset = inputs[0]
    with open_raster(raster, band_map=band_map, level=level, offset=offset) as source:
        choice = choose_model(source.info)
    return choice.card, choice


def embed_scene(store: IndexStore, p: _Planned, tile: int, step: int, loaded, run_engine, batch_size: int,
                progress: ProgressFn | None, cancel: CancelFn | None) -> tuple[SceneRecord, int]:
    """Embed one scene's usable tiles and commit them; returns (committed record, tiles encoded)."""
    with open_raster(p.raster, band_map=p.band_map, level=p.level, offset=p.offset) as source:
        info = source.info
        fp = scene_fingerprint(info, p.band_map, p.level)
        if fp != p.fingerprint:
            raise ValueError(f"raster {p.raster} changed while it was being indexed")
        grid = make_grid(info, tile, step)
        record = scene_record(info, fp, p.key, grid, p.band_map, p.level)
        stats = EmbedStats()
        tiles, chunks = [], []
        for batch_tiles, emb in embed_tiles(source, grid.tiles, loaded, run_engine, batch_size=batch_size,
                                            progress=progress, cancel=cancel, stats=stats):
            tiles.extend(batch_tiles)
            chunks.append(np.asarray(emb, dtype=np.float16))
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")
    record.skipped_nodata = stats.skipped_nodata
    record.runner = run_engine.name
    emb16 = np.concatenate(chunks) if chunks else np.zeros((0, store.embed_dim), np.float16)
    return store.add_scene(record, tiles, emb16), len(tiles)


# --- command line and torchrun (options: cli.py, `tileprompt index`) ----------------------------------------------

def _inputs_from_args(args: argparse.Namespace) -> list[dict]:
    rasters = list(args.rasters)
    if args.scene_list:
        path = Path(args.scene_list).expanduser()
        if not path.is_file():
            raise ValueError(f"scene list not found: {path}")
        rasters += [line.strip() for line in path.read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    if not rasters:
        raise ValueError("no rasters to index: give RASTER... or --scene-list FILE")
    return [{"raster": r, "band_map": args.band_map, "date": args.date, "level": args.level, "offset": args.offset}
            for r in rasters]


def _print_result(r: IndexResult, world: int = 1) -> None:
    ranks = f" on {world} ranks" if world > 1 else ""
    if r.model_reason:
        print(f"model {r.model_reason}")
    print(f"indexed {r.scenes} scene(s), {r.tiles} tiles in {r.seconds:.1f} s{ranks}: {r.computed} computed, "
          f"{r.reused} reused, {r.skipped_nodata} nodata tiles skipped")
    print(f"index {r.index}: {r.index_scenes} scene(s), {r.index_tiles} tiles; search: {r.search_method}")


def run(args: argparse.Namespace) -> int:
    """``tileprompt index``: single process, or one rank of a torchrun job when WORLD_SIZE > 1."""
    inputs = _inputs_from_args(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _run_distributed(args, inputs)
    from ..bars import StageBars, tile_bar
    from ..models import download_hooks

    progress, close = tile_bar("index", args.quiet)
    bars = StageBars(args.quiet)
    try:
        with download_hooks(progress=bars):  # a model not downloaded yet: bars for its download first
            result = build_index(inputs, model=args.model, tile_px=args.tile, stride=args.stride, index=args.index,
                                 device=args.device, runner=args.runner, progress=progress,
                                 batch_size=args.batch_size, pixel_space=args.pixel_space)
    finally:
        bars.close()
        close()
    _print_result(result)
    return 0


def _run_distributed(args: argparse.Namespace, inputs: list[dict]) -> int:
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group("gloo")
    t0 = time.perf_counter()
    try:
        # rank 0 resolves the model (downloading weights once) and creates the main index; the others follow
        setup: list[Any] = [None]
        if rank == 0:
            try:
                card = ensure_weights(index_card(args.model, raster_inputs(inputs))[0])
                tile, step = _tile_params(card, args.tile, args.stride)
                mk = _model_key_or_fail(card, tile, step)
                root = Path(args.index).expanduser() if args.index else default_index_dir(mk)
                store = IndexStore.create_or_open(root, mk)
                store.cleanup()
                setup[0] = {"root": str(store.root), "run": uuid.uuid4().hex[:8], "model": str(card.path)}
            except (ValueError, OSError) as e:
                setup[0] = {"error": str(e)}
        dist.broadcast_object_list(setup, src=0)
        if "error" in setup[0]:
            if rank == 0:
                raise ValueError(setup[0]["error"])
            return 2
        main = IndexStore.open(setup[0]["root"])
        shard = main.root / SHARDS_DIR / f"{setup[0]['run']}-rank{rank:05d}"
        mine = inputs[rank::world]
        outcome: dict[str, Any] = {"rank": rank}
        try:
            if mine:
                r = _build(mine, setup[0]["model"], args.tile, args.stride, shard, args.device, args.runner, None,
                           None, args.batch_size, also_in=main, pixel_space=args.pixel_space)
                outcome.update(asdict(r), index=str(r.index))
            else:
                outcome.update(scenes=0, tiles=0, computed=0, reused=0, skipped_nodata=0)
        except (ValueError, OSError, Cancelled) as e:
            outcome["error"] = f"rank {rank}: {e}"
        outcomes: list[Any] = [None] * world
        dist.all_gather_object(outcomes, outcome)
        dist.barrier()
        if rank == 0:
            merged = merge_shards(main)
            n_tiles = main.total_tiles()
            total = IndexResult(
                index=main.root, scenes=sum(o.get("scenes", 0) for o in outcomes if "error" not in o),
                tiles=sum(o.get("tiles", 0) for o in outcomes if "error" not in o),
                computed=sum(o.get("computed", 0) for o in outcomes if "error" not in o),
                reused=sum(o.get("reused", 0) for o in outcomes if "error" not in o),
                skipped_nodata=sum(o.get("skipped_nodata", 0) for o in outcomes if "error" not in o),
                seconds=time.perf_counter() - t0, search_method=search_method_for(main),
                index_scenes=len(main.scenes()), index_tiles=n_tiles)
            _print_result(total, world)
            print(f"merged {merged} scene(s) from {world} shard(s)")
        dist.barrier()  # every rank waits for the merge, so no rank exits while rank 0 still moves its shard
        errors = [o["error"] for o in outcomes if "error" in o]
        if errors and rank == 0:
            raise ValueError("; ".join(errors))
        return 2 if errors else 0
    finally:
        dist.destroy_process_group()


def merge_shards(main: IndexStore) -> int:
    """Move every complete scene of every shard under ``main/shards`` into ``main``; remove the shards."""
    shards_dir = main.root / SHARDS_DIR
    if not shards_dir.is_dir():
        return 0
    merged = 0
    for shard_dir in sorted(p for p in shards_dir.iterdir() if p.is_dir()):
        try:
            shard = IndexStore.open(shard_dir)
            if shard.meta.get("model_key") == main.meta.get("model_key"):
                for rec in shard.scenes():
                    if main.adopt_scene(shard, rec) is not None:
                        merged += 1
        except ValueError:
            pass  # a shard whose creation never finished holds nothing complete
        shutil.rmtree(shard_dir, ignore_errors=True)
    shutil.rmtree(shards_dir, ignore_errors=True)
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    from ..cli import main as cli_main

    return cli_main(["index", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
