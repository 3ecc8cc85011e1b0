"""The command line: help, sample, info --json, eval --json, and one-line usage errors (exit 2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slimdiff
from slimdiff.models.dit import DiT_models

BIN = Path(sys.executable).parent / "slimdiff"


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([str(BIN), *args], capture_output=True, text=True, env=env)
    if ok:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


@pytest.fixture(scope="module")
def tiny_digits_model(tmp_path_factory) -> Path:
    """A random DiT-M/2 of the digits shape, saved as a slimdiff directory."""
    torch.manual_seed(0)
    m = DiT_models["DiT-M/2"](input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
    path = tmp_path_factory.mktemp("cli") / "tiny"
    slimdiff.save(m, path)
    return path


def test_help_lists_commands():
    out = run("--help").stdout
    for cmd in ("sample", "info", "train", "finetune", "eval", "compress"):
        assert cmd in out


def test_sample_writes_a_grid(tiny_digits_model, tmp_path):
    out = tmp_path / "g.png"
    run("sample", "--model", str(tiny_digits_model), "--steps", "2", "--classes", "0,1,2", "-o", str(out))
    from PIL import Image

    assert Image.open(out).size[0] > 8


def test_info_json_counts_sampling_work(tiny_digits_model):
    info = json.loads(run("info", str(tiny_digits_model), "--steps", "4", "--json").stdout)
    assert {"params", "macs_forward", "macs_sampling"} <= set(info)
    assert info["macs_sampling"] == 4 * info["macs_forward"]
    info_cfg = json.loads(run("info", str(tiny_digits_model), "--steps", "4", "--cfg", "2", "--json").stdout)
    assert info_cfg["macs_sampling"] == 2 * info["macs_sampling"]  # guidance doubles the batch
    assert len(info["structure"]) == 6 and info["structure"][0]["heads"] == 4


def test_eval_json_has_the_protocol_metrics(tiny_digits_model):
    out = json.loads(run("eval", "--model", str(tiny_digits_model), "--reference", str(tiny_digits_model),
                         "--samples", "20", "--steps", "2", "--json").stdout)
    for key in ("fd", "fd_floor", "class_acc", "ssim", "psnr", "macs_ratio", "params"):
        assert key in out, key
    assert out["ssim"] == pytest.approx(1.0) and out["macs_ratio"] == 1.0


@pytest.mark.parametrize(
    "args, needle",
    [
        (("sample", "--model", "DiT-Q/9"), "cannot load"),
        (("sample", "--model", "digits-dit", "--classes", "0,x"), "--classes"),
        (("sample", "--model", "digits-dit", "--classes", "12", "--steps", "1"), "out of range"),
        (("sample", "--model", "digits-dit", "--steps", "0"), "steps"),
        (("sample", "--model", "digits-dit", "--sampler", "heun", "--steps", "1"), "unknown sampler"),
        (("info", "/nonexistent/model"), "cannot load"),
        (("compress", "--method", "nope", "--budget", "0.5", "-o", "/tmp/x"), "unknown method"),
        (("compress", "--method", "nope", "--budget", "abc", "-o", "/tmp/x"), "budget"),
        (("compress", "--method", "nope", "--budget", "1.5", "-o", "/tmp/x"), "budget"),
        (("train", "--data", "/nonexistent/folder", "--steps", "1"), "unknown --data"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(args, needle):
    p = run(*args, ok=False)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], p.stderr


def test_finetune_with_output_kd_saves_a_loadable_model(tiny_digits_model, tmp_path):
    out = tmp_path / "ft"
    run("finetune", "--model", str(tiny_digits_model), "--teacher", str(tiny_digits_model), "--kd", "output",
        "--steps", "2", "--batch-size", "8", "--checkpoint-every", "1", "-o", str(out))
    tuned = slimdiff.load(out / "model")
    assert tuned.slimdiff_meta["finetune"]["kd"] == "output"
    before = slimdiff.load(tiny_digits_model)
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), tuned.state_dict().values()))


def test_train_continues_a_saved_model(tiny_digits_model, tmp_path):
    """``train --model DIR`` continues that model (its size and diffusion config), not a fresh one."""
    run("train", "--data", "digits", "--model", str(tiny_digits_model), "--steps", "2", "--batch-size", "8",
        "--warmup", "1", "--ema", "0", "-o", str(tmp_path / "run"))
    before, after = slimdiff.load(str(tiny_digits_model)), slimdiff.load(str(tmp_path / "run" / "model"))
    assert before.state_dict().keys() == after.state_dict().keys()
    assert any(not torch.equal(before.state_dict()[k], v) for k, v in after.state_dict().items())
    assert after.slimdiff_meta["diffusion"] == before.slimdiff_meta["diffusion"]
