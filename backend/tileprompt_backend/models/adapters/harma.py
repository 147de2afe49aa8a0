"""HarMA's adapters (Huang, "Efficient Remote Sensing with Harmonized Transfer Learning and Modality Alignment",
ICLR-W 2024; released code seekerhuang/HarMA, method notes §3.2-3.4).

In every block of both towers a multimodal gated adapter (MGA, the code's ``MMadapter``) sits on the MLP output
before the residual add, behind a block gate: ``y' = sigmoid(G) MGA(y) + (1 - sigmoid(G)) y`` (G = 0.6 at start).

MGA (Algorithm 1): ``z = GELU(Down(y))``; ``z_mid = z``; ``z = MSA(z)``; ``z = MMS(z)`` (the shared multimodal
sub-adapter, where placed); ``z = MSA(z)`` with the *same* MSA weights (I-MSA and MM-MSA share parameters);
``z = sigmoid(g) z_mid + (1 - sigmoid(g)) z``; ``out = y + Up(z)``. Down: width -> 128, Up: 128 -> width with
zero weight and bias (the model is the base model at start), MSA: 8 heads.

MMS-Adapter (the code's ``BiShareAdapter``): ``h = l1(z)`` (128 -> 64), ``a = sigmoid(g)``,
``out = z + l2(a MSA(h) + (1 - a) h)``, l2 zero-initialised. Placement (``shared``): ``both`` - one instance per
depth used by the image and the text MGA of that depth (the paper: shared mini-regions process both modalities;
the default); ``text`` - text MGAs only, as the released code does; ``none``.

Text padding (``text_padding``): ``mask`` - the adapters' attention never looks at positions after the
end-of-text token (the default: a sentence's embedding does not depend on how much padding follows it);
``attend`` - attention over every context position as the released code does (then text is always encoded
at the full context length).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import MlpAdapter, SelfAttention, TokenContext, shared_index, shared_ref, zero_linear

SHARED_PLACEMENTS = ("both", "text", "none")
TEXT_PADDING = ("mask", "attend")


@dataclass(frozen=True)
class HarmaConfig:
    bottleneck: int = 128  # MGA down-projection width (the code's r)
    heads: int = 8  # MGA self-attention heads
    mini_bottleneck: int = 64  # MMS-Adapter width
    mini_heads: int = 8
    gate_init: float = 0.6  # MGA and MMS-Adapter gates g (sigmoid(0.6) = 0.646)
    block_gate_init: float = 0.6  # the per-block gate G around the MGA
    shared: str = "both"
    text_padding: str = "mask"

    def check(self, where: str) -> None:
        if self.shared not in SHARED_PLACEMENTS:
            raise ValueError(f"{where}: shared must be one of {', '.join(SHARED_PLACEMENTS)}, got {self.shared!r}")
        if self.text_padding not in TEXT_PADDING:
            raise ValueError(f"{where}: text_padding must be one of {', '.join(TEXT_PADDING)}, "
                             f"got {self.text_padding!r}")
        for name, dim, heads in (("bottleneck", self.bottleneck, self.heads),
                                 ("mini_bottleneck", self.mini_bottleneck, self.mini_heads)):
            if dim < 1 or heads < 1 or dim % heads:
                raise ValueError(f"{where}: {name} {dim} must be a positive multiple of its {heads} heads")

    def as_dict(self) -> dict:
        return asdict(self)


class MiniAdapter(nn.Module):
    """HarMA's shared multimodal sub-adapter (MMS-Adapter): ``z + l2(a MSA(l1 z) + (1 - a) l1 z)``."""

    def __init__(self, dim: int, hidden: int, heads: int, gate_init: float):
        super().__init__()
        self.l1 = nn.Linear(dim, hidden)
        self.attn = SelfAttention(hidden, heads)
        self.l2 = zero_linear(hidden, dim)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, z: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        h = self.l1(z)
        a = torch.sigmoid(self.gate)
        return z + self.l2(a * self.attn(h, padding) + (1 - a) * h)


class MultimodalGatedAdapter(nn.Module):
    """HarMA's MGA on one block's MLP output (B, L, width) -> (B, L, width)."""

    def __init__(self, width: int, config: HarmaConfig, shared: MiniAdapter | None = None,
                 tokens: TokenContext | None = None):
        super().__init__()
        self.down = nn.Linear(width, config.bottleneck)
        self.attn = SelfAttention(config.bottleneck, config.heads)  # applied twice: I-MSA and MM-MSA are tied
        self.up = zero_linear(config.bottleneck, width)
        self.gate = nn.Parameter(torch.tensor(float(config.gate_init)))
        self._shared = shared_ref(shared)
        self.tokens = tokens  # text side: the batch's token ids (padding mask); None on the image side
        self.sees_padding = tokens is not None and config.text_padding == "attend"

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        padding = None
        if self.tokens is not None and not self.sees_padding:
            padding = ~self.tokens.valid()
        z = F.gelu(self.down(y))
        z_mid = z
        z = self.attn(z, padding)
        if self._shared:
            z = self._shared[0](z, padding)
        z = self.attn(z, padding)
        a = torch.sigmoid(self.gate)
        return y + self.up(a * z_mid + (1 - a) * z)


def build_harma(towers, config: HarmaConfig, tokens: TokenContext) -> nn.ModuleList:
    """Append an MGA behind a block gate to every block of both towers; returns the MMS-Adapters (one per depth).

    ``towers``: (side, blocks, width) for "image" and "text" (``adapters.tower_blocks``). Towers of unequal
    depth share by relative depth (``common.shared_index``).
    """
    depths = {side: len(blocks) for side, blocks, _ in towers}
    shared_sides = {"both": ("image", "text"), "text": ("text",), "none": ()}[config.shared]
    n_shared = min((depths[s] for s in shared_sides), default=0)
    minis = nn.ModuleList(MiniAdapter(config.bottleneck, config.mini_bottleneck, config.mini_heads, config.gate_init)
                          for _ in range(n_shared))
    for side, blocks, width in towers:
        for depth, block in enumerate(blocks):
            mini = minis[shared_index(depth, len(blocks), n_shared)] if side in shared_sides else None
            mga = MultimodalGatedAdapter(width, config, mini, tokens if side == "text" else None)
            block.mlp.add_module("adapter", MlpAdapter(mga, config.block_gate_init))
    return minis
