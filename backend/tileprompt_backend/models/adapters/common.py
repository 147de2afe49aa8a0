"""What every adapter method shares: where an adapter sits in an open_clip block, the text batch's tokens, and
a multi-head attention that never looks at padding.

Position (HarMA method notes §3.2, kept for RDB): in every block of both towers the adapter acts on the MLP's
output before the residual add, ``x = x + Attn(LN1(x)); y = MLP(LN2(x)); x = x + A(y)``. It is appended to the
block's ``mlp`` Sequential (open_clip reads ``mlp.c_fc`` for its cast dtype, so the MLP is never replaced), which
keeps every base key unchanged. An adapter's last projection is zero-initialised: at start the model is the
base model.

Text adapters need to know which positions are padding (after the end-of-text token). A forward pre-hook on
the text tower's token embedding records the token ids of the batch being encoded, per thread, so every path
that encodes text (open_clip's ``encode_text``, the engine's trimmed encoder, training) hands them over.
"""

from __future__ import annotations

import threading

import torch
from torch import nn


class TokenContext:
    """The token ids (B, L) of the text batch the current thread is encoding (set by a hook, read by adapters)."""

    def __init__(self):
        self._tokens: dict[int, torch.Tensor] = {}

    def hook(self, module: nn.Module, args: tuple) -> None:
        self._tokens[threading.get_ident()] = args[0]

    def attach(self, token_embedding: nn.Module) -> None:
        token_embedding.register_forward_pre_hook(self.hook)

    @property
    def tokens(self) -> torch.Tensor:
        tokens = self._tokens.get(threading.get_ident())
        if tokens is None:
            raise RuntimeError("a text adapter ran before the token embedding: text must be encoded from token ids")
        return tokens

    def valid(self) -> torch.Tensor:
        """(B, L) bool: positions up to and including each sentence's end-of-text token.

        open_clip pools the text feature at ``argmax(tokens)`` (the end-of-text token has the highest id); the
        zeros after it are padding.
        """
        tokens = self.tokens
        eot = tokens.argmax(dim=-1)
        return torch.arange(tokens.shape[1], device=tokens.device)[None, :] <= eot[:, None]

    def __getstate__(self):  # copies of a model get an empty context (tensors of a past batch are not state)
        return {"empty": True}

    def __setstate__(self, state):
        self._tokens = {}


class MlpAdapter(nn.Module):
    """Appended to a block's MLP: ``y -> sigmoid(G) A(y) + (1 - sigmoid(G)) y`` (HarMA's block gate), or
    ``y -> A(y)`` without one."""

    def __init__(self, adapter: nn.Module, gate_init: float | None):
        super().__init__()
        self.adapter = adapter
        self.gate = nn.Parameter(torch.tensor(float(gate_init))) if gate_init is not None else None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        out = self.adapter(y)
        if self.gate is None:
            return out
        g = torch.sigmoid(self.gate)
        return g * out + (1 - g) * y


def zero_linear(fan_in: int, fan_out: int, bias: bool = True) -> nn.Linear:
    """A linear layer with zero weight and bias: the adapter's output projection, so it starts as the identity."""
    layer = nn.Linear(fan_in, fan_out, bias=bias)
    nn.init.zeros_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class SelfAttention(nn.Module):
    """Multi-head self-attention over the tokens of each sample (batch first), padding keys masked out."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return self.attn(x, x, x, key_padding_mask=padding, need_weights=False)[0]


def shared_index(depth: int, blocks: int, n_shared: int) -> int:
    """Which of ``n_shared`` per-depth shared modules block ``depth`` of a tower of ``blocks`` blocks uses.

    Towers of one depth pair block i with module i (the papers' ViT-B/32: 12 and 12). Towers of unequal depth
    (ViT-L/14: 24 image, 12 text blocks) pair by relative depth, ``floor(depth n_shared / blocks)`` with one module
    per block of the shallower tower: image blocks 2j and 2j + 1 share text block j's.
    """
    return depth * n_shared // blocks


def shared_ref(module: nn.Module | None) -> tuple:
    """Hold a module used by several adapters without registering it in each (its weights appear once)."""
    return (module,) if module is not None else ()
