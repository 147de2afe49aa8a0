"""``tileprompt serve``: run the service on the loopback interface until SIGTERM/SIGINT.

Start-up: refuse non-loopback hosts, bind the socket ourselves (port 0: the kernel picks a free one), make a
fresh token, and once uvicorn accepts connections write the state file ``{"host", "port", "token", "pid",
"version"}`` atomically with mode 0600. Shutdown on SIGTERM/SIGINT: stop accepting, cancel the running job,
wait for the worker to finish the cancel, remove the state file, exit 0.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import logging.handlers
import os
import secrets
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Callable

from .. import __version__
from ..paths import home_dir

log = logging.getLogger("tileprompt_backend.server")

LOG_BYTES = 5 * 1024 * 1024
LOG_BACKUPS = 3
#: Seconds uvicorn waits for open connections to finish when stopping.
GRACEFUL_SECONDS = 5


def default_state_file() -> Path:
    return home_dir() / "server.json"


def default_log_file() -> Path:
    return home_dir() / "logs" / "server.log"


def loopback_host(host: str) -> str:
    """The address to bind: ``host`` when it is a loopback address ("localhost" is 127.0.0.1); else ValueError."""
    host = host.strip()
    if host.lower() == "localhost":
        return "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"--host must be a loopback IP address such as 127.0.0.1, got {host!r}") from None
    if not addr.is_loopback:
        raise ValueError(f"refusing to listen on {host}: the TilePrompt service accepts connections from this "
                         f"machine only; bind 127.0.0.1 (the default)")
    return str(addr)


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; "cuda" without one is refused before serving.

    (As models.loading.resolve_device, without importing the model families: the service starts faster and
    the worker imports them in the background.)
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {device!r} (valid: auto, cpu, cuda)")
    if device == "cpu":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise ValueError("device 'cuda' requested but torch sees no CUDA GPU")
    return "cpu"


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port); port 0 lets the kernel choose a free one (read it back from the socket)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if os.name != "nt":  # on Windows SO_REUSEADDR would let another process steal the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(False)
    return sock


def write_state(path: Path, state: dict) -> None:
    """Write the state file atomically; it is created with mode 0600 and never exists world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_state(path: Path, token: str) -> None:
    """Remove the state file if it is still this run's (another server may have taken the name since)."""
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("token") == token:
            path.unlink()
            log.info("removed state file %s", path)
    except (OSError, ValueError):
        pass


def setup_logging(path: Path) -> logging.Handler:
    """INFO and above of this process to a rotating file; warnings also to stderr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS,
                                                   encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("tileprompt serve: %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    root.addHandler(console)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    return handler


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with our start hook and signal handling (uvicorn re-raises the signal; we exit 0)."""

        def __init__(self, config, on_started: Callable[[], None], on_signal: Callable[[], None]):
            super().__init__(config)
            self._on_started = on_started
            self._on_signal = on_signal

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                self._on_started()

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])
            originals = {sig: signal.signal(sig, self._signal) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

        def _signal(self, sig, frame) -> None:
            log.info("received %s: stopping (running job cancelled, no new jobs)", signal.Signals(sig).name)
            # Not in the handler itself: it may have interrupted code holding the queue's lock.
            threading.Thread(target=self._on_signal, name="tileprompt-cancel", daemon=True).start()
            self.handle_exit(sig, frame)

    return Server


def serve(host: str = "127.0.0.1", port: int = 0, state_file: str | Path | None = None,
          log_file: str | Path | None = None, device: str = "auto") -> int:
    """Run the service until SIGTERM/SIGINT; returns the exit code (0 after a clean shutdown)."""
    host = loopback_host(host)
    state_path = Path(state_file).expanduser().absolute() if state_file else default_state_file()
    log_path = Path(log_file).expanduser().absolute() if log_file else default_log_file()

    device = resolve_device(device)
    sock = bind_socket(host, port)
    try:
        import uvicorn

        from ..jobs import JobQueue
        from .app import create_app

        setup_logging(log_path)
        token = secrets.token_urlsafe(32)
        queue = JobQueue(device=device)
        app = create_app(queue, token)
        bound_host, bound_port = sock.getsockname()[:2]
        state = {"host": bound_host, "port": bound_port, "token": token, "pid": os.getpid(), "version": __version__}

        def started() -> None:
            write_state(state_path, state)
            url = f"http://{bound_host if ':' not in bound_host else f'[{bound_host}]'}:{bound_port}"
            log.info("serving %s/v1 (pid %d, device %s, version %s); state file %s", url, os.getpid(), device,
                     __version__, state_path)
            print(f"tileprompt serve: listening on {url}/v1; state file {state_path}; log {log_path}",
                  file=sys.stderr, flush=True)

        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", server_header=False,
                                timeout_graceful_shutdown=GRACEFUL_SECONDS)
        server = _server_class()(config, on_started=started, on_signal=queue.cancel_all)
        try:
            server.run(sockets=[sock])
        finally:
            remove_state(state_path, token)
        log.info("stopped")
        return 0
    finally:
        sock.close()
