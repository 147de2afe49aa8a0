"""``tileprompt train rdb``: RDB's Cross-Modal Asymmetric Adapter on a frozen open_clip ViT card.

Ning et al., "Representation Discrepancy Bridging Method for Remote Sensing Image-Text Retrieval" (2025).
Adapters (models/adapters/rdb.py): differential attention on the image side, hierarchical attention on the text
side, a shared layer under a gate. Dual-Task Consistency Loss (§3.3) on the global batch:
L_cross (Eq. 10, bidirectional hinge triplet over all negatives, margin 0.2), L_cls (Eq. 12, cross-entropy of
a linear classifier shared by both modalities on the dataset's classes), L_consist (Eq. 13, squared distance of
each image embedding to its caption's embedding from an EMA teacher of the adapters: the text side teaches), summed
with learnable uncertainty weights (Eq. 14).

Defaults: the paper's recipe (Adam lr 2e-4, batch 32, 30 epochs, x0.7 every 20 epochs, dropout 0.2, margin 0.2);
every point the paper leaves open is an option below (rdb-notes §6), chosen as docs/training.md explains.
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
from .losses import classification_loss
from .retrieval import MethodSpec, add_retrieval_arguments, run_retrieval
from .retrieval_losses import consistency_loss, cross_modal_triplet, uncertainty_weighted

PAPER_PARAMS = "RDB paper: no parameter count stated"
TERMS = ("cross", "cls", "consist")


class EmaTeacher(nn.Module):
    """Exponential moving averages of a module's trainable parameters, kept as buffers (checkpointed with it)."""

    def __init__(self, names: list[str], params: list[torch.Tensor]):
        super().__init__()
        self.names = list(names)
        for i, p in enumerate(params):
            self.register_buffer(f"p{i}", p.detach().clone())

    def averages(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, f"p{i}") for i, n in enumerate(self.names)}

    @torch.no_grad()
    def update(self, params: list[torch.Tensor], decay: float) -> None:
        """theta_t <- m theta_t + (1 - m) theta_s."""
        for i, p in enumerate(params):
            getattr(self, f"p{i}").mul_(decay).add_(p.detach(), alpha=1 - decay)


class RdbParameters(nn.Module):
    """RDB's own trainable parameters (the loss weights s_i = log sigma_i^2 and the classifier) and the EMA teacher."""

    def __init__(self, embed_dim: int, n_classes: int, n_terms: int):
        super().__init__()
        self.log_variances = nn.Parameter(torch.zeros(n_terms))  # sigma_i^2 = 1: every weight 1/2 at start
        self.classifier = nn.Linear(embed_dim, n_classes) if n_classes >= 2 else None
        self.ema: EmaTeacher | None = None


def adapter_names(module) -> list[str]:
    """Names (in the trained module) of the adapter parameters the EMA teacher averages."""
    return [n for n, _ in module.named_parameters() if not n.startswith("extras.")]


def ema_text(module, tokens: torch.Tensor) -> torch.Tensor:
    """Text embeddings of the EMA teacher: the trained module run with the averaged adapter weights, no dropout."""
    module.eval()
    try:
        with torch.no_grad():
            return torch.func.functional_call(module, module.extras.ema.averages(), (None, tokens))[1]
    finally:
        module.train()


