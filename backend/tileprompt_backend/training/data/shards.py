"""Datasets as webdataset shards in the CLIP_benchmark layout the Mind the Modality Gap code reads, plus a manifest.

Layout (``DIR``)::

    classnames.txt                           one class name per line, in label order
    zeroshot_classification_templates.txt    prompt templates, ``{c}`` marks the class name
    manifest.json                            ours: task, bands, level, counts per class and split, provenance
    train/ val/ test/                        nshards.txt, nsamples.txt, 0.tar ... N-1.tar (or .tar.gz)

A sample we write holds ``image.npy`` (raw (C, H, W) DN or uint8 RGB), ``target.npy`` (multi-hot) or ``cls``
(class index), and ``json`` (channel names, level, where the tile came from). The reference's own shards are
read too: ``s2_patch.pth`` images and ``labels_19.pth``-style targets (tensors loaded with
``torch.load(weights_only=True)``: nothing is ever unpickled as an arbitrary object), ``webp``/``png``/``jpg`` +
``cls`` for RGB sets. See docs/training.md.
"""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ... import __version__
from ...outputs import guard_folder_output, partial_path, replace_folder
from ...sentinel2.bands import BANDS, L2A_BANDS, normalize_band_name
from ...sentinel2.readers import RGB_NAMES
from .samples import TASKS, Sample, compact_dtype

FORMAT = "tileprompt-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
SPLITS = ("train", "val", "test")
#: Keys tried, in order, when a dataset does not say which member holds the image / the target.
IMAGE_KEYS = ("image.npy", "s2_patch.pth", "s2_patch.npy", "webp", "png", "jpg", "jpeg")
TARGET_KEYS = ("target.npy", "cls", "labels_19.pth", "labels_43.pth", "labels_5.pth", "labels_10.pth")
_IMAGE_SUFFIXES = {"webp", "png", "jpg", "jpeg"}
DEFAULT_SAMPLES_PER_SHARD = 1000


# --- reading -----------------------------------------------------------------------------------------------------

@dataclass
class SplitInfo:
    name: str
    files: list[Path]
    nsamples: int


@dataclass
class DatasetSpec:
    """A dataset on disk: its classes, prompt templates, task, member keys and splits."""

    root: Path
    classes: list[str]
    templates: list[str]
    task: str
    image_key: str
    target_key: str | None
    bands: tuple[str, ...] | None = None  # for samples without a json member (reference shards)
    level: str | None = None
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.root.name

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ValueError(f"dataset {self.root} has no {name!r} split (it has: {', '.join(self.splits) or 'none'})")
        return self.splits[name]


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _split_files(folder: Path) -> SplitInfo | None:
    if not folder.is_dir():
        return None
    nshards_file, nsamples_file = folder / "nshards.txt", folder / "nsamples.txt"
    if not nshards_file.is_file() or not nsamples_file.is_file():
        raise ValueError(f"dataset split {folder} lacks nshards.txt or nsamples.txt (CLIP_benchmark layout)")
    try:
        nshards, nsamples = int(nshards_file.read_text().strip()), int(nsamples_file.read_text().strip())
    except ValueError:
        raise ValueError(f"dataset split {folder}: nshards.txt and nsamples.txt must hold whole numbers") from None
    files = []
    for i in range(nshards):
        for name in (f"{i}.tar", f"{i}.tar.gz"):
            if (folder / name).is_file():
                files.append(folder / name)
                break
        else:
            raise ValueError(f"dataset split {folder}: shard {i}.tar (of {nshards} in nshards.txt) is missing")
    return SplitInfo(folder.name, files, nsamples)


