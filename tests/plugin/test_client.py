"""The backend client: answers, errors the user can read, and bounded waits when the backend is down or slow."""

import json
import socket
import threading
import time

import pytest
from qgis.PyQt.QtCore import QTimer

from conftest import wait_until
from tileprompt_plugin.plugin.client import (AsyncClient, BackendClient, BackendError, BackendUnavailable, Connection,
                                             error_message)
from tileprompt_plugin.plugin.jobs import (JobCancelled, JobFailed, JobSucceeded, describe_status, fraction_done,
                                           run_jobs)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def client(fake_backend):
    return BackendClient(Connection("127.0.0.1", fake_backend.port, fake_backend.token), timeout=5)


def test_health_and_models(client):
    assert client.health()["device"] == "cpu"
    assert [m["id"] for m in client.models()] == ["tiny-aligned-s2", "clip-vit-b32-openai"]


def test_a_wrong_token_says_to_attach_again(fake_backend):
    bad = BackendClient(Connection("127.0.0.1", fake_backend.port, "old-token"))
    with pytest.raises(BackendError) as info:
        bad.health()
    assert info.value.status == 401 and "attach again" in str(info.value)
    assert not isinstance(info.value, BackendUnavailable)


def test_a_bad_request_shows_the_backends_detail(client, tmp_path):
    with pytest.raises(BackendError) as info:
        client.submit({"kind": "classify", "raster": str(tmp_path / "nope.tif"), "prompts": "a", "out": "/o.gpkg"})
    assert info.value.status == 422 and "raster not found" in str(info.value) and "nope.tif" in info.value.detail


def test_validation_error_lists_become_one_line():
    body = json.dumps({"detail": [{"loc": ["body", "k"], "msg": "too big"}, {"loc": ["body"], "msg": "bad"}]})
    assert error_message(422, body, "Starting") == "Starting failed: k: too big; bad"
    assert error_message(500, b"", "Listing") == "Listing failed with HTTP 500"


def test_backend_down_fails_fast_with_a_clear_message():
    down = BackendClient(Connection("127.0.0.1", free_port(), "t"), timeout=5)
    start = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        down.health()
    assert time.monotonic() - start < 2
    assert "does not answer" in str(info.value) and "Start" in str(info.value)


def test_a_backend_that_hangs_is_given_up_after_the_timeout():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # accepts connections, never answers
    try:
        hung = BackendClient(Connection("127.0.0.1", server.getsockname()[1], "t"), timeout=0.5)
        start = time.monotonic()
        with pytest.raises(BackendUnavailable, match="no answer within 0.5 s"):
            hung.health()
        assert time.monotonic() - start < 3
    finally:
        server.close()


