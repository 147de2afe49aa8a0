"""Differential attention (Ye et al., "Differential Transformer", ICLR 2025), as RDB's visual enhancement adapter
uses it (Ning et al. 2025, Eq. 2-3; rdb-notes §2.3 and §7).

``[Q1; Q2] = E W_Q``, ``[K1; K2] = E W_K``, ``V = E W_V``;
``DiffAttn(E) = (softmax(Q1 K1^T / sqrt(d)) - lambda softmax(Q2 K2^T / sqrt(d))) V``;
``lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init`` (Eq. 3).

Multi-head as in the Differential Transformer's reference: each of ``heads`` heads has two query/key halves of
``d = dim / heads / 2`` and a value of ``2 d``; the lambda vectors have length ``d`` and start N(0, 0.1); the
output of each head goes through an RMSNorm and is scaled by ``1 - lambda_init`` (``norm``, on by default; the
RDB paper's equations leave both out); then an output projection. No causal mask and no rotary embedding:
image tokens have no order. ``lambda_init`` defaults to the reference's depth schedule
``0.8 - 0.6 exp(-0.3 depth)`` (0-based block index), or a constant in (0, 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def lambda_init_schedule(depth: int) -> float:
    """The Differential Transformer's lambda_init for 0-based layer ``depth``: 0.8 - 0.6 exp(-0.3 depth)."""
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


def reparameterised_lambda(q1: torch.Tensor, k1: torch.Tensor, q2: torch.Tensor, k2: torch.Tensor,
                           lambda_init: float) -> torch.Tensor:
    """RDB Eq. 3: lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init (a scalar)."""
    return torch.exp(torch.dot(q1, k1)) - torch.exp(torch.dot(q2, k2)) + lambda_init


class DifferentialAttention(nn.Module):
    """Differential self-attention over the tokens of each sample: (B, L, dim) -> (B, L, dim)."""

    def __init__(self, dim: int, heads: int, lambda_init: float, norm: bool = True):
        super().__init__()
        if heads < 1 or dim % (2 * heads):
            raise ValueError(f"differential attention width {dim} must be a multiple of 2 x {heads} heads")
        if not 0.0 < lambda_init < 1.0:
            raise ValueError(f"lambda_init must be in (0, 1), got {lambda_init}")
        self.heads = heads
        self.head_dim = dim // heads // 2
        self.lambda_init = float(lambda_init)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.lambda_q1 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_k1 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_q2 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_k2 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.norm = nn.RMSNorm(2 * self.head_dim, eps=1e-5) if norm else None

    def lam(self) -> torch.Tensor:
        return reparameterised_lambda(self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2, self.lambda_init)

    def attention_maps(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """(B, heads, 2, L, L): softmax(Q1 K1^T / sqrt(d)) and softmax(Q2 K2^T / sqrt(d)) of every head."""
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 2 * self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, 2 * self.heads, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) * self.head_dim ** -0.5
        if padding is not None:
            scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1).view(b, self.heads, 2, n, n)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        b, n, dim = x.shape
        maps = self.attention_maps(x, padding)
        attn = maps[:, :, 0] - self.lam().to(maps.dtype) * maps[:, :, 1]
        v = self.v(x).view(b, n, self.heads, 2 * self.head_dim).transpose(1, 2)
        heads = attn @ v  # (B, heads, L, 2d)
        if self.norm is not None:  # in float32: the norm's weight is float32 (bf16 autocast would mix dtypes)
            heads = (self.norm(heads.float()) * (1 - self.lambda_init)).to(heads.dtype)
        return self.out(heads.transpose(1, 2).reshape(b, n, dim))
