"""Getting published weights onto disk: the only code in the backend that reaches the network.

Every weight file goes ``obtain`` -> ``install``:

- **obtain** brings the publisher's file to this machine. Hugging Face files go through ``huggingface_hub``'s
  ``hf_hub_download`` at the card's revision, so users get its cache (``HF_HOME``/``HF_HUB_CACHE``), retries,
  ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` mirrors, ``HF_TOKEN`` and proxies. Other URLs get our resumable download
  (:mod:`.transfer`): HTTP Range requests continue a ``.part`` file across retries and runs.
- **install** checks the file's sha256 (the publisher's digest when the card gives one, the Hub's LFS digest for
  Hugging Face files, and the digest recorded at the first download - see below), extracts a zip member, converts
  the checkpoint (``torch.load(weights_only=True)``, then the layout's filter) and writes safetensors under a
  temporary name, renamed into place: an interrupted or refused download never looks finished.

Trust on first use: beside each installed file, ``<file>.source.json`` records where it came from and the sha256
of what was downloaded. A later download of the same file into that folder must have the same digest.

Two destinations:
- files a card names (``"weights": "model.safetensors"``) with a ``sources`` entry go into the card's folder; a
  bundled card is first copied to the user models folder (the bundled folder may be read-only), and that copy
  then shadows the bundled card (same JSON, same card hash);
- open_clip pretrained tags go into ``cache_dir()/open_clip`` as ``<hub id>.safetensors``, shared by every card
  that uses the tag (the CLIP cards and the text tower of the aligned cards).

Progress and cancel: whoever runs a download (the CLI's bar, a job's status) sets
:func:`~.progress.download_hooks`; every download in that thread reports ``(stage, done, total)`` and polls cancel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import Cancelled
from ..paths import bundled_models_dir, cache_dir, user_models_dir
from .card import ModelCard, read_card, write_card
from .checkpoints import convert_checkpoint
from .progress import CHECKING, CONVERTING, DOWNLOADING, current_hooks, report, using_hooks
from .registry import get_family
from .sources import Source, parse_source
from .transfer import http_download
from .weights import write_weights

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SIDECAR_SUFFIX = ".source.json"


# --- obtaining a publisher's file ----------------------------------------------------------------------------

def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (``HF_HUB_CACHE``, ``HF_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TILEPROMPT_OFFLINE``) set: nothing is downloaded, caches only."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TILEPROMPT_OFFLINE"))


def _hf_progress_class():
    """A tqdm class for hf_hub_download that forwards byte counts to :func:`report` and draws nothing."""
    from tqdm.std import tqdm

    hooks = current_hooks()

    class _Report(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            # Xet downloads draw two bars (network transfer, bytes written): report the bytes written.
            self._silent = "downloading bytes" in str(kwargs.get("desc") or "")

        def update(self, n=1):
            self.n += n
            if not self._silent:
                with using_hooks(hooks):  # Xet reports from its own thread: use the downloading thread's hooks
                    report(DOWNLOADING, self.n, self.total)

    return _Report


def hf_download(src: Source) -> Path:
    """The file of a Hugging Face source, from the HF cache or downloaded into it (at the pinned revision)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(
            src.hf_repo, src.hf_file, revision=src.revision, cache_dir=hf_cache_dir(),
            endpoint=os.environ.get("HF_ENDPOINT") or None, local_files_only=offline(),
            library_name="tileprompt", tqdm_class=_hf_progress_class()))
    except Cancelled:
        _abort_xet()
        raise
    except Exception as e:  # noqa: BLE001 - huggingface_hub and httpx raise many types; make them one clear error
        kind = type(e).__name__
        if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or offline():
            raise ValueError(f"{src.hf_file} of {src.hf_repo} is not in the Hugging Face cache ({hf_cache_dir()}) "
                             "and downloads are off (HF_HUB_OFFLINE): fetch it on a machine with internet and move "
                             "it with `tileprompt models export` / `models import`") from None
        first = str(e).splitlines()[0][:300] if str(e) else kind
        raise ValueError(f"could not download {src.location}: {kind}: {first}") from None


