"""Models: cards, the family registry, loaders, preprocessing, runners, ONNX export and weight downloads.

See docs/models.md for the card fields, families, weight sources and runner measurements.
"""

from .card import InputSpec, ModelCard, card_from_dict, read_card, write_card
from .cache import ModelCache, cached_model, cached_runner, shared_models
from .checkpoints import ssl4eo_checkpoint_filter
from .fetch import fetch
from .importers import import_checkpoint, list_importers, register_importer
from . import mtmg  # noqa: E402,F401  (registers the mtmg-patched / mtmg-aligned importers)
from .loading import LoadedModel, load_model
from .onnx_export import check_onnx_parity, export_onnx
from .registry import Family, list_families, list_models, register_family, resolve_card
from .runners import Runner, make_runner
from .tiny import write_tiny, write_untrained

#: The model the CLI and the plugin use when none is named.
DEFAULT_MODEL = "clip-vit-b32-openai"

__all__ = [
    "DEFAULT_MODEL", "Family", "InputSpec", "LoadedModel", "ModelCache", "ModelCard", "Runner", "cached_model",
    "cached_runner", "card_from_dict", "shared_models",
    "check_onnx_parity", "export_onnx", "fetch", "import_checkpoint", "list_families", "list_importers", "list_models", "load_model", "make_runner",
    "read_card", "register_family", "register_importer", "resolve_card", "ssl4eo_checkpoint_filter", "write_card", "write_tiny",
    "write_untrained",
]
