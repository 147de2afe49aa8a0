"""The objectives of HarMA and RDB on a batch of paired image and text embeddings, as small pure functions.

Row i of ``image`` and of ``text`` is a matched pair; ``similarity = image @ text.T`` of L2-normalised embeddings
(cosine). ``same`` (B, B) marks pairs whose image and caption belong together (the same image): the diagonal and
any other caption of a pair's image in the batch. Which off-diagonal pairs count as negatives is the caller's
choice (``negatives``): the released HarMA code uses every off-diagonal pair, even another caption of the same
image; our default leaves those out (method notes §3.5, rdb-notes §3.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_positive_contrastive(similarity: torch.Tensor, same: torch.Tensor, temperature: torch.Tensor | float
                               ) -> torch.Tensor:
    """HarMA's contrastive loss (Eq. 7-8 with the released code's multi-positive targets).

    logits = similarity / tau; targets t_ij = same_ij / sum_j same_ij; image->text and text->image
    cross-entropies ``-sum_j t_ij log softmax_j(logits_ij)``, each averaged over its rows, then averaged. With one
    positive per row this is CLIP's InfoNCE (Eq. 7).
    """
    logits = similarity.float() / temperature
    targets = same.float()
    i2t = -(targets / targets.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    t2i = -(targets.T / targets.T.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (i2t + t2i) / 2


def _violations(similarity: torch.Tensor, margin: float, negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hinge costs of every negative: for image i against text j ``[m + s_ij - s_ii]_+`` and for text j against
    image i ``[m + s_ij - s_jj]_+`` (zero where ``negatives`` is False)."""
    s = similarity.float()
    positive = s.diagonal()
    mask = negatives.float()
    return ((margin + s - positive[:, None]).clamp(min=0) * mask,
            (margin + s - positive[None, :]).clamp(min=0) * mask)


def adaptive_triplet(similarity: torch.Tensor, negatives: torch.Tensor, margin: float = 0.2,
                     gamma: float = 2.0) -> torch.Tensor:
    """HarMA's adaptive triplet loss (Eq. 3-4): every negative's hinge cost c weighted by w = (1 - exp(-c))^gamma.

    ``sum_ij w c`` over both directions, summed (not averaged) over the batch as Eq. 3 writes it; the weights are
    not detached (the released code's gradient flows through them too).
    """
    c_image, c_text = _violations(similarity, margin, negatives)
    return ((1 - torch.exp(-c_image)) ** gamma * c_image).sum() + ((1 - torch.exp(-c_text)) ** gamma * c_text).sum()


def cross_modal_triplet(similarity: torch.Tensor, negatives: torch.Tensor, margin: float = 0.2,
                        reduction: str = "mean") -> torch.Tensor:
    """RDB's cross-modal constraint (Eq. 10-11): for each matched pair (I, T),
    ``sum_T^ [mu - cos(I, T) + cos(I, T^)]_+ + sum_I^ [mu - cos(I, T) + cos(I^, T)]_+`` over all non-matching
    items (the VSE "sum" form: no hardest-negative mining); then the mean over the batch's pairs (``reduction``
    "mean", our default: the paper does not say) or their sum."""
    c_image, c_text = _violations(similarity, margin, negatives)
    per_pair = c_image.sum(1) + c_text.sum(0)  # pair i: its image against other texts, its text against other images
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    raise ValueError(f"unknown reduction {reduction!r} (valid: mean, sum)")


def consistency_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RDB's consistency constraint (Eq. 13): ``(1/n) sum_i ||y_Ii - y_Ti||^2`` (squares summed over the embedding,
    averaged over the n pairs); the teacher side carries no gradient."""
    return (student.float() - teacher.detach().float()).pow(2).sum(dim=-1).mean()


def uncertainty_weighted(losses: list[torch.Tensor], log_variances: torch.Tensor) -> torch.Tensor:
    """RDB's overall objective (Eq. 14, Liebel & Koerner 2018): ``sum_i L_i / (2 sigma_i^2) + log(1 + sigma_i^2)``.

    ``log_variances`` holds s_i = log sigma_i^2 (free parameters, so sigma_i^2 = exp(s_i) stays positive).
    """
    if len(losses) != len(log_variances):
        raise ValueError(f"{len(losses)} losses but {len(log_variances)} weights")
    var = torch.exp(log_variances.float())
    return sum(loss.float() / (2 * v) + torch.log1p(v) for loss, v in zip(losses, var))
