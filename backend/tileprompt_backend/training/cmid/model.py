"""The CMID network on a timm ViT: a student (backbone + MIM head + global projector + local head + mask token) and
its EMA teacher (backbone + global projector + local head), the MoCo queue and the local centre.

Layout of one step (paper Fig. 2; method notes §4): each tile gives views A and B. The student encodes both
masked (mean fill + mask token) and reconstructs each from its own tokens (MIM); the teacher encodes both
unmasked. Global branch: the student's masked-A query against the teacher's B key and the other way round
(MoCo with a queue). Local branch: position-matched features of masked A (student) and B (teacher), and of
masked B and A, projected onto the prototypes (DINO-style distillation with centring).

Multispectral ViT choices (method notes §4.7): the mask token is added to the patch embeddings before the
position embeddings; the MIM head is a linear map from each patch token to its patch's pixels (the reference's
1x1 convolution + PixelShuffle); the local grid is the patch-token grid; the global feature is the backbone's
own pooled feature (timm's ``forward_head(pre_logits=True)``: the CLS token for ViTs by default, the mean of the
patch tokens with ``global_pool="avg"``), so the exported backbone pools exactly as it was trained.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import Dist
from .geometry import cell_centres, match_positions
from .losses import local_distillation_loss, mim_loss, moco_infonce, updated_center
from .masking import mean_fill, pixel_mask


@dataclass(frozen=True)
class CMIDConfig:
    """Every weight and constant of the method; defaults are the reference code's (docs/cmid.md lists the paper's
    beside them)."""

    mim_weight: float = 1.0  # lambda_1 (0: no MIM branch)
    global_weight: float = 1.0  # lambda_2 (0: no global branch)
    local_weight: float = 1.0  # lambda_3 (0: no local branch)
    focal_alpha: float = 0.2
    focal_gamma: float = 1.0  # 0: the paper's plain L1
    fft_weight: float = 1.0
    fft_alpha: float = 1.0
    fft_unmask_weight: float = 0.001
    global_hidden: int = 2048
    global_dim: int = 256
    queue_size: int = 65536
    moco_temperature: float = 0.2
    local_hidden: int = 2048
    local_layers: int = 3
    local_bottleneck: int = 256
    prototypes: int = 2048
    local_pairs: int = 20
    student_temperature: float = 0.1
    center_momentum: float = 0.9


def vit_tokens(vit: nn.Module, x: torch.Tensor, token_mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """timm ViT ``forward_features`` with the mask token added to the patch embeddings of masked tokens (Eq. 3).

    ``token_mask`` (N, gh, gw), 1 where masked. Without a mask this is exactly ``vit.forward_features(x)``.
    """
    t = vit.patch_embed(x)  # (N, L, D), or (N, gh, gw, D) for dynamic-size ViTs
    if token_mask is not None and mask_token is not None:
        t = t + mask_token.view(-1) * token_mask.reshape(*t.shape[:-1], 1).to(t.dtype)
    t = vit._pos_embed(t)
    t = vit.patch_drop(t)
    t = vit.norm_pre(t)
    t = vit.blocks(t)
    return vit.norm(t)


def check_vit(vit: nn.Module, where: str) -> None:
    needed = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "forward_head",
              "num_prefix_tokens")
    missing = [a for a in needed if not hasattr(vit, a)]
    if missing:
        raise ValueError(f"{where}: {type(vit).__name__} is not a timm VisionTransformer (lacks "
                         f"{', '.join(missing)}); CMID here trains timm ViTs (vit_*, deit_* ...)")


def full_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``x``'s device: losses and the logits before them run in float32 under bf16 training."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def pick(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(N, L, D) tokens at (N, P) indices -> (N, P, D)."""
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def mlp(dims: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class LocalHead(nn.Module):
    """Projector with ``layers`` linear layers (GELU between, no BN for transformers), L2 normalisation, and K
    prototypes: the output is the cosine of each feature to each prototype (the reference's weight-normed last
    layer with its norm fixed to 1 is exactly this)."""

    def __init__(self, width: int, hidden: int, layers: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.mlp = mlp([width] + [hidden] * (layers - 1) + [bottleneck], nn.GELU)
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck))
        nn.init.kaiming_uniform_(self.prototypes, a=5 ** 0.5)  # as the reference's Conv1d initialises its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.mlp(x)
        with full_precision(z):  # cosines divided by temperatures of 0.04-0.1: bf16 rounding would show
            return F.normalize(z.float(), dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).T


