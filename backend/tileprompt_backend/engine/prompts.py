"""Class prompts and prompt templates.

A prompt list is classes separated by ``;`` or new lines; each class may carry synonyms after ``|``:
``"forest | woodland; water; farmland"``. The first phrase names the class. Templates turn each phrase
into sentences (``"a satellite photo of {}."``); the class embedding averages all of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..paths import resources_dir

MAX_CLASSES = 256
MAX_PHRASE_CHARS = 200
DEFAULT_TEMPLATES = "templates/satellite.txt"


@dataclass(frozen=True)
class PromptClass:
    name: str
    phrases: tuple[str, ...]  # the name first, then its synonyms
    column: str  # attribute name of this class's score column: s_<slug>


def parse_prompts(text: str | Iterable[str]) -> list[PromptClass]:
    """Parse ``"forest | woodland; water"`` (or a list of such lines) into classes; bad input -> ValueError."""
    lines = [text] if isinstance(text, str) else list(text)
    entries = [e.strip() for line in lines for e in re.split(r"[;\n]", line)]
    classes: list[PromptClass] = []
    seen: dict[str, str] = {}
    columns: set[str] = set()
    for entry in filter(None, entries):
        phrases = tuple(dict.fromkeys(p.strip() for p in entry.split("|") if p.strip()))
        if not phrases:
            continue
        for p in phrases:
            if len(p) > MAX_PHRASE_CHARS:
                raise ValueError(f"prompt is too long ({len(p)} characters, at most {MAX_PHRASE_CHARS}): {p[:40]!r}...")
            if not re.search(r"\w", p):
                raise ValueError(f"prompt has no letters or digits: {p!r}")
        name = phrases[0]
        key = name.casefold()
        if key in seen:
            raise ValueError(f"class {name!r} is given twice")
        seen[key] = name
        classes.append(PromptClass(name=name, phrases=phrases, column=_unique_column(name, columns)))
    if not classes:
        raise ValueError("no class prompts given: type classes separated by ';', e.g. \"forest; water; farmland\"")
    if len(classes) > MAX_CLASSES:
        raise ValueError(f"too many classes ({len(classes)}, at most {MAX_CLASSES})")
    return classes


def _unique_column(name: str, taken: set[str]) -> str:
    slug = re.sub(r"[^0-9a-z]+", "_", name.casefold()).strip("_")[:40] or "class"
    column, n = f"s_{slug}", 2
    while column in taken:
        column, n = f"s_{slug}_{n}", n + 1
    taken.add(column)
    return column


def load_templates(path: str | Path | None = None) -> list[str]:
    """Templates from a file (one per line, ``{}`` or ``{c}`` marks the phrase, ``#`` comments), default bundled set.

    A relative path that does not exist is looked up in the bundled resources (cards name ``templates/...``).
    """
    if path is None:
        path = DEFAULT_TEMPLATES
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = resources_dir() / path
    if not path.is_file():
        raise ValueError(f"templates file not found: {path}")
    templates = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.replace("{c}", "{}")
        if line.count("{}") != 1 or re.search(r"\{(?!\})|(?<!\{)\}", line.replace("{}", "")):
            raise ValueError(f"{path}:{n}: a template needs exactly one '{{}}' (or '{{c}}') placeholder: {raw!r}")
        templates.append(line)
    if not templates:
        raise ValueError(f"templates file has no templates: {path}")
    return templates


def expand(templates: list[str], phrase: str) -> list[str]:
    """Every template filled with one phrase."""
    return [t.replace("{}", phrase) for t in templates]
