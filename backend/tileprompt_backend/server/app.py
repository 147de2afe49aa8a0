"""The FastAPI application: thin routers under /v1 over the job queue and the model registry.

Errors: a bad request is a 422 whose ``detail`` is one line naming the input (schema errors and the eager
checks of :func:`tileprompt_backend.jobs.check_request` alike); an unknown job id is a 404; a missing or
wrong token a 401; a job posted while the queue is full a 429, while the service stops a 503. Every error body is ``{"detail": "..."}``.
"""

from __future__ import annotations

import logging
import sys
import threading
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .. import __version__
from ..errors import InputError
from ..jobs import JobQueue, QueueFull, ShuttingDown, UnknownJob
from ..schemas import ErrorBody, FetchRequest, Health, JobRequest, JobStatus, ModelChoiceInfo, ModelInfo, RasterInput
from .deps import Queue, TokenGate, require_token

log = logging.getLogger("tileprompt_backend.server")

API_PREFIX = "/v1"
#: Seconds the service waits, when it stops, for the worker to finish cancelling the running job.
SHUTDOWN_WAIT = 30.0
#: Retry-After (s) of a 429 answer to a job posted while the queue is full.
QUEUE_RETRY_AFTER_S = 10

_errors = {401: {"model": ErrorBody, "description": "missing or wrong bearer token"}}
_bad_request = {422: {"model": ErrorBody, "description": "the request names a bad input (detail says which)"}}
_unknown_job = {404: {"model": ErrorBody, "description": "no job with this id"}}


# ---------------------------------------------------------------------------------------------------------------
# Routers

system = APIRouter(tags=["service"])
models = APIRouter(tags=["models"])
jobs = APIRouter(tags=["jobs"])


@system.get("/health", response_model=Health, summary="Service state: version, device, engines, queue")
def health(request: Request, queue: Queue) -> Health:
    import torch

    from ..defaults import DEFAULT_MODEL  # not ..models: health must answer without importing the ML stack

    providers = list(dict.fromkeys(_onnx_providers(request.app) + queue.runner_providers()))
    return Health(version=__version__, device=queue.device, device_name=_device_name(request.app),
                  default_model=DEFAULT_MODEL, torch=torch.__version__, onnx_providers=providers,
                  loaded_models=queue.loaded_models(), queue_length=queue.queue_length, running_job=queue.running_job,
                  vector_indexes=_loaded_indexes())


def _loaded_indexes() -> list[dict]:
    """The indexes loaded for search. Until a search ran, index.query is not even imported (importing it costs
    seconds, 19 s at load 10, which a health check must not wait for) and no index is loaded."""
    query = sys.modules.get(f"{__package__.rpartition('.')[0]}.index.query")
    return query.loaded_indexes() if query is not None else []


@models.get("/models", response_model=list[ModelInfo], summary="Model cards found, plus model folders used")
def list_models(queue: Queue) -> list[ModelInfo]:
    from ..models import list_models, resolve_card

    cards = {str(c.path): c for c in list_models()}
    for path in list(queue.model_dirs):
        if path not in cards:
            try:
                cards[path] = resolve_card(path)
            except ValueError:
                continue  # the folder went away since; nothing to list
    return [model_info(c) for c in sorted(cards.values(), key=lambda c: (c.id, str(c.path)))]


@models.get("/models/default", response_model=ModelChoiceInfo, responses=_bad_request,
            summary="The model used for a raster when none is named, and why")
def default_model(raster: Annotated[str, Query(min_length=1, description="raster path (absolute)")],
                  band_map: Annotated[str | None, Query(description="band names of a multiband file, "
                                                                    "comma-separated")] = None,
                  level: Annotated[str | None, Query(pattern="^(L1C|L2A)$")] = None,
                  offset: Annotated[str, Query(description="auto, none or DN")] = "auto") -> ModelChoiceInfo:
    from .. import validation
    from ..jobs import check_raster_input
    from ..models import choose_model

    r = RasterInput(raster=raster, band_map=band_map.split(",") if band_map else None, level=level,
                    offset=validation.offset(offset))
    choice = choose_model(check_raster_input(r))
    return ModelChoiceInfo(model=choice.card.id, reason=choice.reason)


