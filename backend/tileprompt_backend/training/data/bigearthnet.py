"""BigEarthNet-S2 v1 and v2 (reBEN) patch folders -> samples with BigEarthNet-19, -43 or -5 labels.

v1: ``<patch>/<patch>_B01.tif ... _B12.tif, _B8A.tif`` + ``<patch>_labels_metadata.json`` (``labels``: CLC level-3
names, the 43-class nomenclature). v2: ``metadata.parquet`` (``patch_id``, ``labels`` in the 19-class
nomenclature, ``split``) beside ``BigEarthNet-S2/<tile>/<patch>/<patch>_B01.tif ...``. Bands are L2A (12, no
B10), 10/20/60 m resampled onto the 10 m grid by the project's reader (bilinear). Nomenclatures (method notes
§2.5): BigEarthNet-19 from the 43 names by the official ``label_indices.json`` mapping (classes 3-10, 30, 32 and
37 have no 19-class counterpart); BigEarthNet-5 = CORINE level 1, from the first digit of each 43-class CLC code.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from ...sentinel2 import L2A_BANDS, open_raster
from .samples import Sample, multi_hot

BEN43 = [
    "Continuous urban fabric", "Discontinuous urban fabric", "Industrial or commercial units",
    "Road and rail networks and associated land", "Port areas", "Airports", "Mineral extraction sites",
    "Dump sites", "Construction sites", "Green urban areas", "Sport and leisure facilities",
    "Non-irrigated arable land", "Permanently irrigated land", "Rice fields", "Vineyards",
    "Fruit trees and berry plantations", "Olive groves", "Pastures", "Annual crops associated with permanent crops",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest", "Natural grassland",
    "Moors and heathland", "Sclerophyllous vegetation", "Transitional woodland/shrub", "Beaches, dunes, sands",
    "Bare rock", "Sparsely vegetated areas", "Burnt areas", "Inland marshes", "Peatbogs", "Salt marshes",
    "Salines", "Intertidal flats", "Water courses", "Water bodies", "Coastal lagoons", "Estuaries", "Sea and ocean",
]
#: CORINE Land Cover level-3 code of each BigEarthNet-43 class, in the same order.
CLC43 = [111, 112, 121, 122, 123, 124, 131, 132, 133, 141, 142, 211, 212, 213, 221, 222, 223, 231, 241, 242,
         243, 244, 311, 312, 313, 321, 322, 323, 324, 331, 332, 333, 334, 411, 412, 421, 422, 423, 511, 512,
         521, 522, 523]
BEN19 = [
    "Urban fabric", "Industrial or commercial units", "Arable land", "Permanent crops", "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland and sparsely vegetated areas", "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub", "Beaches, dunes, sands", "Inland wetlands", "Coastal wetlands",
    "Inland waters", "Marine waters",
]
#: CORINE level 1 (first digit of the code).
BEN5 = ["Artificial surfaces", "Agricultural areas", "Forest and semi-natural areas", "Wetlands", "Water bodies"]
#: 43 -> 19 (BigEarthNet-S2_19-classes_models ``label_indices.json``, by 43-class index).
BEN43_TO_19 = {0: 0, 1: 0, 2: 1, 11: 2, 12: 2, 13: 2, 14: 3, 15: 3, 16: 3, 18: 3, 17: 4, 19: 5, 20: 6, 21: 7,
               22: 8, 23: 9, 24: 10, 25: 11, 31: 11, 26: 12, 27: 12, 28: 13, 29: 14, 33: 15, 34: 15, 35: 16,
               36: 16, 38: 17, 39: 17, 40: 18, 41: 18, 42: 18}
#: 19 -> 5 for v2, which has only 19-class labels: every 19-class merges 43-classes of one CORINE level-1 group.
BEN19_TO_5 = {i: CLC43[next(j for j, k in BEN43_TO_19.items() if k == i)] // 100 - 1 for i in range(19)}
NOMENCLATURES = {"19": BEN19, "43": BEN43, "5": BEN5}
#: Split names of v2's metadata (and of split files) -> ours.
_SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def classes_of(nomenclature: str) -> list[str]:
    if nomenclature not in NOMENCLATURES:
        raise ValueError(f"unknown BigEarthNet nomenclature {nomenclature!r} (valid: 19, 43, 5)")
    return list(NOMENCLATURES[nomenclature])


def _label_ids(names: list[str], vocabulary, nomenclature: str) -> list[int]:
    """Positions of ``names`` in ``vocabulary``; an unknown name is an error naming it."""
    index = {n: i for i, n in enumerate(vocabulary)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise ValueError(f"unknown BigEarthNet-{nomenclature} label(s): {', '.join(map(repr, unknown))}")
    return [index[n] for n in names]


def target_from_43(names: list[str], nomenclature: str) -> np.ndarray:
    """Multi-hot target from CLC level-3 names (BigEarthNet v1 labels)."""
    ids = _label_ids(names, BEN43, "43")
    if nomenclature == "43":
        return multi_hot(ids, 43)
    if nomenclature == "19":
        return multi_hot([BEN43_TO_19[i] for i in ids if i in BEN43_TO_19], 19)
    if nomenclature == "5":
        return multi_hot([CLC43[i] // 100 - 1 for i in ids], 5)
    raise ValueError(f"unknown BigEarthNet nomenclature {nomenclature!r} (valid: 19, 43, 5)")


def target_from_19(names: list[str], nomenclature: str) -> np.ndarray:
    """Multi-hot target from 19-class names (BigEarthNet v2 labels)."""
    ids = _label_ids(names, BEN19, "19")
    if nomenclature == "19":
        return multi_hot(ids, 19)
    if nomenclature == "5":
        return multi_hot([BEN19_TO_5[i] for i in ids], 5)
    raise ValueError("BigEarthNet v2 has 19-class labels only: use --nomenclature 19 or 5 (43 needs v1 labels)")


def read_patch(folder: Path) -> tuple[np.ndarray, dict]:
    """(12, 120, 120) float32 L2A DN on the 10 m grid and where it lies, for one patch folder."""
    with open_raster(folder) as src:
        info = src.info
        image = src.read(Window(0, 0, info.width, info.height), L2A_BANDS, fill_missing=False)
        meta = {"crs": info.crs.to_string() if info.crs else None, "transform": list(info.transform)[:6],
                "width": info.width, "height": info.height, "level": info.level}
    return image, meta


def _read_split_files(folder: Path | None) -> dict[str, str]:
    """patch name -> split from ``train.csv``/``val.csv``/``test.csv`` (first column; official split files)."""
    if folder is None:
        return {}
    folder = Path(folder).expanduser()
    out: dict[str, str] = {}
    for split in ("train", "val", "test"):
        path = next((folder / f"{split}{ext}" for ext in (".csv", ".txt") if (folder / f"{split}{ext}").is_file()),
                    None)
        if path is None:
            raise ValueError(f"split folder {folder} lacks {split}.csv (one patch name per line)")
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if row and row[0].strip():
                    out[Path(row[0].strip()).stem] = split
    return out


def _read_names(path: Path | None) -> set[str]:
    if path is None:
        return set()
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"exclude list not found: {path}")
    with open(path, newline="") as f:
        return {row[0].strip() for row in csv.reader(f) if row and row[0].strip()}


def find_v1_patches(root: Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).rglob("*_labels_metadata.json"))


def iter_bigearthnet(root: str | Path, nomenclature: str = "19", splits_dir: str | Path | None = None,
                     exclude: str | Path | None = None) -> Iterator[tuple[str | None, Sample]]:
    """(split or None, sample) for every patch under ``root`` (v1 or v2, detected), in name order.

    The split comes from v2's metadata, or from split files (``splits_dir``); None when neither says.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"BigEarthNet folder not found: {root}")
    classes_of(nomenclature)
    skip = _read_names(exclude)
    if (root / "metadata.parquet").is_file():
        yield from _iter_v2(root, nomenclature, skip)
        return
    patches = find_v1_patches(root)
    if not patches:
        raise ValueError(f"no BigEarthNet patches under {root} (v1: <patch>/<patch>_labels_metadata.json; "
                         "v2: metadata.parquet)")
    splits = _read_split_files(Path(splits_dir) if splits_dir else None)
    for folder in patches:
        name = folder.name
        if name in skip:
            continue
        if splits and name not in splits:
            continue  # official split files leave out snowy, cloudy and otherwise excluded patches
        meta_file = folder / f"{name}_labels_metadata.json"
        try:
            labels = json.loads(meta_file.read_text())["labels"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{meta_file}: no readable 'labels' list ({e})") from None
        image, meta = read_patch(folder)
        sample = Sample(key=_key(name), image=image, bands=L2A_BANDS, level="L2A",
                        target=target_from_43(list(labels), nomenclature),
                        meta={"source": "bigearthnet-v1", "patch": name, "labels": list(labels), **meta})
        yield splits.get(name), sample


def _iter_v2(root: Path, nomenclature: str, skip: set[str]) -> Iterator[tuple[str | None, Sample]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading BigEarthNet v2's metadata.parquet needs pyarrow (pip install pyarrow)") from None
    rows = pq.read_table(root / "metadata.parquet", columns=["patch_id", "labels", "split"]).to_pylist()
    images = root / "BigEarthNet-S2" if (root / "BigEarthNet-S2").is_dir() else root
    for row in sorted(rows, key=lambda r: r["patch_id"]):
        patch = row["patch_id"]
        if patch in skip:
            continue
        split = _SPLIT_NAMES.get(str(row.get("split", "")).lower())
        folder = images / "_".join(patch.split("_")[:-2]) / patch
        if not folder.is_dir():
            raise ValueError(f"BigEarthNet v2 patch folder not found: {folder}")
        image, meta = read_patch(folder)
        labels = list(row["labels"])
        yield split, Sample(key=_key(patch), image=image, bands=L2A_BANDS, level="L2A",
                            target=target_from_19(labels, nomenclature),
                            meta={"source": "bigearthnet-v2", "patch": patch, "labels": labels, **meta})


def _key(name: str) -> str:
    return name.replace(".", "_")
