"""The embedding index: tile embeddings computed once and cached on disk, and search over them.

    build_index(rasters, model=None, tile_px=None, stride=None, index=None, ...) -> IndexResult
    search(index, like=... | tile_ids=... | text=..., k=50, out=..., heatmap=None, ...) -> SearchResult

Modules: ``store`` (on-disk format, cache keys, atomic commits), ``build`` (indexing, torchrun sharding),
``vectors`` (FAISS / numpy top-k with automatic method choice), ``query`` (similar-tile and text search),
``heatmap`` (similarity GeoTIFFs), ``reuse`` (classification from indexed embeddings), ``change`` (change search
between two dates). See docs/index.md and docs/change.md.

Names are imported on first use, so ``python -m tileprompt_backend.index.build`` (torchrun) runs the module
without it having been imported by the package first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "IndexResult": "build", "build_index": "build", "SearchResult": "query", "search": "query",
    "IndexStore": "store", "default_index_dir": "store", "model_key": "store", "VectorIndex": "vectors",
    "choose_method": "vectors", "ChangeResult": "change", "change_search": "change",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .build import IndexResult, build_index
    from .change import ChangeResult, change_search
    from .query import SearchResult, search
    from .store import IndexStore, default_index_dir, model_key
    from .vectors import VectorIndex, choose_method


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
