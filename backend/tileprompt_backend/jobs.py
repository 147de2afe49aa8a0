"""The job queue: one worker thread owns the accelerator and runs classify / index / search jobs in order.

Clients (HTTP handlers, in their own threads) submit requests, read statuses and ask for cancels; every read
and write of the job table happens under one lock. The worker runs one job at a time through the engine,
which reports ``progress(done, total)`` and polls ``cancel()`` between batches, so a cancel takes effect at
the next batch. Engines write their outputs atomically: a job that fails or is cancelled leaves nothing
under its output names.

Requests are checked eagerly on submit (:func:`check_request`): whatever is cheap to know before the model
loads - files and folders, model ids, prompts, geometries, CRSs - is a ValueError naming the bad input.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from . import validation
from .errors import ResourceError
from .schemas import ChangeRequest, ClassifyRequest, FetchRequest, IndexRequest, JobStatus, RasterInput, SearchRequest

log = logging.getLogger(__name__)

Request = ClassifyRequest | IndexRequest | SearchRequest | ChangeRequest | FetchRequest
#: Finished jobs kept for GET /v1/jobs; older finished ones are forgotten first.
MAX_FINISHED_JOBS = 500
#: Jobs waiting to run at most; one more is refused (HTTP 429) instead of queueing without bound.
MAX_QUEUED_JOBS = 100
#: A request whose grid would exceed this many tiles is refused before any work (a typo such as tile_px=1).
MAX_GRID_TILES = 1_000_000
#: Up to this many rasters of an index request are opened (headers only) on submit; beyond, only found.
MAX_RASTERS_OPENED = 32
FINAL_STATES = ("succeeded", "failed", "cancelled")
#: The stages a job reports (JobStatus.stage); the download stages come from models.progress.
DOWNLOADING = "downloading weights"
PROCESSING = "processing tiles"


class ShuttingDown(RuntimeError):
    """The queue takes no new jobs: the service is stopping."""


class QueueFull(RuntimeError):
    """The queue holds :data:`MAX_QUEUED_JOBS` waiting jobs; the client should retry later."""


class UnknownJob(KeyError):
    """No job has this id (never submitted, or forgotten: only the last finished jobs are kept)."""

    def __str__(self) -> str:
        return f"unknown job id {self.args[0]!r}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------------------------------------------
# Eager request checks


def _absolute(value: str, what: str) -> Path:
    """A path the client gave: it must be absolute (the service does not know the client's working folder)."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise ValueError(f"{what} must be an absolute path (the service does not know the client's working "
                         f"folder), got {value!r}")
    return path


def _existing(value: str, what: str) -> Path:
    path = _absolute(value, what)
    if not path.exists():
        raise ValueError(f"{what} not found: {path}")
    return path


def _model_arg(model: str | None) -> str | None:
    """A model id stays as it is; a model directory must be absolute like every other path."""
    if model is not None and ("/" in model or "\\" in model or model.startswith("~")):
        return str(_absolute(model, "model directory"))
    return model


def check_raster_input(r: RasterInput):
    """A client's raster: absolute, existing and readable; its RasterInfo (the default-model route uses this)."""
    try:
        return _check_raster(r)
    except OSError as e:
        raise ValueError(f"cannot use the path: {e.strerror or e}") from None


def _check_raster(r: RasterInput, open_it: bool = True):
    """The raster exists and (``open_it``) opens; returns its RasterInfo (None when not opened)."""
    from .sentinel2 import open_raster

    path = _existing(r.raster, "raster")
    if not open_it:
        return None
    with open_raster(path, band_map=r.selected_band_map(), level=r.level, offset=r.offset) as source:
        return source.info


