"""Class-folder datasets: ``ROOT/<class>/<image>`` (EuroSAT MS and RGB, and any such layout) -> samples.

Each file is read with the project's raster reader, so EuroSAT's 13-band tifs (B8A stored last) come out in the
canonical band order and 8-bit JPEG/PNG files as plain RGB. When the folders are EuroSAT's ten classes, the
class names and templates are CLIP_benchmark's EuroSAT ones (the reference's zero-shot prompts; method notes
§2.5); otherwise the folder names are the class names.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from rasterio.windows import Window

from ...sentinel2 import open_raster
from .samples import Sample

EUROSAT_FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake"]
#: CLIP_benchmark's EuroSAT class names, in label order (= the folders above, sorted).
EUROSAT_CLASSNAMES = ["annual crop land", "forest", "brushland or shrubland", "highway or road",
                      "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
                      "residential buildings or homes or apartments", "river", "lake or sea"]
EUROSAT_TEMPLATES = ["a centered satellite photo of {c}.", "a centered satellite photo of a {c}.",
                     "a centered satellite photo of the {c}."]
IMAGE_SUFFIXES = {".tif", ".tiff", ".jp2", ".jpg", ".jpeg", ".png"}


def class_folders(root: Path) -> list[Path]:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"dataset folder not found: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} has no class folders (expected ROOT/<class>/<image files>)")
    return folders


def class_names(folders: list[Path]) -> list[str]:
    names = [f.name for f in folders]
    return list(EUROSAT_CLASSNAMES) if names == EUROSAT_FOLDERS else names


def iter_class_folders(root: str | Path) -> Iterator[Sample]:
    """Every image of every class folder, classes in name order, files in name order."""
    folders = class_folders(Path(root))
    for index, folder in enumerate(folders):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in files:
            with open_raster(path) as src:
                info = src.info
                image = src.read(Window(0, 0, info.width, info.height), info.bands, fill_missing=False)
            key = f"{folder.name}-{path.stem}".replace(".", "_").replace(" ", "_")
            yield Sample(key=key, image=image, bands=tuple(info.bands), level=info.level, target=index,
                         meta={"source": "class-folders", "file": f"{folder.name}/{path.name}",
                               "layout": info.layout})
