"""Runners: model input (N, C, S, S) float32 -> (N, D) float32 L2-normalised embeddings, one engine each.

``auto`` picks, per device (measurements in docs/models.md):
- CUDA (model loaded on a GPU): torch with bf16 autocast.
- CPU model, but onnxruntime-gpu with a working CUDA: ONNX Runtime CUDA fp32.
- CPU: ONNX Runtime int8 (2.8x eager fp32 on ViT-B/32, 1.4x on ViT-S/16) when its recorded cosine to eager fp32
  on a probe batch is at least :data:`AUTO_MIN_COSINE`; else eager torch fp32, which is as fast as ONNX Runtime
  fp32 on these ViTs (timm's and open_clip's attention use PyTorch's fused kernels) and needs no export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .loading import LoadedModel
from .onnx_export import INPUT, int8_cosine, onnx_file, ort_session

BACKENDS = ("auto", "torch", "onnx", "onnx-int8")
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
    """Eager torch where the model lives: fp32 on the CPU, bf16 autocast on CUDA (outputs back in fp32)."""

    def __init__(self, model: LoadedModel):
        super().__init__(model.embed_dim)
        self._tower = model.image_tower
        self.device = model.device
        self.name = "torch-cuda-bf16" if self.device == "cuda" else "torch-cpu-fp32"
        self.providers = []

    def _run(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).to(self.device)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
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


def _ort_cuda_installed() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def make_runner(model: LoadedModel, backend: str = "auto", device: str | None = None) -> Runner:
    """A runner for ``model``'s image tower: ``torch``, ``onnx`` (fp32), ``onnx-int8`` or ``auto`` (module doc).

    ``device`` defaults to the model's; ONNX runners ask for CUDA when it is "cuda" and report what they got.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown runner backend {backend!r} (valid: {', '.join(BACKENDS)})")
    device = device or model.device
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown runner device {device!r} (valid: cpu, cuda)")
    dim = model.embed_dim
    if backend == "torch":
        if device != model.device:
            raise ValueError(f"the torch runner runs where the model is ({model.device}); "
                             f"load the model with device={device!r}")
        return TorchRunner(model)
    if backend == "onnx":
        return OrtRunner(onnx_file(model), dim, "fp32", want_cuda=device == "cuda")
    if backend == "onnx-int8":
        return OrtRunner(onnx_file(model, int8=True), dim, "int8")  # integer kernels are CPU kernels
    if device == "cuda" and model.device == "cuda":
        return TorchRunner(model)
    if device == "cuda" or _ort_cuda_installed():
        runner = OrtRunner(onnx_file(model), dim, "fp32", want_cuda=True)
        if runner.device == "cuda":
            return runner
    int8 = onnx_file(model, int8=True)
    if int8_cosine(int8) >= AUTO_MIN_COSINE:
        return OrtRunner(int8, dim, "int8")
    return TorchRunner(model) if model.device == "cpu" else OrtRunner(onnx_file(model), dim, "fp32")