@models.post("/models/{model_id}/fetch", response_model=JobStatus, status_code=status.HTTP_201_CREATED,
             responses=_bad_request, summary="Download a model's weights as a job (progress: stage, bytes_done)")
def fetch_model(model_id: str, queue: Queue) -> JobStatus:
    return queue.submit(FetchRequest(model=model_id))


@jobs.post("/jobs", response_model=JobStatus, status_code=status.HTTP_201_CREATED, responses=_bad_request | {
    503: {"model": ErrorBody, "description": "the service is shutting down"},
    429: {"model": ErrorBody, "description": "the queue is full (jobs.MAX_QUEUED_JOBS waiting); retry later"}},
    summary="Queue a job")
def submit_job(job: Annotated[JobRequest, Body()], queue: Queue) -> JobStatus:
    return queue.submit(job)


@jobs.get("/jobs", response_model=list[JobStatus], summary="All jobs, oldest first")
def list_jobs(queue: Queue) -> list[JobStatus]:
    return queue.jobs()


@jobs.get("/jobs/{job_id}", response_model=JobStatus, responses=_unknown_job, summary="One job's state")
def get_job(job_id: str, queue: Queue) -> JobStatus:
    return queue.get(job_id)


@jobs.delete("/jobs/{job_id}", response_model=JobStatus, responses=_unknown_job,
             summary="Cancel a job (queued: at once; running: at the engine's next batch)")
def cancel_job(job_id: str, queue: Queue) -> JobStatus:
    return queue.cancel(job_id)


def model_info(card) -> ModelInfo:
    from ..models.downloads import weights_state
    from ..models.fetch import downloadable

    inp = card.input
    state = weights_state(card)
    return ModelInfo(id=card.id, title=card.title, family=card.family, modality=inp.modality, bands=list(inp.bands),
                     gsd_m=inp.gsd_m, tile_px=inp.tile_px, image_size=inp.image_size, embed_dim=card.embed_dim,
                     trained=card.trained, description=card.describe(), summary=card.description or card.title,
                     license=card.license, license_url=card.provenance.get("license_url"),
                     downloaded=state.downloaded, weights=state.describe(),
                     download_bytes=None if state.downloaded else state.bytes, downloadable=downloadable(card),
                     path=str(card.path) if card.path is not None else None, space=_space(card))


def _space(card) -> str | None:
    from ..models.identity import space_of

    try:
        return space_of(card)
    except ValueError:  # weights not downloaded yet: the space is known once they are
        return None


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime providers a session really gets (get_available_providers lists CUDA even when it cannot load)

_providers_lock = threading.Lock()


def _onnx_providers(app: FastAPI) -> list[str]:
    with _providers_lock:
        if getattr(app.state, "onnx_providers", None) is None:
            app.state.onnx_providers = session_providers(app.state.queue.device)
        return list(app.state.onnx_providers)


def _device_name(app: FastAPI) -> str:
    if getattr(app.state, "device_name", None) is None:  # found once (at start): it imports the models package
        from ..models.runners import device_name

        app.state.device_name = device_name(app.state.queue.device)
    return app.state.device_name