def open_dataset(root: str | Path, *, image_key: str | None = None, target_key: str | None = None,
                 task: str | None = None, bands: str | list[str] | None = None,
                 level: str | None = None) -> DatasetSpec:
    """Open a shard dataset (ours or the reference's CLIP_benchmark layout); every problem is a ValueError.

    The keyword arguments say what a reference dataset without a manifest cannot: which member holds the image
    and the target, the task, and the channel names and level of ``.pth`` images (default: 12 channels = L2A
    order without B10, 13 = the canonical L1C order).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"dataset folder not found: {root}")
    manifest: dict[str, Any] = {}
    if (root / MANIFEST).is_file():
        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except ValueError as e:
            raise ValueError(f"{root / MANIFEST} is not valid JSON: {e}") from None
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{root / MANIFEST} is not a {FORMAT} manifest")
    if not (root / CLASSNAMES).is_file():
        raise ValueError(f"{root} is not a shard dataset: {CLASSNAMES} is missing (make one with "
                         "`tileprompt prepare-data`)")
    classes = _read_lines(root / CLASSNAMES)
    templates = _read_lines(root / TEMPLATES) if (root / TEMPLATES).is_file() else []
    splits = {name: info for name in SPLITS if (info := _split_files(root / name)) is not None}
    if not splits:
        raise ValueError(f"dataset {root} has none of the splits {', '.join(SPLITS)}")

    band_list = tuple(normalize_band_name(b) for b in (bands.split(",") if isinstance(bands, str) else bands)) \
        if bands else (tuple(manifest["bands"]) if manifest.get("bands") else None)
    spec = DatasetSpec(root=root, classes=classes, templates=templates,
                       task=task or manifest.get("task") or "", image_key=image_key or manifest.get("image_key", ""),
                       target_key=target_key or manifest.get("target_key"), bands=band_list,
                       level=level or manifest.get("level"), splits=splits, manifest=manifest)
    if not spec.image_key or (spec.target_key is None and "target_key" not in manifest):
        _probe_keys(spec)
    if not spec.task:
        spec.task = "none" if spec.target_key is None else "multi-class" if spec.target_key == "cls" else "multi-label"
    if spec.task not in TASKS:
        raise ValueError(f"unknown task {spec.task!r} (valid: {', '.join(TASKS)})")
    if spec.task != "none" and not classes:
        raise ValueError(f"dataset {root}: {CLASSNAMES} is empty")
    return spec


def _probe_keys(spec: DatasetSpec) -> None:
    """Find the image and target members from the first sample of the first split."""
    first = next(iter_raw(next(iter(spec.splits.values())).files), None)
    if first is None:
        raise ValueError(f"dataset {spec.root} holds no samples")
    members = [k for k in first if not k.startswith("__")]
    if not spec.image_key:
        spec.image_key = next((k for k in IMAGE_KEYS if k in first), "")
        if not spec.image_key:
            raise ValueError(f"dataset {spec.root}: no image member among {', '.join(members)} "
                             f"(expected one of {', '.join(IMAGE_KEYS)}; name it with --image-key)")
    if spec.target_key is None:
        found = [k for k in TARGET_KEYS if k in first]
        if len(found) > 1:
            raise ValueError(f"dataset {spec.root}: several target members ({', '.join(found)}); "
                             "choose one with --target-key")
        spec.target_key = found[0] if found else None


def iter_raw(files: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Raw samples (``{"__key__": ..., member: bytes}``) of tar shards, in file order; nothing decoded."""
    import webdataset as wds

    urls = [str(f) for f in files]
    if not urls:
        return iter(())
    # Splitting by rank and worker, and shuffling, are ours (deterministic; see .stream): no webdataset splitters.
    return iter(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False))


def _decode_array(key: str, data: bytes) -> np.ndarray:
    if key.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    if key.endswith(".pth"):
        import torch

        try:
            value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError ... all mean the same here
            raise ValueError(f"member {key} is not a tensor file that torch.load(weights_only=True) reads "
                             "(it holds other objects, or is damaged); such files are never unpickled") from None
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"member {key} holds a {type(value).__name__}, not a tensor")
        return value.numpy()
    if key.split(".")[-1].lower() in _IMAGE_SUFFIXES:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy()
    raise ValueError(f"member {key}: unknown encoding (expected .npy, .pth or an image)")


def decode_sample(raw: dict[str, Any], spec: DatasetSpec) -> Sample:
    """A raw shard sample -> :class:`Sample`; a broken sample is a ValueError naming its key and member."""
    key = raw.get("__key__", "?")
    try:
        if spec.image_key not in raw:
            raise ValueError(f"has no {spec.image_key} member")
        image = _decode_array(spec.image_key, raw[spec.image_key])
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3:
            raise ValueError(f"image has shape {image.shape}, expected (C, H, W)")
        meta = json.loads(raw["json"]) if "json" in raw else {}
        bands, level = _channels(image, meta, spec)
        target = _decode_target(raw, spec) if spec.task != "none" else None
    except (ValueError, OSError, RuntimeError) as e:
        raise ValueError(f"dataset {spec.root}: sample {key}: {e}") from None
    return Sample(key=key, image=image, bands=bands, level=level, target=target, meta=meta)