def _abort_xet() -> None:
    """A cancelled Xet download keeps running in its own threads unless its session is aborted."""
    try:
        from huggingface_hub.utils._xet import abort_xet_session
    except ImportError:
        return
    with contextlib.suppress(Exception):
        abort_xet_session()


def _hf_lfs_sha256(path: Path) -> str | None:
    """The Hub's sha256 of an LFS file: the name of the cache blob the snapshot file links to."""
    name = Path(os.path.realpath(path)).name
    return name if re.fullmatch(r"[0-9a-f]{64}", name) else None


def download_dir_for_urls() -> Path:
    """Where resumable downloads of non-Hugging-Face URLs keep their ``.part`` files."""
    return cache_dir() / "downloads"


def obtain(src: Source) -> tuple[Path, bool]:
    """(local file with the publisher's bytes, whether it is ours to delete after installing)."""
    if src.is_hf:
        return hf_download(src), False
    if offline():
        raise ValueError(f"{src.location} is not downloaded and downloads are off (HF_HUB_OFFLINE/TILEPROMPT_OFFLINE)")
    return http_download(src.url, download_dir_for_urls(), expected_size=src.size), True


# --- installing: verify, convert, write ------------------------------------------------------------------------

def file_sha256(path: Path, stage: str | None = None) -> str:
    """sha256 hex digest of a file, read in blocks (reporting ``stage`` progress when given)."""
    h = hashlib.sha256()
    total, done = path.stat().st_size, 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            done += len(block)
            if stage is not None:
                report(stage, done, total)
    return h.hexdigest()


def sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + SIDECAR_SUFFIX)