def _check_grid(info, tile_px: int, stride: int | None, aoi: str | None = None, aoi_crs: str | None = None) -> None:
    """Grid size within bounds and, when given, the area of interest readable, placeable and on the raster."""
    from .tiling import grid_shape, make_grid

    stride = stride or tile_px
    rows, cols = grid_shape(info.width, info.height, tile_px, stride)
    if rows * cols > MAX_GRID_TILES:
        raise ValueError(f"tile size {tile_px} px with stride {stride} px makes {rows * cols} tiles on a "
                         f"{info.width}x{info.height} px raster (at most {MAX_GRID_TILES}); use larger tiles")
    if aoi is not None:
        # One raster-sized tile: the engine's own parsing, reprojection and overlap checks, at no cost.
        make_grid(info, max(info.width, info.height), aoi=aoi, aoi_crs=aoi_crs)


def _check_crs(value: str | None, what: str) -> None:
    if value is None:
        return
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        CRS.from_user_input(value)
    except CRSError as e:
        raise ValueError(f"{what}: unknown CRS {value!r} ({e})") from None


def _check_search_scene(request: SearchRequest, index: Path) -> None:
    """The index opens; the query scene is known; query geometries lie on it and tile ids on its grid."""
    from .index import IndexStore
    from .tiling import make_grid

    store = IndexStore.open(index)
    needs_scene = request.like is not None or request.tile_ids is not None or request.heatmap is not None
    if request.scene is None and not needs_scene:
        return
    scenes = store.scenes()
    if not scenes:
        raise ValueError(f"index {index} holds no complete scenes (was its indexing cancelled?)")
    if request.scene is not None:
        scene = store.find_scene(request.scene)
    elif len(scenes) == 1:
        scene = scenes[0]
    else:
        raise ValueError(f"index {index} holds {len(scenes)} scenes: name the scene the query geometries, tile ids "
                         "or heat map refer to (scene)")
    info = scene.grid_info()
    for n, geom in enumerate(request.like or []):
        try:  # one scene-sized tile: the engine's parsing, reprojection and overlap checks, at no cost
            make_grid(info, max(info.width, info.height), aoi=geom, aoi_crs=request.like_crs)
        except ValueError as e:
            text = str(e).replace("area of interest", "geometry").replace("the raster", f"scene {scene.name}")
            raise ValueError(f"like[{n}]: {text}") from None
    n_tiles = scene.n_rows * scene.n_cols
    off = [t for t in request.tile_ids or [] if not 0 <= t < n_tiles]
    if off:
        raise ValueError(f"tile id(s) {', '.join(map(str, off[:10]))} are not on the grid of scene {scene.name} "
                         f"(ids 0..{n_tiles - 1}, {scene.n_rows} rows x {scene.n_cols} columns)")


def _check_cross_modal(request: SearchRequest, index: Path, updates: dict) -> None:
    """A cross-modal query: geometries on a raster (indexed or not) embedded by a card of the index's space."""
    from .index import IndexStore
    from .index.crossmodal import check_cross_modal

    if request.like is None or request.scene is None:
        raise ValueError("query_model (cross-modal search) needs query geometries (like) and the raster they lie "
                         "on (scene)")
    scene = _absolute(request.scene, "scene")
    check_cross_modal(IndexStore.open(index), request.query_model, str(scene), request.like, request.like_crs,
                      request.query_tile)
    updates["scene"] = str(scene)


def check_request(request: Request) -> Request:
    """Validate what is cheap to validate before queueing; a ValueError names the bad input.

    Returns the request with client paths made absolute (``~`` expanded) and the model resolved to a card
    that exists; what only the engine can know (bands against the model, nodata) is checked when it runs.
    """
    try:
        return _check_request(request)
    except OSError as e:  # e.g. a path too long for the file system, a folder we may not read
        where = f": {e.filename}" if e.filename else ""
        raise ValueError(f"cannot use the path{where}: {e.strerror or e}") from None


def _card_for(model: str | None, info):
    """The named card, or the best one for a raster (None: the default of no raster)."""
    from .models import DEFAULT_MODEL, choose_model, resolve_card

    if model:
        return resolve_card(model)
    return choose_model(info).card if info is not None else resolve_card(DEFAULT_MODEL)


