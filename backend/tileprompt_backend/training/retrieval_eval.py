"""Image-text retrieval evaluation (HarMA / RDB protocol): embed a captioned split with a card, R@1/5/10 both
ways and mR, and the section ``tileprompt evaluate`` reports for captioned datasets.

Every image of the split and every caption of it are embedded (ranks take positions r, r + world, ...; rank 0
gathers them back into file order); captions are cleaned as in training. An image's rank is its best own
caption's, a caption's its image's (``metrics.image_text_recall``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .data.captions import pre_caption
from .data.samples import Sample
from .data.shards import DatasetSpec
from .data.stream import eval_batches
from .distributed import Dist, gather_objects
from .inputs import model_input
from .loop import autocast, resolve_precision
from .metrics import image_text_recall

DEFAULT_EVAL_BATCH = 128  # HarMA's test batch


@dataclass
class CaptionedSplit:
    """A captioned split embedded by one card (rank 0, file order): its images and all their captions."""

    images: torch.Tensor  # (N, D) unit rows
    texts: torch.Tensor  # (M, D) unit rows
    owners: torch.Tensor  # (M,) image index of each caption
    keys: list[str]
    captions: list[str]


def embed_captioned(model, spec: DatasetSpec, split: str, d: Dist, batch_size: int = DEFAULT_EVAL_BATCH,
                    limit: int | None = None, precision: str = "auto", max_words: int = 30,
                    embed_images: bool = True) -> CaptionedSplit | None:
    """Embed every image of ``split`` and every caption of it with ``model`` (a ``LoadedModel``); rank 0 gets
    the gathered result in file order, other ranks None. Captions are cleaned as in training. With
    ``embed_images=False`` only the captions are embedded (``images`` is then empty: the caller has them)."""
    precision = resolve_precision(precision, d.device)
    positions, keys, captions, owners_local, img_parts, txt_parts = [], [], [], [], [], []

    def embed(batch: list[tuple[int, Sample]]) -> None:
        caps = [pre_caption(c, max_words) for _, s in batch for c in s.meta.get("captions", [])]
        if embed_images:
            x = model_input(model, [s.image for _, s in batch], [s.info() for _, s in batch], d.device)
            with torch.inference_mode(), autocast(d.device, precision):
                img_parts.append(model.image_tower(x).float().cpu())
        txt_parts.append(torch.from_numpy(model.encode_text(caps)))
        for pos, s in batch:
            n = len(s.meta.get("captions", []))
            if n == 0:
                raise ValueError(f"dataset {spec.root}: sample {s.key} of split {split!r} has no captions")
            owners_local.extend([len(positions)] * n)
            positions.append(pos)
            keys.append(s.key)
        captions.extend(caps)

    for batch in eval_batches(spec, split, batch_size, rank=d.rank, world=d.world, limit=limit):
        embed(batch)
    dim = model.embed_dim
    mine = {"positions": positions, "keys": keys, "captions": captions, "owners": owners_local,
            "images": torch.cat(img_parts) if img_parts else torch.zeros(0, dim),
            "texts": torch.cat(txt_parts) if txt_parts else torch.zeros(0, dim)}
    parts = gather_objects(d, mine)
    if not d.main:
        return None
    images, texts, owners, all_keys, all_caps, all_pos = [], [], [], [], [], []
    for p in parts:  # renumber each rank's local image indices, then put images back in file order
        offset = len(all_pos)
        images.append(p["images"])
        texts.append(p["texts"])
        owners.extend(o + offset for o in p["owners"])
        all_keys.extend(p["keys"])
        all_caps.extend(p["captions"])
        all_pos.extend(p["positions"])
    if not all_pos:
        raise ValueError(f"split {split!r} of dataset {spec.root} holds no samples")
    order = np.argsort(np.asarray(all_pos), kind="stable")
    rank_of = np.empty(len(order), dtype=np.int64)
    rank_of[order] = np.arange(len(order))
    owners_t = torch.from_numpy(rank_of[np.asarray(owners)])
    caption_order = torch.argsort(owners_t, stable=True)
    images_t = torch.cat(images)[torch.from_numpy(order)] if embed_images else torch.zeros(0, dim)
    return CaptionedSplit(images_t, torch.cat(texts)[caption_order],
                    owners_t[caption_order], [all_keys[i] for i in order], [all_caps[i] for i in caption_order])


def retrieval_scores(emb: CaptionedSplit) -> dict[str, Any]:
    return image_text_recall(emb.images, emb.texts, emb.owners)


def text_retrieval_report(emb: CaptionedSplit, spec: DatasetSpec, split: str) -> dict[str, Any]:
    """The image-text retrieval section of an evaluation report: R@1/5/10 both ways, mR, and chance (K / images:
    a random ranking, one image per caption, about one caption in K per image)."""
    from .metrics import RETRIEVAL_KS, chance_recall

    return {**retrieval_scores(emb), "split": split, "chance": chance_recall(len(emb.images), RETRIEVAL_KS),
            "captions_source": spec.manifest.get("captions")}


def text_retrieval_markdown(r: dict[str, Any], card: str) -> list[str]:
    """The report's section: a table in the papers' layout (i2t R@1/5/10 | t2i R@1/5/10 | mR), in percent."""
    src = r.get("captions_source") or {}
    note = " Captions are **templated** from label names and shares, not written by people." \
        if src.get("templated") else ""
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    ks = list(r["i2t"])
    head = " | ".join(f"i2t R@{k}" for k in ks) + " | " + " | ".join(f"t2i R@{k}" for k in ks)
    return ["## Image-text retrieval", "",
            f"`{card}` on split `{r['split']}`: {r['images']} images, {r['captions']} captions; an image's rank is "
            f"its best caption's.{note}", "",
            f"| | {head} | mR |", "|---|" + "---|" * (2 * len(ks) + 1),
            f"| `{card}` | " + " | ".join(pct(v) for v in (*r["i2t"].values(), *r["t2i"].values())) +
            f" | {pct(r['mR'])} |",
            "| chance | " + " | ".join(pct(v) for v in (*r["chance"].values(), *r["chance"].values())) +
            f" | {pct(sum(r['chance'].values()) / len(ks))} |", ""]


def format_recall(r: dict[str, Any]) -> str:
    """``i2t R@1/5/10 ... | t2i R@1/5/10 ... | mR ...`` in percent (the papers' column order, RDB Table 1)."""
    trip = lambda d: "/".join(f"{100 * v:.2f}" for v in d.values())  # noqa: E731
    return f"i2t R@1/5/10 {trip(r['i2t'])} | t2i R@1/5/10 {trip(r['t2i'])} | mR {100 * r['mR']:.2f}"