def test_state_file_errors(tmp_path):
    with pytest.raises(BackendUnavailable, match="does not exist"):
        Connection.from_state_file(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(BackendUnavailable, match="Cannot read"):
        Connection.from_state_file(tmp_path / "bad.json")
    (tmp_path / "short.json").write_text('{"host": "127.0.0.1"}')
    with pytest.raises(BackendUnavailable, match="lacks"):
        Connection.from_state_file(tmp_path / "short.json")
    (tmp_path / "ok.json").write_text('{"host": "::1", "port": 5, "token": "t", "pid": 999999999}')
    connection = Connection.from_state_file(tmp_path / "ok.json")
    assert connection.base_url == "http://[::1]:5" and connection.process_alive() is False


def test_async_client_never_blocks_the_event_loop():
    """Backend down: the callback reports it, and the event loop kept running meanwhile."""
    down = AsyncClient(Connection("127.0.0.1", free_port(), "t"), timeout=3)
    results, ticks = [], []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(5)
    start = time.monotonic()
    down.health(lambda data, error: results.append((data, error)))
    assert wait_until(lambda: results, 5)
    timer.stop()
    assert time.monotonic() - start < 3
    data, error = results[0]
    assert data is None and isinstance(error, BackendUnavailable) and "does not answer" in str(error)


def test_async_client_times_out_a_silent_server():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        client = AsyncClient(Connection("127.0.0.1", server.getsockname()[1], "t"), timeout=0.5)
        results = []
        client.health(lambda data, error: results.append(error))
        assert wait_until(lambda: results, 5)
        assert isinstance(results[0], BackendUnavailable) and "0.5 s" in str(results[0])
    finally:
        server.close()


def test_async_client_gets_json_and_errors(fake_backend):
    good = AsyncClient(Connection("127.0.0.1", fake_backend.port, fake_backend.token))
    bad = AsyncClient(Connection("127.0.0.1", fake_backend.port, "wrong"))
    results = {}
    good.models(lambda data, error: results.setdefault("good", (data, error)))
    bad.models(lambda data, error: results.setdefault("bad", (data, error)))
    assert wait_until(lambda: len(results) == 2, 5)
    assert len(results["good"][0]) == 2 and results["good"][1] is None
    assert results["bad"][0] is None and results["bad"][1].status == 401


def test_run_jobs_success_reports_progress(client, tmp_path, sample_files):
    seen = []
    request = {"kind": "classify", "raster": str(sample_files["s2"]), "prompts": "a\nb",
               "out": str(tmp_path / "o.gpkg")}
    outcome = run_jobs(client, [request], lambda: False, lambda i, n, s: seen.append(fraction_done(i, n, s)), 0.01)
    assert isinstance(outcome, JobSucceeded) and outcome.status["state"] == "succeeded"
    assert (tmp_path / "o.gpkg").is_file()
    assert seen == sorted(seen) and seen[-1] == 1.0


def test_run_jobs_chains_index_and_search(client, fake_backend, tmp_path, sample_files):
    index = {"kind": "index", "rasters": [{"raster": str(sample_files["s2"])}]}

    def search(statuses):
        return {"kind": "search", "index": statuses[-1]["result"]["index"], "text": "x", "k": 5,
                "out": str(tmp_path / "s.gpkg")}

    outcome = run_jobs(client, [index, search], lambda: False, poll_s=0.01)
    assert isinstance(outcome, JobSucceeded) and len(outcome.statuses) == 2
    assert fake_backend.requests[1]["index"] == outcome.statuses[0]["result"]["index"]


def test_run_jobs_failure_carries_the_backends_error(client, fake_backend, sample_files, tmp_path):
    fake_backend.fail_with = "raster has 3 bands, the model needs 13 (B01..B12)"
    request = {"kind": "classify", "raster": str(sample_files["s2"]), "prompts": "a", "out": str(tmp_path / "o.gpkg")}
    outcome = run_jobs(client, [request], lambda: False, poll_s=0.01)
    assert isinstance(outcome, JobFailed) and "model needs 13" in outcome.message


def test_run_jobs_cancel_cancels_on_the_backend(client, fake_backend, sample_files, tmp_path):
    fake_backend.hang = True
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    request = {"kind": "classify", "raster": str(sample_files["s2"]), "prompts": "a", "out": str(tmp_path / "o.gpkg")}
    start = time.monotonic()
    outcome = run_jobs(client, [request], cancel.is_set, poll_s=0.05)
    assert isinstance(outcome, JobCancelled) and outcome.status["state"] == "cancelled"
    assert time.monotonic() - start < 3
    assert any(method == "DELETE" for method, _ in fake_backend.calls)


def test_run_jobs_with_the_backend_gone_fails_cleanly():
    down = BackendClient(Connection("127.0.0.1", free_port(), "t"), timeout=2)
    outcome = run_jobs(down, [{"kind": "index", "rasters": []}], lambda: False)
    assert isinstance(outcome, JobFailed) and "does not answer" in outcome.message


def test_status_text():
    assert describe_status({"kind": "classify", "state": "queued"}) == "classify: queued"
    text = describe_status({"kind": "classify", "state": "running", "done": 10, "total": 288, "rate": 51.2,
                            "eta_seconds": 5.4})
    assert text == "classify: 10 / 288 tiles, 51 tiles/s, about 5 s left"
    assert fraction_done(1, 2, {"state": "running", "done": 5, "total": 10}) == 0.75
