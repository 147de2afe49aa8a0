"""Runners: model input (N, C, S, S) float32 -> (N, D) float32 L2-normalised embeddings, one engine each.

``auto`` picks, per device (measurements in docs/models.md, benchmarks/results/runners-cpu.json):
- CUDA (model loaded on a GPU): torch with bf16 autocast.
- CPU model, but onnxruntime-gpu with a working CUDA: ONNX Runtime CUDA fp32.
- CPU: the fastest of the candidates that keep a cosine of at least :data:`AUTO_MIN_COSINE` to eager fp32 on a
  probe batch: ONNX Runtime int8 (dynamic quantisation), OpenVINO (bf16 inference precision on CPUs with native
  bf16, AMX or AVX512-BF16; fp32 elsewhere) when the ``openvino`` package is installed, and, on CPUs with native
  bf16, torch bf16 autocast. The choice is measured once per model, size, CPU and candidate set and recorded
  beside the ONNX export. No candidate: eager torch fp32, which is as fast as ONNX Runtime fp32 on these ViTs
  and needs no export.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..paths import cache_dir
from .loading import LoadedModel
from .onnx_export import INPUT, eager_embeddings, int8_cosine, min_cosine, onnx_file, ort_session

BACKENDS = ("auto", "torch", "torch-bf16", "onnx", "onnx-int8", "openvino")
#: The int8 tower must keep this cosine to eager fp32 for ``auto`` to choose it.
AUTO_MIN_COSINE = 0.998


class Runner:
    """Call with a model-input batch; ``name``, ``device`` and ``providers`` say what actually runs it."""

    name: str
    device: str
    providers: list[str]

    def __init__(self, embed_dim: int):
        self._dim = embed_dim

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4:
            raise ValueError(f"{self.name}: expected model input shaped (N, C, S, S), got {x.shape}")
        if len(x) == 0:
            return np.zeros((0, self._dim), dtype=np.float32)
        return self._run(x)

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, providers={self.providers})"


class TorchRunner(Runner):
    """Eager torch where the model lives: bf16 autocast on CUDA, fp32 on the CPU unless ``bf16`` (outputs in fp32)."""

    def __init__(self, model: LoadedModel, bf16: bool | None = None):
        super().__init__(model.embed_dim)
        self._tower = model.image_tower
        self.device = model.device
        self.bf16 = self.device == "cuda" if bf16 is None else bf16
        self.name = f"torch-{self.device}-{'bf16' if self.bf16 else 'fp32'}"
        self.providers = []

    def _run(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).to(self.device)
        with torch.inference_mode(), torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
            y = self._tower(t)
        # bf16 keeps ~3 significant digits: re-normalise in fp32 so rows are unit vectors to fp32 precision.
        return F.normalize(y.float(), dim=-1).cpu().numpy()


class OrtRunner(Runner):
    """An ONNX Runtime session over an exported tower; the device is whatever provider the session got."""

    def __init__(self, path: Path, embed_dim: int, precision: str, want_cuda: bool = False):
        super().__init__(embed_dim)
        self.path = path
        self._session = ort_session(path, want_cuda)
        self.providers = list(self._session.get_providers())
        self.device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        self.name = f"onnxruntime-{self.device}-{precision}"

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._session.run(None, {INPUT: x})[0].astype(np.float32, copy=False)


class OpenVinoRunner(Runner):
    """OpenVINO on the CPU over the exported tower, in bf16 where the CPU computes bf16 natively (AMX,
    AVX512-BF16: OpenVINO's own capability report), else fp32; outputs re-normalised in fp32.

    Compiled models are cached by OpenVINO under ``cache_dir()/openvino`` (a second start skips compilation).
    """

    def __init__(self, path: Path, embed_dim: int):
        super().__init__(embed_dim)
        ov = openvino_module()
        if ov is None:
            raise ValueError("the openvino runner needs the openvino package (pip install openvino)")
        core = ov.Core()
        try:
            core.set_property({"CACHE_DIR": str(cache_dir() / "openvino")})
        except RuntimeError:
            pass  # an unwritable cache only costs compiling again
        self.precision = openvino_precision(core)
        compiled = core.compile_model(str(path), "CPU", {
            "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY"})
        self._request = compiled.create_infer_request()
        self.device, self.providers = "cpu", []
        self.name = f"openvino-cpu-{self.precision}"

    def _run(self, x: np.ndarray) -> np.ndarray:
        y = np.array(self._request.infer({0: x})[0], dtype=np.float32)  # a copy: the request reuses its buffer
        return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)


def openvino_precision(core=None) -> str:
    """"bf16" where OpenVINO's CPU plugin computes bf16 natively, else "fp32"."""
    core = core or openvino_module().Core()
    return "bf16" if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "fp32"


def openvino_module():
    """The openvino package, or None where it is not installed (it is an optional speed-up)."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units (AVX512-BF16 or AMX): without them bf16 on the CPU is emulated and slow."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu helpers, hence getattr
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def _throughput(runner: Runner, x: np.ndarray, repeats: int = 3) -> float:
    runner(x)  # warm-up: first calls allocate and pick kernels
    best = min(_timed(runner, x) for _ in range(repeats))
    return len(x) / best


def _timed(runner: Runner, x: np.ndarray) -> float:
    t0 = time.perf_counter()
    runner(x)
    return time.perf_counter() - t0


def _auto_cpu(model: LoadedModel) -> Runner:
    """The fastest CPU runner that stays within :data:`AUTO_MIN_COSINE` of eager fp32 (see the module doc)."""
    dim = model.embed_dim
    int8 = onnx_file(model, int8=True)
    fp32 = "torch-cpu-fp32"
    candidates: dict[str, Callable[[], Runner]] = {fp32: lambda: TorchRunner(model)}
    if int8_cosine(int8) >= AUTO_MIN_COSINE:
        candidates["onnxruntime-cpu-int8"] = lambda: OrtRunner(int8, dim, "int8")
    if cpu_has_bf16():
        candidates["torch-cpu-bf16"] = lambda: TorchRunner(model, bf16=True)
    if openvino_module() is not None:
        candidates[f"openvino-cpu-{openvino_precision()}"] = lambda: OpenVinoRunner(onnx_file(model), dim)
    measured = [k for k in candidates if k != fp32]
    if len(measured) <= 1:  # int8 (its cosine checked at quantisation) or the fp32 reference
        return candidates[measured[0] if measured else fp32]()
    record = int8.with_name(int8.name.replace("-int8.onnx", "-auto.json"))
    cpu = cpu_name()
    choice = None
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("cpu") == cpu and sorted(saved.get("candidates", [])) == sorted(measured):
            choice = saved.get("choice")
    if choice not in candidates:
        choice, figures = _measure(model, {k: candidates[k] for k in measured})
        tmp = record.with_name(f".{record.name}.tmp")
        tmp.write_text(json.dumps({"cpu": cpu, "candidates": measured, "choice": choice, **figures}, indent=1) + "\n")
        tmp.replace(record)
    return candidates[choice]()


def device_name(device: str) -> str:
    """What runs the jobs, for people: the GPU's name on cuda, else the CPU model."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def cpu_name() -> str:
    """The CPU model, so a measured choice is redone on other hardware (a copied cache, a moved venv)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _measure(model: LoadedModel, candidates: dict) -> tuple[str, dict]:
    """Tiles/s of each candidate on a probe batch that keeps the cosine. Returns (choice, figures): the choice is
    a key of ``candidates``."""
    # the engine's batch size: a batch of 8 ranked int8 first on ViT-S/16 at 128 px where bf16 wins at 32
    x = model.probe_batch(32, seed=3)
    reference = eager_embeddings(model, x)
    speed, cosine = {}, {}
    for name, make in candidates.items():
        runner = make()
        cosine[name] = min_cosine(runner(x), reference)
        if cosine[name] >= AUTO_MIN_COSINE:
            speed[name] = _throughput(runner, x)
    choice = max(speed, key=speed.get) if speed else "torch-cpu-fp32"  # nothing kept the cosine: the reference
    return choice, {"tiles_per_s": speed, "min_cosine": cosine, "probe": "32 smooth synthetic tiles, seed 3"}


def _ort_cuda_installed() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def make_runner(model: LoadedModel, backend: str = "auto", device: str | None = None) -> Runner:
    """A runner for ``model``'s image tower: ``torch``, ``torch-bf16``, ``onnx`` (fp32), ``onnx-int8``,
    ``openvino`` (CPU) or ``auto``.

    ``device`` defaults to the model's; ONNX runners ask for CUDA when it is "cuda" and report what they got.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown runner backend {backend!r} (valid: {', '.join(BACKENDS)})")
    device = device or model.device
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown runner device {device!r} (valid: cpu, cuda)")
    dim = model.embed_dim
    if backend in ("torch", "torch-bf16"):
        if device != model.device:
            raise ValueError(f"the torch runner runs where the model is ({model.device}); "
                             f"load the model with device={device!r}")
        return TorchRunner(model, bf16=True if backend == "torch-bf16" else None)
    if backend == "onnx":
        return OrtRunner(onnx_file(model), dim, "fp32", want_cuda=device == "cuda")
    if backend == "onnx-int8":
        return OrtRunner(onnx_file(model, int8=True), dim, "int8")  # integer kernels are CPU kernels
    if backend == "openvino":
        if openvino_module() is None:  # before any export: the message is the useful part
            raise ValueError("the openvino runner needs the openvino package (pip install openvino)")
        return OpenVinoRunner(onnx_file(model), dim)  # the CPU plugin; GPUs go through the other runners
    if device == "cuda" and model.device == "cuda":
        return TorchRunner(model)
    if device == "cuda" or _ort_cuda_installed():
        runner = OrtRunner(onnx_file(model), dim, "fp32", want_cuda=True)
        if runner.device == "cuda":
            return runner
    if model.device == "cpu":
        return _auto_cpu(model)
    return OrtRunner(onnx_file(model), dim, "fp32")
