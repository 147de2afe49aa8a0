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
from ..outputs import WRITER_TAG, guard_output, write_layer
from ..paths import templates_path
from ..sentinel2 import open_raster
from ..tiling import make_grid
from .embed import CancelFn, EmbedStats, ProgressFn, check_bands, embed_tiles
from .examples import (EXAMPLE_FIELD, check_model, encode_vectors, example_vectors, model_stamp, read_examples,
                       resolve_classes)
from .fewshot import DEFAULT_METHOD, METHODS, fit_correction, zero_shot_linear
from .head import probabilities, rank_scores, zero_shot_head
from .prompts import load_templates, parse_prompts
from .transductive import refine

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
    correction: dict | None = None  # few-shot correction: method, examples per class, new classes, seconds
    transductive: dict | None = None  # context-aware refinement: seconds, tiles whose class changed
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
             examples: str | Path | None = None, context: bool = False,
             fewshot_method: str = DEFAULT_METHOD, class_map: str | Path | None = None) -> ClassifyResult:
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

    ``examples`` (a result GeoPackage with corrected tiles, or polygons with a ``class`` field; see
    engine.examples) corrects the zero-shot head with those tiles (engine.fewshot, ``fewshot_method``); the run
    row keeps every example with its embedding. ``context`` (context-aware zero-shot) refines the single-label
    probabilities with the layer's own tiles (engine.transductive). Both default to off: plain zero-shot.
    """
    started, t0 = _now(), time.perf_counter()
    threshold = validation.threshold(threshold)
    batch_size = validation.batch_size(batch_size)
    tile_px, stride = validation.tile_px(tile_px), validation.stride(stride)
    band_map = validation.select_date(validation.band_map(band_map), date)
    classes = parse_prompts(prompts)
    examples = validation.examples(examples)
    validation.context(context, multi_label)
    if fewshot_method not in METHODS:
        raise ValueError(f"unknown few-shot method {fewshot_method!r} (valid: {', '.join(METHODS)})")
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
        out = guard_output(out, [raster, template_file, examples, *info.files.values()], overwrite, layer=layer,
                           input_dirs=[card.path, index])
        if class_map is not None:
            class_map = guard_output(class_map, [raster, template_file, examples, *info.files.values()], overwrite,
                                     suffixes=(".tif", ".tiff"), what="class map", input_dirs=[card.path, index])
        note = check_georeference(info, pixel_space)
        if note:
            warnings.append(note)
        grid = make_grid(info, tile_px or card.input.tile_px, stride, aoi=aoi, aoi_crs=aoi_crs)
        if not len(grid):
            raise ValueError("no tiles to classify in the area of interest")
        found = read_examples(examples, info, grid.tile_px, grid.stride) if examples is not None else None
        if found is not None:
            check_model(found, card)
            classes, example_labels = resolve_classes(classes, found)
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
        has_text = np.array([bool(c.phrases) for c in classes])
        head = np.zeros((len(classes), int(card.embed_dim)), dtype=np.float32)
        head[has_text] = zero_shot_head(encode_text, [c for c in classes if c.phrases], template_list)

        stats = EmbedStats()
        if cached is not None:
            run_name, run_device = f"index ({cached.runner})", "none"
            batches = cached.batches(grid.tiles, batch_size, stats, progress, cancel)
        else:
            run_engine = cached_runner(loaded, backend=runner)
            run_name, run_device = run_engine.name, run_engine.device
            batches = embed_tiles(source, grid.tiles, loaded, run_engine, batch_size=batch_size,
                                  progress=progress, cancel=cancel, stats=stats)
        tiles, chunks = [], []
        for batch_tiles, emb in batches:
            # the index keeps float16: round here too, so scores never depend on where embeddings came from
            tiles.extend(batch_tiles)
            chunks.append(np.asarray(emb).astype(np.float16))
        emb16 = np.concatenate(chunks) if chunks else np.zeros((0, int(card.embed_dim)), np.float16)
        stored = None
        if cache and cached is None and grid.aoi is None and tiles:  # a full grid: worth storing
            stored = store_embeddings(loaded.card, info, band_map, level, grid, index, tiles, chunks,
                                      stats.skipped_nodata, run_name)

    if not tiles:
        raise ValueError(f"every tile in the area is nodata ({stats.skipped_nodata} tiles skipped); "
                         "nothing to classify")

    # the parallel reader may hand batches over out of grid order: the layer lists tiles in grid order
    order = np.argsort([t.id for t in tiles], kind="stable")
    tiles, emb16 = [tiles[i] for i in order], emb16[order]
    emb = emb16.astype(np.float32)
    raster_path = str(Path(raster).resolve())
    linear, correction, example_rows = zero_shot_linear(head, card.logit_scale), None, {}
    if found is not None:
        t_fit = time.perf_counter()
        positions = {t.id: i for i, t in enumerate(tiles)}
        vectors = example_vectors(found, card, raster_path, grid.tile_px, grid.stride, positions, emb16)
        linear = fit_correction(fewshot_method, head, card.logit_scale, vectors.astype(np.float32), example_labels,
                                tiles=emb, has_text=has_text)
        example_rows = {e.tile: classes[y].name for e, y in zip(found.examples, example_labels)
                        if e.on_grid(raster_path, grid.tile_px, grid.stride) and e.tile in positions}
        correction = _correction_summary(found, classes, example_labels, has_text, fewshot_method,
                                         time.perf_counter() - t_fit)
    probs = probabilities(linear.logits(emb), multi_label=multi_label, logit_bias=card.logit_bias)
    refinement = None
    if context:
        refinement = refine(probs, emb, np.array([t.row for t in tiles]), np.array([t.col for t in tiles]))
        probs = refinement.probabilities
    s = rank_scores(probs, multi_label=multi_label, threshold=threshold)
    columns = _columns(tiles, classes, s, multi_label)
    columns[EXAMPLE_FIELD] = [example_rows.get(t.id) for t in tiles]
    counts = Counter({c.name: 0 for c in classes})
    counts.update(dict(zip(*np.unique(columns["class"], return_counts=True))))
    counts = Counter({name: int(n) for name, n in counts.items()})
    transductive_summary = None if refinement is None else {
        "seconds": round(refinement.seconds, 4), "changed": refinement.changed, "rounds": refinement.rounds,
        "neighbour_pairs": refinement.neighbour_pairs}

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
        "level": level,
        "raster_level": info.level,
        "raster_bands": list(info.bands),
        "offset": info.offset.to_json(),
        "band_map": band_map,
        "date": date,
        "pixel_space": not info.georeferenced,
        "bands_used": list(required_bands(card, info)),
        "prompts": [{"class": c.name, "phrases": list(c.phrases), "column": c.column} for c in classes],
        "examples_file": str(found.path) if found is not None else None,
        "examples": ([{"class": classes[y].name, "given": e.cls, "raster": e.raster, "tile": e.tile,
                       "tile_px": e.tile_px, "stride": e.stride, "source": e.source}
                      for e, y in zip(found.examples, example_labels)] if found is not None else None),
        "examples_embeddings": encode_vectors(vectors) if found is not None else None,
        "examples_model": model_stamp(card) if found is not None else None,
        "correction": correction,
        "transductive": transductive_summary,
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
        "tiles": len(tiles),
        "skipped_outside": grid.skipped_outside,
        "skipped_nodata": stats.skipped_nodata,
        "counts": dict(counts),
        "warnings": warnings,
        "class_map": str(class_map) if class_map is not None else None,
    }
    write_layer(out, info.crs, _fields(classes, multi_label), [t.polygon for t in tiles], columns, run,
                layer=layer or "tiles", add_layer=layer is not None)
    if class_map is not None:
        write_class_map(class_map, info.crs, grid.transform, grid.tile_px, grid.stride, (grid.n_rows, grid.n_cols),
                        np.array([t.row for t in tiles]), np.array([t.col for t in tiles]), s.scores,
                        [c.name for c in classes], [c.column for c in classes],
                        {WRITER_TAG: run["run_id"], "TILEPROMPT_MODEL": card.id})
    seconds = time.perf_counter() - t0
    return ClassifyResult(out=out, tiles=len(tiles), skipped_outside=grid.skipped_outside,
                          skipped_nodata=stats.skipped_nodata, counts=dict(counts), seconds=seconds,
                          encode_seconds=stats.encode_seconds, runner=run_name, correction=correction,
                          transductive=transductive_summary, warnings=warnings, run=run, model=card.id,
                          model_reason=choice.reason if choice is not None else None, class_map=class_map)


def _correction_summary(found, classes, labels: np.ndarray, has_text: np.ndarray, method: str,
                        seconds: float) -> dict:
    per_class = Counter(classes[y].name for y in labels)
    return {"method": method, "examples": len(labels), "per_class": dict(per_class),
            "new_classes": [c.name for c, t in zip(classes, has_text) if not t],
            "sources": dict(Counter(e.source for e in found.examples)), "seconds": round(seconds, 4)}


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
    fields[EXAMPLE_FIELD] = "str"  # the analyst's class for a tile (few-shot examples); empty otherwise
    return fields


def _columns(tiles, classes, s, multi_label: bool) -> dict[str, np.ndarray]:
    """The layer's attribute columns for ``tiles`` scored ``s`` (one value per tile in each)."""
    names = np.array([c.name for c in classes], dtype=object)
    n = np.arange(len(tiles))
    columns = {
        "id": np.array([t.id for t in tiles], dtype=np.int64), "row": np.array([t.row for t in tiles], dtype=np.int64),
        "col": np.array([t.col for t in tiles], dtype=np.int64),
        "col_off": np.array([t.window.col_off for t in tiles], dtype=np.int64),
        "row_off": np.array([t.window.row_off for t in tiles], dtype=np.int64),
        "width": np.array([t.window.width for t in tiles], dtype=np.int64),
        "height": np.array([t.window.height for t in tiles], dtype=np.int64),
        "class": names[s.best], "score": s.scores[n, s.best].astype(np.float64),
        "second": names[s.second] if len(classes) > 1 else np.full(len(tiles), None, dtype=object),
        "margin": np.asarray(s.margin, dtype=np.float64),
    }
    if multi_label:
        columns["labels"] = np.array([";".join(names[on]) for on in s.labels], dtype=object)
    columns.update({c.column: s.scores[:, i].astype(np.float64) for i, c in enumerate(classes)})
    return columns
