"""A real HTTP server on loopback for download tests (stdlib only: the backend and the e2e suites both use it).

It serves byte strings at paths, honours ``Range: bytes=N-`` with 206 answers, and speaks enough of the Hugging
Face Hub's ``/resolve/`` protocol for ``huggingface_hub.hf_hub_download`` (``X-Repo-Commit``, ``ETag``) when a path
is registered with :meth:`FileServer.add_hf`. Faults on demand: throttle (seconds per chunk), cut the connection
after some bytes, ignore ranges, answer with another status. Every request is logged.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Served:
    data: bytes
    etag: str | None = None  # HF: the LFS sha256 the hub lists (None: the real one)
    commit: str | None = None  # HF: X-Repo-Commit (None: not an HF file)


@dataclass
class Faults:
    throttle_s: float = 0.0  # sleep per chunk of ``chunk`` bytes
    chunk: int = 1 << 16
    cut_after: int | None = None  # close the connection after this many body bytes (next requests too)
    cut_times: int = 1  # how many GETs are cut
    ignore_range: bool = False
    status: int | None = None  # answer every request with this status


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class _State:
    files: dict[str, Served] = field(default_factory=dict)
    faults: Faults = field(default_factory=Faults)
    log: list[Request] = field(default_factory=list)
    cuts: int = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: _State  # set per server

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):  # noqa: N802
        self._answer(body=False)

    def do_GET(self):  # noqa: N802
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        st = self.state
        path = unquote(urlparse(self.path).path)
        st.log.append(Request(self.command, path, self.headers.get("Range"), self.headers.get("Authorization")))
        served = st.files.get(path)
        if st.faults.status is not None or served is None:
            code = st.faults.status or 404
            self.send_response(code)
            self.send_header("Content-Length", "0")
            if served is None and path.count("/resolve/"):
                self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return
        data, start = served.data, 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and not st.faults.ignore_range and body:
            start = int(rng[len("bytes="):].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        if served.commit is not None:
            self.send_header("X-Repo-Commit", served.commit)
            etag = served.etag or hashlib.sha256(data).hexdigest()
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.end_headers()
        if not body:
            return
        cut = st.faults.cut_after is not None and st.cuts < st.faults.cut_times
        sent, pos = 0, start
        while pos < len(data):
            n = st.faults.chunk
            if cut:
                n = min(n, st.faults.cut_after - sent)
                if n <= 0:
                    st.cuts += 1
                    self.close_connection = True
                    return
            block = data[pos:pos + n]
            try:
                self.wfile.write(block)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return
            pos += len(block)
            sent += len(block)
            if st.faults.throttle_s:
                time.sleep(st.faults.throttle_s)


class FileServer:
    """``with FileServer() as s: s.add("/f.bin", data); url = s.url("/f.bin")``."""

    def __init__(self):
        self.state = _State()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def endpoint(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def faults(self) -> Faults:
        return self.state.faults

    @property
    def log(self) -> list[Request]:
        return self.state.log

    def url(self, path: str) -> str:
        return self.endpoint + path

    def add(self, path: str, data: bytes) -> str:
        self.state.files[path] = Served(data)
        return self.url(path)

    def add_hf(self, repo: str, filename: str, data: bytes, revision: str | None = None,
               etag: str | None = None) -> None:
        """Serve ``filename`` of ``repo`` at ``revision`` (and at main) as the Hub's /resolve/ does."""
        commit = revision if revision and len(revision) == 40 else COMMIT
        for rev in {revision or "main", "main", commit}:
            self.state.files[f"/{repo}/resolve/{rev}/{filename}"] = Served(data, etag, commit)

    def gets(self, path_part: str = "") -> list[Request]:
        return [r for r in self.log if r.method == "GET" and path_part in r.path]
