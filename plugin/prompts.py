"""Class prompts as the dock edits them: one class per line, synonyms after ``|``, ``#`` starts a comment.

The rules are the backend's (``engine.prompts``), checked here too so the dock can say what is wrong before a
job is sent: the first phrase names the class, classes are unique ignoring case, every phrase has a letter and at
most 200 characters, at most 256 classes. Bundled prompt sets live in ``resources/prompts/*.txt`` (first line
``# title: ...``), template sets in ``resources/templates/*.txt``; projects keep their own sets (settings.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
PROMPTS_DIR = RESOURCES / "prompts"
TEMPLATES_DIR = RESOURCES / "templates"
MAX_CLASSES = 256
MAX_PHRASE = 200


class PromptError(ValueError):
    """The prompt text cannot be sent; the message says which line and why."""


@dataclass(frozen=True)
class PromptClass:
    name: str
    synonyms: tuple[str, ...] = ()

    def line(self) -> str:
        return " | ".join((self.name, *self.synonyms))


def _strip_comment(line: str) -> str:
    return line.split("#", 1)[0].strip()


def parse_prompts(text: str) -> list[PromptClass]:
    """Classes from the editor's text; raises PromptError naming the first problem."""
    classes: list[PromptClass] = []
    seen: set[str] = set()
    for number, raw in enumerate((text or "").splitlines(), start=1):
        for part in _strip_comment(raw).split(";"):
            phrases = [p.strip() for p in part.split("|")]
            if not any(phrases):
                continue
            if not all(phrases):
                raise PromptError(f"line {number}: empty synonym in {part.strip()!r}")
            for phrase in phrases:
                if not any(ch.isalpha() for ch in phrase):
                    raise PromptError(f"line {number}: {phrase!r} has no letters")
                if len(phrase) > MAX_PHRASE:
                    raise PromptError(f"line {number}: a phrase is longer than {MAX_PHRASE} characters")
            key = phrases[0].casefold()
            if key in seen:
                raise PromptError(f"line {number}: class {phrases[0]!r} appears twice")
            seen.add(key)
            classes.append(PromptClass(phrases[0], tuple(phrases[1:])))
    if not classes:
        raise PromptError("no classes: type one class per line (synonyms after |)")
    if len(classes) > MAX_CLASSES:
        raise PromptError(f"{len(classes)} classes; at most {MAX_CLASSES}")
    return classes


def prompts_to_request(classes: list[PromptClass]) -> str:
    """The ``prompts`` field of a ClassifyRequest: one class per line, synonyms after ``|``, no comments."""
    return "\n".join(c.line() for c in classes)


@dataclass(frozen=True)
class PromptSet:
    key: str  # "bundled:<stem>" or "project:<name>"
    title: str
    text: str

    @property
    def is_project(self) -> bool:
        return self.key.startswith("project:")


def _title_of(path: Path, text: str) -> str:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.lower().startswith("# title:"):
            return stripped.split(":", 1)[1].strip()
        if stripped and not stripped.startswith("#"):
            break
    return path.stem.replace("-", " ").replace("_", " ")


def bundled_prompt_sets(folder: Path = PROMPTS_DIR) -> list[PromptSet]:
    sets = []
    for path in sorted(folder.glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        sets.append(PromptSet(f"bundled:{path.stem}", _title_of(path, text), text))
    return sets


def project_prompt_sets(sets: dict[str, str]) -> list[PromptSet]:
    return [PromptSet(f"project:{name}", name, text) for name, text in sorted(sets.items())]


def template_files(folder: Path = TEMPLATES_DIR) -> list[Path]:
    """Bundled template sets (one template per line with ``{}``)."""
    return sorted(folder.glob("*.txt"))
