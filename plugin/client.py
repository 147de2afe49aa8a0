"""The HTTP client of the local backend (``/v1``, bearer token, JSON), in two flavours that share the rules.

* :class:`BackendClient` is synchronous (``urllib``, strict timeouts, never a proxy) and runs only off the UI
  thread: inside a QgsTask (tasks.py) or a Processing algorithm's worker.
* :class:`AsyncClient` runs on the UI thread without blocking it (``QNetworkAccessManager``, replies arrive as
  signals; a timer aborts a request that takes too long): health checks, the model list.

Errors are :class:`BackendError` (the server answered 4xx/5xx; ``detail`` is its message) and
:class:`BackendUnavailable` (nothing answered in time). Their messages are what the user reads.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from qgis.PyQt.QtCore import QByteArray, QObject, QTimer, QUrl
from qgis.PyQt.QtNetwork import QNetworkAccessManager, QNetworkProxy, QNetworkReply, QNetworkRequest

from .i18n import tr
from .processes import pid_alive

API = "/v1"
DEFAULT_TIMEOUT_S = 10.0


class BackendError(Exception):
    """The backend answered with an error (``status`` is the HTTP status, ``detail`` its one-line message).

    A refused input may carry ``code`` (``output_exists``, ``band_map``, ``no_georeference`` ...) and ``fixes``,
    the remedy in each interface's words (``dock``, ``processing`` ...): :meth:`message_for` uses them.
    """

    def __init__(self, message: str, status: int | None = None, detail: str | None = None, code: str | None = None,
                 fixes: dict | None = None):
        super().__init__(message)
        self.status = status
        self.detail = detail or message
        self.code = code
        self.fixes = dict(fixes or {})

    def message_for(self, interface: str) -> str:
        """The message with the remedy phrased for ``interface`` ("dock" or "processing") when the backend gave one."""
        return with_fix(str(self), self.fixes, interface)


def with_fix(message: str, fixes: dict, interface: str) -> str:
    """``message`` ends with the HTTP remedy of ``fixes``: swap it for the one of ``interface``."""
    http, own = fixes.get("http"), fixes.get(interface)
    if http and own and message.endswith(http):
        return message[: -len(http)] + own
    return message


class BackendUnavailable(BackendError):
    """Nothing answered: not started, stopped, crashed, or too slow (``timed_out``: it did not answer in time)."""

    def __init__(self, message: str, status: int | None = None, detail: str | None = None, timed_out: bool = False):
        super().__init__(message, status, detail)
        self.timed_out = timed_out


@dataclass(frozen=True)
class Connection:
    """Where a running backend listens, from its state file ``{"host","port","token","pid","version"}``."""

    host: str
    port: int
    token: str
    pid: int | None = None
    version: str = ""
    state_file: str = ""

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_state_file(cls, path: str | Path) -> Connection:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BackendUnavailable(
                tr("No running backend: its state file {path} does not exist. "
                   "Start the backend from the TilePrompt dock, or run `tileprompt serve`.").format(path=path)
            ) from None
        except (OSError, ValueError) as exc:
            raise BackendUnavailable(tr("Cannot read the backend state file {path}: {error}").format(
                path=path, error=exc)) from None
        try:
            host, port, token = str(data["host"]), int(data["port"]), str(data["token"])
        except (KeyError, TypeError, ValueError):
            raise BackendUnavailable(
                tr("The backend state file {path} lacks host, port or token.").format(path=path)) from None
        pid = data.get("pid")
        return cls(host, port, token, int(pid) if isinstance(pid, int) else None, str(data.get("version", "")),
                   str(path))

    def process_alive(self) -> bool | None:
        """Whether the state file's pid still runs (None when unknown, e.g. no pid or another user's process)."""
        return pid_alive(self.pid) if self.pid else None


def error_message(status: int, body: bytes | str | None, what: str) -> str:
    """One line for the user from an error response ``{"detail": ...}`` (FastAPI's 422 gives a list)."""
    detail = None
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if body:
        try:
            parsed = json.loads(body)
            detail = parsed.get("detail") if isinstance(parsed, dict) else None
        except ValueError:
            detail = body.strip()[:300] or None
    if isinstance(detail, list):  # pydantic validation errors: [{"loc": [...], "msg": "..."}]
        parts = []
        for item in detail[:5]:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
        detail = "; ".join(parts) or None
    if status == 401 or status == 403:
        return tr("The backend refused the token ({status}): it was restarted with a new one; attach again.").format(
            status=status)
    if detail:
        return tr("{what} failed: {detail}").format(what=what, detail=detail)
    return tr("{what} failed with HTTP {status}").format(what=what, status=status)


def unavailable_message(connection: Connection, reason: str) -> str:
    return tr("The TilePrompt backend at {address} does not answer ({reason}). Start it again from the "
              "TilePrompt dock (Backend: Start), or attach to a running one.").format(
        address=connection.address, reason=reason)


class BackendClient:
    """Blocking calls for worker threads. Every call ends within ``timeout`` seconds."""

    def __init__(self, connection: Connection, timeout: float = DEFAULT_TIMEOUT_S):
        self.connection = connection
        self.timeout = timeout
        # Loopback only: never route through the user's proxy settings or http_proxy variables.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, method: str, path: str, body: dict | None = None, what: str | None = None):
        url = self.connection.base_url + API + path
        data = json.dumps(body).encode("utf-8") if body is not None else None
        # http to the loopback backend only (the URL comes from its state file)
        req = urllib.request.Request(url, data=data, method=method)  # nosec B310
        req.add_header("Authorization", f"Bearer {self.connection.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        what = what or f"{method} {path}"
        try:
            with self._opener.open(req, timeout=self.timeout) as response:  # nosec B310
                raw = response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            parsed = _body(body)
            raise BackendError(error_message(exc.code, body, what), exc.code, _detail(body), parsed.get("code"),
                               parsed.get("fixes") if isinstance(parsed.get("fixes"), dict) else None) from None
        except (socket.timeout, TimeoutError):
            raise BackendUnavailable(unavailable_message(
                self.connection, tr("no answer within {s:g} s").format(s=self.timeout))) from None
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BackendUnavailable(unavailable_message(self.connection, str(reason))) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise BackendError(tr("{what}: the backend sent something that is not JSON").format(what=what)) from None

    def health(self) -> dict:
        return self.request("GET", "/health", what=tr("Health check"))

    def models(self) -> list:
        return self.request("GET", "/models", what=tr("Listing models"))

    def submit(self, job_request: dict) -> dict:
        if job_request.get("kind") == "fetch":  # downloads have their own route: POST /models/{id}/fetch
            model = urllib.parse.quote(str(job_request.get("model", "")), safe="")
            return self.request("POST", f"/models/{model}/fetch", what=tr("Starting the download"))
        return self.request("POST", "/jobs", job_request, what=tr("Starting the {kind} job").format(
            kind=job_request.get("kind", "")))

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/jobs/{job_id}", what=tr("Reading the job status"))

    def cancel(self, job_id: str) -> dict | None:
        return self.request("DELETE", f"/jobs/{job_id}", what=tr("Cancelling the job"))


def _body(body: bytes) -> dict:
    try:
        parsed = json.loads(body or b"{}")
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _detail(body: bytes) -> str | None:
    detail = _body(body).get("detail")
    return detail if isinstance(detail, str) else None


class AsyncClient(QObject):
    """Non-blocking GETs on the UI thread; callbacks get ``(data, None)`` or ``(None, BackendError)``."""

    def __init__(self, connection: Connection, timeout: float = DEFAULT_TIMEOUT_S, parent=None):
        super().__init__(parent)
        self.connection = connection
        self.timeout = timeout
        self._manager = QNetworkAccessManager(self)
        self._manager.setProxy(QNetworkProxy(QNetworkProxy.ProxyType.NoProxy))
        self._pending: dict = {}  # reply -> (timer, callback, what)

    def get(self, path: str, callback, what: str) -> None:
        request = QNetworkRequest(QUrl(self.connection.base_url + API + path))
        request.setRawHeader(QByteArray(b"Authorization"), QByteArray(f"Bearer {self.connection.token}".encode()))
        request.setRawHeader(QByteArray(b"Accept"), QByteArray(b"application/json"))
        reply = self._manager.get(request)
        timer = QTimer(self)
        timer.setSingleShot(True)
        timer.timeout.connect(reply.abort)
        timer.start(int(self.timeout * 1000))
        self._pending[reply] = (timer, callback, what)
        reply.finished.connect(lambda r=reply: self._finished(r))

    def health(self, callback) -> None:
        self.get("/health", callback, tr("Health check"))

    def models(self, callback) -> None:
        self.get("/models", callback, tr("Listing models"))

    def default_model(self, raster_fields: dict, callback) -> None:
        """The model the backend would use for a raster (``{"model", "reason"}``); fields as in a job request."""
        query = {k: (",".join(v) if isinstance(v, (list, tuple)) else str(v)) for k, v in raster_fields.items()}
        self.get("/models/default?" + urllib.parse.urlencode(query), callback, tr("Choosing the model"))

    def _finished(self, reply) -> None:
        timer, callback, what = self._pending.pop(reply, (None, None, ""))
        if timer is None:
            return
        timed_out = not timer.isActive()
        timer.stop()
        timer.deleteLater()
        status = reply.attribute(QNetworkRequest.Attribute.HttpStatusCodeAttribute)
        body = bytes(reply.readAll())
        error = reply.error()
        reply.deleteLater()
        if status is None or (error != QNetworkReply.NetworkError.NoError and not status):
            reason = tr("no answer within {s:g} s").format(s=self.timeout) if timed_out else reply.errorString()
            callback(None, BackendUnavailable(unavailable_message(self.connection, reason), timed_out=timed_out))
            return
        if int(status) >= 400:
            callback(None, BackendError(error_message(int(status), body, what), int(status)))
            return
        try:
            callback(json.loads(body) if body else None, None)
        except ValueError:
            callback(None, BackendError(tr("{what}: the backend sent something that is not JSON").format(what=what)))

    def abort_all(self) -> None:
        """Drop every pending request without calling back (unload)."""
        for reply, (timer, _callback, _what) in list(self._pending.items()):
            timer.stop()
            self._pending.pop(reply, None)
            reply.abort()