def _check_request(request: Request) -> Request:
    from .models import resolve_card
    from .outputs import guard_output

    updates: dict[str, Any] = {}
    if isinstance(request, ClassifyRequest):
        from .engine.classify import check_georeference
        from .engine.prompts import load_templates
        from .paths import templates_path

        out = _absolute(request.out, "out")
        model = _model_arg(request.model)
        card = resolve_card(model) if model else None
        index = _absolute(request.index, "index") if request.index is not None else None
        raster = _existing(request.raster, "raster")
        examples = validation.examples(_absolute(request.examples, "examples")) if request.examples else None
        info = None
        if card is None:  # no model named: the raster's default, as the engine picks it (the raster must open)
            info = _check_raster(request)
            card = _card_for(None, info)
        template_file = templates_path(request.templates or card.templates)
        load_templates(template_file)
        info = info or _check_raster(request)
        guard_output(out, [raster, template_file, examples, *info.files.values()], request.overwrite,
                     layer=request.layer, input_dirs=[card.path, index])
        check_georeference(info, request.pixel_space)
        _check_grid(info, request.tile_px or card.input.tile_px, request.stride, request.aoi, request.aoi_crs)
        updates = {"raster": str(raster), "out": str(out), "model": model}
        if request.examples is not None:
            updates["examples"] = str(examples)
        if request.class_map is not None:
            class_map = _absolute(request.class_map, "class_map")
            guard_output(class_map, [raster, template_file, examples, *info.files.values()], request.overwrite,
                         suffixes=(".tif", ".tiff"), what="class map", input_dirs=[card.path, index])
            updates["class_map"] = str(class_map)
        if index is not None:
            if index.exists() and not index.is_dir():
                raise ValueError(f"index must be a folder, got a file: {index}")
            updates["index"] = str(index)
    elif isinstance(request, IndexRequest):
        from .engine.classify import check_georeference

        model = _model_arg(request.model)
        card = resolve_card(model) if model else None
        rasters = []
        for n, r in enumerate(request.rasters):
            try:
                info = _check_raster(r, open_it=n < MAX_RASTERS_OPENED)
                if card is None:  # no model named: the first raster's default, as the index build picks it
                    card = _card_for(None, info)
                if info is not None:
                    check_georeference(info, request.pixel_space)
                    _check_grid(info, request.tile_px or card.input.tile_px, request.stride)
            except ValueError as e:
                raise ValueError(f"rasters[{n}]: {e}") from None
            rasters.append(r.model_copy(update={"raster": str(_absolute(r.raster, "raster"))}))
        updates = {"rasters": rasters, "model": model}
        if request.index is not None:
            index = _absolute(request.index, "index")
            if not index.parent.is_dir():
                raise ValueError(f"index folder's parent does not exist: {index.parent}")
            if index.exists() and not index.is_dir():
                raise ValueError(f"index must be a folder, got a file: {index}")
            updates["index"] = str(index)
    elif isinstance(request, SearchRequest):
        index = _existing(request.index, "index")
        given = [n for n, v in (("like", request.like), ("tile_ids", request.tile_ids), ("text", request.text))
                 if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one query: geometries (like), tile ids (tile_ids) or text"
                             + (f" (got {' and '.join(given)})" if given else ""))
        if request.text is not None and not request.text.strip():
            raise ValueError("text is empty: give a description to search for, e.g. \"river with sand banks\"")
        if request.like is not None and not request.like:
            raise ValueError("like is an empty list: give at least one WKT or GeoJSON geometry")
        if request.tile_ids is not None and not request.tile_ids:
            raise ValueError("tile_ids is an empty list: give at least one tile id")
        _check_crs(request.like_crs, "like_crs")
        from .index.store import IndexStore, guard_search_outputs

        out = _absolute(request.out, "out")
        heatmap = _absolute(request.heatmap, "heatmap") if request.heatmap is not None else None
        guard_search_outputs(IndexStore.open(index), out, heatmap, request.overwrite, request.layer,
                             query_raster=request.scene if request.query_model is not None else None)
        updates = {"index": str(index), "out": str(out)}
        if heatmap is not None:
            updates["heatmap"] = str(heatmap)
        if request.query_model is not None:
            _check_cross_modal(request, index, updates)
        else:
            _check_search_scene(request, index)
    elif isinstance(request, ChangeRequest):
        from .engine.classify import check_georeference
        from .engine.prompts import load_templates
        from .outputs import guard_gpkg_and_heatmap
        from .paths import templates_path

        model = _model_arg(request.model)
        card = resolve_card(model) if model else None
        dates, files = {}, []
        for name in ("before", "after"):
            r = getattr(request, name)
            try:
                _existing(r.raster, "raster")
                info = _check_raster(r)
                check_georeference(info, request.pixel_space)
                card = card or _card_for(None, info)  # no model named: the before raster's, as the engine picks
                _check_grid(info, request.tile_px or card.input.tile_px, request.stride)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            dates[name] = r.model_copy(update={"raster": str(_absolute(r.raster, "raster"))})
            files += [dates[name].raster, *info.files.values()]
        if Path(dates["before"].raster).resolve() == Path(dates["after"].raster).resolve() and \
                dates["before"].selected_band_map() == dates["after"].selected_band_map() and \
                dates["before"].level == dates["after"].level:
            raise ValueError("before and after are the same raster: give two dates of the same place")
        template_file = templates_path(request.templates) if request.templates is not None else None
        if template_file is not None:
            load_templates(template_file)
        index = _absolute(request.index, "index") if request.index is not None else None
        if index is not None and index.exists() and not index.is_dir():
            raise ValueError(f"index must be a folder, got a file: {index}")
        out = _absolute(request.out, "out")
        heatmap = _absolute(request.heatmap, "heatmap") if request.heatmap is not None else None
        guard_gpkg_and_heatmap(out, heatmap, [*files, template_file], request.overwrite, request.layer,
                               input_dirs=[index, card.path])
        updates = {**dates, "out": str(out), "model": model}
        if heatmap is not None:
            updates["heatmap"] = str(heatmap)
        if index is not None:
            updates["index"] = str(index)
    elif isinstance(request, FetchRequest):
        from .models.fetch import downloadable

        model = _model_arg(request.model)
        card = resolve_card(model)
        if not downloadable(card):
            raise ValueError(f"model {card.id!r} names no weights to download")
        updates = {"model": model}
    else:  # pragma: no cover - the schema's discriminator admits only these kinds
        raise ValueError(f"unknown job kind {getattr(request, 'kind', None)!r}")
    return request.model_copy(update=updates)


