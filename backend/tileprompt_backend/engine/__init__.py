"""Pipelines composing readers, tiling, models and outputs: classify (and, later, embed/index/search)."""

from .classify import ClassifyResult, classify
from .embed import Cancelled, EmbedStats, embed_tiles
from .head import logits, score_tiles, zero_shot_head
from .prompts import PromptClass, load_templates, parse_prompts

__all__ = [
    "Cancelled", "ClassifyResult", "EmbedStats", "PromptClass", "classify", "embed_tiles", "load_templates",
    "logits", "parse_prompts", "score_tiles", "zero_shot_head",
]
