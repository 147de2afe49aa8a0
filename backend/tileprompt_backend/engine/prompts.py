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

from .. import validation
from ..paths import templates_path

MAX_CLASSES = 256
MAX_PHRASE_CHARS = 200
#: A templates file is a short text file; anything larger is not one.
MAX_TEMPLATES_BYTES = 1_000_000


@dataclass(frozen=True)
class PromptClass:
    name: str
    phrases: tuple[str, ...]  # the name first, then its synonyms
    column: str  # attribute name of this class's score column: s_<slug>


def parse_prompts(text: str | Iterable[str]) -> list[PromptClass]:
    """Parse ``"forest | woodland; water"`` (or a list of such lines) into classes; bad input -> ValueError."""
    lines = [text] if isinstance(text, str) else list(text)
    for line in lines:
        validation.plain_text(str(line), "prompts")
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
    path = templates_path(path)
    if path.stat().st_size > MAX_TEMPLATES_BYTES:
        raise ValueError(f"not a templates file (larger than {MAX_TEMPLATES_BYTES // 1000} kB): {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"not a templates file (not UTF-8 text): {path}") from None
    templates = []
    # errors name the line, never its text: the file may be anything the user (or a client) pointed at
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.replace("{c}", "{}")
        if line.count("{}") != 1 or re.search(r"\{(?!\})|(?<!\{)\}", line.replace("{}", "")):
            raise ValueError(f"not a templates file: line {n} of {path} has no single '{{}}' (or '{{c}}') "
                             "placeholder for the class")
        try:
            validation.plain_text(line, "template")
        except ValueError:
            raise ValueError(f"not a templates file: line {n} of {path} holds a control character") from None
        templates.append(line)
    if not templates:
        raise ValueError(f"templates file has no templates: {path}")
    return templates


def expand(templates: list[str], phrase: str) -> list[str]:
    """Every template filled with one phrase."""
    return [t.replace("{}", phrase) for t in templates]