def _channels(image: np.ndarray, meta: dict, spec: DatasetSpec) -> tuple[tuple[str, ...], str]:
    if meta.get("bands"):
        bands = tuple(meta["bands"])
        level = meta.get("level", "unknown")
    elif spec.image_key.split(".")[-1].lower() in _IMAGE_SUFFIXES:
        bands, level = RGB_NAMES, "unknown"
    elif spec.bands:
        bands, level = spec.bands, spec.level or ("L2A" if "B10" not in spec.bands else "L1C")
    elif image.shape[0] == len(L2A_BANDS):
        bands, level = L2A_BANDS, spec.level or "L2A"
    elif image.shape[0] == len(BANDS):
        bands, level = BANDS, spec.level or "L1C"
    else:
        raise ValueError(f"{image.shape[0]} channels and no band names (give --bands)")
    if len(bands) != image.shape[0]:
        raise ValueError(f"image has {image.shape[0]} channels but {len(bands)} band names ({', '.join(bands)})")
    return bands, level


def _decode_target(raw: dict[str, Any], spec: DatasetSpec) -> np.ndarray | int | None:
    if spec.target_key not in raw:
        if spec.manifest:  # ours: the writer leaves the target out of unlabelled samples (--keep-unlabelled)
            return None
        raise ValueError(f"has no {spec.target_key} member")
    data = raw[spec.target_key]
    if spec.target_key == "cls":
        value: Any = int(data.decode().strip())
    else:
        value = _decode_array(spec.target_key, data)
    if spec.task == "multi-class":
        arr = np.asarray(value)
        if arr.ndim == 1 and arr.size == spec.n_classes:  # a one-hot vector
            if arr.sum() != 1:
                raise ValueError("multi-class target is a vector with other than one positive class")
            value = int(arr.argmax())
        value = int(np.asarray(value).reshape(()))
        if not 0 <= value < spec.n_classes:
            raise ValueError(f"class index {value} outside 0..{spec.n_classes - 1}")
        return value
    arr = np.asarray(value).reshape(-1)
    if arr.size != spec.n_classes:
        raise ValueError(f"multi-label target has {arr.size} entries for {spec.n_classes} classes")
    return (arr > 0).astype(np.uint8)


# --- writing -----------------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def encode_sample(sample: Sample, task: str) -> dict[str, Any]:
    """A :class:`Sample` -> the members of one webdataset sample (bytes)."""
    if not sample.key or any(c in sample.key for c in "./\\ "):
        raise ValueError(f"sample key {sample.key!r} must be non-empty without '.', '/', '\\\\' or spaces")
    out: dict[str, Any] = {"__key__": sample.key, "image.npy": _npy_bytes(compact_dtype(sample.image))}
    meta = dict(sample.meta, bands=list(sample.bands), level=sample.level)
    out["json"] = json.dumps(meta, default=str).encode()
    if task == "multi-class" and sample.target is not None:
        out["cls"] = str(int(sample.target)).encode()
    elif task == "multi-label" and sample.target is not None:
        out["target.npy"] = _npy_bytes(np.asarray(sample.target, dtype=np.uint8))
    return out


