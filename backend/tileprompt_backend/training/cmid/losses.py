"""CMID's objectives and schedules as small pure functions (Muhtar et al., "CMID: A Unified Self-Supervised
Learning Framework for Remote Sensing Image Understanding", TGRS 2023; method notes §4.3-4.6).

The paper writes the formulas; the reference code (NJU-LHRS/official-CMID) fixes the constants and a few
variants (focal L1 instead of plain L1, DINO's loss direction). Each function names which it follows; the
differences are listed in docs/cmid.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def focal_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, alpha: float = 0.2,
                  gamma: float = 1.0) -> torch.Tensor:
    """The spatial reconstruction loss L_spat (Eq. 2) as the reference computes it: focal L1 on masked pixels.

    l = |x' - x| (2 sigmoid(alpha |x' - x|) - 1)^gamma per pixel and channel; gamma = 0 is the paper's plain L1.
    ``pred``, ``target``: (N, C, H, W); ``mask``: (N, 1, H, W), 1 where masked. The mean is taken over the
    masked pixel-channels: sum(l m) / (sum(m) + 1e-5) / C (unmasked pixels weigh 0, the reference's default).
    """
    err = (pred.float() - target.float()).abs()
    loss = err * (2.0 * torch.sigmoid(alpha * err) - 1.0) ** gamma if gamma else err
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / (mask.sum() + 1e-5) / pred.shape[1]


def focal_frequency_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Focal frequency loss (Jiang et al., ICCV 2021) with the settings CMID uses (L_freq, Eq. 4).

    Per channel 2-D FFT (orthonormal) of (N, C, H, W) images, spectra averaged over the batch (``ave_spectrum``);
    distance d = |F_pred - F_target|^2 per frequency; weight w = |F_pred - F_target|^alpha, log(w + 1)
    (``log_matrix``), divided by its maximum over the whole batch (``batch_matrix``), NaN -> 0, clamped to
    [0, 1] and detached; the loss is mean(w d). Computed in float32 (FFTs do not run in bf16).
    """
    fp = torch.fft.fft2(pred.float(), dim=(-2, -1), norm="ortho").mean(dim=0, keepdim=True)
    ft = torch.fft.fft2(target.float(), dim=(-2, -1), norm="ortho").mean(dim=0, keepdim=True)
    diff = fp - ft
    distance = diff.real ** 2 + diff.imag ** 2
    with torch.no_grad():
        weight = torch.log(distance.sqrt() ** alpha + 1.0)
        weight = weight / weight.max()
        weight = torch.nan_to_num(weight, nan=0.0).clamp(0.0, 1.0)
    return (weight * distance).mean()


def frequency_input(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                    unmask_weight: float = 0.001) -> torch.Tensor:
    """What the reference feeds its frequency loss: the prediction on masked pixels, and on the others a mix
    weighted ``unmask_weight`` towards the prediction and the rest towards 0.5 (stop-gradient prediction + target).

    x~ = x' m_f + (0.5 sg(x') + 0.5 x)(1 - m_f), m_f = m + unmask_weight (1 - m).
    """
    m = mask.to(pred.dtype)
    m_f = m + unmask_weight * (1.0 - m)
    replace = 0.5 * pred.detach() + 0.5 * target
    return pred * m_f + replace * (1.0 - m_f)


def mim_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, alpha: float = 0.2, gamma: float = 1.0,
             fft_weight: float = 1.0, fft_alpha: float = 1.0, unmask_weight: float = 0.001
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """L_spat + fft_weight x L_freq of one view (Eq. 11's first bracket); returns (spatial, frequency) terms."""
    spatial = focal_l1_loss(pred, target, mask, alpha, gamma)
    if not fft_weight:
        return spatial, torch.zeros((), device=pred.device)
    freq = focal_frequency_loss(frequency_input(pred, target, mask, unmask_weight), target, fft_alpha)
    return spatial, fft_weight * freq


def moco_infonce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """L_NCE (Eq. 5), MoCo's form: cross-entropy of [q.k+, q.queue] / tau with the positive first.

    ``query`` (N, D) and ``key`` (N, D) are L2-normalised (so the dot products are the paper's cosines);
    ``queue`` (K, D) holds earlier keys (negatives). The key carries no gradient.
    """
    q, k = query.float(), key.detach().float()
    positive = (q * k).sum(dim=1, keepdim=True)
    negative = q @ queue.detach().float().T
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def local_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                            student_temp: float = 0.1, teacher_temp: float = 0.07) -> torch.Tensor:
    """L_local (Eq. 8-10) as the reference (and DINO) computes it: the teacher's centred, sharpened assignment
    over the prototypes is the target of the student's.

    ``student``, ``teacher``: (..., K) cosine similarities of position-matched features to the K prototypes;
    ``center`` (K,) or broadcastable. -sum_k softmax((t - c)/tau_t)_k log softmax(s/tau_s)_k, averaged over all
    leading positions. (Eq. 10 as printed swaps the roles; see docs/cmid.md.)
    """
    target = F.softmax((teacher.detach().float() - center) / teacher_temp, dim=-1)
    return -(target * F.log_softmax(student.float() / student_temp, dim=-1)).sum(dim=-1).mean()


def updated_center(center: torch.Tensor, batch_means: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """DINO's centring: c <- m c + (1 - m) mean, once per row of ``batch_means`` (the reference updates once per
    local loss term, i.e. twice a step)."""
    for mean in batch_means:
        center = center * momentum + mean * (1.0 - momentum)
    return center


def ema_momentum(step: int, total: int, base: float = 0.996, final: float = 1.0) -> float:
    """The teacher's EMA momentum after ``step`` of ``total`` steps: cosine from ``base`` to ``final``.

    tau = final - (final - base) (cos(pi step / total) + 1) / 2 (BYOL's schedule; the reference's MomentumUpdater).
    """
    return final - (final - base) * (math.cos(math.pi * min(step, total) / max(total, 1)) + 1.0) / 2.0


def teacher_temperature(step: int, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> float:
    """Local-branch teacher temperature: linear from ``start`` to ``end`` over the warm-up, then ``end``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps
