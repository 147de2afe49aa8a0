"""Resumable downloads of plain URLs (sources that are not on Hugging Face): HTTP Range requests with retries.

The file grows as ``<downloads>/<name>-<hash of url>.part``; a broken connection, a killed process or a cancel
leaves it there, and the next download of the same URL asks for ``Range: bytes=<size>-`` and continues. A server
that ignores the range (200 instead of 206) restarts the file. Only a complete file is renamed away from
``.part``. One process at a time writes a given URL (an advisory lock). Proxies come from the environment
(``https_proxy``, ``no_proxy``: urllib's rules), which the plugin fills from QGIS's proxy settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.client import HTTPException
from pathlib import Path
from urllib.parse import urlparse

from .. import __version__
from .progress import DOWNLOADING, report

log = logging.getLogger(__name__)

#: Attempts in a row that bring no new byte before giving up (a retry that makes progress resets the count).
RETRIES = 5
#: Seconds before retry n (n = 1, 2, ...): 1, 2, 4, 8, 16.
BACKOFF_S = 1.0
TIMEOUT_S = 60.0
CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
#: What http_download opens: the publishers' web addresses, and local mirrors (file://).
URL_SCHEMES = ("https", "http", "file")


class _Restart(Exception):
    """The server sent the whole file although we asked for a range: start the file again."""


def part_path(url: str, folder: Path) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urlparse(url).path).name)[:80] or "download"
    return folder / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:16]}.part"


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """One writer per file across processes (POSIX advisory lock; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{path.name} is being downloaded by another TilePrompt process; try again when it "
                             "has finished") from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)  # before unlocking: whoever locks next makes a fresh file
            fcntl.flock(lock, fcntl.LOCK_UN)


def http_download(url: str, folder: Path, expected_size: int | None = None) -> Path:
    """Download ``url`` into ``folder``, continuing a ``.part`` left by an earlier try; returns the complete file.

    Reports ``DOWNLOADING`` progress (bytes) and honours cancel through :func:`~.downloads.report`. A file
    longer than ``expected_size`` or than the server's total is removed and refused.
    """
    scheme = urlparse(url).scheme.lower()
    if scheme not in URL_SCHEMES:
        raise ValueError(f"weights can be downloaded over {', '.join(URL_SCHEMES)}, not {scheme or 'no'} URLs: {url}")
    folder.mkdir(parents=True, exist_ok=True)
    part = part_path(url, folder)
    done_path = part.with_suffix("")
    with _exclusive(part):
        failures = 0
        while True:
            have = part.stat().st_size if part.exists() else 0
            try:
                total = _fetch(url, part, have, expected_size, TIMEOUT_S)
                break
            except _Restart:
                part.unlink(missing_ok=True)
                continue
            except ValueError:
                part.unlink(missing_ok=True)  # refused (HTTP error, wrong size): nothing to resume from
                raise
            except (urllib.error.URLError, HTTPException, OSError, TimeoutError) as e:
                grown = (part.stat().st_size if part.exists() else 0) > have
                failures = 0 if grown else failures + 1
                if failures >= RETRIES:
                    reason = getattr(e, "reason", e)
                    if part.exists() and not part.stat().st_size:
                        part.unlink()
                    raise ValueError(f"download of {url} failed after {RETRIES} tries without progress ({reason}); "
                                     f"the {part.stat().st_size if part.exists() else 0} bytes received are kept "
                                     "and the next try continues from there") from None
                wait = BACKOFF_S * 2 ** max(failures - 1, 0)
                log.warning("download of %s interrupted (%s); retrying in %.0f s", url, getattr(e, "reason", e), wait)
                time.sleep(wait)
        size = part.stat().st_size
        if (total is not None and size != total) or (expected_size is not None and size != expected_size):
            part.unlink(missing_ok=True)
            raise ValueError(f"download of {url} is {size} bytes, expected {expected_size or total}: removed")
        part.replace(done_path)
    return done_path


def _fetch(url: str, part: Path, have: int, expected_size: int | None, timeout_s: float) -> int | None:
    """One request: append what the server sends to ``part``; returns the file's total size (None if unknown)."""
    headers = {"User-Agent": f"tileprompt/{__version__}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    if have == 0:
        log.warning("downloading %s", url)  # can take minutes: say so even when logging is not configured
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)  # nosec B310 - scheme checked (URL_SCHEMES)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after what we have: complete, or the file shrank
            total = _total_from_416(e)
            if total == have:
                return total
            raise _Restart() from None
        if e.code in (408, 429, 500, 502, 503, 504):
            raise urllib.error.URLError(f"HTTP {e.code}") from None  # transient: retried
        raise ValueError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    with response:
        status = getattr(response, "status", None) or 200
        total = None
        if have and status == 206:
            m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                raise _Restart()
            total = int(m.group(3)) if m.group(3) != "*" else None
        elif have:
            raise _Restart()  # 200: the server ignored the range and sends everything
        else:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if total is None:
            total = expected_size
        if total is not None and expected_size is not None and total != expected_size:
            raise ValueError(f"{url} is {total} bytes on the server, the card expects {expected_size}")
        with open(part, "ab") as out:
            done = have
            report(DOWNLOADING, done, total)
            while True:
                block = response.read(CHUNK)
                if not block:
                    break
                out.write(block)
                done += len(block)
                if total is not None and done > total:
                    raise ValueError(f"{url} sent more than its {total} bytes")
                report(DOWNLOADING, done, total)
        if total is not None and done < total:
            raise ConnectionError(f"connection closed after {done} of {total} bytes")
    return total


def _total_from_416(error: urllib.error.HTTPError) -> int | None:
    m = re.match(r"bytes \*/(\d+)", error.headers.get("Content-Range", "") if error.headers else "")
    return int(m.group(1)) if m else None
