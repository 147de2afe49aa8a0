"""``tileprompt train harma``: HarMA retrieval adapters on a frozen open_clip ViT card.

Huang, "Efficient Remote Sensing with Harmonized Transfer Learning and Modality Alignment" (ICLR-W 2024).
Multimodal gated adapters in every block of both towers with shared MMS-Adapters (models/adapters/harma.py);
only they and the temperature train. Objective (Eq. 5): L = lambda1 L_ada-triplet + lambda2 L_contrastive on
L2-normalised embeddings of the global batch: the contrastive term with a learnable temperature (init 0.07) and
multi-positive targets (captions of one image), the adaptive triplet term with margin 0.2 and focal exponent 2.

Defaults: the paper where it states a value (batch 1024, AdamW lr 8e-5, weight decay 0.04, linear decay,
temperature 0.07, margin 0.2); the released code where it does not (10 % linear warm-up, betas 0.9/0.98,
no decay on biases and norms, gamma 2, lambda1 = 1/2 and lambda2 = 1 as its (c_s + c_im) / 2 sum, 50 epochs as
its RSITMD CLIP config, HarMA's augmentations). Model selection on the validation split.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import nn

from .command import add_run_arguments, parser_for, run_command
from .loop import LoopConfig
from .retrieval import MethodSpec, add_retrieval_arguments, run_retrieval
from .retrieval_losses import adaptive_triplet, multi_positive_contrastive

PAPER_PARAMS = "HarMA paper: 0.50 M per adapter module (Table 1, †), 3.82 % of the parameters (Table 3)"


class HarmaParameters(nn.Module):
    """HarMA's own trainable parameter: the contrastive temperature (raw, not in log space, as the code's temp1)."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))


def harma_loss(args: argparse.Namespace):
    """L = lambda1 adaptive triplet + lambda2 multi-positive contrastive (Eq. 5), on the global batch."""

    def loss(module, b: SimpleNamespace):
        sim = b.img @ b.txt.T
        tau = module.extras.temperature.clamp(min=args.min_temperature)
        contrastive = multi_positive_contrastive(sim, b.same, tau)
        eye = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
        negatives = ~b.same if args.same_image == "positive" else ~eye
        triplet = adaptive_triplet(sim, negatives, args.margin, args.gamma)
        total = args.triplet_weight * triplet + args.contrastive_weight * contrastive
        return total, {"contrastive": contrastive.detach(), "triplet": triplet.detach(),
                       "temperature": module.extras.temperature.detach()}

    return loss


def no_decay(name: str) -> bool:
    """The released code's optimizer groups: no weight decay on biases and norm weights."""
    return name.endswith(".bias") or "norm" in name


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = parser_for(prog, __doc__.split("\n", 2)[2])
    add_retrieval_arguments(p, augment="reference", model_help="the base card: any open_clip ViT card (default: "
                                                                "clip-vit-b32-openai; the paper also uses GeoRSCLIP)")
    h = p.add_argument_group("HarMA")
    h.add_argument("--shared-adapter", choices=["both", "text", "none"], default="both",
                   help="MMS-Adapters: both = one per depth shared by the image and the text tower (the paper; "
                        "default); text = text tower only (the released code); none")
    h.add_argument("--text-padding", choices=["mask", "attend"], default="mask",
                   help="text adapters' attention: mask = never over padding (default); attend = over every "
                        "context position, padding included (the released code)")
    h.add_argument("--bottleneck", type=int, default=128, help="MGA width (default and code: 128)")
    h.add_argument("--temperature", type=float, default=0.07, help="initial contrastive temperature (paper: 0.07)")
    h.add_argument("--min-temperature", type=float, default=1e-3,
                   help="lower bound of the learnable temperature (the code leaves it unbounded; default 0.001)")
    h.add_argument("--margin", type=float, default=0.2, help="triplet margin m (paper: 0.2)")
    h.add_argument("--gamma", type=float, default=2.0, help="focal exponent of the triplet weights (code: 2)")
    h.add_argument("--triplet-weight", type=float, default=0.5,
                   help="lambda1 (the paper gives none; the code's (c_s + c_im) / 2 is 0.5)")
    h.add_argument("--contrastive-weight", type=float, default=1.0, help="lambda2 (code: 1)")
    h.add_argument("--same-image", choices=["positive", "negative"], default="positive",
                   help="another caption of a pair's image in the batch: positive = left out of the triplet's "
                        "negatives, as the contrastive term treats it (default); negative = the released code")
    h.add_argument("--warmup-fraction", type=float, default=0.1,
                   help="linear warm-up share of the run when --warmup-steps is not given (code: 0.1)")
    add_run_arguments(p, batch=1024, epochs=50, lr=8e-5, weight_decay=0.04, warmup=None, grad_clip=0.0,
                      paper="recipe", seed=3407)  # the recipe: docs/training.md; the seed: the released code's
    return p


def build_method(args: argparse.Namespace, spec, model, d) -> MethodSpec:
    if not 0.0 <= args.warmup_fraction < 1.0:
        raise ValueError(f"--warmup-fraction must be in [0, 1), got {args.warmup_fraction}")
    if args.temperature <= 0 or args.min_temperature <= 0:
        raise ValueError("--temperature and --min-temperature must be positive")
    config = {"bottleneck": args.bottleneck, "shared": args.shared_adapter, "text_padding": args.text_padding}
    extras = HarmaParameters(args.temperature)
    return MethodSpec(
        name="harma", adapter_config=config, extras=extras, loss=harma_loss(args), no_decay=no_decay,
        logit_scale=lambda m: 1.0 / float(m.extras.temperature.detach().clamp(min=args.min_temperature)),
        paper_params=PAPER_PARAMS,
        provenance={"losses": {"triplet_weight": args.triplet_weight, "contrastive_weight": args.contrastive_weight,
                               "margin": args.margin, "gamma": args.gamma, "temperature_init": args.temperature,
                               "same_image": args.same_image}})


def loop_config(args: argparse.Namespace, total: int, per_epoch: int) -> LoopConfig:
    warmup = args.warmup_steps if args.warmup_steps is not None else int(round(args.warmup_fraction * total))
    return LoopConfig(total_steps=total, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=min(warmup, total),
                      grad_clip=args.grad_clip, precision=args.precision, log_every=args.log_every,
                      checkpoint_every=args.checkpoint_every, compile=args.compile, schedule="linear",
                      betas=(0.9, 0.98), eps=1e-8)


def main(argv: Sequence[str] | None = None, prog: str = "tileprompt train harma") -> int:
    return run_command(build_parser(prog), argv, lambda args: run_retrieval(args, build_method, loop_config))


if __name__ == "__main__":
    sys.exit(main(prog="python -m tileprompt_backend.training.harma"))
