"""Where a weight file comes from: a Hugging Face file at a revision, or a plain URL (HTTP Range downloads).

A card's ``sources`` maps each weight file it names to one source::

    "model.safetensors": {"hf_repo": "chendelong/RemoteCLIP", "hf_file": "RemoteCLIP-ViT-B-32.pt",
                          "revision": "bf1d8a3c...", "convert": "open-clip", "size": 605211493}
    "model.safetensors": {"url": "https://.../SkyCLIP_ViT_L14_top30pct.zip",
                          "member": "SkyCLIP_ViT_L14_top30pct/epoch_20.pt", "convert": "open-clip"}

``sha256`` is the publisher's digest (full, or a prefix of at least 8 hex digits) when one is published;
``size`` is the download's exact size in bytes when known (shown before downloading and checked after),
``approx_size`` a rounded size from the publisher's listing (shown only);
``member`` names the file inside a zip archive; ``convert`` names the checkpoint layout
(:data:`~.checkpoints.CONVERTERS`) that turns the download into the state dict the card loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

HEX = re.compile(r"^[0-9a-f]+$")
_FIELDS = {"hf_repo", "hf_file", "revision", "url", "member", "sha256", "size", "approx_size", "convert"}
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    """One downloadable file (see the module doc for the card fields)."""

    convert: str = "safetensors"
    hf_repo: str | None = None
    hf_file: str | None = None
    revision: str | None = None  # a commit hash pins the file; None = the repository's main branch
    url: str | None = None
    member: str | None = None
    sha256: str | None = None
    size: int | None = None  # exact bytes: shown before downloading and checked after
    approx_size: int | None = None  # bytes as the publisher's listing rounds them: shown only

    @property
    def is_hf(self) -> bool:
        return self.hf_repo is not None

    @property
    def location(self) -> str:
        """One line naming the file, for messages and records."""
        if self.is_hf:
            where = f"hf://{self.hf_repo}/{self.hf_file}@{self.revision or 'main'}"
        else:
            where = str(self.url)
        return f"{where}!{self.member}" if self.member else where

    @property
    def pinned(self) -> bool:
        """Whether the bytes cannot change under us: a full publisher digest or an HF commit hash."""
        full_digest = self.sha256 is not None and len(self.sha256) == 64
        return full_digest or (self.is_hf and bool(self.revision) and bool(re.fullmatch(r"[0-9a-f]{40}",
                                                                                          self.revision or "")))

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def parse_source(data: dict[str, Any], where: str) -> Source:
    """A card's source entry; every problem is a ValueError naming ``where`` and the field."""
    from .checkpoints import CONVERTERS

    if not isinstance(data, dict):
        raise ValueError(f"{where}: a source must be an object with 'hf_repo'+'hf_file' or 'url', got {data!r}")
    unknown = set(data) - _FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown source field(s) {sorted(unknown)} (valid: {', '.join(sorted(_FIELDS))})")
    src = Source(**{k: data[k] for k in data})
    if (src.url is None) == (src.hf_repo is None):
        raise ValueError(f"{where}: give either 'url' or 'hf_repo' (with 'hf_file'), not both or neither")
    if src.is_hf:
        if not _REPO.match(str(src.hf_repo)) or not src.hf_file:
            raise ValueError(f"{where}: 'hf_repo' must look like 'owner/name' and 'hf_file' name a file in it")
    elif not re.match(r"^(https?|file)://", str(src.url)):
        raise ValueError(f"{where}: url must be http(s):// or file://, got {src.url!r}")
    elif src.revision is not None or src.hf_file is not None:
        raise ValueError(f"{where}: 'revision' and 'hf_file' belong to a Hugging Face source ('hf_repo')")
    if src.sha256 is not None:
        digest = str(src.sha256).lower()
        if not HEX.match(digest) or not 8 <= len(digest) <= 64:
            raise ValueError(f"{where}: sha256 must be 8 to 64 hex digits, got {src.sha256!r}")
        src = Source(**{**src.__dict__, "sha256": digest})
    for key in ("size", "approx_size"):
        value = getattr(src, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{where}: {key} must be a positive number of bytes, got {value!r}")
    if src.convert not in CONVERTERS:
        raise ValueError(f"{where}: unknown conversion {src.convert!r} (valid: {', '.join(sorted(CONVERTERS))})")
    return src