class DatasetWriter:
    """Write samples into a new shard dataset; the folder appears complete, or not at all.

    Everything is written into a temporary folder beside ``out``; :meth:`close` writes the manifest and renames
    it into place. A dataset already at ``out`` is replaced only with ``overwrite`` and only if it is one of
    ours (its manifest says so): never a folder we did not write. Use as a context manager: an exception (or
    Ctrl-C) removes the temporary folder.
    """

    def __init__(self, out: str | Path, classes: list[str], templates: list[str], task: str,
                 samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, overwrite: bool = False,
                 info: dict[str, Any] | None = None):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} (valid: {', '.join(TASKS)})")
        if task != "none" and not classes:
            raise ValueError("a labelled dataset needs class names")
        if samples_per_shard < 1:
            raise ValueError(f"samples per shard must be positive, got {samples_per_shard}")
        self.out = Path(out).expanduser()
        check_dataset_output(self.out, overwrite)
        self.classes, self.templates, self.task = list(classes), list(templates), task
        self.samples_per_shard = samples_per_shard
        self.info = dict(info or {})
        self.tmp = partial_path(self.out)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self._writers: dict[str, Any] = {}
        self._counts: dict[str, dict[str, Any]] = {}
        self._keys: set[str] = set()
        self._bands: set[tuple[str, ...]] = set()
        self._levels: set[str] = set()
        self._sizes: set[tuple[int, int]] = set()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self.tmp.exists():
            self.close()

    def add(self, split: str, sample: Sample) -> None:
        import webdataset as wds

        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (valid: {', '.join(SPLITS)})")
        if sample.key in self._keys:
            raise ValueError(f"sample key {sample.key!r} is used twice")
        self._keys.add(sample.key)
        counts = self._counts.setdefault(split, {"samples": 0, "shards": 0, "unlabelled": 0,
                                                 "per_class": Counter()})
        if counts["samples"] % self.samples_per_shard == 0:
            if split in self._writers:
                self._writers[split].close()
            folder = self.tmp / split
            folder.mkdir(exist_ok=True)
            self._writers[split] = wds.TarWriter(str(folder / f"{counts['shards']}.tar"), encoder=False)
            counts["shards"] += 1
        self._writers[split].write(encode_sample(sample, self.task))
        counts["samples"] += 1
        self._bands.add(tuple(sample.bands))
        self._levels.add(sample.level)
        self._sizes.add(tuple(sample.image.shape[1:]))
        if sample.target is None:
            counts["unlabelled"] += 1
        elif self.task == "multi-class":
            counts["per_class"][self.classes[int(sample.target)]] += 1
        else:
            for i in np.flatnonzero(np.asarray(sample.target)):
                counts["per_class"][self.classes[int(i)]] += 1

    def abort(self) -> None:
        for w in self._writers.values():
            try:
                w.close()
            except Exception:  # noqa: BLE001 - cleaning up after another error
                pass
        self._writers.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close(self) -> dict[str, Any]:
        """Finish the shards, write the manifest and move the dataset into place; returns the manifest."""
        for w in self._writers.values():
            w.close()
        self._writers.clear()
        if not self._counts:
            self.abort()
            raise ValueError("no samples to write: the dataset would be empty")
        for split, c in self._counts.items():
            (self.tmp / split / "nshards.txt").write_text(f"{c['shards']}\n")
            (self.tmp / split / "nsamples.txt").write_text(f"{c['samples']}\n")
        (self.tmp / CLASSNAMES).write_text("".join(f"{c}\n" for c in self.classes))
        (self.tmp / TEMPLATES).write_text("".join(f"{t}\n" for t in self.templates))
        bands = sorted(self._bands)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "software": f"tileprompt {__version__}",
            "created": _now(), "name": self.out.name, "task": self.task, "classes": self.classes,
            "image_key": "image.npy",
            "target_key": {"multi-class": "cls", "multi-label": "target.npy"}.get(self.task),
            "bands": list(bands[0]) if len(bands) == 1 else None,
            "levels": sorted(self._levels),
            "level": next(iter(self._levels)) if len(self._levels) == 1 else None,
            "tile_sizes": sorted(list(s) for s in self._sizes),
            "splits": {split: {"samples": c["samples"], "shards": c["shards"], "unlabelled": c["unlabelled"],
                               "per_class": {k: c["per_class"].get(k, 0) for k in self.classes}}
                       for split, c in self._counts.items()},
            **self.info,
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_folder(self.tmp, self.out)
        return manifest


def check_dataset_output(out: Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse, before any work, an output folder we may not (re)write: an input, or not a dataset we wrote."""
    return guard_folder_output(out, lambda p: (p / MANIFEST).is_file() and _is_ours(p / MANIFEST), overwrite,
                               inputs, "dataset folder")


def _is_ours(manifest: Path) -> bool:
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


