"""Moving a model between machines: ``models export ID DIR`` writes a complete card folder, ``models import DIR``
takes it in (for machines without internet).

An export is ``DIR/<id>/`` holding ``model.json``, the weight files the card names with their source records,
the open_clip pretrained weights it uses under ``open_clip/`` (they live in the cache, not the card folder), and
``export.json`` listing every file with its size and sha256. Import checks every file against that list, loads
the model once (strict key check) and only then moves the card into the models folder and the open_clip files
into the cache.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..paths import cache_dir, user_models_dir
from .card import CARD_FILE, ModelCard, read_card
from .downloads import file_sha256, missing_weights, sidecar, tag_weights_path
from .importers import place_card
from .loading import load_model
from .progress import CHECKING
from .registry import get_family, resolve_card

EXPORT_FILE = "export.json"
FORMAT = "tileprompt-model-export/1"
TAGS_DIR = "open_clip"


def export_model(name: str | Path, out_dir: str | Path) -> Path:
    """Write model ``name`` (id or card folder) with all its weights to ``out_dir/<id>``; returns that folder."""
    card = resolve_card(name)
    files, tags = missing_weights(card)
    if files or tags:
        missing = files + [f"open_clip {m}/{t}" for m, t in tags]
        raise ValueError(f"model {card.id!r} is not downloaded ({', '.join(missing)} missing): run "
                         f"`tileprompt models fetch {card.id}` first")
    out_dir = Path(out_dir).expanduser()
    if not out_dir.is_dir():
        raise ValueError(f"export folder not found: {out_dir}")
    target = out_dir / card.id
    if target.exists():
        raise ValueError(f"{target} already exists: choose another folder or remove it")
    with tempfile.TemporaryDirectory(prefix=f".{card.id}.export-", dir=out_dir) as work:
        staged = Path(work) / card.id
        staged.mkdir()
        shutil.copy2(card.path / CARD_FILE, staged / CARD_FILE)
        copies = {card.file(f): staged / f for f in get_family(card.family).weight_files(card)}
        copies.update({tag_weights_path(*t): staged / TAGS_DIR / tag_weights_path(*t).name
                       for t in get_family(card.family).pretrained_tags(card)})
        for src, dest in list(copies.items()):
            if sidecar(src).is_file():
                copies[sidecar(src)] = sidecar(dest)
        listing = {}
        for src, dest in copies.items():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
            listing[dest.relative_to(staged).as_posix()] = {"size": dest.stat().st_size,
                                                           "sha256": file_sha256(dest, CHECKING)}
        manifest = {"format": FORMAT, "id": card.id, "card_hash": card.card_hash(), "files": listing,
                    "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "software": f"tileprompt {__version__}"}
        (staged / EXPORT_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        staged.rename(target)
    return target


def is_export(folder: Path) -> bool:
    return (folder / CARD_FILE).is_file() and (folder / EXPORT_FILE).is_file()


def import_model(folder: str | Path, models_dir: Path | None = None, replace: bool = False) -> ModelCard:
    """Take in a folder written by :func:`export_model`: verify, load once, then move into place."""
    folder = Path(folder).expanduser()
    if not is_export(folder):
        raise ValueError(f"not a model export (no {CARD_FILE} and {EXPORT_FILE}): {folder}")
    try:
        manifest = json.loads((folder / EXPORT_FILE).read_text())
        listing = dict(manifest["files"])
        if manifest.get("format") != FORMAT:
            raise ValueError(f"unknown export format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{folder / EXPORT_FILE} is not a valid export listing ({e})") from None
    card = read_card(folder)
    if card.card_hash() != manifest.get("card_hash"):
        raise ValueError(f"{folder / CARD_FILE} was changed after export (card hash {card.card_hash()}, "
                         f"exported {manifest.get('card_hash')})")
    for rel, entry in listing.items():
        path = (folder / rel).resolve()
        if folder.resolve() not in path.parents:
            raise ValueError(f"{EXPORT_FILE} names a file outside the export: {rel}")
        if not path.is_file() or path.stat().st_size != entry.get("size"):
            raise ValueError(f"export {folder}: {rel} is missing or truncated")
        if file_sha256(path, CHECKING) != entry.get("sha256"):
            raise ValueError(f"export {folder}: {rel} does not match its recorded sha256 (corrupted in transit?)")
    root = (Path(models_dir) if models_dir is not None else user_models_dir()).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    tags_dir = cache_dir() / "open_clip"
    with tempfile.TemporaryDirectory(prefix=f".import-{card.id}-", dir=root) as work:
        staged = Path(work) / card.id
        shutil.copytree(folder, staged, ignore=shutil.ignore_patterns(EXPORT_FILE, TAGS_DIR))
        for rel in listing:
            if rel.startswith(TAGS_DIR + "/"):
                _install_tag_file(folder / rel, tags_dir)
        staged_card = read_card(staged)
        load_model(staged_card, device="cpu")
        return place_card(staged, root, card.id, replace)


def _install_tag_file(src: Path, tags_dir: Path) -> None:
    """Put an exported open_clip weight file into the cache (an identical one already there is kept)."""
    dest = tags_dir / src.name
    if dest.is_file():
        if dest.name.endswith(".safetensors") and file_sha256(dest) != file_sha256(src):
            raise ValueError(f"{dest} differs from the exported {src.name}; remove it to import this export")
        return
    tags_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.import.tmp")
    shutil.copy2(src, tmp)
    tmp.replace(dest)
