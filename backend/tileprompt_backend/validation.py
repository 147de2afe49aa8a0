"""One validation function per request parameter, shared by the CLI, the HTTP schemas and the engine.

Light on purpose: stdlib only (plus the band catalogue), so the CLI checks its arguments and paths before it
imports torch or rasterio, and a bad value gets the same verdict and the same words from every interface.
Each function takes the raw value, returns the normalised one, or raises ValueError naming the problem; a
None means "the default" where the parameter has one. ``docs/outputs-and-validation.md`` lists them and how
a new parameter joins.
"""

from __future__ import annotations

import math
import re
import unicodedata
from pathlib import Path
from typing import Any, Sequence

from .errors import InputError

#: Largest tile and stride in pixels (a larger tile is not a "tile" of any encoder this project runs).
MAX_TILE_PX = 4096
#: Largest encoder batch.
MAX_BATCH = 1024
#: Largest k a search may ask for; larger asks are refused, not allocated.
MAX_K = 10_000
#: Longest prompt list and search description, in characters.
MAX_PROMPTS_CHARS = 20_000
MAX_TEXT_CHARS = 2_000
#: Longest class a change search ranks by ("became flooded field"), in characters.
MAX_BECAME_CHARS = 200
#: The band-map entry for a band to ignore.
SKIP = "-"
#: Most dates a band map may describe (a stack of 64 dates x 13 bands is already an unusual file).
MAX_DATES = 64
#: The Sentinel-2 processing-baseline offset: these words, or a number of DN up to MAX_OFFSET_DN.
OFFSET_MODES = ("auto", "none")
MAX_OFFSET_DN = 10000.0
#: Prompt separators and line breaks are allowed; every other control character is refused.
_ALLOWED_CONTROLS = {"\n", "\r", "\t"}


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{what} must be a whole number, got {value!r}")
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{what} must be a whole number, got {value!r}") from None
    if not isinstance(value, int):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return value


def _bounded(value: Any, what: str, low: int, high: int, unit: str = "") -> int:
    n = _int(value, what)
    if not low <= n <= high:
        raise ValueError(f"{what} must be between {low} and {high}{unit}, got {n}")
    return n


def tile_px(value: Any) -> int | None:
    """Tile size in pixels, 1..MAX_TILE_PX; None: the model card's."""
    return None if value is None else _bounded(value, "tile size", 1, MAX_TILE_PX, " pixels")


def stride(value: Any) -> int | None:
    """Pixels between tiles, 1..MAX_TILE_PX; None: the tile size."""
    return None if value is None else _bounded(value, "stride", 1, MAX_TILE_PX, " pixels")


def batch_size(value: Any) -> int:
    """Tiles per encoder batch, 1..MAX_BATCH."""
    return _bounded(value, "batch size", 1, MAX_BATCH)


def k(value: Any) -> int:
    """Number of search results, 1..MAX_K."""
    return _bounded(value, "k (number of results)", 1, MAX_K)


def threshold(value: Any) -> float:
    """Multi-label threshold, strictly between 0 and 1."""
    try:
        t = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number between 0 and 1, got {value!r}") from None
    if not 0.0 < t < 1.0:
        raise ValueError(f"threshold must be between 0 and 1 (exclusive), got {value!r}")
    return t


def plain_text(text: str, what: str) -> None:
    """ValueError when ``text`` holds a control character other than tab and line breaks (NUL, escapes ...)."""
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs") and ch not in _ALLOWED_CONTROLS:
            raise ValueError(f"{what} contains a control character (U+{ord(ch):04X}); type plain text")


def prompts(value: Any) -> str:
    """Class prompts as text; the classes must parse (``engine.prompts.parse_prompts``)."""
    if not isinstance(value, str):
        raise ValueError(f"prompts must be text, got {type(value).__name__}")
    if len(value) > MAX_PROMPTS_CHARS:
        raise ValueError(f"prompts are too long ({len(value)} characters, at most {MAX_PROMPTS_CHARS})")
    plain_text(value, "prompts")
    from .engine.prompts import parse_prompts  # imports the engine package (torch): the CLI checks paths first

    parse_prompts(value)  # control characters are refused there too, for callers that skip this function
    return value


