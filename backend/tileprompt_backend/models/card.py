"""Model cards: ``models/<id>/model.json``, the only format the backend loads.

A card says everything about one model: family, input modality and bands, scaling, RGB composite,
image size, tile size, ground sampling distance, embedding size, towers and where their weights are,
logit scale, default templates and provenance. See ARCHITECTURE.md ("A model card, by example").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..sentinel2.bands import BANDS, normalize_band_name

CARD_FILE = "model.json"
FAMILIES = ("clip", "aligned-s2")
MODALITIES = ("rgb", "s2")
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class InputSpec:
    """What the image tower eats, and how raw pixels become that."""

    modality: str  # "rgb" | "s2"
    bands: tuple[str, ...] = ()  # s2: band names in model order; rgb: empty
    level: str = "any"  # "L1C" | "L2A" | "any"
    scale: dict[str, Any] = field(default_factory=lambda: {"divide": 10000.0, "clip": [0.0, 1.0]})
    composite: dict[str, float] = field(default_factory=lambda: {"L2A": 2000.0, "L1C": 3558.0})
    image_size: int = 224
    tile_px: int = 64
    gsd_m: float = 10.0
    mean: tuple[float, ...] | None = None  # optional per-channel normalisation after scaling
    std: tuple[float, ...] | None = None
    interpolation: str | None = None  # s2: resize to image_size ("bilinear" default, or "bicubic")


@dataclass(frozen=True)
class ModelCard:
    id: str
    family: str
    title: str
    input: InputSpec
    image_tower: dict[str, Any]
    text_tower: dict[str, Any]
    embed_dim: int
    trained: bool = True
    logit_scale: float = 100.0
    logit_bias: float = 0.0  # added to logits before the sigmoid in multi-label mode (SigLIP-style cards)
    templates: str = "templates/satellite.txt"
    pretrained: str | None = None  # open_clip pretrained tag (clip family)
    weights: str | None = None  # a full checkpoint file in the card's directory (clip family; safetensors)
    # where weight files named by the card can be downloaded from: {file: {"url", "sha256" (hex or prefix), "convert"}}
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    description: str | None = None  # one line for model lists: what the model is and what it is good at
    preference: int = 0  # > 0: may be chosen as the default for a layer it reads, the highest first (choice.py)
    # the embedding space the card's towers live in: "<teacher id>@<weights hash>"; a teacher and the students
    # aligned to it share one (None: the card's own, see models.identity.space_of)
    space: str | None = None
    # retrieval adapters attached to a clip card's towers on load: {"method", "config", "weights"}
    # (models/adapters; None: the plain model)
    adapters: dict[str, Any] | None = None
    path: Path | None = None  # the card's directory; None for cards not on disk

    # --- derived ---
    def file(self, relative: str) -> Path:
        """A path named by the card, resolved against the card's directory (never outside it)."""
        if self.path is None:
            raise ValueError(f"model {self.id!r} has no directory, cannot resolve {relative!r}")
        base = self.path.resolve()
        target = (base / relative).resolve()
        if base != target and base not in target.parents:
            raise ValueError(f"model {self.id!r}: file {relative!r} escapes the model directory")
        return target

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        if d["adapters"] is None:  # plain cards keep their JSON and hash; adapters change the model: hashed
            del d["adapters"]
        d["input"]["bands"] = list(self.input.bands)
        for key in _OPTIONAL:  # fields added later are written only when set
            if d[key] == ModelCard.__dataclass_fields__[key].default:
                del d[key]
        if d["input"]["interpolation"] is None:
            del d["input"]["interpolation"]
        return d

    @property
    def license(self) -> str:
        """The weights' licence as the card's provenance states it ("unknown" when it does not)."""
        return str(self.provenance.get("license") or "unknown")

    def card_hash(self) -> str:
        """sha256 of the card's JSON (stable key order): identifies a model version in outputs and caches.

        The one-line description, the default preference and the embedding space's name do not change what the
        model computes, so they are left out: editing them keeps indexes and ONNX exports keyed by the hash.
        """
        data = {k: v for k, v in self.to_json().items() if k not in _OPTIONAL}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        """One line for pickers: modality, bands, GSD, untrained warning."""
        inp = self.input
        what = "RGB" if inp.modality == "rgb" else f"Sentinel-2 {len(inp.bands)} bands"
        warn = "" if self.trained else " - UNTRAINED (random weights, for tests and demos)"
        return f"{self.title}: {what}, {inp.gsd_m:g} m GSD, tile {inp.tile_px} px, dim {self.embed_dim}{warn}"