def session_providers(device: str) -> list[str]:
    """Create a one-node ONNX Runtime session the way the runners do and return the providers it was granted."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return []
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "providers-probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # old enough for any onnxruntime this project supports
    ort.set_default_logger_severity(3)
    wanted = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        wanted.insert(0, "CUDAExecutionProvider")
    try:
        return list(ort.InferenceSession(model.SerializeToString(), providers=wanted).get_providers())
    except Exception as e:  # noqa: BLE001 - a broken onnxruntime is a health fact, not a crash
        log.warning("onnxruntime session probe failed: %s", e)
        return []


# ---------------------------------------------------------------------------------------------------------------
# Errors


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def _error_body(detail: str, exc: BaseException | None = None) -> dict[str, Any]:
    """``{"detail": ...}``, plus ``code`` and ``fixes`` for an InputError (each interface phrases the remedy)."""
    body: dict[str, Any] = {"detail": " ".join(detail.split())}
    if isinstance(exc, InputError):
        body.update(code=exc.code, fixes=exc.fixes)
    return body


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    lines, cause = [], None
    for err in exc.errors():
        kind, ctx = err.get("type"), err.get("ctx") or {}
        if kind == "json_invalid":
            lines.append(f"the body is not valid JSON: {ctx.get('error', 'decode error')}")
        elif kind == "union_tag_not_found":
            lines.append('body: "kind" is missing (one of: classify, index, search, change)')
        elif kind == "value_error" and isinstance(ctx.get("error"), ValueError):
            # a check of validation.py: its own words (an InputError with the HTTP remedy), not pydantic's prefix
            error = ctx["error"]
            cause = cause or (error if isinstance(error, InputError) else None)
            text = error.message("http") if isinstance(error, InputError) else str(error)
            lines.append(f"{_location(tuple(err.get('loc', ())))}: {text}")
        else:
            lines.append(f"{_location(tuple(err.get('loc', ())))}: {err.get('msg', 'invalid')}")
    detail = "; ".join(dict.fromkeys(lines)) or "invalid request"
    log.info("422 %s %s: %s", request.method, request.url.path, detail[:500])
    return JSONResponse(_error_body(detail, cause), status_code=422)


async def _value_error(request: Request, exc: ValueError) -> JSONResponse:
    detail = (exc.message("http") if isinstance(exc, InputError) else str(exc)) or type(exc).__name__
    body = _error_body(detail, exc)
    log.info("422 %s %s: %s", request.method, request.url.path, body["detail"][:500])
    return JSONResponse(body, status_code=422)


async def _unknown_job_error(request: Request, exc: UnknownJob) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def _shutting_down(request: Request, exc: ShuttingDown) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503)


async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
    log.info("429 %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": str(QUEUE_RETRY_AFTER_S)})


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("500 %s %s", request.method, request.url.path)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


# ---------------------------------------------------------------------------------------------------------------
# The factory


def create_app(queue: JobQueue, token: str) -> FastAPI:
    """The service over ``queue``; every request needs ``Authorization: Bearer <token>``.

    The lifespan starts the queue's worker and, on shutdown, cancels what runs and waits for the worker.
    """
    if not token:
        raise ValueError("the service needs a non-empty token")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        log.info("worker started (device %s)", queue.device)
        # Probe ONNX Runtime's providers now, before the state file says "ready": done lazily, the first health
        # check (the plugin's, 10 s timeout) took 32 s on a loaded 2-core machine and the dock showed the new
        # backend as not answering.
        await anyio.to_thread.run_sync(lambda: (_onnx_providers(app), _device_name(app)))
        yield
        await anyio.to_thread.run_sync(lambda: queue.shutdown(SHUTDOWN_WAIT))

    app = FastAPI(title="TilePrompt backend", version=__version__, lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None,
                  description="Classify and search raster tiles with text prompts. Local service: loopback only, "
                              "bearer token from the state file. See docs/service.md.")
    app.state.queue = queue
    app.state.token = token
    app.state.onnx_providers = None
    app.state.device_name = None
    for router in (system, models, jobs):
        app.include_router(router, prefix=API_PREFIX, dependencies=[Depends(require_token)], responses=_errors)

    @app.get(f"{API_PREFIX}/openapi.json", include_in_schema=False, dependencies=[Depends(require_token)])
    def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(UnknownJob, _unknown_job_error)
    app.add_exception_handler(ShuttingDown, _shutting_down)
    app.add_exception_handler(QueueFull, _queue_full)
    app.add_exception_handler(ValueError, _value_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(TokenGate, token=token)
    return app
