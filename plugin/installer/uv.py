"""uv, fetched as a wheel from the package sources and unpacked by the plugin itself.

Nothing from the plugin zip is executed (QGIS's "Install from ZIP" drops executable bits) and no pip is needed
(QGIS's Python often has none): the plugin looks for the pinned uv wheel of this platform where uv will look for
packages (folders of wheels, the extra indexes, the index: PyPI by default), reading an index's simple page for
``uv`` (PEP 503) and checking the wheel's sha256 against it, and unpacks the ``uv`` executable from the wheel's
``.data/scripts`` folder. Downloads go through a ``fetch(url) -> bytes`` the caller gives (in QGIS: QGIS's network
access manager, so QGIS's proxy and authentication apply).
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import re
import stat
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urljoin, urlsplit

from .locations import MACOS, WINDOWS, executable_name

UV_VERSION = "0.13.9"
DEFAULT_INDEX = "https://pypi.org/simple"


class BootstrapError(RuntimeError):
    """uv could not be fetched or unpacked; the message says from where and why."""


@dataclass(frozen=True)
class WheelFile:
    filename: str
    url: str
    sha256: str | None


class _Anchors(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str]] = []  # (href, text)
        self._href: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data):
        if self._href is not None:
            self.links.append((self._href, data.strip()))
            self._href = None


def parse_simple_page(html: str, page_url: str) -> list[WheelFile]:
    """The files a PEP 503 project page lists, with absolute URLs and the sha256 of their ``#sha256=`` fragment."""
    parser = _Anchors()
    parser.feed(html)
    files = []
    for href, text in parser.links:
        url = urljoin(page_url, href)
        parts = urlsplit(url)
        filename = text or unquote(parts.path.rsplit("/", 1)[-1])
        match = re.search(r"sha256=([0-9a-fA-F]{64})", parts.fragment)
        files.append(WheelFile(filename, url.split("#", 1)[0], match.group(1).lower() if match else None))
    return files


def platform_tags(system: str | None = None, machine: str | None = None,
                  libc: tuple[str, str] | None = None) -> list[str]:
    """The wheel platform tags of uv's wheels that run here, best first."""
    system = system or platform.system()
    machine = (machine or platform.machine()).lower()
    arch = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if system == WINDOWS:
        return {"aarch64": ["win_arm64"], "x86": ["win32"], "i686": ["win32"]}.get(arch, ["win_amd64"])
    if system == MACOS:
        return ["macosx_11_0_arm64"] if arch == "aarch64" else ["macosx_10_12_x86_64"]
    name, version = libc if libc is not None else platform.libc_ver()
    if name != "glibc":
        return [f"musllinux_1_1_{arch}"]
    tags = [f"manylinux_2_17_{arch}", f"manylinux2014_{arch}"]
    try:
        if tuple(int(v) for v in version.split(".")[:2]) >= (2, 28):
            tags.append(f"manylinux_2_28_{arch}")
    except ValueError:
        pass
    return tags


def pick_wheel(files: list[WheelFile], version: str, tags: list[str]) -> WheelFile:
    """The wheel of uv ``version`` whose (possibly compressed) platform tag names one of ``tags``."""
    prefix = f"uv-{version}-"
    for tag in tags:
        for file in files:
            if file.filename.startswith(prefix) and file.filename.endswith(".whl") and \
                    tag in file.filename[:-4].split("-")[-1].split("."):
                return file
    raise BootstrapError(f"the package index has no uv {version} wheel for this platform ({', '.join(tags)})")


def _file_path(url_path: str) -> Path:
    """The local path of a ``file://`` URL's path part (``/C:/wheels`` is ``C:/wheels`` on Windows)."""
    path = unquote(url_path)
    return Path(path[1:] if os.name == "nt" and re.match(r"^/[A-Za-z]:", path) else path)


def read_url(url: str, fetch: Callable[[str], bytes]) -> bytes:
    """``file://`` URLs and plain folders are read here (offline mirrors, tests); anything else through ``fetch``."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        path = _file_path(parts.path)
        try:
            if path.is_dir():
                path = path / "index.html"
            return path.read_bytes()
        except OSError as exc:
            raise BootstrapError(f"cannot read {url}: {exc.strerror or exc}") from None
    return fetch(url)


def _local_folder(link: str) -> Path | None:
    """A find-links entry that is a folder on this machine (a path, or a file:// URL)."""
    parts = urlsplit(link)
    if parts.scheme in ("http", "https"):
        return None
    path = _file_path(parts.path) if parts.scheme == "file" else Path(link)  # "C:\\x" parses as scheme "c"
    return path if path.is_dir() else None


def find_wheel(version: str, tags: list[str], fetch: Callable[[str], bytes], index_url: str = "",
               extra_index_urls: tuple = (), find_links: tuple = ()) -> tuple[WheelFile, bytes]:
    """The uv wheel and its bytes, looked for where uv itself looks for packages: folders of wheels (find links)
    first, then the extra indexes, then the index (PyPI by default). A wheel from an index or a web page must come
    with a sha256 and match it; a local folder is the user's own copy and is taken as it is."""
    tried = []
    for link in find_links:
        folder = _local_folder(link)
        if folder is not None:
            files = [WheelFile(p.name, p.as_uri(), None) for p in sorted(folder.glob(f"uv-{version}-*.whl"))]
            try:
                wheel = pick_wheel(files, version, tags)
            except BootstrapError as exc:
                tried.append(f"{folder} ({exc})")
                continue
            return wheel, (folder / wheel.filename).read_bytes()
    pages = [(link.rstrip("/") + "/", link) for link in find_links if _local_folder(link) is None]
    pages += [(url.rstrip("/") + "/uv/", url) for url in (*extra_index_urls, index_url or DEFAULT_INDEX)]
    for page, source in pages:
        try:
            html = read_url(page, fetch).decode("utf-8", "replace")
            wheel = pick_wheel(parse_simple_page(html, page), version, tags)
        except BootstrapError as exc:
            tried.append(f"{source} ({exc})")
            continue
        if not wheel.sha256:
            raise BootstrapError(f"{source} gives no sha256 for {wheel.filename}; refusing to run it")
        data = read_url(wheel.url, fetch)
        digest = hashlib.sha256(data).hexdigest()
        if digest != wheel.sha256:
            raise BootstrapError(f"{wheel.filename}: sha256 {digest} does not match {source}'s {wheel.sha256}")
        return wheel, data
    raise BootstrapError(f"uv {version} could not be fetched: {'; '.join(tried)}")


def bootstrap(dest: Path, fetch: Callable[[str], bytes], index_url: str = "", extra_index_urls: tuple = (),
              find_links: tuple = (), version: str = UV_VERSION, system: str | None = None,
              machine: str | None = None) -> Path:
    """Fetch uv ``version`` into ``dest``; returns the executable. A complete earlier bootstrap is reused. The
    executable appears under its final name only when unpacked completely."""
    system = system or platform.system()
    exe = Path(dest) / executable_name("uv", system)
    if exe.is_file():
        return exe
    wheel, data = find_wheel(version, platform_tags(system, machine), fetch, index_url, extra_index_urls, find_links)
    member = f"uv-{version}.data/scripts/{executable_name('uv', system)}"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            content = archive.read(member)
    except (zipfile.BadZipFile, KeyError):
        raise BootstrapError(f"{wheel.filename} does not hold {member}") from None
    exe.parent.mkdir(parents=True, exist_ok=True)
    partial = exe.with_name(exe.name + ".partial")
    partial.write_bytes(content)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(partial, exe)
    return exe
