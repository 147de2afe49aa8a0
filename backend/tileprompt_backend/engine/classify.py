"""Zero-shot classification of every tile of a raster: read -> encode -> score -> write a GeoPackage."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import __version__, validation
from ..classmap import write_class_map
from ..errors import InputError
from ..models import cached_model, cached_runner, choose_model, resolve_card
from ..outputs import WRITER_TAG, guard_output, write_tiles_gpkg
from ..sentinel2 import open_raster
from ..tiling import make_grid
from .embed import CancelFn, EmbedStats, ProgressFn, check_bands, embed_tiles
from .head import logits, score_tiles, zero_shot_head
from ..paths import templates_path
from .prompts import load_templates, parse_prompts

#: The remedy for a raster without georeference, in each interface's words.
PIXEL_SPACE_FIXES = {
    "cli": "pass --pixel-space to classify it in pixel coordinates (x = column, y = -row, as QGIS draws it)",
    "http": 'send "pixel_space": true to classify it in pixel coordinates (x = column, y = -row, as QGIS draws it)',
    "processing": 'tick "Classify a raster without georeference in pixel coordinates"',
    "dock": "confirm classifying it in pixel coordinates",
}


@dataclass
class ClassifyResult:
    out: Path
    tiles: int  # tiles classified and written
    skipped_outside: int  # grid tiles outside the area of interest
    skipped_nodata: int  # tiles that were mostly nodata
    counts: dict[str, int]  # tiles per (top) class, every class listed
    seconds: float
    encode_seconds: float
    runner: str
    warnings: list[str] = field(default_factory=list)  # what the user should know: pixel space, a re-embedded raster
    run: dict = field(repr=False, default_factory=dict)
    model: str = ""  # the card used
    model_reason: str | None = None  # why, when no model was named (the layer's default)
    class_map: Path | None = None  # the class-map GeoTIFF, when asked for

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def classify(raster: str | Path, prompts: str | Sequence[str], out: str | Path, model: str | None = None,
             templates: str | Path | None = None, tile_px: int | None = None, stride: int | None = None,
             aoi: str | dict | None = None, aoi_crs: str | None = None, multi_label: bool = False,
             threshold: float = 0.5, band_map: Sequence[str] | None = None, level: str | None = None,
             offset: str | float | None = "auto", batch_size: int = 32, runner: str = "auto",
             device: str = "auto", progress: ProgressFn | None = None, cancel: CancelFn | None = None,
             index: str | Path | None = None, cache: bool = True, date: int | None = None,
             overwrite: bool = False, layer: str | None = None, pixel_space: bool = False,
             class_map: str | Path | None = None) -> ClassifyResult:
    """Classify every tile of ``raster`` against class ``prompts`` and write ``out`` (GeoPackage, atomically),
    and with ``class_map`` also the class-map GeoTIFF (``classmap.py``: one pixel per tile, class and scores).

    All inputs are validated before the model loads; every bad input is a ValueError naming the problem.
    ``model`` None picks the best card for the raster (``models.choose_model``); the result says which and why.
    ``offset`` ("auto", "none" or DN) is the Sentinel-2 processing-baseline offset reads subtract; the run
    metadata records what was applied and why.

    Tile embeddings come from an index when the raster (same files, band map, level) is complete in it for
    this model, tile size and stride: ``index`` (a folder), else the default cache index of the model + tile +
    stride. Then the image encoder never runs (nor loads) and only the prompts are encoded. A run that
    computed every tile of the grid (no area of interest) stores its embeddings there for the next run.
    Prompt sentences are cached per model too (``index.textcache``): sentences seen before cost no text
    tower. ``cache=False`` does none of this. Scores are computed from float16-rounded tile embeddings either
    way (the index stores float16), so a result is the same with or without the index.

    ``band_map`` may skip bands (``-``) and, with ``date``, name a stack of several dates
    (``validation.select_date``). ``out`` passes ``outputs.guard_output`` with every input of the run
    (``overwrite`` replaces a file TilePrompt did not write; ``layer`` adds a layer to a result GeoPackage).
    A raster without georeference is refused unless ``pixel_space``: then tiles are in QGIS's pixel
    coordinates (x = column, y = -row) and the result carries a warning.
    """
    started, t0 = _now(), time.perf_counter()
    threshold = validation.threshold(threshold)
    batch_size = validation.batch_size(batch_size)
    tile_px, stride = validation.tile_px(tile_px), validation.stride(stride)
    band_map = validation.select_date(validation.band_map(band_map), date)
    classes = parse_prompts(prompts)
    offset = validation.offset(offset)
    card = resolve_card(model) if model else None
    warnings: list[str] = []

    with open_raster(raster, band_map=band_map, level=level, offset=offset) as source:
        info = source.info
        choice = choose_model(info) if card is None else None
        if choice is not None:  # no model named: the best card for this layer
            card = choice.card
        template_file = templates_path(templates or card.templates)
        template_list = load_templates(template_file)
        out = guard_output(out, [raster, template_file, *info.files.values()], overwrite, layer=layer,
                           input_dirs=[card.path, index])
        if class_map is not None:
            class_map = guard_output(class_map, [raster, template_file, *info.files.values()], overwrite,
                                     suffixes=(".tif", ".tiff"), what="class map", input_dirs=[card.path, index])
        note = check_georeference(info, pixel_space)
        if note:
            warnings.append(note)
        grid = make_grid(info, tile_px or card.input.tile_px, stride, aoi=aoi, aoi_crs=aoi_crs)
        if not len(grid):
            raise ValueError("no tiles to classify in the area of interest")
        from ..index.build import required_bands  # the index package imports the engine: import here
        from ..index.reuse import cached_embeddings, changed_since_indexed, store_embeddings
        from ..index.textcache import CachedTextEncoder

        cached = cached_embeddings(card, info, band_map, level, grid, index) if cache else None
        if cache and cached is None:
            note = changed_since_indexed(card, info, band_map, level, grid, index)
            if note:
                warnings.append(note)
        check_bands(info, required_bands(card, info), card.id)
        loaded = cached_model(card, device=device) if cached is None else None

        def model_for_text():
            nonlocal loaded
            if loaded is None:
                loaded = cached_model(card, device=device)
            return loaded

        encode_text = CachedTextEncoder(card, model_for_text) if cache else loaded.encode_text
        head = zero_shot_head(encode_text, classes, template_list)

        stats = EmbedStats()
        features = []
        cells: list[tuple[int, int]] = []  # (row, col) of each feature, for the class map
        cell_scores = []
        counts = Counter({c.name: 0 for c in classes})
        if cached is not None:
            run_name, run_device = f"index ({cached.runner})", "none"
            batches = cached.batches(grid.tiles, batch_size, stats, progress, cancel)
        else:
            run_engine = cached_runner(loaded, backend=runner)
            run_name, run_device = run_engine.name, run_engine.device
            batches = embed_tiles(source, grid.tiles, loaded, run_engine, batch_size=batch_size,
                                  progress=progress, cancel=cancel, stats=stats)
        keep = cache and cached is None and grid.aoi is None  # a full grid: worth storing
        kept_tiles, kept_emb = [], []
        for tiles, emb in batches:
            # the index keeps float16: round here too, so scores never depend on where embeddings came from
            emb = np.asarray(emb).astype(np.float16)
            if keep:
                kept_tiles.extend(tiles)
                kept_emb.append(emb)
            s = score_tiles(logits(emb.astype(np.float32), head, card.logit_scale), multi_label=multi_label,
                            threshold=threshold, logit_bias=card.logit_bias)
            for i, tile in enumerate(tiles):
                props = _tile_attributes(tile, classes, s, i, multi_label)
                counts[props["class"]] += 1
                features.append((tile.polygon, props))
            if class_map is not None:
                cells.extend((tile.row, tile.col) for tile in tiles)
                cell_scores.append(np.asarray(s.scores, dtype=np.float32))
        stored = None
        if keep and features:
            stored = store_embeddings(loaded.card, info, band_map, level, grid, index, kept_tiles, kept_emb,
                                      stats.skipped_nodata, run_name)

    if not features:
        raise ValueError(f"every tile in the area is nodata ({stats.skipped_nodata} tiles skipped); nothing to classify")
    features.sort(key=lambda f: f[1]["id"])  # grid order, however the reader went through the raster

    run = {
        "run_id": uuid.uuid4().hex,
        "software": f"tileprompt {__version__}",
        "started": started,
        "finished": _now(),
        "model": card.id,
        "model_title": card.title,
        "model_card_hash": card.card_hash(),
        "model_trained": card.trained,
        "model_choice": choice.reason if choice is not None else "named by the user",
        "runner": run_name,
        "device": run_device,
        "embeddings_index": (str(cached.store.root) if cached is not None else str(stored) if stored else None),
        "embeddings_reused": cached is not None,
        "text_cached": (f"{encode_text.hits} of {encode_text.hits + encode_text.misses} sentences"
                        if cache else None),
        "raster": str(Path(raster).resolve()),
        "raster_layout": info.layout,
        "raster_level": info.level,
        "raster_bands": list(info.bands),
        "offset": info.offset.to_json(),
        "band_map": band_map,
        "date": date,
        "pixel_space": not info.georeferenced,
        "bands_used": list(required_bands(card, info)),
        "prompts": [{"class": c.name, "phrases": list(c.phrases), "column": c.column} for c in classes],
        "templates": template_list,
        "templates_source": str(templates or card.templates),
        "mode": "multi-label" if multi_label else "single-label",
        "threshold": threshold if multi_label else None,
        "logit_scale": card.logit_scale,
        "tile_px": grid.tile_px,
        "stride": grid.stride,
        "grid": [grid.n_rows, grid.n_cols],
        "aoi": grid.aoi.wkt if grid.aoi is not None else None,
        "aoi_crs": aoi_crs,
        "tiles": len(features),
        "skipped_outside": grid.skipped_outside,
        "skipped_nodata": stats.skipped_nodata,
        "counts": dict(counts),
        "warnings": warnings,
        "class_map": str(class_map) if class_map is not None else None,
    }
    write_tiles_gpkg(out, info.crs, _fields(classes, multi_label), features, run, layer=layer or "tiles",
                     add_layer=layer is not None)
    if class_map is not None:
        rows, cols = np.asarray(cells, dtype=np.int64).reshape(-1, 2).T
        write_class_map(class_map, info.crs, grid.transform, grid.tile_px, grid.stride, (grid.n_rows, grid.n_cols),
                        rows, cols, np.concatenate(cell_scores), [c.name for c in classes],
                        [c.column for c in classes], {WRITER_TAG: run["run_id"], "TILEPROMPT_MODEL": card.id})
    seconds = time.perf_counter() - t0
    return ClassifyResult(out=out, tiles=len(features), skipped_outside=grid.skipped_outside,
                          skipped_nodata=stats.skipped_nodata, counts=dict(counts), seconds=seconds,
                          encode_seconds=stats.encode_seconds, runner=run_name, warnings=warnings, run=run,
                          model=card.id, model_reason=choice.reason if choice is not None else None,
                          class_map=class_map)


def check_georeference(info, pixel_space: bool) -> str | None:
    """Refuse a raster without georeference unless ``pixel_space``; then the warning every interface shows."""
    if info.georeferenced:
        return None
    if not pixel_space:
        raise InputError(f"the raster has no georeference (no CRS, no geotransform): {info.path}", "no_georeference",
                         PIXEL_SPACE_FIXES)
    return ("the raster has no georeference: tiles are in pixel coordinates (x = column, y = -row) without a CRS; "
            "they overlay the image in QGIS, not a map")


def _fields(classes, multi_label: bool) -> dict[str, str]:
    fields = {"id": "int", "row": "int", "col": "int", "col_off": "int", "row_off": "int", "width": "int",
              "height": "int", "class": "str", "score": "float", "second": "str", "margin": "float"}
    if multi_label:
        fields["labels"] = "str"
    fields.update({c.column: "float" for c in classes})
    return fields


def _tile_attributes(tile, classes, s, i: int, multi_label: bool) -> dict:
    w = tile.window
    best, second = int(s.best[i]), int(s.second[i])
    props = {
        "id": tile.id, "row": tile.row, "col": tile.col, "col_off": int(w.col_off), "row_off": int(w.row_off),
        "width": int(w.width), "height": int(w.height),
        "class": classes[best].name, "score": float(s.scores[i, best]),
        "second": classes[second].name if len(classes) > 1 else None, "margin": float(s.margin[i]),
    }
    if multi_label:
        props["labels"] = ";".join(c.name for c, on in zip(classes, s.labels[i]) if on)
    props.update({c.column: float(v) for c, v in zip(classes, np.asarray(s.scores[i]))})
    return props
