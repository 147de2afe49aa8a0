"""The training objectives of Mind the Modality Gap (and PAINT), as small pure functions.

All logits are the frozen zero-shot head's: ``logit_scale x cos(image, class)`` with the class embeddings built
from the task's prompts by the text tower (CLIP / PAINT head; ``engine.head.zero_shot_head``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def zero_shot_logits(image_emb: torch.Tensor, head: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """(N, C) logits = logit_scale x cosine(image embedding, class embedding); ``head`` is (C, D), unit rows.

    The image embedding is normalised here (the head of the reference normalises its input).
    """
    return logit_scale * F.normalize(image_emb.float(), dim=-1) @ head.float().T


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, task: str,
                        labelled: torch.Tensor | None = None) -> torch.Tensor:
    """BCE-with-logits (multi-label, mean over samples x classes) or cross-entropy (multi-class, mean).

    The reference wraps BCE in timm's ``BinaryCrossEntropy(smoothing=0.2)``, which only smooths index targets:
    on multi-hot targets it is plain BCE-with-logits, as here. ``labelled`` (N,) bool leaves unlabelled rows out;
    with no labelled row the loss is 0 (and has a gradient of 0).
    """
    if labelled is not None:
        if not bool(labelled.any()):
            return logits.sum() * 0.0
        logits, targets = logits[labelled], targets[labelled]
    if task == "multi-label":
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
    if task == "multi-class":
        return F.cross_entropy(logits.float(), targets.long())
    raise ValueError(f"no classification loss for task {task!r}")


def alignment_loss(student: torch.Tensor, teacher: torch.Tensor, logits: torch.Tensor | None = None,
                   targets: torch.Tensor | None = None, task: str = "none", lam: float = 0.05,
                   labelled: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Mind the Modality Gap, Eq. 1: L = MSE(E_i, E~_i) + lambda x CE(y_pred, y_true).

    ``student`` and ``teacher`` are the un-normalised (N, D) embeddings (the reference's ``encode_image``
    outputs); MSE is the mean over N x D. ``logits`` are the student's zero-shot logits; the "CE" is BCE for
    multi-label tasks, as in the reference code. Without targets (unlabelled data) the loss is MSE alone.
    Returns (loss, {"mse", "cls"} as detached tensors: reading them is left to the logger, no sync per step).
    """
    mse = F.mse_loss(student.float(), teacher.float())
    if targets is None or task == "none" or lam == 0:
        return mse, {"mse": mse.detach(), "cls": torch.zeros((), device=mse.device)}
    if logits is None:
        raise ValueError("alignment with labels needs the student's zero-shot logits")
    cls = classification_loss(logits, targets, task, labelled)
    return mse + lam * cls, {"mse": mse.detach(), "cls": cls.detach()}
