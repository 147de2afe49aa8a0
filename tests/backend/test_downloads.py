"""models.downloads / transfer / sources: real downloads from a loopback HTTP server (plain URLs and the Hugging Face
/resolve/ protocol), resume, retries, digests, offline mode, progress and cancel - through fetch(), as users get them.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fileserver import FileServer
from tileprompt_backend.errors import Cancelled
from tileprompt_backend.models import download_hooks, fetch, load_model, read_card
from tileprompt_backend.models import transfer
from tileprompt_backend.models.downloads import read_sidecar, weights_state
from tileprompt_backend.models.sources import parse_source
from tileprompt_backend.models.weights import read_weights
from tileprompt_backend.paths import cache_dir

REPO_ID = "acme/tiny-clip"
REVISION = "c0ffee" * 6 + "c0ff"


def _publish(weights: dict, seed: int | None = None) -> bytes:
    """A plain pickled state dict, as RemoteCLIP and GeoRSCLIP publish theirs."""
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        weights = {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in weights.items()}
    buf = io.BytesIO()
    torch.save(weights, buf)
    return buf.getvalue()


@pytest.fixture
def zoo(tiny_models, tmp_path, monkeypatch):
    """A bundled tiny clip card whose weights are published on a loopback server; yields helpers."""
    resources = tmp_path / "resources" / "models"
    monkeypatch.setenv("TILEPROMPT_RESOURCES", str(resources.parent))
    monkeypatch.setenv("TILEPROMPT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TILEPROMPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(transfer, "BACKOFF_S", 0.01)
    weights = read_weights(tiny_models["clip"] / "model.safetensors")
    data = _publish(weights)
    with FileServer() as server:
        def card(source: dict, card_id: str = "tiny-zoo") -> Path:
            folder = resources / card_id
            shutil.copytree(tiny_models["clip"], folder, dirs_exist_ok=True)
            (folder / "model.safetensors").unlink(missing_ok=True)
            spec = json.loads((folder / "model.json").read_text())
            spec.update(id=card_id, trained=True, sources={"model.safetensors": source})
            (folder / "model.json").write_text(json.dumps(spec))
            return folder

        yield SimpleNamespace(server=server, data=data, weights=weights, card=card,
                              user=tmp_path / "home" / "models" / "tiny-zoo")


def _stages(events: list) -> list[str]:
    return list(dict.fromkeys(e[0] for e in events))


def _assert_loaded_equal(card_id: str, weights: dict) -> None:
    m = load_model(card_id, device="cpu")
    for k, v in m.image_tower.visual.state_dict().items():
        torch.testing.assert_close(v, weights[f"visual.{k}"])


def test_url_download_resumes_after_a_cancel(zoo):
    url = zoo.server.add("/ckpt/tiny.pt", zoo.data)
    zoo.card({"url": url, "convert": "torch-state-dict", "size": len(zoo.data)})
    zoo.server.faults.chunk, zoo.server.faults.throttle_s = 64 * 1024, 0.02
    events = []
    half = len(zoo.data) // 2
    with pytest.raises(Cancelled), download_hooks(progress=lambda *e: events.append(e),
                                                  cancel=lambda: events[-1][1] > half):
        fetch("tiny-zoo")
    parts = list((cache_dir() / "downloads").glob("*.part"))
    assert len(parts) == 1 and half < parts[0].stat().st_size < len(zoo.data)
    assert not zoo.user.exists()  # nothing that looks like a model
    kept = parts[0].stat().st_size
    zoo.server.faults.throttle_s = 0.0
    events.clear()
    with download_hooks(progress=lambda *e: events.append(e)):
        card = fetch("tiny-zoo")
    assert zoo.server.gets("/ckpt/tiny.pt")[-1].range == f"bytes={kept}-"  # continued, not restarted
    downloading = [e for e in events if e[0] == "downloading weights"]
    assert downloading[0][1] == kept and downloading[-1][1:] == (len(zoo.data), len(zoo.data))
    assert _stages(events) == ["downloading weights", "checking weights", "converting weights", "loading the model"]
    assert not list((cache_dir() / "downloads").iterdir())  # the download's file went into the card, converted
    _assert_loaded_equal(card.id, zoo.weights)


def test_cut_connections_are_retried_from_where_they_broke(zoo):
    url = zoo.server.add("/tiny.pt", zoo.data)
    zoo.card({"url": url, "convert": "torch-state-dict"})
    zoo.server.faults.chunk, zoo.server.faults.cut_after, zoo.server.faults.cut_times = 50_000, 120_000, 2
    fetch("tiny-zoo")
    gets = zoo.server.gets("/tiny.pt")
    assert [g.range for g in gets] == [None, "bytes=120000-", "bytes=240000-"]
    _assert_loaded_equal("tiny-zoo", zoo.weights)


def test_a_server_that_ignores_ranges_gets_a_fresh_start(zoo):
    url = zoo.server.add("/tiny.pt", zoo.data)
    zoo.card({"url": url, "convert": "torch-state-dict"})
    part = transfer.part_path(url, cache_dir() / "downloads")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage from another day")
    zoo.server.faults.ignore_range = True
    fetch("tiny-zoo")
    assert zoo.server.gets()[0].range == "bytes=24-"
    _assert_loaded_equal("tiny-zoo", zoo.weights)


def test_truncated_or_wrong_downloads_are_refused_and_leave_nothing(zoo):
    url = zoo.server.add("/tiny.pt", zoo.data)
    zoo.card({"url": url, "convert": "torch-state-dict", "size": len(zoo.data) + 10})
    with pytest.raises(ValueError, match="the card expects"):
        fetch("tiny-zoo")
    zoo.card({"url": url, "convert": "torch-state-dict"})
    zoo.server.faults.chunk, zoo.server.faults.cut_after, zoo.server.faults.cut_times = 10_000, 0, 99
    with pytest.raises(ValueError, match="failed after 5 tries without progress"):
        fetch("tiny-zoo")  # the server never sends a byte
    zoo.server.faults.cut_after = None
    zoo.card({"url": url, "convert": "torch-state-dict", "sha256": "ab" * 32})
    with pytest.raises(ValueError, match="checksum mismatch .*publisher's sha256 is abababab"):
        fetch("tiny-zoo")
    zoo.server.add("/tiny.pt", b"not a checkpoint" * 1000)
    zoo.card({"url": url, "convert": "torch-state-dict"})
    with pytest.raises(ValueError, match="not a usable torch-state-dict checkpoint"):
        fetch("tiny-zoo")
    assert not zoo.user.exists()
    assert not [p for p in (cache_dir() / "downloads").iterdir()]


def test_the_first_downloads_digest_is_recorded_and_enforced(zoo):
    url = zoo.server.add("/tiny.pt", zoo.data)
    zoo.card({"url": url, "convert": "torch-state-dict"})
    card = fetch("tiny-zoo")
    record = read_sidecar(card.file("model.safetensors"))
    assert record["sha256"] == hashlib.sha256(zoo.data).hexdigest() and record["location"] == url
    assert weights_state(read_card(card.path)).describe() == "downloaded"
    card.file("model.safetensors").unlink()  # e.g. deleted to save space; the record stays
    zoo.server.add("/tiny.pt", _publish(zoo.weights, seed=1))  # the publisher replaced the file since
    with pytest.raises(ValueError, match="changed since it was first downloaded"):
        fetch(card.path)
    assert not card.file("model.safetensors").exists()


def test_hugging_face_sources_use_the_hub_cache_token_mirror_and_offline_mode(zoo, monkeypatch, tmp_path):
    zoo.server.add_hf(REPO_ID, "ckpt/tiny.pt", zoo.data, revision=REVISION)
    zoo.card({"hf_repo": REPO_ID, "hf_file": "ckpt/tiny.pt", "revision": REVISION, "convert": "torch-state-dict"})
    monkeypatch.setenv("HF_ENDPOINT", zoo.server.endpoint)  # a mirror
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    events = []
    with download_hooks(progress=lambda *e: events.append(e)):
        card = fetch("tiny-zoo")
    gets = zoo.server.gets(f"/{REPO_ID}/resolve/{REVISION}/ckpt/tiny.pt")
    assert len(gets) == 1 and gets[0].authorization == "Bearer hf_secret"
    assert max(e[1] for e in events if e[0] == "downloading weights") == len(zoo.data)
    blobs = list((tmp_path / "hf").glob("models--acme--tiny-clip/blobs/*"))
    assert [b.name for b in blobs] == [hashlib.sha256(zoo.data).hexdigest()]  # huggingface_hub's own cache
    _assert_loaded_equal(card.id, zoo.weights)

    # offline with a complete cache: the card folder is rebuilt without a request
    shutil.rmtree(zoo.user)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(zoo.server.log)
    fetch("tiny-zoo")
    assert len(zoo.server.log) == n
    # offline with an empty cache: one clear message
    shutil.rmtree(zoo.user)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    with pytest.raises(ValueError) as err:
        fetch("tiny-zoo")
    assert "ckpt/tiny.pt of acme/tiny-clip is not in the Hugging Face cache" in str(err.value)
    assert "HF_HUB_OFFLINE" in str(err.value) and "\n" not in str(err.value)
    assert not zoo.user.exists()


def test_a_hub_file_that_does_not_match_its_listed_digest_is_refused(zoo, monkeypatch):
    zoo.server.add_hf(REPO_ID, "tiny.pt", zoo.data, etag="0" * 64)
    zoo.card({"hf_repo": REPO_ID, "hf_file": "tiny.pt", "convert": "torch-state-dict"})
    monkeypatch.setenv("HF_ENDPOINT", zoo.server.endpoint)
    with pytest.raises(ValueError, match="the Hub lists sha256 00000000"):
        fetch("tiny-zoo")
    assert not zoo.user.exists()


def test_source_validation_names_the_problem():
    where = "model 'x' source of model.safetensors"
    cases = [
        ({"url": "http://a/b"} | {"hf_repo": "a/b", "hf_file": "f"}, "either 'url' or 'hf_repo'"),
        ({"hf_repo": "not a repo", "hf_file": "f"}, "'owner/name'"),
        ({"url": "ftp://x/y"}, "http"),
        ({"url": "https://x/y", "revision": "main"}, "belong to a Hugging Face source"),
        ({"url": "https://x/y", "sha256": "xyz"}, "sha256 must be 8 to 64 hex"),
        ({"url": "https://x/y", "size": -3}, "size must be a positive"),
        ({"url": "https://x/y", "convert": "pickle"}, "unknown conversion 'pickle'"),
        ({"url": "https://x/y", "mirror": "z"}, "unknown source field"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError, match=message):
            parse_source(data, where)
    src = parse_source({"hf_repo": "a/b", "hf_file": "c.pt", "revision": REVISION, "sha256": "ABCDEF01"}, where)
    assert src.location == f"hf://a/b/c.pt@{REVISION}" and src.sha256 == "abcdef01" and src.pinned
