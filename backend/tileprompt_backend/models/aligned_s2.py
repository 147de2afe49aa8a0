"""The ``aligned-s2`` family: a multispectral timm ViT projected into the embedding space of a CLIP text tower.

Card fields:
- ``image_tower``: ``{"arch": "timm:vit_small_patch16_224", "in_chans": 13, "proj_dim": 512, "timm_kwargs": {},
  "weights": "image_tower.safetensors"}``: ``weights`` holds the whole tower (``backbone.*`` timm keys and
  ``proj.weight``/``proj.bias``), as alignment training writes it. Instead of ``weights``,
  ``"backbone_weights": "ssl4eo_vits16_moco.safetensors"`` loads a pre-trained backbone only (timm keys, already
  filtered by :func:`~.checkpoints.ssl4eo_checkpoint_filter` when fetched); the projection then keeps its seeded
  random init and the card must say ``"trained": false``.
- ``text_tower``: the CLIP the tower was aligned to: ``{"arch": "open_clip:ViT-B-32-quickgelu", "pretrained":
  "openai"}``, or ``"weights": "text_tower.safetensors"`` (the open_clip state dict without ``visual.*``), or an
  ``open_clip_config`` for tiny models. Its visual tower is dropped after loading.
"""

from __future__ import annotations

import difflib

import timm
from torch import nn

from .card import ModelCard
from .clip import check_embed_dim, check_fields, create_open_clip, open_clip_spec, open_clip_tokenizer, \
    open_clip_weights
from .downloads import tag_cfg
from .registry import Family, Towers, register_family
from .towers import S2ImageTower, fit_pos_embed, set_timm_image_size
from .weights import SEEDS, card_weights, load_strict, read_weights, seeded

TIMM = "timm:"
DEFAULT_ARCH = "timm:vit_small_patch16_224"
_IMAGE_KEYS = {"arch", "in_chans", "proj_dim", "weights", "backbone_weights", "timm_kwargs"}
_TEXT_KEYS = {"arch", "open_clip_config", "pretrained", "weights", "context_length"}
_RESERVED_TIMM = {"pretrained", "in_chans", "num_classes", "img_size"}
_HEAD_KEYS = ("head.weight", "head.bias")  # the only keys a backbone checkpoint may lack (our head is Identity)


def build_text_model(card: ModelCard) -> tuple[nn.Module, object]:
    """The open_clip model of the card's text tower with its weights, visual tower dropped; and its tokenizer."""
    where = f"model {card.id!r} text_tower"
    spec = card.text_tower
    check_fields(spec, _TEXT_KEYS, where)
    name, config = open_clip_spec(spec, where)
    check_embed_dim(card, config, "the text tower")
    tag = spec.get("pretrained")
    quick_gelu = tag_cfg(name, tag).get("quick_gelu", False) if tag and name else False
    with seeded(SEEDS["text"]):
        model = create_open_clip(config, quick_gelu)
    model.visual = None  # the image side is ours; free it before loading
    path = open_clip_weights(card, name, tag, spec.get("weights"), "text tower")
    if path is not None:
        sd = {k: v for k, v in read_weights(path).items() if not k.startswith("visual.")}
        load_strict(model, sd, f"{where} weights {path.name}")
    return model, open_clip_tokenizer(name, config)


def _create_backbone(card: ModelCard, spec: dict, where: str) -> nn.Module:
    arch = spec.get("arch", DEFAULT_ARCH)
    if not str(arch).startswith(TIMM):
        raise ValueError(f"{where}: arch {arch!r} must start with {TIMM!r}")
    name = arch[len(TIMM):]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models("vit_*"), n=5)
        raise ValueError(f"{where}: unknown timm arch {name!r} (close matches: {', '.join(close) or 'none'}; "
                         "any timm ViT from timm.list_models('vit_*') works)")
    kwargs = dict(spec.get("timm_kwargs", {}))
    if _RESERVED_TIMM & set(kwargs):
        raise ValueError(f"{where}: timm_kwargs may not set {sorted(_RESERVED_TIMM & set(kwargs))} (the card does)")
    in_chans = int(spec.get("in_chans", len(card.input.bands)))
    if in_chans != len(card.input.bands):
        raise ValueError(f"{where}: in_chans {in_chans} but the card lists {len(card.input.bands)} input bands")
    try:
        with seeded(SEEDS["image"]):
            backbone = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=0,
                                         img_size=card.input.image_size, **kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: timm cannot build {name!r} with {kwargs}: {e}") from None
    if not all(hasattr(backbone, a) for a in ("patch_embed", "pos_embed", "set_input_size")):
        raise ValueError(f"{where}: {name!r} is not a ViT (aligned-s2 needs patch and position embeddings)")
    return backbone


@register_family("aligned-s2")
class AlignedS2(Family):
    def weight_files(self, card: ModelCard) -> list[str]:
        image, text = card.image_tower, card.text_tower
        return [f for f in (image.get("weights"), image.get("backbone_weights"), text.get("weights")) if f]

    def pretrained_tags(self, card: ModelCard) -> list[tuple[str, str]]:
        tag = card.text_tower.get("pretrained")
        if not tag:
            return []
        name, _ = open_clip_spec(card.text_tower, f"model {card.id!r} text_tower")
        return [(name, tag)] if name else []

    def build(self, card: ModelCard, image_size: int) -> Towers:
        where = f"model {card.id!r}"
        spec = card.image_tower
        check_fields(spec, _IMAGE_KEYS, f"{where} image_tower")
        if card.input.modality != "s2":
            raise ValueError(f"{where}: an aligned-s2 model takes Sentinel-2 bands (input.modality 's2')")
        if card.adapters:
            raise ValueError(f"{where}: retrieval adapters apply to clip cards (open_clip towers), not aligned-s2")
        backbone = _create_backbone(card, spec, f"{where} image_tower")
        proj_dim = int(spec.get("proj_dim", card.embed_dim))
        if proj_dim != card.embed_dim:
            raise ValueError(f"{where}: proj_dim {proj_dim} differs from embed_dim {card.embed_dim}")
        with seeded(SEEDS["proj"]):
            proj = nn.Linear(backbone.num_features, proj_dim)
        tower = S2ImageTower(backbone, proj).eval()

        weights, backbone_weights = spec.get("weights"), spec.get("backbone_weights")
        if weights and backbone_weights:
            raise ValueError(f"{where}: image_tower names both 'weights' and 'backbone_weights'")
        if card.trained and not weights:
            raise ValueError(f"{where} is marked trained but its image_tower names no 'weights' "
                             "(backbone weights alone leave the projection untrained)")
        files = []
        prefix_tokens = backbone.num_prefix_tokens
        if weights:
            path = card_weights(card, weights)
            sd = fit_pos_embed(read_weights(path), "backbone.pos_embed", backbone.pos_embed, prefix_tokens)
            load_strict(tower, sd, f"{where}: image tower weights {weights}")
            files.append(path)
        elif backbone_weights:
            path = card_weights(card, backbone_weights)
            sd = fit_pos_embed(read_weights(path), "pos_embed", backbone.pos_embed, prefix_tokens)
            load_strict(backbone, sd, f"{where}: backbone weights {backbone_weights}", may_miss=_HEAD_KEYS)
            files.append(path)
        set_timm_image_size(backbone, image_size, where)

        text_model, tokenizer = build_text_model(card)
        return Towers(tower, text_model, tokenizer, card.input.mean, card.input.std, tuple(files))