class Encoder(nn.Module):
    """Backbone + the heads the teacher shares with the student (EMA pairs)."""

    def __init__(self, backbone: nn.Module, config: CMIDConfig):
        super().__init__()
        width = backbone.num_features
        self.backbone = backbone
        if config.global_weight:
            self.global_proj = mlp([width, config.global_hidden, config.global_dim], nn.ReLU)
        if config.local_weight:
            self.local_head = LocalHead(width, config.local_hidden, config.local_layers, config.local_bottleneck,
                                        config.prototypes)

    def features(self, x: torch.Tensor, token_mask=None, mask_token=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled (N, D), patch tokens (N, L, D))."""
        t = vit_tokens(self.backbone, x, token_mask, mask_token)
        return self.backbone.forward_head(t, pre_logits=True), t[:, self.backbone.num_prefix_tokens:]


class CMIDNet(nn.Module):
    """The whole trainable module (what DDP wraps and checkpoints hold): student, teacher, queue, centre."""

    def __init__(self, backbone: nn.Module, channels: int, config: CMIDConfig, d: Dist = Dist(),
                 target_mean: torch.Tensor | None = None, target_std: torch.Tensor | None = None):
        super().__init__()
        check_vit(backbone, "CMID")
        if not (config.mim_weight or config.global_weight or config.local_weight):
            raise ValueError("every branch weight is 0: nothing to train")
        self.config, self.d = config, d
        self.patch = int(backbone.patch_embed.patch_size[0])
        width = backbone.num_features
        self.student = Encoder(backbone, config)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))  # zero-init, learnable (Eq. 3)
        if config.mim_weight:
            self.mim_head = nn.Linear(width, self.patch * self.patch * channels)
        self.teacher = copy.deepcopy(self.student) if (config.global_weight or config.local_weight) else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
        if config.global_weight:
            # the queue starts as random unit keys (normalised along the feature axis; the reference normalises
            # its (D, K) buffer along K)
            self.register_buffer("queue", F.normalize(torch.randn(config.queue_size, config.global_dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if config.local_weight:
            self.register_buffer("center", torch.zeros(config.prototypes))
        ones = torch.ones(channels)
        self.register_buffer("target_mean", torch.zeros(channels) if target_mean is None else target_mean.float())
        self.register_buffer("target_std", ones if target_std is None else target_std.float())
        self.enqueued = 0  # keys added this process (tests check one enqueue of the gathered keys per step)

    def train(self, mode: bool = True) -> CMIDNet:
        """The teacher always runs in eval mode (no drop-path or dropout in the targets, as DINO's teacher)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        """Names the optimiser's decay filter leaves out of weight decay: the mask token and the ViT's own tokens."""
        own = getattr(self.student.backbone, "no_weight_decay", lambda: set())()
        return {"mask_token"} | {f"student.backbone.{n}" for n in own}

    # --- the teacher ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum x teacher + (1 - momentum) x student, for every shared parameter."""
        if self.teacher is None:
            return
        t = [p for p in self.teacher.parameters()]
        s = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)

    # --- one step ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mask: torch.Tensor, crops: torch.Tensor, teacher_temperature: float = 0.07
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step: ``x`` (N, 2, C, S, S) views, ``mask`` (N, 2, gh, gw) token masks, ``crops`` (N, 2, 6) their
        crops (``geometry.CROP_FIELDS``); returns (loss, detached parts)."""
        cfg = self.config
        n = x.shape[0]
        views = x.transpose(0, 1).reshape(2 * n, *x.shape[2:])  # A_0..A_n-1, B_0..B_n-1
        masks = mask.transpose(0, 1).reshape(2 * n, *mask.shape[2:])
        pix = pixel_mask(masks, self.patch).to(views.dtype)
        pooled, tokens = self.student.features(mean_fill(views, pix), masks, self.mask_token)
        parts: dict[str, torch.Tensor] = {}
        loss = views.new_zeros(())

        if cfg.mim_weight:
            target = (views - self.target_mean.view(1, -1, 1, 1)) / self.target_std.view(1, -1, 1, 1)
            rec = self.reconstruct(tokens, views.shape[-2:])
            with full_precision(rec):
                terms = [mim_loss(rec[i * n:(i + 1) * n], target[i * n:(i + 1) * n], pix[i * n:(i + 1) * n],
                                  cfg.focal_alpha, cfg.focal_gamma, cfg.fft_weight, cfg.fft_alpha,
                                  cfg.fft_unmask_weight) for i in range(2)]
            spatial = (terms[0][0] + terms[1][0]) / 2
            freq = (terms[0][1] + terms[1][1]) / 2
            parts.update(mim=spatial + freq, mim_spatial=spatial.detach(), mim_freq=freq.detach())
            loss = loss + cfg.mim_weight * parts["mim"]

        if self.teacher is None:
            return loss, {k: v.detach() for k, v in parts.items()}
        with torch.no_grad():
            t_pooled, t_tokens = self.teacher.features(views)

        if cfg.global_weight:
            q = self.student.global_proj(pooled)
            with torch.no_grad():
                k = self.teacher.global_proj(t_pooled)
            with full_precision(q):  # unit keys in float32: the queue keeps them for many steps
                q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
            q_a, q_b = q[:n], q[n:]
            k_a, k_b = k[:n], k[n:]
            queue = self.queue.clone()
            with full_precision(q):
                parts["global"] = (moco_infonce(q_a, k_b, queue, cfg.moco_temperature)
                                   + moco_infonce(q_b, k_a, queue, cfg.moco_temperature)) / 2
            loss = loss + cfg.global_weight * parts["global"]
            self.enqueue(torch.cat([k_b, k_a]))

        if cfg.local_weight:
            centres = cell_centres(crops.transpose(0, 1).reshape(2 * n, -1), self.grid(views.shape[-2:]))
            c_a, c_b = centres[:n], centres[n:]
            pairs = min(cfg.local_pairs, c_a.shape[1])
            # student A with teacher B, and student B with teacher A; the heads are per feature, so only the
            # matched features are projected (the reference also projects after matching)
            i_ab, j_ab = match_positions(c_a, c_b, pairs)
            i_ba, j_ba = match_positions(c_b, c_a, pairs)
            s_local = self.student.local_head(torch.cat([pick(tokens[:n], i_ab), pick(tokens[n:], i_ba)]))
            with torch.no_grad():
                t_local = self.teacher.local_head(torch.cat([pick(t_tokens[n:], j_ab), pick(t_tokens[:n], j_ba)]))
            with full_precision(s_local):
                terms = [local_distillation_loss(s_local[i * n:(i + 1) * n], t_local[i * n:(i + 1) * n],
                                                 self.center, cfg.student_temperature, teacher_temperature)
                         for i in range(2)]
            parts["local"] = (terms[0] + terms[1]) / 2
            loss = loss + cfg.local_weight * parts["local"]
            self.update_center(torch.stack([t_local[:n].float().mean(dim=(0, 1)),
                                            t_local[n:].float().mean(dim=(0, 1))]))
        return loss, {k: v.detach() for k, v in parts.items()}

    def grid(self, size) -> tuple[int, int]:
        return int(size[0]) // self.patch, int(size[1]) // self.patch

    def reconstruct(self, tokens: torch.Tensor, size) -> torch.Tensor:
        """(N, L, D) patch tokens -> (N, C, H, W): each token's linear prediction of its patch's pixels."""
        gh, gw = self.grid(size)
        out = self.mim_head(tokens)  # (N, L, C p p): PixelShuffle's channel order (c, i, j)
        n, p = out.shape[0], self.patch
        out = out.transpose(1, 2).reshape(n, -1, gh, gw)
        return F.pixel_shuffle(out, p)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Add this step's keys of every rank to the queue: one all-gather, one write (the reference gathers
        twice and so adds each key world-size times)."""
        keys = keys.detach().float()
        if self.d.distributed:
            import torch.distributed as dist

            gathered = [torch.empty_like(keys) for _ in range(self.d.world)]
            dist.all_gather(gathered, keys.contiguous())
            keys = torch.cat(gathered)
        size = self.queue.shape[0]
        ptr = int(self.queue_ptr)
        new = keys[-size:]  # more keys than the queue holds: the newest fill it
        self.queue[(torch.arange(len(new), device=keys.device) + ptr + len(keys) - len(new)) % size] = new
        self.queue_ptr[0] = (ptr + len(keys)) % size
        self.enqueued += 1

    @torch.no_grad()
    def update_center(self, teacher_means: torch.Tensor) -> None:
        """The local centre's EMA with the rank-averaged teacher means of this step's two local terms."""
        if self.d.distributed:
            import torch.distributed as dist

            dist.all_reduce(teacher_means)
            teacher_means = teacher_means / self.d.world
        self.center.copy_(updated_center(self.center, teacher_means, self.config.center_momentum))
