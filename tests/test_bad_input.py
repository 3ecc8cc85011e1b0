"""Bad input: each row of :data:`CASES` is one mistake a user can make.

Through the Python API it must raise :class:`slimdiff.errors.UsageError` with a one-line
message naming the problem (the row's ``needle``) and the fix; through the command line
(``slimdiff.cli.main``, the console-script entry point, run in-process) it must exit with
code 2 and print exactly one line. A diverging run is not a usage error: it raises
``TrainingDiverged`` (CLI: one line, exit code 1). In every row nothing already on disk
is changed, removed or left half-written.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import cli_main, tiny_dit, tiny_unet

import slimdiff
from slimdiff.data.datasets import digits, get_dataset
from slimdiff.diffusion.sampling import sample
from slimdiff.errors import UsageError
from slimdiff.methods.base import Context, compress
from slimdiff.train.trainer import TrainConfig, TrainingDiverged, train

STEPS = 4  # the reuse plan's schedule


# --------------------------------------------------------------------------- shared models
@dataclass
class Env:
    """Saved tiny models the rows start from (read-only: rows copy what they change)."""

    dit: Path  # class-conditional, digits-shaped (1x8x8, 10 classes), 2 blocks
    wide: Path  # the same with width 48
    unet: Path  # unconditional UNet2DModel
    plan: Path  # ``dit`` with a DiP-GO reuse plan for ddim x STEPS


def _digits_dit(**kw):
    return tiny_dit(in_channels=1, learn_sigma=False, **kw)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("bad-input")
    dit = slimdiff.save(_digits_dit(), root / "dit")
    planned = compress(slimdiff.load(dit), "dipgo", 0.7, Context(steps=STEPS, progress=False), {"opt_steps": 1})
    return Env(dit=dit, wide=slimdiff.save(_digits_dit(hidden_size=48), root / "wide"),
               unet=slimdiff.save(tiny_unet(), root / "unet"), plan=slimdiff.save(planned, root / "plan"))


# --------------------------------------------------------------------------- row set-ups
def _copy(src: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(src, tmp / "model"))


def _edit_json(d: Path, fn: Callable[[dict], None]) -> Path:
    p = d / "slimdiff.json"
    doc = json.loads(p.read_text())
    fn(doc)
    p.write_text(json.dumps(doc))
    return d


def _truncated(env: Env, tmp: Path) -> Path:
    d = _copy(env.dit, tmp)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    return d


def _newer_format(env: Env, tmp: Path) -> Path:
    return _edit_json(_copy(env.dit, tmp), lambda doc: doc.update(format_version=99, slimdiff_version="9.0"))


def _foreign_weights(env: Env, tmp: Path) -> Path:
    """The wide model's weights under the narrow model's slimdiff.json (a mixed-up copy)."""
    arch = json.loads((env.dit / "slimdiff.json").read_text())
    return _edit_json(_copy(env.wide, tmp), lambda doc: doc.update(architecture=arch["architecture"],
                                                                   structure=arch["structure"]))


def _image_folder(tmp: Path, *, corrupt: bool = False) -> Path:
    from PIL import Image

    d = tmp / "images"
    d.mkdir()
    if corrupt:
        Image.new("L", (8, 8), 128).save(d / "ok.png")
        (d / "broken.png").write_bytes(b"\x89PNG not really")
    return d


def _foreign_dir(tmp: Path) -> Path:
    d = tmp / "holiday-photos"
    d.mkdir()
    (d / "notes.txt").write_text("not a slimdiff result")
    return d


def _under_a_file(tmp: Path) -> Path:
    (tmp / "a-file").write_text("x")
    return tmp / "a-file" / "out"


def _checkpointed_run(env: Env, tmp: Path) -> Path:
    cfg = TrainConfig(steps=1, batch_size=4, checkpoint_every=1, ema_decay=0.0)
    train(slimdiff.load(env.dit), digits("train"), cfg, tmp / "ft", progress=False)
    return tmp / "ft"


def _nan_latents(tmp: Path) -> Path:
    path = tmp / "nan.npz"
    np.savez(path, latents=np.full((8, 1, 8, 8), np.nan, np.float32), labels=np.arange(8) % 10)
    return path


def _compress(model: Path, method: str, out: Path, *extra: str, budget: str = "0.5") -> list[str]:
    return ["compress", "--method", method, "--model", str(model), "--budget", budget, "--steps", "2",
            "--batch-size", "4", "-o", str(out), *extra]


def _load(env: Env):
    return slimdiff.load(env.dit)


def _diverged(env: Env):
    model = _load(env)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = math.nan
    return model


# --------------------------------------------------------------------------- the table
@dataclass
class Case:
    """``run(env, tmp)`` prepares the row's files and returns argv (``cli``) or the API call."""

    id: str
    run: Callable[[Env, Path], Any]
    needle: str
    cli: bool = False
    error: type[Exception] = UsageError
    exit_code: int = 2