def text(value: Any) -> str | None:
    """A search description: not blank, no control characters, at most MAX_TEXT_CHARS."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"text must be text, got {type(value).__name__}")
    if not value.strip():
        raise ValueError("search text is empty: type a description, e.g. \"river with sand banks\"")
    if len(value) > MAX_TEXT_CHARS:
        raise ValueError(f"search text is too long ({len(value)} characters, at most {MAX_TEXT_CHARS})")
    plain_text(value, "search text")
    return value


def optional_prompts(value: Any) -> str | None:
    """Class prompts where they are optional (a change search): None or blank text means none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return prompts(value)


def became(value: Any) -> str | None:
    """The one class a change search ranks by the increase of ("flooded field", synonyms after "|")."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"became must be text, got {type(value).__name__}")
    if not value.strip():
        raise ValueError('became is empty: name the class, e.g. "flooded field"')
    if len(value) > MAX_BECAME_CHARS:
        raise ValueError(f"became is too long ({len(value)} characters, at most {MAX_BECAME_CHARS})")
    plain_text(value, "became")
    from .engine.prompts import parse_prompts  # the engine package (torch): the CLI checks paths first

    if len(parse_prompts(value)) != 1:
        raise ValueError(f"became names one class (synonyms after \"|\"), got {value!r}")
    return value


def optional_k(value: Any) -> int | None:
    """How many top-ranked tiles to write, 1..MAX_K; None: all of them (a change search)."""
    return None if value is None else k(value)


#: The remedy for context-aware zero-shot asked with multi-label, in each interface's words.
CONTEXT_FIXES = {
    "cli": "drop --multi-label, or drop --context",
    "http": 'send "multi_label": false, or "context": false',
    "processing": 'untick "Multi-label", or untick "Context-aware"',
    "dock": "untick multi-label, or untick context-aware",
}


def context(value: Any, multi_label: bool = False) -> bool:
    """Context-aware (transductive) zero-shot: a yes/no that refines single-label probabilities only."""
    if not isinstance(value, bool):
        raise ValueError(f"context must be true or false, got {value!r}")
    if value and multi_label:
        raise InputError("context-aware zero-shot refines single-label probabilities: it cannot be combined with "
                         "multi-label", "context_multi_label", CONTEXT_FIXES)
    return value


# --- band maps ----------------------------------------------------------------------------------------------


def band_map_fixes(example: Sequence[str], date: int | None = None) -> dict[str, str]:
    """How each interface writes the band map ``example`` (the remedy of a band-map error)."""
    names = list(example)
    date_cli = f" --date {date}" if date else ""
    date_http = f', "date": {date}' if date else ""
    return {
        "cli": f"e.g. --band-map {','.join(names)}{date_cli} ({SKIP} skips a band)",
        "http": 'e.g. "band_map": [' + ", ".join(f'"{n}"' for n in names) + f"]{date_http} (\"{SKIP}\" skips a band)",
        "processing": f"e.g. band names {','.join(names)}" + (f" and date {date}" if date else "")
                      + f" ({SKIP} skips a band)",
        "dock": f"name each row of the band table: {', '.join(names)}" + (f", date {date}" if date else "")
                + f" ({SKIP} skips a band)",
    }


def band_map(value: Any) -> list[str] | None:
    """Band names in file order (a list, or comma-separated text); ``-`` marks a band to ignore.

    Names are normalised (``b4`` -> ``B04``, ``red`` stays for the reader to refuse with the raster's facts);
    an unknown name or an all-skip map is an :class:`~.errors.InputError` whose remedy each interface phrases.
    Names may repeat: a stack of several dates (see :func:`select_date`).
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"band map must be a list of band names, got {type(value).__name__}")
    from .sentinel2.bands import try_band_name

    names: list[str] = []
    for raw in value:
        if not isinstance(raw, str):
            raise ValueError(f"band map entries must be band names, got {raw!r}")
        text_ = raw.strip()
        plain_text(text_, "band map")
        if text_ == SKIP:
            names.append(SKIP)
        elif text_.upper() in ("R", "G", "B"):
            names.append(text_.upper())
        elif try_band_name(text_):
            names.append(try_band_name(text_))
        else:
            shown = text_ if len(text_) <= 20 else text_[:20] + "..."
            raise InputError(f"unknown band name {shown!r} in the band map (Sentinel-2 names B01..B12, B8A, or "
                             f"R, G, B for plain RGB)", "band_map", band_map_fixes(["B04", "B03", "B02", SKIP]))
    if not names:
        raise ValueError("band map is empty: name every band of the file, or give none to detect them")
    if all(n == SKIP for n in names):
        raise InputError("band map skips every band", "band_map", band_map_fixes(["B04", "B03", "B02", SKIP]))
    return names


