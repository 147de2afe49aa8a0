"""Captioned images for retrieval training: the RSICD / RSITMD caption files, and captions templated from an
admin's labelled polygons.

Caption files, two layouts (method notes §3.7):

- **per split** (the PIR / HarMA files ``rsitmd_train.json``, ``rsicd_val.json`` ...): a JSON list; training
  files hold one entry per caption ``{"image", "caption", "image_id", ...}``, validation and test files one entry
  per image with its captions ``{"image", "caption": [five captions]}``. The split is read from the file name.
- **one file** (the datasets' own ``dataset_rsicd.json`` / ``dataset_RSITMD.json``): ``{"images": [{"filename",
  "split", "sentences": [{"raw": ...}, ...]}, ...]}``.

Classes come from file-name prefixes (``bridge_942.tif`` -> ``bridge``; RSITMD has 33, RSICD 30); files named
by a number alone (about 7 % of RSICD) have no class and stay unlabelled. A sample is one image with all its
captions (``meta["captions"]``); training draws one of them at each visit.

Templated captions (``templated_captions``) are made from the class shares of a tile under the polygons: label
names and proportions put into fixed sentence patterns ("mostly forest with some water."). They are templated,
not written by people, and every dataset made from them says so in its manifest.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .samples import Sample

SPLIT_NAMES = ("train", "val", "test")
_PREFIX = re.compile(r"^(.*?)[_\-\s]*\d+$")
_STRIP = re.compile(r"[,.'!?\"()*#:;~]")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """HarMA's caption cleaning: lower case, punctuation removed, '-' and '/' as spaces, at most ``max_words``."""
    text = _STRIP.sub("", caption.lower()).replace("-", " ").replace("/", " ")
    words = text.split()
    return " ".join(words[:max_words])


def class_of(file_name: str) -> str | None:
    """The class a file name's prefix gives (``bridge_942.tif`` -> ``bridge``), None for a bare number."""
    stem = Path(file_name).stem
    m = _PREFIX.match(stem)
    if m is None:
        return stem or None  # no trailing number: the whole stem names the class
    return m.group(1) or None


def _split_of(path: Path) -> str:
    found = [s for s in SPLIT_NAMES if re.search(rf"(^|[_\-.]){s}([_\-.]|$)", path.stem.lower())]
    if len(found) != 1:
        raise ValueError(f"caption file {path.name}: cannot tell its split from its name (expected exactly one of "
                         f"{', '.join(SPLIT_NAMES)} in it, e.g. rsitmd_train.json)")
    return found[0]


