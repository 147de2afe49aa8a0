"""The uv command lines of an installation, built from the choices (pure, so each platform is tested here).

* ``uv python install 3.11`` only when the system has no Python >= 3.11 (uv downloads a standalone CPython into the
  installation folder);
* ``uv venv --python <interpreter> <env>``;
* ``uv pip install --python <env>/bin/python --constraints backend/constraints.txt <plugin>/backend[cpu|gpu]``.

PyTorch: a CPU installation takes PyTorch's CPU wheels (``--torch-backend cpu``: PyTorch's CPU index for torch
and torchvision), so no CUDA library is downloaded; a CUDA installation lets uv pick the CUDA build that matches
the NVIDIA driver (``--torch-backend auto``). macOS wheels on PyPI have no CUDA, so macOS uses the indexes as
they are. ``torch_backend="none"`` takes torch from the configured indexes like every other package (a mirror
that holds the wanted build; the tests, which point at a local cache).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

from .locations import MACOS

COMPUTES = ("cpu", "cuda")
#: What ``--torch-backend`` is, per compute, unless the settings say otherwise.
TORCH_BACKEND = {"cpu": "cpu", "cuda": "auto"}
#: The backend package's extra per compute (backend/pyproject.toml): which ONNX Runtime wheel.
EXTRA = {"cpu": "cpu", "cuda": "gpu"}
PROVISIONED_PYTHON = "3.11"


@dataclass(frozen=True)
class PackageSources:
    """Where packages come from; empty means PyPI (and, for torch, PyTorch's index for the compute)."""

    index_url: str = ""
    extra_index_urls: tuple[str, ...] = field(default_factory=tuple)
    find_links: tuple[str, ...] = field(default_factory=tuple)
    torch_backend: str = ""  # "" = by compute (TORCH_BACKEND); "none" = from the indexes; else uv's value
    index_strategy: str = ""  # "" = uv's first-index; "unsafe-best-match" for a partial mirror beside PyPI

    @classmethod
    def from_text(cls, index_url: str = "", extra_index_urls: str = "", find_links: str = "",
                  torch_backend: str = "", index_strategy: str = "") -> PackageSources:
        """From the settings' text fields (lists separated by spaces or new lines)."""
        return cls(index_url.strip(), tuple(extra_index_urls.split()), tuple(find_links.split()),
                   torch_backend.strip(), index_strategy.strip())


def torch_backend(compute: str, sources: PackageSources, system: str | None = None) -> str | None:
    """The ``--torch-backend`` value, or None for none."""
    if sources.torch_backend == "none":
        return None
    if sources.torch_backend:
        return sources.torch_backend
    if (system or platform.system()) == MACOS:
        return None
    return TORCH_BACKEND[compute]


def index_arguments(sources: PackageSources) -> list[str]:
    args: list[str] = []
    if sources.index_url:
        args += ["--index-url", sources.index_url]
    for url in sources.extra_index_urls:
        args += ["--extra-index-url", url]
    for link in sources.find_links:
        args += ["--find-links", link]
    if sources.index_strategy:
        # uv takes a package from the first index that has it (no dependency confusion); a partial local
        # mirror beside PyPI needs the best version of all indexes instead.
        args += ["--index-strategy", sources.index_strategy]
    return args


def python_install(uv: Path, version: str = PROVISIONED_PYTHON) -> list[str]:
    return [str(uv), "python", "install", version]


def create_venv(uv: Path, python: str, env: Path, managed: bool = False) -> list[str]:
    """``python`` is an interpreter's path, or a version for a uv-provisioned one (``managed``)."""
    command = [str(uv), "venv", "--python", python]
    if managed:
        command.append("--managed-python")
    return command + [str(env)]


def install_packages(uv: Path, env_python: Path, plugin_dir: Path, compute: str, sources: PackageSources,
                     system: str | None = None) -> list[str]:
    if compute not in COMPUTES:
        raise ValueError(f"compute must be one of {', '.join(COMPUTES)}, not {compute!r}")
    backend = Path(plugin_dir) / "backend"
    command = [str(uv), "pip", "install", "--python", str(env_python),
               "--constraints", str(backend / "constraints.txt"), f"{backend}[{EXTRA[compute]}]"]
    command += index_arguments(sources)
    chosen = torch_backend(compute, sources, system)
    if chosen:
        command += ["--torch-backend", chosen]
    return command


def uv_environment(layout_cache: Path, pythons: Path, proxies: dict) -> dict:
    """uv's own settings for every command: cache and provisioned interpreters inside the installation folder,
    no user or project uv.toml (the installer's sources are the settings'), the system's certificates (TLS-
    intercepting company proxies), QGIS's proxy."""
    return {"UV_CACHE_DIR": str(layout_cache), "UV_PYTHON_INSTALL_DIR": str(pythons), "UV_NO_CONFIG": "1",
            "UV_SYSTEM_CERTS": "1", "UV_NO_PROGRESS": "1", **proxies}
