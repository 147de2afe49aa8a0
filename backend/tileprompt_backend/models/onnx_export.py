"""Image towers as ONNX: export (dynamic batch), parity check, int8 dynamic quantisation, and the export cache.

Exports use torch's ``torch.export``-based exporter (``dynamo=True``): the TorchScript exporter is deprecated
since torch 2.9, and the new one exports open_clip's and timm's ViTs without turning off the MHA fast path.
Cached files live in ``cache_dir()/onnx`` as ``<card hash>-<weights fingerprint>-<image size>.onnx``: the
fingerprint covers the weight files (size, mtime) and library versions, so retrained weights under an
unchanged card never reuse a stale export.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import timm
import torch

from ..paths import cache_dir
from .loading import LoadedModel

log = logging.getLogger(__name__)

INPUT, OUTPUT = "pixels", "embedding"
#: ONNX protobuf files cannot exceed 2 GB (larger towers would need external data files).
_MAX_BYTES = 1_900_000_000


def _cpu_tower(model: LoadedModel) -> torch.nn.Module:
    # Export and parity run in fp32 on the CPU: a CUDA tower may use TF32 convolutions.
    return model.image_tower if model.device == "cpu" else copy.deepcopy(model.image_tower).cpu()


def eager_embeddings(model: LoadedModel, x: np.ndarray) -> np.ndarray:
    """The reference embeddings: the image tower in eager fp32 on the CPU."""
    with torch.inference_mode():
        return _cpu_tower(model)(torch.from_numpy(x)).numpy()


def export_onnx(model: LoadedModel, path: Path, opset: int = 18) -> Path:
    """Export the image tower (input ``pixels`` (N, C, S, S) -> ``embedding`` (N, D), N dynamic) to ``path``."""
    path = Path(path)
    tower = _cpu_tower(model)
    if sum(p.numel() * p.element_size() for p in tower.parameters()) > _MAX_BYTES:
        raise ValueError(f"image tower of {model.card.id} exceeds 2 GB: ONNX export of such towers is not supported")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(tower, (torch.from_numpy(model.probe_batch(2)),), str(tmp), dynamo=True,
                          opset_version=opset, external_data=False, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    tmp.replace(path)
    return path


def ort_session(path: Path, want_cuda: bool = False):
    """An ONNX Runtime session: all graph optimisations, one intra-op thread per CPU, CUDA first if asked.

    Log severity 3 (errors only): onnxruntime-gpu on a machine without a usable CUDA logs a wall of
    provider load errors before falling back to the CPU. Which provider runs is read from the session.
    """
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = os.cpu_count() or 1
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    # get_available_providers() lists CUDA whenever onnxruntime-gpu is installed, usable or not: it only
    # decides whether to ask; session.get_providers() tells what was granted.
    if want_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


def check_onnx_parity(model: LoadedModel, onnx_path: Path, atol: float = 1e-4) -> float:
    """Max abs difference between ONNX Runtime (CPU, fp32) and eager torch on a probe batch; ValueError if > atol."""
    x = model.probe_batch(3, seed=1)
    got = ort_session(Path(onnx_path)).run(None, {INPUT: x})[0]
    diff = float(np.abs(got - eager_embeddings(model, x)).max())
    if not diff <= atol:
        raise ValueError(f"ONNX export {onnx_path} differs from torch by {diff:.3g} (> {atol:g})")
    return diff


def quantize_int8(src: Path, dest: Path) -> Path:
    """Dynamic int8 quantisation of the MatMuls (weights per output channel, activations per batch at run time).

    Per-channel weights keep ViT-S/16 at cosine 0.999 where per-tensor gives 0.996; leaving the patch-embedding
    Conv in fp32 is faster (ConvInteger is slow in ONNX Runtime) and more precise. Measured: docs/models.md.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dest.with_name(f".{dest.stem}.{os.getpid()}.tmp.onnx")
    root = logging.getLogger()
    root.addFilter(_drop_preprocess_hint)
    try:
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
    finally:
        root.removeFilter(_drop_preprocess_hint)
    tmp.replace(dest)
    return dest


def _drop_preprocess_hint(record: logging.LogRecord) -> bool:
    # quantize_dynamic always suggests onnxruntime's quant_pre_process on the root logger; its symbolic shape
    # inference fails on torch.export graphs (Expand), and the quantised tower is checked by cosine instead.
    return "pre-processing before quantization" not in record.getMessage()


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def _fingerprint(model: LoadedModel) -> str:
    import open_clip

    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model.image_files]
    versions = (torch.__version__, open_clip.__version__, timm.__version__)
    return hashlib.sha256(json.dumps([stats, versions]).encode()).hexdigest()[:8]


def onnx_file(model: LoadedModel, int8: bool = False) -> Path:
    """The cached ONNX export of ``model``'s image tower (exported and parity-checked once), or its int8 sibling.

    Quantising also records the int8 tower's cosine to eager fp32 on a probe batch in ``<file>.json``
    (see :func:`int8_cosine`).
    """
    fp32 = cache_dir() / "onnx" / f"{model.card.card_hash()}-{_fingerprint(model)}-{model.image_size}.onnx"
    if not fp32.is_file():
        log.info("exporting %s to %s", model.card.id, fp32)
        checked = fp32.with_name(f".{fp32.stem}.{os.getpid()}.unchecked.onnx")
        try:
            check_onnx_parity(model, export_onnx(model, checked))
            checked.replace(fp32)  # only a verified export ever appears under the cached name
        finally:
            checked.unlink(missing_ok=True)
    if not int8:
        return fp32
    q = fp32.with_name(fp32.stem + "-int8.onnx")
    record = q.with_suffix(".json")
    if not (q.is_file() and record.is_file()):
        quantize_int8(fp32, q)
        x = model.probe_batch(8, seed=2)
        cos = min_cosine(ort_session(q).run(None, {INPUT: x})[0], eager_embeddings(model, x))
        record.write_text(json.dumps({"min_cosine": cos, "probe": "8 smooth synthetic tiles, seed 2"}) + "\n")
    return q


def int8_cosine(int8_path: Path) -> float:
    """The smallest cosine between int8 and eager fp32 embeddings recorded when ``int8_path`` was quantised."""
    return float(json.loads(Path(int8_path).with_suffix(".json").read_text())["min_cosine"])