# ---------------------------------------------------------------------------------------------------------------
# Jobs


@dataclasses.dataclass
class Job:
    id: str
    request: Request
    created: str
    state: str = "queued"
    done: int = 0
    total: int = 0
    started: str | None = None
    finished: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    t_started: float | None = None  # perf_counter when it started running
    t_finished: float | None = None
    t_tiles: float | None = None  # perf_counter of the first tile progress
    stage: str | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    t_stage: float | None = None  # perf_counter when the current stage began
    bytes_at_stage: int = 0  # bytes already there when the stage began (a resumed download)

    def status(self) -> JobStatus:
        rate = eta = None
        now = self.t_finished or time.perf_counter()
        # tiles per second count from the start, or from the first tile when weights were downloaded first
        since = self.t_tiles if self.t_stage is not None else self.t_started
        if since is not None and self.done > 0:
            elapsed = now - since
            if elapsed > 0:
                rate = self.done / elapsed
                if self.state == "running" and self.total >= self.done:
                    eta = (self.total - self.done) / rate
        elif self.state == "running" and self.stage == DOWNLOADING and self.bytes_total and self.t_stage:
            elapsed, got = now - self.t_stage, self.bytes_done - self.bytes_at_stage
            if elapsed > 0 and got > 0:
                eta = (self.bytes_total - self.bytes_done) / (got / elapsed)
        return JobStatus(id=self.id, kind=self.request.kind, state=self.state, done=self.done, total=self.total,
                         rate=rate, eta_seconds=eta, stage=self.stage, bytes_done=self.bytes_done,
                         bytes_total=self.bytes_total, created=self.created, started=self.started,
                         finished=self.finished, result=self.result, error=self.error,
                         cancel_requested=self.cancel.is_set(), request=self.request.model_dump(mode="json"))


