"""A small stand-in for the backend's HTTP API (``/v1``), for plugin tests that must not need the ML stack.

``http.server`` in a thread on 127.0.0.1, bearer token, canned JSON shaped like backend/tileprompt_backend/
schemas.py (Health, ModelInfo, JobStatus). A succeeded job copies a prepared GeoPackage/GeoTIFF to the request's
``out``/``heatmap`` path (the files are written beforehand on the main thread with QGIS's own writers).
Behaviour knobs: ``polls_to_finish`` (running states before success), ``fail_with`` (job error), ``hang``
(jobs never finish until cancelled), ``answer_delay_s`` (the server is slow to answer at all), ``refuse_unless``
(a 422 with the backend's code and fixes until the request carries the field that agrees: overwrite ...).
``models`` is what /v1/models lists (add :data:`ZOO_MODEL`, not downloaded, to test downloads: POST
/v1/models/{id}/fetch runs a "fetch" job whose status reports ``stage``/``bytes_done``); /v1/models/default
answers ``default_choice``.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MODELS = [
    {"id": "tiny-aligned-s2", "title": "Tiny untrained aligned-s2 model", "family": "aligned-s2", "modality": "s2",
     "bands": ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"],
     "gsd_m": 10.0, "tile_px": 32, "image_size": 32, "embed_dim": 32, "trained": False,
     "description": "random weights, for tests", "space": "clip-vit-b32-openai@0123456789abcdef"},
    {"id": "clip-vit-b32-openai", "title": "CLIP ViT-B/32 (OpenAI)", "family": "clip", "modality": "rgb",
     "bands": ["R", "G", "B"], "gsd_m": 1.0, "tile_px": 224, "image_size": 224, "embed_dim": 512, "trained": True,
     "description": "OpenAI CLIP", "space": "clip-vit-b32-openai@0123456789abcdef"},
]
for _m in MODELS:
    _m.update(downloaded=True, weights="downloaded", download_bytes=None, downloadable=False, license="MIT",
              summary=_m["title"])
#: A model whose weights are not on the backend's machine yet.
ZOO_MODEL = {"id": "georsclip-vit-b32", "title": "GeoRSCLIP ViT-B/32 (RS5M), RGB", "family": "clip", "modality": "rgb",
             "bands": [], "gsd_m": 10.0, "tile_px": 64, "image_size": 224, "embed_dim": 512, "trained": True,
             "description": "RGB", "summary": "CLIP ViT-B/32 fine-tuned on RS5M", "license": "CC-BY-4.0",
             "downloaded": False, "weights": "about 605 MB to download", "download_bytes": 605_000_000,
             "downloadable": True}
FETCH_BYTES = 605_000_000


class FakeBackend:
    def __init__(self, files: dict, token: str = "secret-token"):
        self.files = files  # "tiles"/"similar"/"change" -> gpkg, "heatmap" -> tif, "classmap" -> tif
        self.token = token
        self.jobs: dict[str, dict] = {}
        self.requests: list[dict] = []  # every job request body received
        self.calls: list[tuple[str, str]] = []  # (method, path)
        self.polls_to_finish = 2
        self.fail_with: str | None = None
        # a 422 answer (the backend's body: detail, code, fixes) for requests without the field that agrees to it
        self.refuse_unless: tuple[str, dict] | None = None
        self.hang = False
        self.answer_delay_s = 0.0
        self.models = [dict(m) for m in MODELS]
        self.models_errors = 0  # the next N model lists fail (503), as a backend still importing may time out
        self.default_choice = {"model": "tiny-aligned-s2", "reason": "tiny-aligned-s2: best multispectral model "
                                                                   "that reads this product's bands"}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> FakeBackend:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def write_state_file(self, path: Path, pid: int | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"host": "127.0.0.1", "port": self.port, "token": self.token, "pid": pid,
                                    "version": "0.0-fake"}))
        return path

    # --- job model ------------------------------------------------------------------------------------------
    def _new_job(self, body: dict) -> dict:
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        job = {"id": uuid.uuid4().hex[:12], "kind": body.get("kind"), "state": "queued", "done": 0, "total": 0,
               "rate": None, "eta_seconds": None, "stage": None, "bytes_done": 0, "bytes_total": None,
               "created": now, "started": None, "finished": None,
               "result": None, "error": None, "request": body, "_polls": 0}
        self.jobs[job["id"]] = job
        return job

    def _advance(self, job: dict) -> None:
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return
        job["_polls"] += 1
        if job["kind"] == "fetch":
            job["state"], job["started"], job["stage"] = "running", job["started"] or job["created"], \
                "downloading weights"
            job["bytes_total"], job["bytes_done"] = FETCH_BYTES, min(FETCH_BYTES, job["_polls"] * FETCH_BYTES // 4)
            job["eta_seconds"] = 3.0
        else:
            job["state"], job["total"], job["started"] = "running", 12, job["started"] or job["created"]
            job["done"] = min(12, job["_polls"] * 4)
            job["rate"], job["eta_seconds"] = 40.0, 0.1
        if self.hang or job["_polls"] < self.polls_to_finish:
            return
        if self.fail_with:
            job["state"], job["error"] = "failed", self.fail_with
            return
        request = job["request"]
        if job["kind"] == "classify":
            shutil.copy(self.files["tiles"], request["out"])
            if request.get("class_map"):
                shutil.copy(self.files["classmap"], request["class_map"])
            job["result"] = {"out": request["out"], "tiles": 12, "class_map": request.get("class_map")}
        elif job["kind"] == "index":
            folder = Path(request.get("index") or Path(self.files["tiles"]).parent / "index")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "embeddings.npy").write_bytes(b"fake")
            job["result"] = {"index": str(folder), "tiles": 12}
        elif job["kind"] == "search":
            shutil.copy(self.files["similar"], request["out"])
            if request.get("heatmap"):
                shutil.copy(self.files["heatmap"], request["heatmap"])
            job["result"] = {"out": request["out"], "heatmap": request.get("heatmap")}
        elif job["kind"] == "change":
            shutil.copy(self.files["change"], request["out"])
            if request.get("heatmap"):
                shutil.copy(self.files["heatmap"], request["heatmap"])
            job["result"] = {"out": request["out"], "heatmap": request.get("heatmap"), "pairs": 12, "unpaired": 0}
        elif job["kind"] == "fetch":
            for model in self.models:
                if model["id"] == request["model"]:
                    model.update(downloaded=True, weights="downloaded", download_bytes=None)
            job["result"] = {"model": request["model"], "weights": "downloaded"}
        job["state"], job["done"], job["finished"] = "succeeded", 12, job["created"]

    @staticmethod
    def public(job: dict) -> dict:
        return {k: v for k, v in job.items() if not k.startswith("_")}

    # --- HTTP -----------------------------------------------------------------------------------------------
    def _handler(self):
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                if backend.answer_delay_s:
                    time.sleep(backend.answer_delay_s)
                backend.calls.append((self.command, self.path))
                if self.headers.get("Authorization") != f"Bearer {backend.token}":
                    self._send(401, {"detail": "missing or wrong bearer token"})
                    return False
                return True

            def do_GET(self):  # noqa: N802
                if not self._authorised():
                    return
                with backend.lock:
                    if self.path == "/v1/health":
                        running = [j["id"] for j in backend.jobs.values() if j["state"] == "running"]
                        self._send(200, {"status": "ok", "version": "0.0-fake", "device": "cpu",
                                         "device_name": "Fake CPU", "default_model": "clip-vit-b32-openai",
                                         "torch": "2.x",
                                         "onnx_providers": ["CPUExecutionProvider"], "loaded_models": [],
                                         "queue_length": 0, "running_job": running[0] if running else None})
                    elif self.path == "/v1/models" and backend.models_errors:
                        backend.models_errors -= 1
                        self._send(503, {"detail": "busy"})
                    elif self.path == "/v1/models":
                        self._send(200, backend.models)
                    elif self.path.startswith("/v1/models/default?"):
                        self._send(200, backend.default_choice)
                    elif self.path.startswith("/v1/jobs/"):
                        job = backend.jobs.get(self.path.rsplit("/", 1)[1])
                        if job is None:
                            self._send(404, {"detail": "no such job"})
                            return
                        backend._advance(job)
                        self._send(200, backend.public(job))
                    else:
                        self._send(404, {"detail": "not found"})

            def do_POST(self):  # noqa: N802
                if not self._authorised():
                    return
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    self._send(422, {"detail": "body is not JSON"})
                    return
                if self.path.startswith("/v1/models/") and self.path.endswith("/fetch"):
                    body = {"kind": "fetch", "model": self.path.split("/")[3]}
                    with backend.lock:
                        backend.requests.append(body)
                        self._send(201, backend.public(backend._new_job(body)))
                    return
                if self.path != "/v1/jobs":
                    self._send(404, {"detail": "not found"})
                    return
                if body.get("kind") not in ("classify", "index", "search", "change"):
                    self._send(422, {"detail": [{"loc": ["body", "kind"], "msg": "unknown job kind"}]})
                    return
                if body.get("kind") == "classify" and not Path(body.get("raster", "")).exists():
                    self._send(422, {"detail": f"raster not found: {body.get('raster')}"})
                    return
                if backend.refuse_unless and not body.get(backend.refuse_unless[0]):
                    with backend.lock:
                        backend.requests.append(body)
                    self._send(422, backend.refuse_unless[1])
                    return
                with backend.lock:
                    backend.requests.append(body)
                    job = backend._new_job(body)
                    self._send(201, backend.public(job))

            def do_DELETE(self):  # noqa: N802
                if not self._authorised():
                    return
                with backend.lock:
                    job = backend.jobs.get(self.path.rsplit("/", 1)[1])
                    if job is None:
                        self._send(404, {"detail": "no such job"})
                        return
                    if job["state"] not in ("succeeded", "failed"):
                        job["state"] = "cancelled"
                    self._send(200, backend.public(job))

        return Handler