def C(id, argv, needle, exit_code=2) -> Case:
    return Case(id, argv, needle, cli=True, exit_code=exit_code)


def A(id, fn, needle, error=UsageError) -> Case:
    return Case(id, fn, needle, error=error)


CASES = [
    # budgets
    C("budget-0", lambda e, t: _compress(e.dit, "diff-pruning", t / "o", budget="0"), r"budget must be in \(0, 1\]"),
    C("budget-1.5", lambda e, t: _compress(e.dit, "diff-pruning", t / "o", budget="1.5"), r"budget must be in \(0, 1\]"),
    C("budget-negative", lambda e, t: _compress(e.dit, "diff-pruning", t / "o", budget="-1"), r"got -1\.0"),
    C("budget-text", lambda e, t: _compress(e.dit, "diff-pruning", t / "o", budget="abc"), "budget must be a number"),
    A("api-budget-0", lambda e, t: partial(compress, _load(e), "dipgo", 0, Context(steps=2, progress=False)), "budget"),
    # names
    C("unknown-method", lambda e, t: _compress(e.dit, "diff-prunning", t / "o"), "unknown method.*did you mean diff-pruning"),
    C("unknown-model", lambda e, t: ["sample", "--model", "DiT-Q/9", "-o", str(t / "g.png")], "cannot load 'DiT-Q/9'"),
    A("api-unknown-model", lambda e, t: partial(slimdiff.load, "digits-dti"), "did you mean digits-dit"),
    # methods that do not fit the model
    C("unet-to-tinyfusion", lambda e, t: _compress(e.unet, "tinyfusion", t / "o"), "removes transformer blocks"),
    C("unet-to-dydit", lambda e, t: _compress(e.unet, "dydit", t / "o"), "DyDiT routes.*UNet"),
    A("api-unet-to-tinyfusion",
      lambda e, t: partial(compress, tiny_unet(), "tinyfusion", 0.5, Context(steps=2, progress=False)), "tinyfusion removes"),
    C("step-gates-on-diff-pruning", lambda e, t: _compress(e.dit, "diff-pruning", t / "o", "--step-gates"),
      "step_gates do not apply to diff-pruning"),
    C("group-not-dividing-depth", lambda e, t: _compress(e.dit, "tinyfusion", t / "o", "--keep", "1:3"),
      "does not divide the depth 2"),
    C("group-n-above-m", lambda e, t: _compress(e.dit, "tinyfusion", t / "o", "--keep", "3:2"), "N > M"),
    C("recover-steps-on-reuse", lambda e, t: _compress(e.dit, "dipgo", t / "o", "--recover-steps", "2"),
      "--recover-steps does not apply to dipgo"),
    # data
    C("empty-image-folder", lambda e, t: ["train", "--data", str(_image_folder(t)), "--steps", "1"], "no PNG/JPEG images"),
    C("corrupt-image", lambda e, t: ["train", "--data", str(_image_folder(t, corrupt=True)), "--steps", "1"],
      "1 of 2 files .* not readable images .*broken.png"),
    A("api-corrupt-image", lambda e, t: partial(get_dataset, str(_image_folder(t, corrupt=True)), size=8), "broken.png"),
    A("api-unknown-data", lambda e, t: partial(get_dataset, "digts"), "unknown --data 'digts'"),
    # damaged or mismatched model files
    C("truncated-safetensors", lambda e, t: ["info", str(_truncated(e, t))], r"model\.safetensors is truncated"),
    A("api-truncated-safetensors", lambda e, t: partial(slimdiff.load, _truncated(e, t)), "truncated"),
    C("newer-format-version", lambda e, t: ["info", str(_newer_format(e, t))], "format_version 99.*upgrade slimdiff"),
    C("weights-of-another-architecture", lambda e, t: ["info", str(_foreign_weights(e, t))],
      "weights belong to a different architecture"),
    # sampling
    C("steps-0", lambda e, t: ["sample", "--model", str(e.dit), "--steps", "0", "-o", str(t / "g.png")],
      "steps must be a positive integer"),
    A("api-steps-0", lambda e, t: partial(sample, _load(e), steps=0), "steps must be a positive integer"),
    C("guidance-on-unconditional", lambda e, t: ["sample", "--model", str(e.unet), "--cfg", "2", "--steps", "1",
                                                 "-o", str(t / "g.png")], "needs a conditional model.*--cfg 1"),
    A("api-guidance-on-unconditional", lambda e, t: partial(sample, tiny_unet(), steps=1, cfg=1.5), "unconditional"),
    A("api-guidance-nan", lambda e, t: partial(sample, _load(e), steps=1, cfg=math.nan), "guidance scale must be a finite"),
    C("class-out-of-range", lambda e, t: ["sample", "--model", str(e.dit), "--classes", "3,10", "--steps", "1",
                                          "-o", str(t / "g.png")], r"class label\(s\) \[10\] out of range"),
    A("api-class-negative", lambda e, t: partial(sample, _load(e), steps=1, classes=[-1]), "out of range"),
    A("api-zero-samples", lambda e, t: partial(sample, _load(e), steps=1, num_samples=0), "number of samples"),
    C("plan-for-other-steps", lambda e, t: ["sample", "--model", str(e.plan), "--steps", "5", "-o", str(t / "g.png")],
      f"reuse plan was made for ddim x{STEPS} steps, not ddim x5"),
    A("api-plan-for-other-sampler", lambda e, t: partial(sample, slimdiff.load(e.plan), sampler="dpm", steps=STEPS),
      f"made for ddim x{STEPS} steps, not dpm x{STEPS}"),
    # devices
    C("unknown-device", lambda e, t: ["sample", "--model", str(e.dit), "--device", "gpu", "-o", str(t / "g.png")],
      "unknown device 'gpu'; use auto, cpu, cuda or cuda:N"),
    C("absent-gpu", lambda e, t: _compress(e.dit, "dipgo", t / "o", "--device", "cuda:99"), "device 'cuda:99'"),
    # outputs: nothing already there may be lost or half-written
    C("output-not-writable", lambda e, t: _compress(e.dit, "diff-pruning", _under_a_file(t)), "cannot write to .*a-file"),
    C("output-foreign-directory", lambda e, t: _compress(e.dit, "diff-pruning", _foreign_dir(t)), "never replaces it"),
    C("output-holds-a-different-result",
      lambda e, t: _compress(e.dit, "magnitude-width", _copy(e.dit, t), budget="0.9"), "already holds a different"),
    C("finetune-over-an-earlier-run", lambda e, t: ["finetune", "--model", str(e.dit), "--steps", "1",
                                                    "-o", str(_checkpointed_run(e, t))], "holds a checkpoint.*--resume"),
    A("api-load-none", lambda e, t: partial(slimdiff.load, None), "path_or_name = None is not a path or name"),
    A("api-load-nan", lambda e, t: partial(slimdiff.load, math.nan), "path_or_name = nan is not a path or name"),
    A("api-save-non-finite-weights", lambda e, t: partial(slimdiff.save, _diverged(e), t / "out"),
      "holds 1 non-finite value"),
    A("api-save-over-a-file", lambda e, t: partial(slimdiff.save, _load(e), _under_a_file(t).parent), "exists and is a file"),
    # command-line syntax (click's errors, one line too)
    C("steps-not-a-number", lambda e, t: ["sample", "--steps", "abc"], "Invalid value for '--steps'"),
    C("missing-output", lambda e, t: ["compress", "--method", "dipgo"], "Missing option '-o'"),
    # training
    A("api-nan-learning-rate", lambda e, t: partial(TrainConfig, lr=math.nan), "learning rate must be a finite number"),
    C("nan-loss", lambda e, t: ["finetune", "--model", str(e.dit), "--data", str(_nan_latents(t)), "--steps", "2",
                                "--batch-size", "4", "--checkpoint-every", "1", "-o", str(t / "ft")],
      "loss became NaN/inf.*last good checkpoint", exit_code=1),
    A("api-nan-loss", lambda e, t: partial(train, _load(e), get_dataset(str(_nan_latents(t))),
                                                  TrainConfig(steps=2, batch_size=4), t / "ft", progress=False), "NaN", error=TrainingDiverged),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_with_one_clear_line(case: Case, env: Env, tmp_path, capsys, monkeypatch):
    call = case.run(env, tmp_path)
    before = _snapshot(tmp_path)
    if case.cli:
        code = cli_main(monkeypatch, *call)
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == case.exit_code, err
        assert len(lines) == 1 and re.search(case.needle, lines[0]), err
        assert lines[0].startswith("error: ")
    else:
        with pytest.raises(case.error, match=case.needle) as raised:
            call()
        assert "\n" not in str(raised.value), raised.value
    after = _snapshot(tmp_path)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"files changed or lost: {changed}"
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name or ".probe-" in p.name], "half-written output left"


# --------------------------------------------------------------------------- accepted inputs
def test_budget_one_returns_the_model_unchanged(env):
    model = _load(env)
    ref = sample(model, steps=2, seed=0)
    opts = {"tinyfusion": {"search_steps": 1}, "dydit": {"train_steps": 1}, "dipgo": {"opt_steps": 1}}
    for method in ("diff-pruning", "tinyfusion", "dydit", "dipgo"):
        out = compress(model, method, 1.0, Context(steps=2, progress=False), opts.get(method))
        assert out.slimdiff_meta["measured"]["macs_ratio"] == 1.0, method
        assert torch.equal(sample(out, steps=2, seed=0), ref), method


def test_images_of_mixed_sizes_are_resized(tmp_path):
    from PIL import Image

    for i, size in enumerate([(8, 8), (20, 12), (5, 9)]):
        Image.new("RGB", size, (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    data = get_dataset(str(tmp_path), size=8)
    assert [tuple(data[i][0].shape) for i in range(3)] == [(3, 8, 8)] * 3