def rdb_loss(args: argparse.Namespace, terms: tuple[str, ...]):
    def loss(module, b: SimpleNamespace):
        extras = module.extras
        sim = b.img @ b.txt.T
        eye = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
        negatives = ~b.same if args.same_image == "positive" else ~eye
        parts: dict[str, torch.Tensor] = {}
        if "cross" in terms:
            parts["cross"] = cross_modal_triplet(sim, negatives, args.margin, args.cross_reduction)
        if "cls" in terms:
            logits = [extras.classifier(e) for e, side in ((b.img, "image"), (b.txt, "text"))
                      if args.cls_on in (side, "both")]
            parts["cls"] = sum(classification_loss(lg, b.labels.clamp(min=0), "multi-class", b.labelled)
                               for lg in logits) / len(logits)
        if "consist" in terms:
            teacher = ema_text(module, b.tokens) if args.teacher == "ema" else b.txt
            if args.teacher == "ema":
                teacher = b.gather(teacher)
            parts["consist"] = consistency_loss(b.img, teacher)
        total = uncertainty_weighted(list(parts.values()), extras.log_variances)
        weights = 1.0 / (2 * torch.exp(extras.log_variances.detach()))
        metrics = {k: v.detach() for k, v in parts.items()}
        metrics.update({f"w_{k}": w for k, w in zip(parts, weights)})
        return total, metrics

    return loss


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = parser_for(prog, __doc__.split("\n", 2)[2])
    add_retrieval_arguments(p, augment="none", model_help="the base card: any open_clip ViT card (default: "
                                                           "clip-vit-b32-openai; the paper uses GeoRSCLIP)")
    a = p.add_argument_group("RDB adapters (the paper leaves these open; defaults as docs/training.md explains)")
    a.add_argument("--bottleneck", type=int, default=128, help="adapter width (default: 128, HarMA's)")
    a.add_argument("--dropout", type=float, default=0.2, help="dropout before the up-projection (paper: 0.2)")
    a.add_argument("--da-heads", type=int, default=4, help="differential attention heads (default: 4)")
    a.add_argument("--lambda-init", default="schedule",
                   help="lambda_init: 'schedule' (0.8 - 0.6 exp(-0.3 depth), the Differential Transformer's; "
                        "default) or a number in (0, 1)")
    a.add_argument("--no-da-norm", action="store_true",
                   help="leave out the per-head RMSNorm and (1 - lambda_init) scaling of differential attention")
    a.add_argument("--sentences", choices=["caption", "split"], default="caption",
                   help="hierarchical attention's sentences: caption = a caption is one sentence (default); "
                        "split = at every '.' inside a caption")
    a.add_argument("--tsa-output", choices=["annotations", "vector"], default="annotations",
                   help="each token's TSA feature: its word annotation plus the text vector (default), or the "
                        "text vector alone")
    a.add_argument("--shared-layer", choices=["linear", "mini-adapter", "none"], default="linear",
                   help="the layer both modalities share per depth (default: linear)")
    l_ = p.add_argument_group("Dual-Task Consistency Loss")
    l_.add_argument("--losses", default="cross,cls,consist",
                    help="terms of the DTCL, comma-separated (default: all three, the paper's RDB; Table 3's "
                         "ablations drop cls or consist)")
    l_.add_argument("--margin", type=float, default=0.2, help="cross-modal margin mu (paper: 0.2)")
    l_.add_argument("--cross-reduction", choices=["mean", "sum"], default="mean",
                    help="L_cross over the batch's pairs (each pair sums over all its negatives; default: mean)")
    l_.add_argument("--same-image", choices=["positive", "negative"], default="positive",
                    help="another caption of a pair's image: left out of the negatives (default) or counted")
    l_.add_argument("--cls-on", choices=["both", "image", "text"], default="both",
                    help="which embeddings the shared classifier sees (default: both)")
    l_.add_argument("--teacher", choices=["ema", "live"], default="ema",
                    help="L_consist's text side: an EMA teacher of the adapters (default) or the live text "
                         "embedding, detached")
    l_.add_argument("--ema-decay", type=float, default=0.999, help="EMA teacher decay per step (default: 0.999)")
    s = p.add_argument_group("schedule")
    s.add_argument("--decay-every", type=float, default=20,
                   help="epochs between learning-rate decays (paper: 20)")
    s.add_argument("--decay-factor", type=float, default=0.7, help="learning-rate factor per decay (paper: 0.7)")
    add_run_arguments(p, batch=32, epochs=30, lr=2e-4, weight_decay=0.0, warmup=0, grad_clip=0.0,
                      paper="recipe")  # the paper's where it says; docs/training.md for the rest
    return p


