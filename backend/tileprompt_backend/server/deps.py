"""What the /v1 routes depend on: the bearer token check and the job queue, as ``Annotated`` dependencies.

The token is checked twice on purpose: :class:`TokenGate` (ASGI middleware) refuses every request without it
before anything else runs - unknown paths and unparseable bodies included - and :func:`require_token`, the
routers' dependency, declares the bearer scheme in the OpenAPI schema so generated clients send it.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..jobs import JobQueue

log = logging.getLogger("tileprompt_backend.server")

MISSING = "missing bearer token: send 'Authorization: Bearer <token>' with the token from the server's state file"
INVALID = "invalid bearer token: use the token from the state file of this server run (a new one is made per start)"

_bearer = HTTPBearer(auto_error=False, scheme_name="bearer",
                     description="the token in the state file written by `tileprompt serve`")


def token_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison of the presented token with this run's token."""
    return given is not None and secrets.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _bearer_value(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def require_token(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    given = credentials.credentials if credentials is not None else None
    if given is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, MISSING, headers={"WWW-Authenticate": "Bearer"})
    if not token_matches(request.app.state.token, given):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, INVALID, headers={"WWW-Authenticate": "Bearer"})


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


Queue = Annotated[JobQueue, Depends(get_queue)]


class TokenGate:
    """ASGI middleware: 401 for any HTTP request without this run's bearer token; one log line per request."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        raw = headers.get(b"authorization")
        given = _bearer_value(raw.decode("latin-1") if raw is not None else None)
        code = {"status": 0}

        async def send_logged(message):
            if message["type"] == "http.response.start":
                code["status"] = message["status"]
            await send(message)

        try:
            if given is None or not token_matches(self.token, given):
                await _send_401(send_logged, MISSING if given is None else INVALID)
            else:
                await self.app(scope, receive, send_logged)
        finally:
            client = scope.get("client") or ("?", 0)
            log.info("%s %s %s %.1f ms (client port %s)", scope["method"], scope["path"], code["status"] or "-",
                     1000 * (time.perf_counter() - t0), client[1])


async def _send_401(send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": body})
