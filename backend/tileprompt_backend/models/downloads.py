"""Downloading published weights: the only code in the backend that reaches the network.

Every download goes ``transport(url, part_file)`` -> sha256 check (when known) -> conversion to safetensors ->
rename into place, so an interrupted or corrupt download never leaves a file that looks finished.
``transport`` is injectable: tests pass one that copies a local file.

Two destinations:
- files a card names (``"backbone_weights": "ssl4eo_vits16_moco.safetensors"``) with a ``sources`` entry go into
  the card's folder; a bundled card is first copied to the user models folder (the bundled folder may be
  read-only), and that copy then shadows the bundled card (same JSON, same card hash);
- open_clip pretrained tags go into ``cache_dir()/open_clip`` as ``<hub id>.safetensors``, shared by every card
  that uses the tag (the CLIP card and the text tower of the aligned cards).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.client import HTTPException
from pathlib import Path

import torch

from .. import __version__
from ..paths import bundled_models_dir, cache_dir, user_models_dir
from .card import ModelCard, read_card, write_card
from .checkpoints import ssl4eo_checkpoint_filter, strip_module_prefix, unwrap_state_dict
from .registry import get_family
from .weights import read_weights, write_weights

log = logging.getLogger(__name__)

Transport = Callable[[str, Path], None]
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


#: What urllib_transport opens: the publishers' web addresses, and local mirrors (file://).
URL_SCHEMES = ("https", "http", "file")


def urllib_transport(url: str, dest: Path) -> None:
    """Stream ``url`` into ``dest`` (http(s) or file://); a short read is an error."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in URL_SCHEMES:
        raise ValueError(f"weights can be downloaded over {', '.join(URL_SCHEMES)}, not {scheme or 'no'} URLs: {url}")
    request = urllib.request.Request(url, headers={"User-Agent": f"tileprompt/{__version__}"})
    log.warning("downloading %s", url)  # can take minutes: say so even when logging is not configured
    # The scheme is one of URL_SCHEMES (checked above), so B310's file:/custom-scheme concern does not apply.
    with urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as out:  # nosec B310
        expected = response.headers.get("Content-Length")
        shutil.copyfileobj(response, out, 1 << 20)
    if expected is not None and dest.stat().st_size != int(expected):
        raise ValueError(f"download of {url} stopped after {dest.stat().st_size} of {expected} bytes")


def _convert_torch(src: Path) -> dict[str, torch.Tensor]:
    # weights_only=True: the unpickler only rebuilds tensors and plain containers, it runs no code.
    return strip_module_prefix(unwrap_state_dict(torch.load(src, map_location="cpu", weights_only=True)))


#: How a downloaded file becomes the safetensors file we keep.
CONVERTERS: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {
    "safetensors": read_weights,
    "torch-state-dict": _convert_torch,
    "ssl4eo-moco": lambda src: ssl4eo_checkpoint_filter(_convert_torch(src)),
}


def download(url: str, dest: Path, sha256: str | None = None, convert: str = "safetensors",
             transport: Transport | None = None) -> Path:
    """Download ``url``, verify its sha256 (full hex digest or a prefix of it), convert it and write ``dest``."""
    if convert not in CONVERTERS:
        raise ValueError(f"unknown weight conversion {convert!r} (valid: {', '.join(CONVERTERS)})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        (transport or urllib_transport)(url, part)
        if sha256:
            digest = file_sha256(part)
            if not digest.startswith(sha256.lower()):
                raise ValueError(f"checksum mismatch for {url}: expected sha256 {sha256}..., got {digest[:16]}...")
        try:
            state_dict = CONVERTERS[convert](part)
        except Exception as e:  # torch.load raises many types for a bad file; make them all one clear error
            raise ValueError(f"{url}: not a usable checkpoint ({e})") from None
        return write_weights(state_dict, dest)
    finally:
        part.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- open_clip pretrained tags -------------------------------------------------------------------------------

def tag_cfg(model_name: str, tag: str) -> dict:
    """open_clip's record of a pretrained tag (locations, mean/std, quick_gelu); unknown tags are a ValueError."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {model_name!r} "
                         f"(valid: {', '.join(tags) or 'none'})")
    return dict(cfg)


def _tag_candidates(model_name: str, tag: str) -> tuple[str, list[tuple[str, str, str | None]]]:
    """(cache file name, [(url, conversion, sha256)]) for a tag, safetensors first, as open_clip prefers."""
    cfg = tag_cfg(model_name, tag)
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    candidates: list[tuple[str, str, str | None]] = []
    if hub:
        repo, filename = hub.rstrip("/"), ""
        if not hub.endswith("/"):
            repo, filename = hub.rsplit("/", 1)
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        base = f"{endpoint}/{repo}/resolve/main/"
        if not filename or filename == "open_clip_pytorch_model.bin":
            candidates.append((base + "open_clip_model.safetensors", "safetensors", None))
            filename = "open_clip_pytorch_model.bin"
        elif filename.endswith((".bin", ".pth", ".pt")):
            candidates.append((base + filename.rsplit(".", 1)[0] + ".safetensors", "safetensors", None))
        converter = "safetensors" if filename.endswith(".safetensors") else "torch-state-dict"
        candidates.append((base + filename, converter, None))
        name = repo.replace("/", "--")
    else:
        name = Path(url).stem
    # OpenAI's own URLs serve TorchScript archives, which only torch.jit.load (running their code) can read:
    # those tags come from the hub copy. Other URLs are plain state dicts (mlfoundations: sha256 prefix in the name).
    if url and "openaipublic" not in url:
        sha = Path(url).stem.split("-")[-1] if "mlfoundations" in url else None
        candidates.append((url, "torch-state-dict", sha))
    if not candidates:
        raise ValueError(f"open_clip tag {model_name}/{tag} has no location we can download")
    return f"{name}.safetensors", candidates


def tag_weights_path(model_name: str, tag: str) -> Path:
    """Where the weights of an open_clip tag live once downloaded."""
    return cache_dir() / "open_clip" / _tag_candidates(model_name, tag)[0]


def weight_paths(card) -> list[Path] | None:
    """The files a card's weights come from (card files and open_clip tags); None when any is not there yet."""
    from .registry import get_family

    family = get_family(card.family)
    paths = [card.file(f) for f in family.weight_files(card)]
    paths += [tag_weights_path(name, tag) for name, tag in family.pretrained_tags(card)]
    return None if any(not p.is_file() for p in paths) else paths


def download_tag(model_name: str, tag: str, transport: Transport | None = None) -> Path:
    """Download an open_clip tag's weights into the cache (once); returns the safetensors path."""
    name, candidates = _tag_candidates(model_name, tag)
    dest = cache_dir() / "open_clip" / name
    if dest.is_file():
        return dest
    errors = []
    for url, convert, sha in candidates:
        try:
            return download(url, dest, sha, convert, transport)
        except (OSError, ValueError, HTTPException) as e:  # urllib's HTTPError is an OSError: try the next one
            errors.append(f"{url}: {e}")
    raise ValueError(f"could not download open_clip weights {model_name}/{tag}: " + "; ".join(errors))


# --- cards ---------------------------------------------------------------------------------------------------

def missing_weights(card: ModelCard) -> tuple[list[str], list[tuple[str, str]]]:
    """(files the card names that are absent from its folder, tags not yet in the cache)."""
    family = get_family(card.family)
    files = [f for f in family.weight_files(card) if not card.file(f).is_file()]
    tags = [t for t in family.pretrained_tags(card) if not tag_weights_path(*t).is_file()]
    return files, tags


def ensure_weights(card: ModelCard, transport: Transport | None = None, models_dir: Path | None = None) -> ModelCard:
    """Download whatever weights ``card`` names that are not here yet; returns the card to load.

    That is ``card`` itself, or its copy in ``models_dir`` (default: the user models folder) when files had
    to be written and the card is bundled or ``models_dir`` was given.
    """
    files, tags = missing_weights(card)
    for f in files:
        src = card.sources.get(f)
        if src is None:
            raise ValueError(f"model {card.id!r}: weights file {f} not found in {card.path} "
                             "and the card names no source to download it from")
        if "url" not in src or set(src) - {"url", "sha256", "convert"}:
            raise ValueError(f"model {card.id!r}: the source of {f} needs 'url' and may have 'sha256' and 'convert', "
                             f"got {sorted(src)}")
    for model_name, tag in tags:
        download_tag(model_name, tag, transport)
    if not files:
        return card
    target = download_dir(card, models_dir)
    if target != card.path.resolve():
        write_card(card, target)
        for f in get_family(card.family).weight_files(card):
            if f not in files:  # present beside the original card: copy, the new card must be complete
                (target / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(card.file(f), target / f)
        card = read_card(target)
    for f in files:
        src = card.sources[f]
        download(src["url"], card.file(f), src.get("sha256"), src.get("convert", "safetensors"), transport)
    return card


def download_dir(card: ModelCard, models_dir: Path | None = None) -> Path:
    """The folder that receives a card's downloaded files (see :func:`ensure_weights`)."""
    if card.path is None:
        raise ValueError(f"model {card.id!r} has no directory to download into")
    bundled = bundled_models_dir().resolve()
    here = card.path.resolve()
    if models_dir is None and bundled != here and bundled not in here.parents:
        return here
    if not _ID.match(card.id):
        raise ValueError(f"model id {card.id!r} cannot be used as a folder name")
    return (Path(models_dir) if models_dir is not None else user_models_dir()).resolve() / card.id