_OPTIONAL = ("description", "preference", "space")


def card_from_dict(data: dict[str, Any], path: Path | None = None) -> ModelCard:
    """Validate a parsed model.json; every problem is a ValueError naming the field."""
    def need(d: dict, key: str, where: str):
        if key not in d:
            raise ValueError(f"model card {where}: missing field {key!r}")
        return d[key]

    where = str(path) if path else data.get("id", "<card>")
    family = need(data, "family", where)
    if family not in FAMILIES:
        raise ValueError(f"model card {where}: unknown family {family!r} (expected one of {', '.join(FAMILIES)})")
    raw_in = dict(need(data, "input", where))
    modality = need(raw_in, "modality", f"{where} input")
    if modality not in MODALITIES:
        raise ValueError(f"model card {where}: unknown input modality {modality!r}")
    bands = tuple(normalize_band_name(b) for b in raw_in.get("bands", ()))
    if modality == "s2" and not bands:
        raise ValueError(f"model card {where}: an s2 model must list its input bands")
    unknown = set(raw_in) - set(InputSpec.__dataclass_fields__)
    if unknown:
        raise ValueError(f"model card {where}: unknown input field(s) {sorted(unknown)}")
    raw_in["bands"] = bands
    for key in ("mean", "std"):
        if raw_in.get(key) is not None:
            raw_in[key] = tuple(float(v) for v in raw_in[key])
    inp = InputSpec(**raw_in)
    if inp.interpolation is not None and inp.interpolation not in INTERPOLATIONS:
        raise ValueError(f"model card {where}: unknown input interpolation {inp.interpolation!r} "
                         f"(valid: {', '.join(INTERPOLATIONS)})")
    card = ModelCard(
        id=need(data, "id", where),
        family=family,
        title=data.get("title", data["id"]),
        input=inp,
        image_tower=dict(need(data, "image_tower", where)),
        text_tower=dict(need(data, "text_tower", where)),
        embed_dim=int(need(data, "embed_dim", where)),
        trained=bool(data.get("trained", True)),
        logit_scale=float(data.get("logit_scale", 100.0)),
        logit_bias=float(data.get("logit_bias", 0.0)),
        templates=data.get("templates", "templates/satellite.txt"),
        pretrained=data.get("pretrained"),
        weights=data.get("weights"),
        sources={str(k): dict(v) for k, v in data.get("sources", {}).items()},
        provenance=dict(data.get("provenance", {})),
        space=data.get("space"),
        adapters=_adapters(data.get("adapters"), where),
        description=data.get("description"),
        preference=int(data.get("preference", 0)),
        path=path,
    )
    if card.space is not None and (not isinstance(card.space, str) or not card.space.strip()):
        raise ValueError(f"model card {where}: space must be a non-empty string, got {card.space!r}")
    if card.input.image_size <= 0 or card.input.tile_px <= 0:
        raise ValueError(f"model card {where}: image_size and tile_px must be positive")
    return card


def _adapters(raw: Any, where: str) -> dict[str, Any] | None:
    """The card's ``adapters`` field: its shape here; the method and its config are checked on load."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("method"), str) or not isinstance(raw.get("weights"), str):
        raise ValueError(f"model card {where}: adapters must be an object with 'method' and 'weights' (and 'config')")
    unknown = set(raw) - {"method", "config", "weights"}
    if unknown:
        raise ValueError(f"model card {where}: unknown adapters field(s) {sorted(unknown)}")
    if not isinstance(raw.get("config", {}), dict):
        raise ValueError(f"model card {where}: adapters.config must be an object")
    return {"method": raw["method"], "config": dict(raw.get("config", {})), "weights": raw["weights"]}


def read_card(directory: str | Path) -> ModelCard:
    """Read ``<directory>/model.json``."""
    directory = Path(directory)
    f = directory / CARD_FILE
    if not f.is_file():
        raise ValueError(f"not a model directory (no {CARD_FILE}): {directory}")
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"model card {f} is not valid JSON: {e}") from None
    return card_from_dict(data, directory)


def write_card(card: ModelCard, directory: str | Path) -> Path:
    """Write ``model.json`` atomically into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (CARD_FILE + ".tmp")
    tmp.write_text(json.dumps(card.to_json(), indent=2) + "\n")
    tmp.replace(directory / CARD_FILE)
    return directory / CARD_FILE


