"""CMID self-supervised pre-training of the Sentinel-2 encoder (``tileprompt train cmid``; docs/cmid.md).

``losses`` (the paper's formulas and schedules), ``masking``, ``geometry`` (where features lie, matched pairs),
``views`` (two augmented, masked views per tile), ``model`` (student, EMA teacher, queue, centre on a timm ViT),
``train`` (the command and the export).
"""

from .train import main

__all__ = ["main"]
