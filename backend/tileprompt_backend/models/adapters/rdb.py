"""RDB's Cross-Modal Asymmetric Adapter (Ning et al., "Representation Discrepancy Bridging Method for Remote Sensing
Image-Text Retrieval", 2025, §3.2; rdb-notes §2 and §6 for every point the paper leaves open).

Per block (Fig. 3(b), three phases): ``z = GELU(Down(y))``; the image side runs differential attention (the
visual enhancement adapter, VEA), the text side hierarchical attention (the text semantic adapter, TSA); the
result meets the shared layer under a gate, ``z = sigmoid(g) z + (1 - sigmoid(g)) S(z)``; then
``out = y + Up(Dropout(z))``. The choices the paper leaves open, and ours (each a config field):

- placement (``layers``): in every block of both towers ("through Transformer blocks"), on the MLP output before
  the residual add, as HarMA places its adapters; Up zero-initialised, so the model starts as the base model.
- ``bottleneck`` 128 (HarMA's r); ``dropout`` 0.2 (the paper's rate) on the bottleneck before Up.
- VEA: ``da_heads`` 4 (the Differential Transformer halves a baseline's heads: HarMA's adapters use 8 on the same
  128 width), ``lambda_init`` "schedule" (0.8 - 0.6 exp(-0.3 depth)) or a constant in (0, 1), ``da_norm`` (the
  reference's per-head RMSNorm and (1 - lambda_init) scaling; on).
- TSA: bidirectional GRUs of ``bottleneck / 2`` per direction (so annotations are ``bottleneck`` wide), attention
  width ``bottleneck``; ``sentences`` "caption" (a caption is one sentence; RSICD/RSITMD captions are) or
  "split" (a new sentence after each ``sentence_end`` token id, written by training from the tokenizer's ".");
  ``tsa_output`` "annotations" (each token: its annotation plus the text vector v) or "vector".
- shared layer (``shared``): one instance per depth, used by the image and the text adapter of that depth:
  "linear" (a bottleneck x bottleneck linear layer; default), "mini-adapter" (HarMA's MMS-Adapter, width
  bottleneck / 2, 8 heads), "none".
- gate: one scalar per adapter, ``gate_init`` 0.6 (HarMA's), mixing the adapter's own features with the shared
  layer's output.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .common import MlpAdapter, TokenContext, shared_index, shared_ref, zero_linear
from .differential import DifferentialAttention, lambda_init_schedule
from .harma import MiniAdapter
from .hierarchical import OUTPUTS, HierarchicalAttention, caption_segments

SHARED_LAYERS = ("linear", "mini-adapter", "none")
SENTENCES = ("caption", "split")


@dataclass(frozen=True)
class RdbConfig:
    bottleneck: int = 128
    dropout: float = 0.2
    da_heads: int = 4
    lambda_init: str | float = "schedule"
    da_norm: bool = True
    sentences: str = "caption"
    sentence_end: tuple[int, ...] = field(default_factory=tuple)
    tsa_output: str = "annotations"
    shared: str = "linear"
    gate_init: float = 0.6

    def check(self, where: str) -> None:
        if self.bottleneck < 2 or self.bottleneck % 2:
            raise ValueError(f"{where}: bottleneck must be an even number >= 2, got {self.bottleneck}")
        if self.bottleneck % (2 * self.da_heads) or self.da_heads < 1:
            raise ValueError(f"{where}: bottleneck {self.bottleneck} must be a multiple of 2 x da_heads "
                             f"({self.da_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{where}: dropout must be in [0, 1), got {self.dropout}")
        if self.lambda_init != "schedule" and not (isinstance(self.lambda_init, (int, float))
                                                   and 0.0 < float(self.lambda_init) < 1.0):
            raise ValueError(f"{where}: lambda_init must be 'schedule' or a number in (0, 1), got "
                             f"{self.lambda_init!r}")
        for name, value, valid in (("sentences", self.sentences, SENTENCES), ("tsa_output", self.tsa_output, OUTPUTS),
                                   ("shared", self.shared, SHARED_LAYERS)):
            if value not in valid:
                raise ValueError(f"{where}: {name} must be one of {', '.join(valid)}, got {value!r}")
        if self.sentences == "split" and not self.sentence_end:
            raise ValueError(f"{where}: sentences 'split' needs the sentence_end token ids")

    def lambda_at(self, depth: int) -> float:
        return lambda_init_schedule(depth) if self.lambda_init == "schedule" else float(self.lambda_init)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["sentence_end"] = list(self.sentence_end)
        return d


class SharedLinear(nn.Module):
    """The shared interaction layer in its plainest form: one linear map both modalities go through."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, z: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(z)


class CrossModalAdapter(nn.Module):
    """One side of the CMAA in one block: VEA (image) or TSA (text), with the shared layer and its gate."""

    def __init__(self, width: int, config: RdbConfig, depth: int, shared: nn.Module | None,
                 tokens: TokenContext | None):
        super().__init__()
        r = config.bottleneck
        self.down = nn.Linear(width, r)
        self.tokens = tokens
        self.sentence_end = tuple(config.sentence_end) if config.sentences == "split" else ()
        if tokens is None:
            self.mix: nn.Module = DifferentialAttention(r, config.da_heads, config.lambda_at(depth), config.da_norm)
        else:
            self.mix = HierarchicalAttention(r, r // 2, r, config.tsa_output)
        self.gate = nn.Parameter(torch.tensor(float(config.gate_init))) if shared is not None else None
        self._shared = shared_ref(shared)
        self.dropout = nn.Dropout(config.dropout)
        self.up = zero_linear(r, width)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        z = F.gelu(self.down(y))
        padding = None
        if self.tokens is None:
            z = self.mix(z)
        else:
            valid = self.tokens.valid()
            padding = ~valid
            z = self.mix(z, caption_segments(self.tokens.tokens, valid, self.sentence_end)).to(y.dtype)
        if self._shared:
            a = torch.sigmoid(self.gate)
            z = a * z + (1 - a) * self._shared[0](z, padding)
        return y + self.up(self.dropout(z))


def _shared_layer(config: RdbConfig) -> nn.Module | None:
    if config.shared == "linear":
        return SharedLinear(config.bottleneck)
    if config.shared == "mini-adapter":
        hidden = config.bottleneck // 2
        return MiniAdapter(config.bottleneck, hidden, math.gcd(8, hidden), config.gate_init)  # HarMA's 8 heads
    return None


def build_rdb(towers, config: RdbConfig, tokens: TokenContext) -> nn.ModuleList:
    """Append a VEA to every image block and a TSA to every text block; returns the shared layers (per depth;
    towers of unequal depth share by relative depth, ``common.shared_index``)."""
    depths = {side: len(blocks) for side, blocks, _ in towers}
    n_shared = 0 if config.shared == "none" else min(depths.values())
    shared = nn.ModuleList(_shared_layer(config) for _ in range(n_shared))
    for side, blocks, width in towers:
        for depth, block in enumerate(blocks):
            layer = shared[shared_index(depth, len(blocks), n_shared)] if n_shared else None
            adapter = CrossModalAdapter(width, config, depth, layer, tokens if side == "text" else None)
            block.mlp.add_module("adapter", MlpAdapter(adapter, None))
    return shared
