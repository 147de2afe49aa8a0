"""Change search between two dates: pair the tiles of two scenes by footprint, rank them by embedding change.

    change_search(before, after, out=..., heatmap=None, prompts=None, became=None, ...) -> ChangeResult

Both rasters are indexed with the same model, tile size and stride (``build_index``: scenes already in the index
cost nothing). Every tile of the **after** scene is paired with the before scene's tiles its footprint overlaps
(the before footprints reprojected into the after scene's CRS), weighted by the overlapping area; a tile is
paired when at least :data:`MIN_COVER` of it is covered by indexed before tiles. Grids on different CRSs, offsets
or pixel sizes are matched this way; identical grids pair tile for tile. The before side of a tile is the
re-normalised, area-weighted mean of its before tiles' unit embeddings.

- ``change`` = 1 - cosine(after, before): how much the tile's content moved in the embedding space.
- With class ``prompts``: each side's class probabilities (the classification head: softmax over the classes of
  ``logit_scale x cosine``), ``class_before`` / ``class_after`` and their probabilities.
- ``became`` (a class, added to the prompts when missing): ``P_after(class) - P_before(class)``, the increase
  of that class's probability ("became flooded"); the ranking score then, instead of ``change``.

Output: layer ``change`` (after scene's CRS; every paired tile, or the top ``k``) with ``id, row, col, rank,
score, change, became, class_before, prob_before, class_after, prob_after, before_tiles, cover`` and the pixel
window, a ``tileprompt_runs`` row, and optionally a float32 heat map of ``score`` on the after scene's grid.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import shapely

from .. import __version__, validation
from ..engine.embed import Cancelled
from ..engine.head import l2_normalize, logits, softmax
from ..outputs import WRITER_TAG, guard_gpkg_and_heatmap, write_tiles_gpkg
from ..tiling import reproject_geometries
from .heatmap import write_heatmap
from .store import IndexStore, SceneRecord, guard_search_outputs

LAYER = "change"
#: A tile is paired when at least this share of it lies under indexed tiles of the other date.
MIN_COVER = 0.5
#: Vertices per side when reprojecting tile footprints (tiles are small: 4 pieces follow any projection).
FOOTPRINT_SEGMENTS = 4
FIELDS = {"id": "int", "row": "int", "col": "int", "rank": "int", "score": "float", "change": "float",
          "became": "float", "class_before": "str", "prob_before": "float", "class_after": "str",
          "prob_after": "float", "before_tiles": "str", "cover": "float", "col_off": "int", "row_off": "int",
          "width": "int", "height": "int"}


@dataclass
class Pairing:
    """After-scene tiles paired with before-scene tiles: sparse weights, per after tile."""

    after: np.ndarray  # (M,) positions (embedding rows) of the paired after tiles
    pair_after: np.ndarray  # (P,) index into ``after`` of each (after, before) pair
    pair_before: np.ndarray  # (P,) embedding row of the before tile of each pair
    weight: np.ndarray  # (P,) share of the after tile's overlap that this before tile holds (sums to 1 per tile)
    cover: np.ndarray  # (M,) share of each paired after tile covered by indexed before tiles
    unpaired: int  # after tiles left out (cover below MIN_COVER)


@dataclass
class ChangeResult:
    out: Path
    heatmap: Path | None
    pairs: int  # after tiles paired and written
    unpaired: int  # after tiles without enough indexed before tiles under them
    seconds: float
    index: str
    before: str
    after: str
    computed: int = 0  # tiles the indexing encoded for this run
    became: str | None = None
    model: str | None = None  # the model both dates were indexed with
    model_reason: str | None = None  # why, when no model was named (the before raster's default)
    run: dict = field(repr=False, default_factory=dict)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- pairing -----------------------------------------------------------------------------------------------------

def pair_footprints(after_polys: np.ndarray, before_polys: np.ndarray, before_overlap: float = 1.0,
                    min_cover: float = MIN_COVER) -> Pairing:
    """Pair polygons (one CRS) by overlap: every after polygon with the before polygons it intersects.

    ``before_overlap`` is how many before tiles cover a point of the before grid ((tile / stride)^2, 1 without
    overlap): covered area / after area / before_overlap is the cover; below ``min_cover`` a tile is unpaired.
    """
    after_polys = np.asarray(after_polys, dtype=object)
    before_polys = np.asarray(before_polys, dtype=object)
    if not len(after_polys) or not len(before_polys):
        empty = np.zeros(0, np.int64)
        return Pairing(empty, empty, empty, np.zeros(0), np.zeros(0), len(after_polys))
    tree = shapely.STRtree(before_polys)
    a_idx, b_idx = tree.query(after_polys, predicate="intersects")
    area = shapely.area(shapely.intersection(after_polys[a_idx], before_polys[b_idx]))
    keep = area > 0
    a_idx, b_idx, area = a_idx[keep], b_idx[keep], area[keep]
    covered = np.bincount(a_idx, weights=area, minlength=len(after_polys))
    cover = covered / np.maximum(shapely.area(after_polys), 1e-300) / max(before_overlap, 1.0)
    paired = np.flatnonzero(cover >= min_cover)
    where = np.full(len(after_polys), -1, np.int64)
    where[paired] = np.arange(len(paired))
    sel = where[a_idx] >= 0
    weight = area[sel] / covered[a_idx[sel]]
    return Pairing(paired, where[a_idx[sel]], b_idx[sel], weight, np.minimum(cover[paired], 1.0),
                   len(after_polys) - len(paired))


def _same_grid(a: SceneRecord, b: SceneRecord) -> bool:
    return a.crs == b.crs and np.allclose(a.transform, b.transform, rtol=0, atol=1e-9)


def pair_scenes(store: IndexStore, before: SceneRecord, after: SceneRecord) -> Pairing:
    """:func:`pair_footprints` of two scenes of an index (tile for tile when their grids coincide)."""
    a_ids, b_ids = store.tile_ids(after), store.tile_ids(before)
    a_rows, b_rows = store.tile_rows(after, a_ids), store.tile_rows(before, b_ids)
    if _same_grid(before, after):
        b_pos = {(r[0], r[1]): i for i, r in enumerate(b_rows[int(t)] for t in b_ids)}
        hits = [(i, b_pos.get((a_rows[int(t)][0], a_rows[int(t)][1]))) for i, t in enumerate(a_ids)]
        after_pos = np.array([i for i, j in hits if j is not None], dtype=np.int64)
        before_pos = np.array([j for _i, j in hits if j is not None], dtype=np.int64)
        n = len(after_pos)
        return Pairing(after_pos, np.arange(n), before_pos, np.ones(n), np.ones(n), len(a_ids) - n)
    if (before.crs is None) != (after.crs is None):
        raise ValueError(f"one of {before.name} and {after.name} has no CRS: their tiles cannot be paired")
    a_polys = shapely.from_wkb([a_rows[int(t)][6] for t in a_ids])
    b_polys = shapely.from_wkb([b_rows[int(t)][6] for t in b_ids])
    if before.crs is not None and before.crs != after.crs:
        b_polys = reproject_geometries(b_polys, before.crs, after.crs, segments=FOOTPRINT_SEGMENTS)
    return pair_footprints(a_polys, b_polys, (store.tile_px / store.stride) ** 2)


def paired_vectors(pairing: Pairing, after_emb: np.ndarray, before_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, D) unit after vectors and (M, D) unit before vectors (area-weighted mean of the paired tiles)."""
    a = l2_normalize(np.asarray(after_emb[pairing.after], dtype=np.float32))
    b_unit = l2_normalize(np.asarray(before_emb, dtype=np.float32))
    b = np.zeros_like(a)
    np.add.at(b, pairing.pair_after, pairing.weight[:, None].astype(np.float32) * b_unit[pairing.pair_before])
    return a, l2_normalize(b)


