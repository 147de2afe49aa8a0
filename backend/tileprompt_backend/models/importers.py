"""Importers: a checkpoint file on disk, in a publisher's layout, becomes a card folder - no network involved.

``tileprompt models import NAME FILE`` runs the importer registered as NAME. Every bundled card that downloads one
file is an importer under its own id (``models import remoteclip-vit-b32 RemoteCLIP-ViT-B-32.pt``): the file goes
through exactly what a download goes through (publisher's and first-download digests, ``torch.load`` with
``weights_only=True``, the card's conversion, safetensors). Other layouts register a function::

    @register_importer("my-layout", "one line: which file this takes, from where")
    def import_my_layout(file: Path, folder: Path) -> ModelCard:
        ...  # read `file` (checkpoints.read_torch_checkpoint), write model.json + safetensors into `folder`
        return read_card(folder)

:func:`import_checkpoint` gives the function an empty folder, then loads the card it wrote once on the CPU (the
strict key check lists any missing, unexpected or misshapen key) and only then moves it into the models folder:
a refused file leaves nothing behind.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..paths import bundled_models_dir, user_models_dir
from .card import ModelCard, read_card, write_card
from .downloads import card_sources, install, missing_weights
from .loading import load_model

ImportFn = Callable[[Path, Path], ModelCard]


@dataclass(frozen=True)
class Importer:
    name: str
    description: str
    run: ImportFn  # (checkpoint file, empty folder to write the card into) -> the card written there


_IMPORTERS: dict[str, Importer] = {}


def register_importer(name: str, description: str) -> Callable[[ImportFn], ImportFn]:
    """Decorator: record ``fn(file, folder) -> ModelCard`` as the importer ``name``."""
    def wrap(fn: ImportFn) -> ImportFn:
        if name in _IMPORTERS:
            raise ValueError(f"checkpoint importer {name!r} registered twice")
        _IMPORTERS[name] = Importer(name, description, fn)
        return fn
    return wrap


def _card_importer(card: ModelCard) -> Importer | None:
    """A bundled card with one downloadable file imports that file from disk as its download would."""
    sources = card_sources(card)
    if len(sources) != 1:
        return None
    (file_name, source), = sources.items()

    def run(file: Path, folder: Path) -> ModelCard:
        write_card(card, folder)
        install(file, source, folder / file_name)
        return read_card(folder)

    origin = source.hf_file or source.member or source.url
    return Importer(card.id, f"{card.title}: the publisher's {Path(str(origin)).name}", run)


def list_importers() -> list[Importer]:
    """Registered importers, then one per bundled card with a single downloadable file, sorted by name."""
    found = dict(_IMPORTERS)
    root = bundled_models_dir()
    for folder in sorted(root.glob("*/model.json")) if root.is_dir() else []:
        try:
            importer = _card_importer(read_card(folder.parent))
        except ValueError:
            continue
        if importer is not None:
            found.setdefault(importer.name, importer)
    return [found[n] for n in sorted(found)]


def get_importer(name: str) -> Importer:
    for importer in list_importers():
        if importer.name == name:
            return importer
    valid = ", ".join(i.name for i in list_importers()) or "none"
    raise ValueError(f"no checkpoint importer named {name!r} (valid: {valid}; or give a folder written by "
                     "`tileprompt models export`)")


def import_checkpoint(name: str, file: str | Path, models_dir: Path | None = None,
                      replace: bool = False) -> ModelCard:
    """Run importer ``name`` on ``file``; the card lands in ``models_dir`` (default: the user models folder)."""
    importer = get_importer(name)
    file = Path(file).expanduser()
    if not file.is_file():
        raise ValueError(f"checkpoint file not found: {file}")
    root = (Path(models_dir) if models_dir is not None else user_models_dir()).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".import-{importer.name}-", dir=root) as work:
        staged = Path(work) / "card"
        staged.mkdir()
        card = importer.run(file, staged)
        files, tags = missing_weights(card)
        if files:
            raise ValueError(f"importer {importer.name!r} did not write {', '.join(files)}")
        load_model(card, device="cpu")  # strict key check (downloads the text tower's open_clip tag if one is named)
        return place_card(staged, root, card.id, replace)


def place_card(staged: Path, root: Path, card_id: str, replace: bool) -> ModelCard:
    """Move a complete card folder to ``root/<id>``; an existing card is refused unless ``replace``."""
    target = root / card_id
    if target.exists():
        if not replace:
            raise ValueError(f"model {card_id!r} already exists in {target}; remove it or pass --replace")
        old = root / f".{card_id}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staged.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staged.rename(target)
    return read_card(target)
