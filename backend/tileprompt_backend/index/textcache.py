"""Text embeddings cached on disk, per model: re-running prompts (or templates) already seen costs no text tower.

``cache_dir()/text/<model>-<key>.sqlite`` maps each template-expanded sentence to its float32 embedding, exactly
as the text tower returned it. The key covers the card hash and the weights hash, so a changed model never
reads another's sentences. :class:`CachedTextEncoder` is a drop-in ``encode_text`` for the zero-shot head: it
encodes only the sentences it has not seen, and loads the model only when there are any.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from pathlib import Path
from typing import Callable

import numpy as np

from ..paths import cache_dir
from .store import _sha, weights_hash

log = logging.getLogger(__name__)


def text_cache_path(card) -> Path | None:
    w = weights_hash(card)
    if w is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", card.id).strip("-")[:60] or "model"
    return cache_dir() / "text" / f"{slug}-{_sha([card.card_hash(), w])[:12]}.sqlite"


class CachedTextEncoder:
    """``encode_text`` over a per-model sentence cache; ``load()`` gives the model on the first miss."""

    def __init__(self, card, load: Callable[[], object]):
        self.card = card
        self._load = load
        self.path = text_cache_path(card)
        self.hits = 0
        self.misses = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        found = self._read(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        self.hits += len(texts) - len(missing)
        self.misses += len(missing)
        if missing:
            emb = np.asarray(self._load().encode_text(missing), dtype=np.float32)
            fresh = dict(zip(missing, emb))
            found.update(fresh)
            self._write(fresh)
        if not texts:
            return np.zeros((0, self.card.embed_dim), dtype=np.float32)
        return np.stack([found[t] for t in texts])

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=30)
        con.execute("CREATE TABLE IF NOT EXISTS text (sentence TEXT PRIMARY KEY, dim INTEGER, emb BLOB)")
        return con

    def _read(self, texts: list[str]) -> dict[str, np.ndarray]:
        if self.path is None or not self.path.is_file():
            return {}
        out: dict[str, np.ndarray] = {}
        try:
            con = self._connect()
            try:
                uniq = list(dict.fromkeys(texts))
                rows = con.execute("SELECT sentence, dim, emb FROM text WHERE sentence IN "
                                   "(SELECT value FROM json_each(?))", (json.dumps(uniq),))
                for sentence, dim, blob in rows:
                    v = np.frombuffer(blob, dtype=np.float32)
                    if dim == self.card.embed_dim and len(v) == dim:
                        out[sentence] = v
            finally:
                con.close()
        except sqlite3.Error as e:  # a damaged cache is only slower
            log.warning("text cache %s unreadable: %s", self.path, e)
            return {}
        return out

    def _write(self, fresh: dict[str, np.ndarray]) -> None:
        if self.path is None or not fresh:
            return
        try:
            con = self._connect()
            try:
                with con:
                    con.executemany("INSERT OR REPLACE INTO text VALUES (?, ?, ?)",
                                    [(s, len(v), np.ascontiguousarray(v, np.float32).tobytes())
                                     for s, v in fresh.items()])
            finally:
                con.close()
        except (sqlite3.Error, OSError) as e:
            log.warning("text embeddings not cached in %s: %s", self.path, e)