def became_score(p_before: np.ndarray, p_after: np.ndarray, column: int) -> np.ndarray:
    """Increase of one class's probability from before to after (positive: the tile became more of it)."""
    return p_after[:, column] - p_before[:, column]


# --- the search --------------------------------------------------------------------------------------------------

def change_search(before, after, *, out: str | Path, heatmap: str | Path | None = None, model: str | None = None,
                  tile_px: int | None = None, stride: int | None = None, index: str | Path | None = None,
                  prompts: str | None = None, became: str | None = None, templates: str | Path | None = None,
                  k: int | None = None, device: str = "auto", runner: str = "auto", batch_size: int = 32,
                  progress: Callable[[int, int], None] | None = None, cancel: Callable[[], bool] | None = None,
                  overwrite: bool = False, layer: str | None = None, pixel_space: bool = False) -> ChangeResult:
    """Index ``before`` and ``after`` (paths, or ``{"raster", "band_map", "date", "level", "offset"}``) and write
    their change layer. Without ``model``, both are indexed with the before raster's default model
    (``models.choose_model``, as ``build_index`` chooses).

    See the module docstring. Every bad input is a ValueError naming it, raised before any model runs where it
    can be; ``out`` and ``heatmap`` pass ``outputs.guard_output`` against both rasters, the templates file and
    the index (``overwrite``, ``layer``: as for classify). ``cancel()`` returning True raises ``Cancelled`` and
    nothing is written.
    """
    from ..engine.prompts import PromptClass, load_templates, parse_prompts
    from ..paths import templates_path
    from .build import build_index, index_card, raster_inputs

    started, t0 = _now(), time.perf_counter()
    k = validation.optional_k(k)
    prompts, became = validation.optional_prompts(prompts), validation.became(became)
    dates = raster_inputs([before, after])
    rasters = [validation.existing_path(r, "raster") for r, _band_map, _level, _offset in dates]
    template_file = templates_path(templates) if templates is not None else None
    if template_file is not None:
        load_templates(template_file)  # a bad file fails before the indexing
    card, choice = index_card(model, dates)
    out, heatmap = guard_gpkg_and_heatmap(out, heatmap, [*rasters, template_file], overwrite, layer,
                                          input_dirs=[index, card.path])
    classes = parse_prompts(prompts) if prompts is not None else []
    became_col = None
    if became is not None:
        target = parse_prompts(became)
        names = {p.casefold(): i for i, c in enumerate(classes) for p in c.phrases}
        became_col = names.get(target[0].name.casefold())
        if became_col is None:
            classes = parse_prompts([*(_prompt_text(c) for c in classes), _prompt_text(target[0])])
            became_col = len(classes) - 1
        if len(classes) < 2:
            raise ValueError(f"'became {target[0].name}' compares that class with others: give the other classes "
                             "too (prompts), e.g. \"water; forest; farmland\"")

    def step_progress(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total + 1)

    built = build_index([before, after], model=model, tile_px=tile_px, stride=stride, index=index, device=device,
                        runner=runner, progress=step_progress, cancel=cancel, batch_size=batch_size,
                        pixel_space=pixel_space)
    if len(built.scene_keys) < 2:
        raise ValueError("before and after are the same raster: give two dates of the same place")
    store = IndexStore.open(built.index)
    out, heatmap = guard_search_outputs(store, out, heatmap, overwrite, layer, inputs=[template_file])
    rec_before, rec_after = (store.scene(key) for key in built.scene_keys[:2])
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")

    pairing = pair_scenes(store, rec_before, rec_after)
    if not len(pairing.after):
        raise ValueError(f"the two scenes do not overlap: no tile of {rec_after.name} has {MIN_COVER:.0%} of its "
                         f"area under indexed tiles of {rec_before.name}")
    a, b = paired_vectors(pairing, store.embeddings(rec_after), store.embeddings(rec_before))
    change = 1.0 - np.einsum("ij,ij->i", a, b).astype(np.float64)

    p_before = p_after = None
    if classes:
        from .query import index_card as stored_card
        from .textcache import CachedTextEncoder
        from ..engine.head import zero_shot_head
        from ..models import cached_model

        card = stored_card(store)
        template_list = load_templates(template_file or templates_path(card.templates))
        head = zero_shot_head(CachedTextEncoder(card, lambda: cached_model(card, device=device)),
                              [PromptClass(c.name, c.phrases, c.column) for c in classes], template_list)
        p_before = softmax(logits(b, head, card.logit_scale)).astype(np.float64)
        p_after = softmax(logits(a, head, card.logit_scale)).astype(np.float64)
    became_values = became_score(p_before, p_after, became_col) if became_col is not None else None
    score = became_values if became_values is not None else change
    order = np.lexsort((np.arange(len(score)), -change, -score))  # best first; ties: more change, then tile order
    if k is not None:
        order = order[:int(k)]

    a_ids, b_ids = store.tile_ids(rec_after), store.tile_ids(rec_before)
    rows = store.tile_rows(rec_after, a_ids[pairing.after[order]])
    before_of: dict[int, list[int]] = {}
    for i, j in zip(pairing.pair_after, pairing.pair_before):
        before_of.setdefault(int(i), []).append(int(b_ids[j]))
    features = []
    for rank, i in enumerate(order, start=1):
        tile = int(a_ids[pairing.after[i]])
        row, col, col_off, row_off, width, height, wkb = rows[tile]
        props = {"id": tile, "row": row, "col": col, "rank": rank, "score": float(score[i]),
                 "change": float(change[i]), "became": float(became_values[i]) if became_values is not None else None,
                 "class_before": None, "prob_before": None, "class_after": None, "prob_after": None,
                 "before_tiles": ",".join(map(str, sorted(before_of.get(int(i), [])))),
                 "cover": float(pairing.cover[i]), "col_off": col_off, "row_off": row_off, "width": width,
                 "height": height}
        if p_before is not None:
            cb, ca = int(p_before[i].argmax()), int(p_after[i].argmax())
            props.update(class_before=classes[cb].name, prob_before=float(p_before[i, cb]),
                         class_after=classes[ca].name, prob_after=float(p_after[i, ca]))
        features.append((shapely.from_wkb(wkb), props))

    run = {
        "run_id": uuid.uuid4().hex, "software": f"tileprompt {__version__}", "kind": "change", "started": started,
        "finished": _now(), "index": str(store.root), "model": store.meta.get("model"),
        "model_reason": choice.reason if choice is not None else None,
        "model_card_hash": store.meta.get("card_hash"), "weights_hash": store.meta.get("weights_hash"),
        "tile_px": store.tile_px, "stride": store.stride, "before": rec_before.raster, "after": rec_after.raster,
        "same_grid": _same_grid(rec_before, rec_after), "min_cover": MIN_COVER, "paired": len(pairing.after),
        "unpaired": pairing.unpaired, "computed": built.computed, "k": k, "written": len(features),
        "prompts": [{"class": c.name, "phrases": list(c.phrases)} for c in classes] or None,
        "became": classes[became_col].name if became_col is not None else None,
        "score": "became" if became_col is not None else "change",
        "heatmap": str(heatmap) if heatmap is not None else None,
    }
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")
    if heatmap is not None:
        all_rows = store.tile_rows(rec_after, a_ids[pairing.after])
        windows = np.array([all_rows[int(t)][2:6] for t in a_ids[pairing.after]], dtype=np.int64).reshape(-1, 4)
        write_heatmap(heatmap, rec_after, windows, score,
                      tags={WRITER_TAG: run["run_id"], "score": run["score"], "before": rec_before.raster,
                            "after": rec_after.raster}, description=f"change score ({run['score']})")
    write_tiles_gpkg(out, rec_after.rasterio_crs(), FIELDS, features, run, layer=layer or LAYER,
                     add_layer=layer is not None)
    if progress is not None:
        progress(1, 1)
    return ChangeResult(out=out, heatmap=heatmap, pairs=len(features), unpaired=pairing.unpaired,
                        seconds=time.perf_counter() - t0, index=str(store.root), before=rec_before.raster,
                        after=rec_after.raster, computed=built.computed, became=run["became"],
                        model=store.meta.get("model"), model_reason=run["model_reason"], run=run)


def _prompt_text(c) -> str:
    return " | ".join(c.phrases)