def read_sidecar(dest: Path) -> dict | None:
    try:
        data = json.loads(sidecar(dest).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _verify(raw: Path, src: Source, dest: Path, digest: str) -> None:
    """The publisher's digest, the Hub's LFS digest and the first download's digest, whichever are known."""
    if src.sha256 and not digest.startswith(src.sha256):
        raise ValueError(f"checksum mismatch for {src.location}: the publisher's sha256 is {src.sha256[:16]}..., "
                         f"the download's {digest[:16]}...")
    if src.is_hf:
        lfs = _hf_lfs_sha256(raw)
        if lfs is not None and lfs != digest:
            raise ValueError(f"checksum mismatch for {src.location}: the Hub lists sha256 {lfs[:16]}..., the file in "
                             f"the cache has {digest[:16]}... (delete it from {hf_cache_dir()} and fetch again)")
    first = read_sidecar(dest) or {}
    if first.get("location") == src.location and first.get("sha256") and first["sha256"] != digest:
        raise ValueError(f"{src.location} changed since it was first downloaded on {first.get('installed', '?')}: "
                         f"sha256 {first['sha256'][:16]}... then, {digest[:16]}... now; the card pins no revision - "
                         f"delete {sidecar(dest)} to accept the new file")


def _member(raw: Path, src: Source, workdir: Path) -> Path:
    """The file inside a zip download that the card names (``member``), extracted into ``workdir``."""
    try:
        with zipfile.ZipFile(raw) as z:
            info = z.getinfo(src.member)
            target = workdir / Path(src.member).name
            with z.open(info) as f_in, open(target, "wb") as f_out:
                shutil.copyfileobj(f_in, f_out, 1 << 22)
    except KeyError:
        raise ValueError(f"{src.location}: the archive has no member {src.member!r}") from None
    except zipfile.BadZipFile:
        raise ValueError(f"{src.location}: not a zip archive") from None
    return target


def install(raw: Path, src: Source, dest: Path) -> Path:
    """Verify ``raw`` (the publisher's file), convert it per ``src.convert`` and write ``dest`` (safetensors) with
    its source record; nothing under ``dest``'s name exists unless all of it succeeded."""
    size = raw.stat().st_size
    if src.size is not None and size != src.size:
        raise ValueError(f"{src.location}: {size} bytes, the card expects {src.size} (truncated or replaced)")
    digest = file_sha256(raw, CHECKING)
    _verify(raw, src, dest, digest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=dest.parent) as work:
        checkpoint = _member(raw, src, Path(work)) if src.member else raw
        report(CONVERTING, 0, None)
        state_dict = convert_checkpoint(checkpoint, src.convert)
        record = {"location": src.location, "source": src.to_json(), "sha256": digest, "size": size,
                  "installed": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        tmp_sidecar = sidecar(dest).with_name(f".{sidecar(dest).name}.{os.getpid()}.tmp")
        tmp_sidecar.write_text(json.dumps(record, indent=2) + "\n")
        try:
            write_weights(state_dict, dest)
        except BaseException:
            tmp_sidecar.unlink(missing_ok=True)
            raise
        tmp_sidecar.replace(sidecar(dest))
    return dest


def download(src: Source, dest: Path) -> Path:
    """Obtain and install one source into ``dest``; a URL download's file is removed once installed or refused
    (an interrupted one stays as ``.part`` so the next try resumes)."""
    raw, ours = obtain(src)
    try:
        return install(raw, src, dest)
    finally:
        if ours:
            raw.unlink(missing_ok=True)


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


def tag_sources(model_name: str, tag: str) -> tuple[str, list[Source]]:
    """(cache file name, sources to try in order) for a tag: the hub's safetensors first, as open_clip prefers."""
    cfg = tag_cfg(model_name, tag)
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    sources: list[Source] = []
    if hub:
        repo, filename = hub.rstrip("/"), ""
        if not hub.endswith("/"):
            repo, filename = hub.rsplit("/", 1)
        if not filename or filename == "open_clip_pytorch_model.bin":
            sources.append(Source(hf_repo=repo, hf_file="open_clip_model.safetensors", convert="safetensors"))
            filename = "open_clip_pytorch_model.bin"
        elif filename.endswith((".bin", ".pth", ".pt")):
            sources.append(Source(hf_repo=repo, hf_file=filename.rsplit(".", 1)[0] + ".safetensors",
                                  convert="safetensors"))
        convert = "safetensors" if filename.endswith(".safetensors") else "torch-state-dict"
        sources.append(Source(hf_repo=repo, hf_file=filename, convert=convert))
        name = repo.replace("/", "--")
    else:
        name = Path(url).stem
    # OpenAI's own URLs serve TorchScript archives, which only torch.jit.load (running their code) can read:
    # those tags come from the hub copy. Other URLs are plain state dicts (mlfoundations: sha256 prefix in the name).
    if url and "openaipublic" not in url:
        sha = Path(url).stem.split("-")[-1] if "mlfoundations" in url else None
        sources.append(Source(url=url, convert="torch-state-dict", sha256=sha))
    if not sources:
        raise ValueError(f"open_clip tag {model_name}/{tag} has no location we can download")
    return f"{name}.safetensors", sources


def tag_weights_path(model_name: str, tag: str) -> Path:
    """Where the weights of an open_clip tag live once downloaded."""
    return cache_dir() / "open_clip" / tag_sources(model_name, tag)[0]


def download_tag(model_name: str, tag: str) -> Path:
    """Download an open_clip tag's weights into the cache (once); returns the safetensors path."""
    name, sources = tag_sources(model_name, tag)
    dest = cache_dir() / "open_clip" / name
    if dest.is_file():
        return dest
    errors = []
    for src in sources:
        try:
            return download(src, dest)
        except ValueError as e:  # e.g. the hub has no safetensors copy of this repo: try the next location
            errors.append(str(e))
            if offline():
                break
    raise ValueError(f"could not download open_clip weights {model_name}/{tag}: " + "; ".join(errors))


# --- cards ---------------------------------------------------------------------------------------------------

def card_sources(card: ModelCard) -> dict[str, Source]:
    """The card's ``sources``, parsed (every problem is a ValueError naming the card and the file)."""
    return {f: parse_source(s, f"model {card.id!r} source of {f}") for f, s in card.sources.items()}


def weight_paths(card: ModelCard) -> list[Path] | None:
    """The files a card's weights come from (card files and open_clip tags); None when any is not there yet."""
    family = get_family(card.family)
    paths = [card.file(f) for f in family.weight_files(card)]
    paths += [tag_weights_path(name, tag) for name, tag in family.pretrained_tags(card)]
    return None if any(not p.is_file() for p in paths) else paths


def missing_weights(card: ModelCard) -> tuple[list[str], list[tuple[str, str]]]:
    """(files the card names that are absent from its folder, tags not yet in the cache)."""
    family = get_family(card.family)
    files = [f for f in family.weight_files(card) if not card.file(f).is_file()]
    tags = [t for t in family.pretrained_tags(card) if not tag_weights_path(*t).is_file()]
    return files, tags


@dataclass(frozen=True)
class WeightsState:
    """Whether a card's weights are here and, if not, how much there is to download."""

    downloaded: bool
    bytes: int | None = None  # still to download; None when a size is unknown
    approximate: bool = False  # bytes is the publisher's rounded listing

    def describe(self) -> str:
        if self.downloaded:
            return "downloaded"
        if self.bytes is None:
            return "to download (size unknown)"
        return f"{'about ' if self.approximate else ''}{_human(self.bytes)} to download"


def _human(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def weights_state(card: ModelCard) -> WeightsState:
    """Downloaded, or the bytes still to download (from the sources' ``size``/``approx_size``)."""
    files, tags = missing_weights(card)
    if not files and not tags:
        return WeightsState(True, 0)
    sources = card_sources(card)
    if tags or any(f not in sources or not (sources[f].size or sources[f].approx_size) for f in files):
        return WeightsState(False)
    return WeightsState(False, sum(sources[f].size or sources[f].approx_size for f in files),
                        any(not sources[f].size for f in files))


def ensure_weights(card: ModelCard, models_dir: Path | None = None) -> ModelCard:
    """Download whatever weights ``card`` names that are not here yet; returns the card to load.

    That is ``card`` itself, or its copy in ``models_dir`` (default: the user models folder) when files had
    to be written and the card is bundled or ``models_dir`` was given.
    """
    files, tags = missing_weights(card)
    sources = card_sources(card)
    for f in files:
        if f not in sources:
            raise ValueError(f"model {card.id!r}: weights file {f} not found in {card.path} "
                             "and the card names no source to download it from")
    for model_name, tag in tags:
        download_tag(model_name, tag)
    if not files:
        return card
    target = download_dir(card, models_dir)
    new_folder = not target.exists()
    try:
        card = card_copy_for_files(card, files, models_dir)
        for f in files:
            download(sources[f], card.file(f))
    except BaseException:  # refused, failed or cancelled: leave no card folder that looks complete
        remove_downloaded(target, files, new_folder)
        raise
    return card


def remove_downloaded(target: Path, files: list[str], new_folder: bool) -> None:
    """Undo downloads into ``target``: the whole folder when it was made for them, else the files written."""
    if new_folder:
        shutil.rmtree(target, ignore_errors=True)
        return
    for f in files:
        (target / f).unlink(missing_ok=True)
        sidecar(target / f).unlink(missing_ok=True)


def card_copy_for_files(card: ModelCard, missing: list[str], models_dir: Path | None = None) -> ModelCard:
    """The card whose folder receives downloaded files: ``card`` itself, or a copy (bundled cards, ``models_dir``)
    holding the card's other weight files too."""
    target = download_dir(card, models_dir)
    if target == card.path.resolve():
        return card
    write_card(card, target)
    for f in get_family(card.family).weight_files(card):
        if f not in missing:  # present beside the original card: copy, the new card must be complete
            (target / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(card.file(f), target / f)
            if sidecar(card.file(f)).is_file():
                shutil.copy2(sidecar(card.file(f)), sidecar(target / f))
    return read_card(target)


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
