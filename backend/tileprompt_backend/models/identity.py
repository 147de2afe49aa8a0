"""What identifies a model's weights and the embedding space it lives in.

``weights_hash`` keys every cache derived from a model's outputs (embedding indexes, prompt caches).
``space_of`` names the embedding space of a card: ``"<teacher id>@<weights hash>"``. A CLIP card lives in its
own space; a card aligned to a teacher (``train align``) lives in the teacher's, so the two can query each
other's embeddings (RGB <-> multispectral search). Cards of different spaces are never compared.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..paths import cache_dir
from .card import ModelCard


def short_sha(obj: Any, n: int = 16) -> str:
    """First ``n`` hex digits of the sha256 of ``obj`` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _memo_file() -> Path:
    return cache_dir() / "index" / "weights-sha256.json"


def file_sha256_cached(path: Path) -> str:
    """sha256 of a weight file, remembered per (path, size, mtime) so big checkpoints are hashed once."""
    from .downloads import file_sha256

    st = path.stat()
    memo_key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = _memo_file()
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo_key in memo:
        return memo[memo_key]
    digest = file_sha256(path)
    memo[memo_key] = digest
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f".{memo_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=0))
        tmp.replace(memo_path)
    except OSError:
        pass  # a read-only cache only costs re-hashing next time
    return digest


def weights_hash(card: ModelCard) -> str | None:
    """Content hash of the card's weight files; seeded cards (no files) hash their seeds and library versions.

    None when a file the card needs is not on disk yet.
    """
    from .downloads import weight_paths

    paths = weight_paths(card)
    if paths is None:
        return None
    if paths:
        return short_sha(sorted((p.name, file_sha256_cached(p)) for p in paths))
    import open_clip
    import timm
    import torch

    from .weights import SEEDS

    return short_sha({"seeds": SEEDS, "versions": [torch.__version__, timm.__version__, open_clip.__version__]})


def space_of(card: ModelCard) -> str:
    """The card's embedding space: its ``space`` field, else its own ``"<id>@<weights hash>"``."""
    if card.space:
        return card.space
    w = weights_hash(card)
    if w is None:
        raise ValueError(f"model {card.id!r}: its weights are not on disk yet, so its embedding space is unknown "
                         f"(run `tileprompt models fetch {card.id}`)")
    return f"{card.id}@{w}"


def check_same_space(a: ModelCard, b: ModelCard, what: str) -> str:
    """The space two cards share; a ValueError naming both spaces when they differ."""
    sa, sb = space_of(a), space_of(b)
    if sa != sb:
        raise ValueError(f"{what}: model {a.id!r} embeds into space {sa!r} but model {b.id!r} into {sb!r}; "
                         "only cards of one embedding space (a teacher and the students aligned to it) can be compared")
    return sa
