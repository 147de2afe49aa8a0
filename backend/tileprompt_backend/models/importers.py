"""Importers: a checkpoint file on disk, in a publisher's layout, becomes a card folder - no network involved
beyond the open_clip tags a card names.

``tileprompt models import NAME FILE`` runs the importer registered as NAME::

    @register_importer("my-layout", "one line: which file this takes, from where")
    def import_my_layout(file: Path, folder: Path) -> ModelCard:
        ...  # read `file` (torch.load with weights_only=True), write model.json + safetensors into `folder`
        return read_card(folder)

:func:`import_checkpoint` gives the function an empty folder, loads the card it wrote once on the CPU (strict key
checks) and only then moves it into the models folder: a refused file leaves nothing behind.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..paths import user_models_dir
from .card import ModelCard, read_card
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


def list_importers() -> list[Importer]:
    return [_IMPORTERS[n] for n in sorted(_IMPORTERS)]


def get_importer(name: str) -> Importer:
    if name not in _IMPORTERS:
        raise ValueError(f"no checkpoint importer named {name!r} (valid: {', '.join(sorted(_IMPORTERS)) or 'none'})")
    return _IMPORTERS[name]


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
        load_model(card, device="cpu")  # strict key check before the card becomes visible
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
