"""Hierarchical attention (Yang et al., "Hierarchical Attention Networks", NAACL 2016), as RDB's text semantic
adapter uses it (Ning et al. 2025, Eq. 4-9; rdb-notes §2.4) on the tokens of CLIP's text tower.

Word level, per sentence i: ``h_it = BiGRU(w_it)``, ``u_it = tanh(W_w h_it + b_w)``,
``alpha_it = softmax_t(u_it . u_w)``, ``s_i = sum_t alpha_it h_it``. Sentence level:
``h_i = BiGRU(s_i)``, ``u_i = tanh(W_s h_i + b_s)``, ``alpha_i = softmax_i(u_i . u_s)``, ``v = sum_i alpha_i h_i``.

A caption's tokens run from the start-of-text to the end-of-text token; positions after it are padding and
take no part: the GRUs run over packed sequences and the softmaxes only over real tokens, so no output of a real
token depends on padding. Sentences: a ``segments`` tensor gives each token its sentence index (-1: padding).
The adapter needs a feature per token, which HAN does not define: ``output`` says what it is - ``annotations``
(default: each token's word annotation ``h_it`` plus the caption's text vector ``v``, so every token, the
end-of-text token CLIP pools included, carries the attention-weighted summary) or ``vector`` (``v`` alone).
The attention runs in float32 (GRUs under bf16 autocast are not supported on every device).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

OUTPUTS = ("annotations", "vector")


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension where ``mask`` is True; rows without any True get all zeros."""
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(out, nan=0.0)


class AttentionPool(nn.Module):
    """HAN's attention with a learned context vector: ``u = tanh(W h + b)``, ``alpha = softmax(u . c)``."""

    def __init__(self, dim: int, attn_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, attn_dim)
        self.context = nn.Parameter(torch.randn(attn_dim) * attn_dim ** -0.5)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled (N, dim), weights (N, T)) of annotations ``h`` (N, T, dim) over positions where ``mask``."""
        alpha = masked_softmax(torch.tanh(self.proj(h)) @ self.context, mask)
        return (alpha.unsqueeze(-1) * h).sum(dim=1), alpha


def _bigru(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    packed = pack_padded_sequence(x, lengths.cpu().clamp(min=1), batch_first=True, enforce_sorted=False)
    out, _ = gru(packed)
    return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


class HierarchicalAttention(nn.Module):
    """(B, L, dim) token features + (B, L) sentence index per token (-1: padding) -> (B, L, 2 hidden)."""

    def __init__(self, dim: int, hidden: int, attn_dim: int, output: str = "annotations"):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"hierarchical attention output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        self.output = output
        self.word_gru = nn.GRU(dim, hidden, batch_first=True, bidirectional=True)
        self.word_attn = AttentionPool(2 * hidden, attn_dim)
        self.sentence_gru = nn.GRU(2 * hidden, hidden, batch_first=True, bidirectional=True)
        self.sentence_attn = AttentionPool(2 * hidden, attn_dim)
        self.last: dict[str, torch.Tensor] = {}  # the weights of the last batch (inspection and tests)

    def forward(self, x: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._forward(x.float(), segments)

    def _forward(self, x: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        real = segments >= 0
        n_sent = (segments.max(dim=1).values + 1).clamp(min=1)  # sentences per caption (at least one)
        first = torch.cumsum(n_sent, 0) - n_sent  # index of each caption's first sentence among all sentences
        sentence = torch.where(real, first[:, None] + segments.clamp(min=0), torch.zeros_like(segments))
        total = int(n_sent.sum())
        # a token's position within its sentence: tokens of a sentence are contiguous
        start = torch.full((total,), n, dtype=torch.long, device=x.device)
        pos = torch.arange(n, device=x.device).expand(b, n)
        start = start.scatter_reduce(0, sentence[real], pos[real], reduce="amin")
        within = pos - start[sentence]
        lengths = torch.zeros(total, dtype=torch.long, device=x.device).index_add_(
            0, sentence[real], torch.ones_like(sentence[real]))
        t_max = int(lengths.max()) if total else 1
        words = x.new_zeros(total, t_max, x.shape[-1])
        words[sentence[real], within[real]] = x[real]
        h = _bigru(self.word_gru, words, lengths)  # (sentences, T, 2 hidden)
        word_mask = torch.arange(t_max, device=x.device)[None, :] < lengths[:, None]
        s, alpha_w = self.word_attn(h, word_mask)  # sentence vectors (sentences, 2 hidden)

        s_max = int(n_sent.max())
        sent_index = torch.arange(s_max, device=x.device)[None, :]
        sent_mask = sent_index < n_sent[:, None]
        sents = s.new_zeros(b, s_max, s.shape[-1])
        sents[sent_mask] = s
        hs = _bigru(self.sentence_gru, sents, n_sent)
        v, alpha_s = self.sentence_attn(hs, sent_mask)  # text vectors (B, 2 hidden)
        self.last = {"word_weights": alpha_w.detach(), "sentence_weights": alpha_s.detach()}

        out = v[:, None, :].expand(b, n, v.shape[-1])
        if self.output == "annotations":
            tokens = h.new_zeros(b, n, h.shape[-1])
            tokens[real] = h[sentence[real], within[real]]
            out = out + tokens
        return out


def caption_segments(tokens: torch.Tensor, valid: torch.Tensor, sentence_end: tuple[int, ...] = ()) -> torch.Tensor:
    """(B, L) sentence index of every real token, -1 for padding.

    Without ``sentence_end`` ids a caption is one sentence. With them, a new sentence starts after each such
    token that is followed by more words (the start-of-text token belongs to the first sentence, the
    end-of-text token to the last).
    """
    segments = torch.zeros_like(tokens)
    if sentence_end:
        ends = torch.zeros_like(valid)
        for t in sentence_end:
            ends |= tokens == int(t)
        eot = tokens.argmax(dim=-1)
        # a split after position p needs a word at p + 1 that is not the end-of-text token
        word_after = torch.zeros_like(valid)
        word_after[:, :-1] = valid[:, 1:] & (torch.arange(1, tokens.shape[1], device=tokens.device)[None, :]
                                             < eot[:, None])
        breaks = (ends & word_after & valid).long()
        segments = torch.cumsum(breaks, dim=1) - breaks  # the end token closes its own sentence
    return torch.where(valid, segments, torch.full_like(segments, -1))