def read_caption_files(files: Sequence[str | Path]) -> dict[str, OrderedDict[str, list[str]]]:
    """{split: {image file: [captions]}} from caption files of either layout (images in first-seen order)."""
    out: dict[str, OrderedDict[str, list[str]]] = {}
    for f in files:
        path = Path(f).expanduser()
        if not path.is_file():
            raise ValueError(f"caption file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"caption file {path.name} is not valid JSON ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            _read_dataset_file(path, data["images"], out)
        elif isinstance(data, list):
            _read_split_file(path, data, out.setdefault(_split_of(path), OrderedDict()))
        else:
            raise ValueError(f"caption file {path.name}: expected a list of entries (rsitmd_train.json layout) or "
                             "an object with 'images' (dataset_rsitmd.json layout)")
    seen: dict[str, str] = {}
    for split, images in out.items():
        for name in images:
            if seen.setdefault(name, split) != split:
                raise ValueError(f"image {name} is in both the {seen[name]} and the {split} split")
    if not any(out.values()):
        raise ValueError("the caption files hold no captions")
    return out


def _captions(value: Any, where: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    caps = [str(c).strip() for c in values if isinstance(c, str) and c.strip()]
    if not caps:
        raise ValueError(f"{where}: no caption text")
    return caps


def _read_split_file(path: Path, entries: list, images: OrderedDict[str, list[str]]) -> None:
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "image" not in e or "caption" not in e:
            raise ValueError(f"caption file {path.name}: entry {i} lacks 'image' or 'caption'")
        images.setdefault(str(e["image"]), []).extend(_captions(e["caption"], f"{path.name} entry {i}"))


def _read_dataset_file(path: Path, entries: list, out: dict) -> None:
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "filename" not in e or "sentences" not in e:
            raise ValueError(f"caption file {path.name}: image {i} lacks 'filename' or 'sentences'")
        split = str(e.get("split", "")).lower()
        if split == "restval":  # the Karpathy layout's extra training images
            split = "train"
        if split not in SPLIT_NAMES:
            raise ValueError(f"caption file {path.name}: image {e['filename']} has split {e.get('split')!r}")
        raw = [s.get("raw") if isinstance(s, dict) else s for s in e["sentences"]]
        out.setdefault(split, OrderedDict()).setdefault(str(e["filename"]), []).extend(
            _captions(raw, f"{path.name} image {e['filename']}"))


def find_image(images_dir: Path, name: str) -> Path:
    """The image file a caption entry names: relative to ``images_dir`` (never outside it), else by its base name."""
    base = images_dir.resolve()
    for candidate in (base / name, base / Path(name).name):
        target = candidate.resolve()
        if base not in target.parents:
            raise ValueError(f"image {name!r} escapes the images folder {images_dir}")
        if target.is_file():
            return target
    raise ValueError(f"image {name!r} of the caption files is not in {images_dir}")


def caption_classes(splits: Mapping[str, Mapping[str, list[str]]]) -> list[str]:
    """Every class the file names give, sorted (the label order)."""
    return sorted({c for images in splits.values() for name in images if (c := class_of(name)) is not None})


def iter_captioned_images(splits: Mapping[str, Mapping[str, list[str]]], images_dir: str | Path, classes: list[str],
                          source: str, limit: int | None = None) -> Iterator[tuple[str, Sample]]:
    """(split, sample) for every captioned image: pixels read by the project's raster reader (8-bit RGB)."""
    from rasterio.windows import Window

    from ...sentinel2 import open_raster

    images_dir = Path(images_dir).expanduser()
    if not images_dir.is_dir():
        raise ValueError(f"images folder not found: {images_dir}")
    index = {c: i for i, c in enumerate(classes)}
    n = 0
    for split, images in splits.items():
        for name, caps in images.items():
            path = find_image(images_dir, name)
            with open_raster(path) as src:
                info = src.info
                image = src.read(Window(0, 0, info.width, info.height), info.bands, fill_missing=False)
            cls = class_of(name)
            key = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(name).stem)
            yield split, Sample(key=key, image=image, bands=tuple(info.bands), level=info.level,
                                target=index.get(cls) if cls is not None else None,
                                meta={"source": source, "file": name, "captions": caps})
            n += 1
            if limit is not None and n >= limit:
                return


# --- templated captions from class shares --------------------------------------------------------------------------

def _amount(share: float) -> str:
    if share >= 0.9:
        return "entirely"
    if share >= 0.6:
        return "mostly"
    if share >= 0.3:
        return "partly"
    return "a little"


def _percent(share: float) -> str:
    return f"about {int(round(share * 10)) * 10} %" if share >= 0.05 else "a little"


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


#: The sentence patterns, in order; each takes the classes sorted by share (largest first) and their shares.
PATTERNS = (
    lambda c, s: f"a satellite image of {c[0]}." if s[0] >= 0.9 or len(c) == 1
    else f"a satellite image of {c[0]} and {c[1]}.",
    lambda c, s: f"{_amount(s[0])} {c[0]}." if len(c) == 1 else f"{_amount(s[0])} {c[0]} with {_amount(s[1])} {c[1]}.",
    lambda c, s: ", ".join(f"{_percent(x)} {n}" for n, x in zip(c[:3], s[:3])) + ".",
    lambda c, s: f"an area of {c[0]}." if len(c) == 1 else f"an area of {c[0]} next to {_join(c[1:3])}.",
    lambda c, s: f"{c[0]} covers {_percent(s[0])} of this tile." if len(c) == 1
    else f"{c[0]} covers {_percent(s[0])} of this tile, {c[1]} {_percent(s[1])}.",
)


def templated_captions(shares: Mapping[str, float], min_share: float = 0.05) -> list[str]:
    """One caption per pattern from a tile's class shares ({class: share of the tile's pixels}).

    Classes below ``min_share`` are left out; no class at or above it gives no captions.
    """
    ranked = sorted(((float(v), k) for k, v in shares.items() if float(v) >= min_share), key=lambda t: (-t[0], t[1]))
    if not ranked:
        return []
    names, values = [k for _, k in ranked], [v for v, _ in ranked]
    return [p(names, values) for p in PATTERNS]


def draw_caption(captions: Sequence[str], rng: np.random.Generator) -> str:
    """One caption of an image for this visit (uniform, from the sample's seeded generator)."""
    return captions[int(rng.integers(len(captions)))]