def parse_terms(text: str) -> tuple[str, ...]:
    terms = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in terms if t not in TERMS]
    if not terms or unknown or len(set(terms)) != len(terms):
        raise ValueError(f"--losses must list terms of {', '.join(TERMS)} once each, got {text!r}")
    return terms


def adapter_config(args: argparse.Namespace, model) -> dict:
    if args.lambda_init == "schedule":
        lam: str | float = "schedule"
    else:
        try:
            lam = float(args.lambda_init)
        except ValueError:
            raise ValueError(f"--lambda-init must be 'schedule' or a number in (0, 1), got {args.lambda_init!r}") \
                from None
    config = {"bottleneck": args.bottleneck, "dropout": args.dropout, "da_heads": args.da_heads,
              "lambda_init": lam, "da_norm": not args.no_da_norm, "sentences": args.sentences,
              "tsa_output": args.tsa_output, "shared": args.shared_layer}
    if args.sentences == "split":  # the tokenizer's id of "." (a token of its own after a word)
        ids = [int(t) for t in model.tokenize(["a ."])[0].tolist() if t]
        config["sentence_end"] = [ids[2]]
    return config


def build_method(args: argparse.Namespace, spec, model, d) -> MethodSpec:
    terms = parse_terms(args.losses)
    if "cls" in terms and (spec.task != "multi-class" or len(spec.classes) < 2):
        raise ValueError(f"dataset {spec.root} has no classes for L_cls (task {spec.task!r}, "
                         f"{len(spec.classes)} classes): use --losses cross,consist")
    if not 0.0 < args.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in (0, 1), got {args.ema_decay}")
    if args.decay_every <= 0 or not 0.0 < args.decay_factor <= 1.0:
        raise ValueError("--decay-every must be positive and --decay-factor in (0, 1]")
    extras = RdbParameters(model.embed_dim, len(spec.classes) if "cls" in terms else 0, len(terms))
    ema_on = "consist" in terms and args.teacher == "ema"

    def after_step(module, step: int) -> None:
        params = dict(module.named_parameters())
        extras.ema.update([params[n] for n in extras.ema.names], args.ema_decay)

    def prepare(module) -> None:  # the teacher starts as the student: the adapters at their start
        names = adapter_names(module)
        params = dict(module.named_parameters())
        extras.ema = EmaTeacher(names, [params[n] for n in names])

    return MethodSpec(
        name="rdb", adapter_config=adapter_config(args, model), extras=extras, loss=rdb_loss(args, terms),
        no_decay=lambda name: name.endswith("log_variances"), after_step=after_step if ema_on else None,
        paper_params=PAPER_PARAMS, prepare=prepare if ema_on else None,
        provenance={"losses": {"terms": list(terms), "margin": args.margin, "cross_reduction": args.cross_reduction,
                               "same_image": args.same_image, "cls_on": args.cls_on, "teacher": args.teacher,
                               "ema_decay": args.ema_decay}})


def loop_config(args: argparse.Namespace, total: int, per_epoch: int) -> LoopConfig:
    return LoopConfig(total_steps=total, lr=args.lr, weight_decay=args.weight_decay,
                      warmup_steps=min(args.warmup_steps or 0, total), grad_clip=args.grad_clip,
                      precision=args.precision, log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                      compile=args.compile, schedule="step", step_every=max(1, int(round(args.decay_every * per_epoch))),
                      step_gamma=args.decay_factor)


def main(argv: Sequence[str] | None = None, prog: str = "tileprompt train rdb") -> int:
    return run_command(build_parser(prog), argv, lambda args: run_retrieval(args, build_method, loop_config))


if __name__ == "__main__":
    sys.exit(main(prog="python -m tileprompt_backend.training.rdb"))