def date(value: Any) -> int | None:
    """The date to read from a multi-date band map, 1..MAX_DATES (``select_date`` checks it against the map)."""
    return None if value is None else _bounded(value, "date", 1, MAX_DATES)


def dates_in(names: Sequence[str]) -> int:
    """How many dates a band map describes: the most times one band name occurs."""
    counts: dict[str, int] = {}
    for n in names:
        if n != SKIP:
            counts[n] = counts.get(n, 0) + 1
    return max(counts.values(), default=0)


def select_date(names: list[str] | None, date: Any = None) -> list[str] | None:
    """The band map of one date of a multi-date stack: the ``date``-th occurrence of each name kept, the
    other bands skipped (``B04,B03,B04,B03`` with date 2 -> ``-,-,B04,B03``).

    A map without repeated names is returned as it is (date must then be None or 1); repeated names need a date.
    """
    if names is None:
        if date is not None:
            raise ValueError("a date needs a band map that names the bands of each date "
                             "(e.g. B04,B03,B02,B08,B04,B03,B02,B08 for two dates)")
        return None
    n_dates = dates_in(names)
    if date is None:
        if n_dates > 1:
            repeated = sorted({n for n in names if n != SKIP and names.count(n) > 1})
            raise InputError(f"the band map names {', '.join(repeated)} {n_dates} times: a stack of {n_dates} "
                             f"dates; choose the date to classify (1..{n_dates})", "band_map_date",
                             band_map_fixes(names, date=1))
        return list(names)
    d = _bounded(date, "date", 1, max(n_dates, 1))
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n == SKIP:
            out.append(SKIP)
            continue
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == d else SKIP)
    return out


def layer(value: Any) -> str | None:
    """A GeoPackage layer name for ``--layer``: letters, digits and _, at most 63, not a system table."""
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", value) \
            or value.lower().startswith(("gpkg_", "rtree_", "sqlite_")) or value == "tileprompt_runs":
        raise ValueError(f"layer name {value!r} is not usable: letters, digits and _ (at most 63, not starting "
                         "with a digit), not tileprompt_runs and not a GeoPackage system name")
    return value


def offset(value: Any) -> str | float:
    """The Sentinel-2 processing-baseline offset to subtract: "auto" (also None or empty: read from the product),
    "none", or a number of DN in 0..MAX_OFFSET_DN (sentinel2/offset.py)."""
    if value is None:
        return "auto"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in OFFSET_MODES or not text:
            return text or "auto"
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"offset must be 'auto', 'none' or a number of DN (e.g. 1000), got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= MAX_OFFSET_DN:
        raise ValueError(f"offset must be 'auto', 'none' or a number of DN between 0 and {MAX_OFFSET_DN:g}, "
                         f"got {value!r}")
    return float(value)


# --- paths --------------------------------------------------------------------------------------------------


def existing_path(value: Any, what: str) -> Path:
    """A file or folder that must exist (``~`` expanded)."""
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise ValueError(f"{what} is empty: give a path")
    plain_text(str(value), what)
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError(f"{what} not found: {path}")
    return path


def examples(value: Any) -> Path | None:
    """A few-shot examples file (a result GeoPackage, or polygons with a class field); None: no correction."""
    if value is None:
        return None
    path = existing_path(value, "examples file")
    if path.is_dir():
        raise ValueError(f"examples file is a folder: {path}; give a GeoPackage, GeoJSON or Shapefile")
    return path
