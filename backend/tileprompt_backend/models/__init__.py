"""Models: cards, the family registry, loaders, preprocessing, runners, ONNX export, weight downloads and imports.

See docs/models.md for the card fields, families, weight sources and runner measurements.
"""

from .bundles import export_model, import_model
from .card import InputSpec, ModelCard, card_from_dict, read_card, write_card
from .cache import ModelCache, cached_model, cached_runner, shared_models
from .checkpoints import msclip_checkpoint_filter, ssl4eo_checkpoint_filter
from .choice import DEFAULT_MODEL, ModelChoice, choose_model
from .fetch import fetch
from .importers import import_checkpoint, list_importers, register_importer
from . import mtmg  # noqa: E402,F401  (registers the mtmg-patched / mtmg-aligned importers)
from .loading import LoadedModel, load_model
from .onnx_export import check_onnx_parity, export_onnx
from .progress import download_hooks
from .registry import Family, list_families, list_models, register_family, resolve_card
from .runners import Runner, make_runner
from .tiny import write_tiny, write_untrained

__all__ = [
    "DEFAULT_MODEL", "Family", "InputSpec", "LoadedModel", "ModelCache", "ModelCard", "ModelChoice", "Runner",
    "cached_model", "cached_runner", "card_from_dict", "check_onnx_parity", "choose_model", "download_hooks",
    "export_model", "export_onnx", "fetch", "import_checkpoint", "import_model", "list_families", "list_importers",
    "list_models", "load_model", "make_runner", "msclip_checkpoint_filter", "read_card", "register_family",
    "register_importer", "resolve_card", "shared_models", "ssl4eo_checkpoint_filter", "write_card", "write_tiny",
    "write_untrained",
]
