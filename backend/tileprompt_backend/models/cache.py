"""Loaded models and their runners, kept per process so a long-running backend never loads a model twice.

The engine, the index and the job queue all get models through :func:`cached_model` / :func:`cached_runner`;
a one-shot CLI run simply fills the cache once. Least recently used models go first when more than
``max_models`` are loaded.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from .card import ModelCard
from .downloads import weight_paths
from .loading import LoadedModel, load_model, resolve_device
from .registry import resolve_card
from .runners import Runner, make_runner

log = logging.getLogger(__name__)

#: Loaded models kept in memory (least recently used go first).
MAX_CACHED_MODELS = 2


class ModelCache:
    """Models keyed by card hash + card folder + device + image size, and the runners made for them."""

    def __init__(self, max_models: int = MAX_CACHED_MODELS):
        self.max_models = max_models
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._runners: dict[tuple, Runner] = {}
        self._lock = threading.RLock()  # held while loading, so two threads never build the same model twice
        # held only while the two dicts change or are read: /v1/health never waits for a model load (which can
        # take longer than a client's timeout on a busy CPU)
        self._state = threading.Lock()
        self.loads = 0  # models actually built (cache misses)

    def model(self, card: ModelCard | str | Path, device: str = "auto", image_size: int | None = None) -> LoadedModel:
        if not isinstance(card, ModelCard):
            card = resolve_card(card)
        key = (card.card_hash(), str(card.path), _files_stamp(card), resolve_device(device), image_size)
        with self._lock:
            if key in self._models:
                with self._state:
                    self._models.move_to_end(key)
                return self._models[key]
            model = load_model(card, device=device, image_size=image_size)
            self.loads += 1
            with self._state:
                self._models[key] = model
                while len(self._models) > self.max_models:
                    _, old = self._models.popitem(last=False)
                    self._runners = {k: v for k, v in self._runners.items() if k[0] != id(old)}
        log.info("loaded model %s on %s (%d in memory)", card.id, model.device, len(self._models))
        return model

    def runner(self, model: LoadedModel, backend: str = "auto", device: str | None = None) -> Runner:
        key = (id(model), backend, device)
        with self._lock:
            if key not in self._runners:
                runner = make_runner(model, backend=backend, device=device)
                if not any(m is model for m in self._models.values()):
                    return runner  # a model from outside the cache: don't pin its runner
                with self._state:
                    self._runners[key] = runner
            return self._runners[key]

    def loaded(self) -> list[str]:
        """Ids of the models in memory, most recently used last."""
        with self._state:
            return [m.card.id for m in self._models.values()]

    def providers(self) -> list[str]:
        """ONNX Runtime providers that the cached runners' sessions actually got."""
        with self._state:
            return list(dict.fromkeys(p for r in self._runners.values() for p in getattr(r, "providers", [])))

    def clear(self) -> None:
        with self._lock, self._state:
            self._models.clear()
            self._runners.clear()


def _files_stamp(card: ModelCard) -> tuple:
    """Name, size and mtime of the weight files: weights replaced under an unchanged card are loaded anew."""
    paths = weight_paths(card) or []
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


#: The process-wide cache.
shared_models = ModelCache()


def cached_model(card: ModelCard | str | Path, device: str = "auto", image_size: int | None = None) -> LoadedModel:
    """:func:`load_model` through the process-wide cache."""
    return shared_models.model(card, device=device, image_size=image_size)


def cached_runner(model: LoadedModel, backend: str = "auto", device: str | None = None) -> Runner:
    """:func:`make_runner` through the process-wide cache."""
    return shared_models.runner(model, backend=backend, device=device)


__all__: list[Any] = ["MAX_CACHED_MODELS", "ModelCache", "cached_model", "cached_runner", "shared_models"]
