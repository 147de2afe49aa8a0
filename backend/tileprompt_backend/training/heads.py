"""The frozen zero-shot head of a task: one unit class embedding per class, from the task's prompts.

Built exactly as classification builds it (``engine.head.zero_shot_head``: each class name through every
template, embeddings normalised, averaged, re-normalised), with the text tower of the card being trained or
its teacher; PAINT and Mind the Modality Gap keep it frozen in both stages.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..engine.head import zero_shot_head
from ..engine.prompts import PromptClass, load_templates
from .data.shards import TEMPLATES, DatasetSpec


def task_templates(spec: DatasetSpec, model, override: str | Path | None = None) -> list[str]:
    """``override``, else the dataset's template file, else the card's templates."""
    if override:
        return load_templates(override)
    if (spec.root / TEMPLATES).is_file() and spec.templates:
        return load_templates(spec.root / TEMPLATES)
    return load_templates(model.card.templates)


def task_head(model, classes: list[str], templates: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """(C, D) float32 unit class embeddings, frozen (no gradient)."""
    if not classes:
        raise ValueError("the task has no classes to build a zero-shot head from")
    prompt_classes = [PromptClass(name=c, phrases=(c,), column=f"c{i}") for i, c in enumerate(classes)]
    head = zero_shot_head(model.encode_text, prompt_classes, templates)
    return torch.from_numpy(head).to(device)