Handler = Callable[[Request, "JobContext"], Any]


@dataclasses.dataclass
class JobContext:
    """What a job handler gets besides its request: the service's device and the job's progress/cancel hooks."""

    device: str
    progress: Callable[[int, int], None]
    cancel: Callable[[], bool]


class JobQueue:
    """A FIFO of jobs run by one worker thread; thread-safe for any number of client threads."""

    def __init__(self, device: str = "auto", handlers: dict[str, Handler] | None = None,
                 max_finished: int = MAX_FINISHED_JOBS, max_queued: int = MAX_QUEUED_JOBS):
        self.device = device
        self.handlers = dict(HANDLERS if handlers is None else handlers)
        self.max_finished = max_finished
        self.max_queued = max_queued
        self.model_dirs: dict[str, str] = {}  # card folders used since start that list_models does not show
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._pending: list[str] = []
        self._running: Job | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._worker: threading.Thread | None = None

    # -- client side ------------------------------------------------------------------------------------------

    def submit(self, request: Request, check: bool = True) -> JobStatus:
        """Queue a job (after :func:`check_request` unless ``check`` is False); its status, state "queued"."""
        if self._closing:
            raise ShuttingDown("the service is shutting down and takes no new jobs")
        self._check_room()
        if check:
            request = check_request(request)
        self._remember_model_dir(getattr(request, "model", None))
        job = Job(id=uuid.uuid4().hex[:12], request=request, created=_now())
        with self._wake:
            if self._closing:
                raise ShuttingDown("the service is shutting down and takes no new jobs")
            self._check_room(locked=True)
            self._jobs[job.id] = job
            self._pending.append(job.id)
            self._forget_old()
            self._wake.notify_all()
            status = job.status()
        log.info("job %s %s queued (%d waiting)", job.id, request.kind, len(self._pending))
        return status

    def _check_room(self, locked: bool = False) -> None:
        """QueueFull when :attr:`max_queued` jobs are waiting (checked before and after the request's checks)."""
        waiting = len(self._pending) if locked else self.queue_length
        if waiting >= self.max_queued:
            raise QueueFull(f"the job queue is full ({waiting} jobs waiting, at most {self.max_queued}); "
                            "retry when some have finished, or cancel some")

    def get(self, job_id: str) -> JobStatus:
        with self._lock:
            return self._job(job_id).status()

    def jobs(self) -> list[JobStatus]:
        with self._lock:
            return [j.status() for j in self._jobs.values()]

    def cancel(self, job_id: str) -> JobStatus:
        """Queued: cancelled at once. Running: its cancel flag is set; the engine stops at its next batch."""
        with self._lock:
            job = self._job(job_id)
            if job.state == "queued":
                self._pending.remove(job.id)
                self._finish(job, "cancelled")
            elif job.state == "running" and not job.cancel.is_set():
                job.cancel.set()
                log.info("job %s cancel requested while running (%d/%d tiles)", job.id, job.done, job.total)
            return job.status()

    def cancel_all(self) -> None:
        """Stop taking jobs, cancel the queued ones and ask the running one to stop (shutdown, first step)."""
        with self._wake:
            self._closing = True
            for job_id in self._pending:
                self._finish(self._jobs[job_id], "cancelled")
            self._pending.clear()
            if self._running is not None:
                self._running.cancel.set()
                log.info("job %s cancel requested: the service is shutting down", self._running.id)
            self._wake.notify_all()

    @property
    def queue_length(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def running_job(self) -> str | None:
        with self._lock:
            return self._running.id if self._running is not None else None

    @property
    def closing(self) -> bool:
        return self._closing

    # -- lifecycle ----------------------------------------------------------------------------------------------

    @staticmethod
    def _model_cache():
        """The process-wide model cache, or None before any job has imported the models package (and torch)."""
        # getattr: another thread may be importing the module right now (it is in sys.modules half-initialised)
        return getattr(sys.modules.get("tileprompt_backend.models.cache"), "shared_models", None)

    def loaded_models(self) -> list[str]:
        """Ids of the models kept in memory between jobs."""
        cache = self._model_cache()
        return cache.loaded() if cache is not None else []

    def runner_providers(self) -> list[str]:
        """ONNX Runtime providers the kept runners' sessions actually got."""
        cache = self._model_cache()
        return cache.providers() if cache is not None else []

    def start(self) -> None:
        with self._lock:
            if self._worker is not None:
                return
            self._worker = threading.Thread(target=self._run, name="tileprompt-worker", daemon=True)
            self._worker.start()

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Cancel everything and wait up to ``timeout`` s for the worker to finish; True when it has."""
        self.cancel_all()
        worker = self._worker
        if worker is None:
            return True
        worker.join(timeout)
        if worker.is_alive():
            log.warning("worker still busy %.0f s after the cancel; leaving it", timeout)
            return False
        log.info("worker stopped")
        return True

    # -- worker side -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:  # import the engine and model families now rather than in the first job (seconds on a CPU)
            from . import engine  # noqa: F401
        except Exception:  # noqa: BLE001 - the first job will report the same error
            log.exception("importing the engine failed")
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return  # closing and nothing left
                job = self._jobs[self._pending.pop(0)]
                job.state, job.started, job.t_started = "running", _now(), time.perf_counter()
                self._running = job
            log.info("job %s %s running", job.id, job.request.kind)
            self._execute(job)

    def _execute(self, job: Job) -> None:
        from .engine import Cancelled
        from .models.progress import download_hooks

        def progress(done: int, total: int) -> None:
            with self._lock:
                if job.t_tiles is None:
                    job.t_tiles = time.perf_counter()
                job.stage = PROCESSING
                job.done, job.total = int(done), int(total)

        def stage(name: str, done: int, total: int | None) -> None:
            with self._lock:
                if name != job.stage:
                    job.stage, job.t_stage, job.bytes_at_stage = name, time.perf_counter(), int(done)
                job.bytes_done, job.bytes_total = int(done), total

        ctx = JobContext(device=self.device, progress=progress, cancel=job.cancel.is_set)
        state, result, error = "failed", None, None
        try:
            if job.cancel.is_set():
                raise Cancelled("cancelled before it started")
            # the job's model may still have to be downloaded: the status shows that stage, and a cancel stops it
            with download_hooks(progress=stage, cancel=job.cancel.is_set):
                result = summarise(self.handlers[job.request.kind](job.request, ctx))
            state = "succeeded"
        except Cancelled:
            state = "cancelled"
        except (ValueError, ResourceError) as e:  # a bad input, or the machine refused a write: the message says it
            error = _one_line(str(e)) or type(e).__name__
            log.info("job %s failed: %s", job.id, error)
        except Exception as e:  # noqa: BLE001 - any failure ends this job, never the worker
            error = _one_line(f"{type(e).__name__}: {e}")
            log.error("job %s failed: %s\n%s", job.id, error, traceback.format_exc().rstrip())
        with self._lock:
            job.result, job.error = result, error
            self._finish(job, state)
            self._running = None

    def _finish(self, job: Job, state: str) -> None:
        """Move a job to a final state (lock held)."""
        job.state, job.finished, job.t_finished = state, _now(), time.perf_counter()
        if state == "succeeded" and job.total:
            job.done = job.total
        took = f" in {job.t_finished - job.t_started:.2f} s" if job.t_started is not None else ""
        detail = f": {job.error}" if job.error else ""
        log.info("job %s %s %s%s (%d/%d tiles)%s", job.id, job.request.kind, state, took, job.done, job.total,
                 detail)

    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJob(job_id)
        return job

    def _forget_old(self) -> None:
        finished = [j.id for j in self._jobs.values() if j.state in FINAL_STATES]
        for job_id in finished[:max(0, len(finished) - self.max_finished)]:
            del self._jobs[job_id]

    def _remember_model_dir(self, model: str | None) -> None:
        if model and ("/" in model or "\\" in model):
            from .models import resolve_card

            try:
                card = resolve_card(model)
            except ValueError:
                return
            self.model_dirs[str(card.path)] = card.id


def _one_line(text: str) -> str:
    return " ".join(text.split())


def summarise(result: Any) -> dict[str, Any]:
    """An engine result (a dataclass) as JSON-ready data: paths as strings; the classify run row reduced to its id."""
    if result is None:
        return {}
    if isinstance(result, dict):
        data = dict(result)
    elif dataclasses.is_dataclass(result):
        data = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    else:
        data = {"value": result}
    run = data.pop("run", None)
    if isinstance(run, dict) and "run_id" in run:
        data["run_id"] = run["run_id"]
    if hasattr(result, "tiles_per_second"):
        data["tiles_per_second"] = result.tiles_per_second
    return _jsonable(data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# Handlers: request -> engine call


def run_classify(req: ClassifyRequest, ctx: JobContext):
    from .engine import classify

    return classify(req.raster, req.prompts, req.out, model=req.model, templates=req.templates, tile_px=req.tile_px,
                    stride=req.stride, aoi=req.aoi, aoi_crs=req.aoi_crs, multi_label=req.multi_label,
                    threshold=req.threshold, band_map=req.band_map, level=req.level, offset=req.offset,
                    batch_size=req.batch_size, runner=req.runner, device=ctx.device, progress=ctx.progress,
                    cancel=ctx.cancel,
                    index=req.index, cache=req.cache, date=req.date, overwrite=req.overwrite, layer=req.layer,
                    pixel_space=req.pixel_space, class_map=req.class_map, examples=req.examples,
                    context=req.context)


def _raster_arg(r: RasterInput):
    """A raster for build_index: its path, or a dict when it carries a band map, a date, a level or an offset."""
    if r.band_map is None and r.level is None and r.date is None and r.offset == "auto":
        return r.raster
    return r.model_dump(exclude_none=True)


def run_index(req: IndexRequest, ctx: JobContext):
    from .index import build_index

    return build_index([_raster_arg(r) for r in req.rasters], model=req.model, tile_px=req.tile_px,
                       stride=req.stride, index=req.index, device=ctx.device, runner=req.runner,
                       batch_size=req.batch_size, progress=ctx.progress, cancel=ctx.cancel,
                       pixel_space=req.pixel_space)


def run_search(req: SearchRequest, ctx: JobContext):
    from .index import search

    return search(req.index, like=req.like, like_crs=req.like_crs, tile_ids=req.tile_ids, scene=req.scene,
                  text=req.text, fuse=req.fuse, k=req.k, out=req.out, heatmap=req.heatmap, progress=ctx.progress,
                  cancel=ctx.cancel, device=ctx.device, overwrite=req.overwrite, layer=req.layer,
                  query_model=req.query_model, query_tile=req.query_tile)


def run_change(req: ChangeRequest, ctx: JobContext):
    from .index import change_search

    return change_search(_raster_arg(req.before), _raster_arg(req.after), out=req.out, heatmap=req.heatmap,
                         model=req.model, tile_px=req.tile_px, stride=req.stride, index=req.index,
                         prompts=req.prompts, became=req.became, templates=req.templates, k=req.k,
                         device=ctx.device, runner=req.runner, batch_size=req.batch_size, progress=ctx.progress,
                         cancel=ctx.cancel, overwrite=req.overwrite, layer=req.layer, pixel_space=req.pixel_space)


def run_fetch(req: FetchRequest, ctx: JobContext):
    from .models import fetch
    from .models.downloads import weights_state

    card = fetch(req.model)
    return {"model": card.id, "path": str(card.path), "weights": weights_state(card).describe()}


HANDLERS: dict[str, Handler] = {"classify": run_classify, "index": run_index, "search": run_search,
                                "change": run_change, "fetch": run_fetch}
