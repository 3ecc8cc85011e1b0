"""Every check that needs no model runs before the model is loaded (issue 24, "every check
before any work"), and the Python API refuses bad sampling arguments by name.

Each CLI row runs ``slimdiff.cli.main`` in-process with model loading replaced by a tripwire:
a row passes only if it exits with code 2 and one ``error:`` line naming the problem, without
loading a model, writing anything (no ``.OUT.work/``) or taking more than a few seconds.
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_main, tiny_dit

import slimdiff
from slimdiff.diffusion.sampling import sample
from slimdiff.errors import UsageError
from slimdiff.methods.base import Context, plan_chain


class ModelLoaded(BaseException):
    """Raised by the tripwire: nothing catches it, so a row that loads a model fails."""


@pytest.fixture(scope="module")
def dit(tmp_path_factory) -> Path:
    """A saved tiny class-conditional digits-shaped DiT (1x8x8, 10 classes, 1000 training timesteps)."""
    return slimdiff.save(tiny_dit(in_channels=1, learn_sigma=False), tmp_path_factory.mktemp("model") / "dit")


def _compress(model: Path, out: Path, *extra: str, method: str = "tinyfusion") -> list[str]:
    return ["compress", "--method", method, "--model", str(model), "--steps", "2", "-o", str(out), *extra]


def _existing_file(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("keep me")
    return tmp / "notes.txt"


ROWS = [  # (id, argv from (model, tmp), what the one line must say)
    ("keep-n-above-m", lambda m, t: _compress(m, t / "o", "--keep", "3:2"), "N > M"),
    ("keep-not-a-shape", lambda m, t: _compress(m, t / "o", "--keep", "abc"), "bad group shape 'abc'"),
    ("keep-option-not-a-shape", lambda m, t: _compress(m, t / "o", "--option", "keep=1:x", method="first-depth"),
     "bad group shape '1:x'"),
    ("kd-bogus", lambda m, t: _compress(m, t / "o", "--kd", "bogus"), "unknown --kd 'bogus'; choose one of none"),
    ("recover-steps-negative", lambda m, t: _compress(m, t / "o", "--recover-steps", "-5"),
     "--recover-steps must be an integer >= 0, got -5"),
    ("batch-size-zero", lambda m, t: _compress(m, t / "o", "--batch-size", "0"), "--batch-size must be an integer"),
    ("lr-nan", lambda m, t: _compress(m, t / "o", "--lr", "nan"), "--lr must be a finite number > 0"),
    ("unknown-sampler", lambda m, t: _compress(m, t / "o", "--sampler", "heun"), "unknown sampler 'heun'"),
    ("same-method-twice", lambda m, t: _compress(m, t / "o", method="dipgo+dipgo"), "dipgo named more than once"),
    ("same-method-twice-comma", lambda m, t: _compress(m, t / "o", method="dipgo,dipgo"), "named more than once"),
    ("two-reuse-methods", lambda m, t: _compress(m, t / "o", method="tinyfusion+dipgo+fewer-steps"),
     "2 reuse methods .*at most one reuse method"),
    ("option-not-an-int", lambda m, t: _compress(m, t / "o", "--option", "opt_steps=abc", method="dipgo"),
     "opt_steps must be an integer, got 'abc'"),
    ("dydit-option-checked", lambda m, t: _compress(m, t / "o", "--option", "train_steps=-1", method="dydit"),
     "train_steps must be >= 0"),
    # every method's option values (choices, ranges, syntax) are checked by its config, before loading
    *[(f"option-{method}-{opt.split('=')[0]}", (lambda m, t, method=method, opt=opt:
                                               _compress(m, t / "o", "--option", opt, method=method)), needle)
      for method, opt, needle in [
          ("dipgo", "postprocess=bogus", "unknown postprocess 'bogus'; choose one of search, greedy"),
          ("dipgo", "lr=0", "lr must be > 0, got 0"),
          ("diff-pruning", "threshold=2", "threshold must be >= 0 and <= 1, got 2"),
          ("diff-pruning", "importance=fisher", "unknown importance 'fisher'"),
          ("taylor", "stride=0", "stride must be >= 1"),
          ("bi-depth", "bi_variant=x", "unknown bi_variant 'x'; choose one of reference, noised"),
          ("oracle-depth", "keep_blocks=2,1", "keep_blocks must be increasing"),
          ("deepcache", "schedule=quad", "unknown schedule 'quad'"),
          ("l2c", "threshold=1", "threshold must be >= 0 and < 1, got 1"),
          ("fbcache", "calib_samples=0", "calib_samples must be >= 1, got 0"),
          ("pab", "timestep_low=900", "timestep_low .900. must be below timestep_high .800."),
          ("dydit", "token_router=conv", "unknown token_router 'conv'"),
          ("tinyfusion", "search_space=wide", "unknown search_space 'wide'"),
          ("scratch", "scratch_steps=0", "scratch_steps must be >= 1"),
      ]],
    ("dydit-then-l2c", lambda m, t: _compress(m, t / "o", method="dydit+l2c"),
     "l2c cannot run after dydit in a chain: DyDiT's routed blocks"),
    ("dydit-then-fbcache", lambda m, t: _compress(m, t / "o", method="dydit+fbcache"),
     "fbcache cannot run after dydit in a chain: .*would drop the routers"),
    ("out-is-the-input-model", lambda m, t: _compress(m, m, method="diff-pruning"), "is the input model directory"),
    ("sample-to-a-text-file", lambda m, t: ["sample", "--model", str(m), "-o", str(_existing_file(t))],
     r"extension '\.txt'.*\.png"),
    ("sample-to-a-directory", lambda m, t: ["sample", "--model", str(m), "-o", str(t)], "is a directory"),
    ("sample-to-proc", lambda m, t: ["sample", "--model", str(m), "-o", "/proc/x.png"], "cannot write -o /proc/x.png"),
    ("sample-under-a-file", lambda m, t: ["sample", "--model", str(m), "-o", str(_existing_file(t) / "g.png")],
     "cannot write -o"),
    ("sample-classes-text", lambda m, t: ["sample", "--model", str(m), "--classes", "1,x", "-o", str(t / "g.png")],
     "--classes must be comma-separated integers"),
    ("eval-grid-to-a-directory", lambda m, t: ["eval", "--model", str(m), "--grid", str(t)], "--grid .* is a directory"),
    ("train-mixed-precision", lambda m, t: ["train", "--mixed-precision", "bogus", "-o", str(t / "run")],
     "unknown --mixed-precision 'bogus'; choose one of no, fp16, bf16"),
    ("train-lr-zero", lambda m, t: ["train", "--lr", "0", "-o", str(t / "run")], "learning rate must be a finite"),
    ("finetune-mixed-precision", lambda m, t: ["finetune", "--model", str(m), "--mixed-precision", "fp8",
                                               "-o", str(t / "run")], "unknown --mixed-precision 'fp8'"),
    ("finetune-kd-bogus", lambda m, t: ["finetune", "--model", str(m), "--kd", "bogus", "-o", str(t / "run")],
     "unknown distillation mode 'bogus'"),
    ("compress-absent-gpu", lambda m, t: _compress(m, t / "o", "--device", "cuda:99"), "device 'cuda:99'"),
    ("sample-unknown-device", lambda m, t: ["sample", "--model", str(m), "--device", "gpu", "-o", str(t / "g.png")],
     "unknown device 'gpu'"),
    ("bench-kd-bogus", lambda m, t: ["bench", "--model", str(m), "--kd", "bogus", "-o", str(t / "bench")],
     "unknown --kd 'bogus'"),
    ("bench-recover-steps-negative", lambda m, t: ["bench", "--model", str(m), "--recover-steps", "-5",
                                                   "-o", str(t / "bench")], "--recover-steps must be an integer >= 0"),
    ("bench-option-not-an-int", lambda m, t: ["bench", "--model", str(m), "--methods", "dipgo",
                                              "--option", "opt_steps=abc", "-o", str(t / "bench")],
     "opt_steps must be an integer, got 'abc'"),
]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in root.rglob("*")}


@pytest.mark.parametrize("argv, needle", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_refused_before_the_model_is_loaded(argv, needle, dit, tmp_path, capsys, monkeypatch):
    args = argv(dit, tmp_path)
    before, model_before = _snapshot(tmp_path), _snapshot(dit)

    def tripwire(*a, **k):
        raise ModelLoaded(f"a model was loaded before the check: {a}")

    import slimdiff.models.registry as registry

    monkeypatch.setattr(slimdiff, "load", tripwire)
    monkeypatch.setattr(registry, "load_model", tripwire)
    start = time.monotonic()
    code = cli_main(monkeypatch, *args)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(needle, lines[0]), err
    assert _snapshot(tmp_path) == before and _snapshot(dit) == model_before, "something was written"
    assert not list(tmp_path.parent.glob(f"{tmp_path.name}/.*.work")), "a work directory was left"
    assert elapsed < 10, f"took {elapsed:.1f} s: the check should need no work"


def test_chains_run_in_kind_order_whatever_order_they_are_written_in():
    """``dydit+tinyfusion`` composes: depth pruning runs first, then the dynamic routing of the
    pruned model (a depth method after a dynamic one is never run)."""
    assert [s.name for s, _ in plan_chain("dydit+tinyfusion")] == ["tinyfusion", "dydit"]
    assert [s.name for s, _ in plan_chain("dipgo,diff-pruning,first-depth")] == ["first-depth", "diff-pruning", "dipgo"]


@pytest.mark.parametrize("kw, needle", [
    (dict(recover_steps=-5), "--recover-steps must be an integer >= 0"),
    (dict(recover_steps=1.5), "--recover-steps must be an integer"),
    (dict(kd="bogus"), "unknown --kd"),
    (dict(steps=0), "--steps must be an integer >= 1"),
    (dict(cfg=math.inf), "--cfg must be a finite number"),
    (dict(seed=math.nan), "--seed must be an integer"),
])
def test_context_checks_its_values(kw, needle):
    with pytest.raises(UsageError, match=re.escape(needle)):
        Context(**kw)


def test_plan_chain_refuses_negative_recovery():
    with pytest.raises(UsageError, match="--recover-steps must be an integer >= 0, got -5"):
        plan_chain("tinyfusion", {}, -5)


# --------------------------------------------------------------------------- CLI errors that need the model
def test_more_steps_than_the_model_was_trained_with(dit, tmp_path, capsys, monkeypatch):
    code = cli_main(monkeypatch, "sample", "--model", str(dit), "--steps", "1001", "-o", str(tmp_path / "g.png"))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "steps = 1001 is more than the 1000 timesteps" in lines[0]
    assert not (tmp_path / "g.png").exists()


def test_compress_for_more_steps_than_the_model_was_trained_with(dit, tmp_path, capsys, monkeypatch):
    code = cli_main(monkeypatch, *_compress(dit, tmp_path / "o", "--steps", "1001", method="dipgo"))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "steps = 1001 is more than the 1000 timesteps" in lines[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.work").exists()


def test_unlabelled_folder_on_a_class_conditional_model(dit, tmp_path, capsys, monkeypatch):
    from PIL import Image

    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), 40 * i).save(folder / f"{i}.png")
    code = cli_main(monkeypatch, "finetune", "--model", str(dit), "--data", str(folder), "--steps", "1",
                    "--batch-size", "2", "-o", str(tmp_path / "ft"))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "this folder has no class sub-folders; the model needs labels" in lines[0]
    assert "label -1" not in lines[0]

    from slimdiff.data.datasets import ImageFolder
    from slimdiff.train.trainer import TrainConfig, train

    with pytest.raises(UsageError, match="no class sub-folders; the model needs labels"):  # the Python API too
        train(slimdiff.load(dit), ImageFolder(folder, size=8, channels=1), TrainConfig(steps=1, batch_size=2),
              tmp_path / "api", progress=False)
    with pytest.raises(UsageError, match="unknown --mixed-precision 'fp8'"):
        TrainConfig(mixed_precision="fp8")


# --------------------------------------------------------------------------- Python API
@pytest.fixture(scope="module")
def model():
    return tiny_dit(in_channels=1, learn_sigma=False)


@pytest.mark.parametrize("kw, needle", [
    (dict(classes=[math.nan]), "classes must be integer class labels, got nan"),
    (dict(classes=[1.5]), "classes must be integer class labels, got 1.5"),
    (dict(classes=[1.0]), "classes must be integer class labels, got 1.0"),
    (dict(classes=[True]), "classes must be integer class labels, got True"),
    (dict(classes=torch.tensor([0.5])), "classes must be integer class labels"),
    (dict(seed=math.nan), "seed must be an integer, got nan"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(num_samples=2, noise=torch.randn(2, 1, 4, 4)), r"noise has shape \(2, 1, 4, 4\).* need \(2, 1, 8, 8\)"),
    (dict(num_samples=2, noise=torch.randn(3, 1, 8, 8)), r"noise has shape \(3, 1, 8, 8\)"),
    (dict(num_samples=1, noise=torch.full((1, 1, 8, 8), math.nan)), "noise holds NaN or inf"),
    (dict(num_samples=1, noise=[[0.0]]), "noise must be a floating-point tensor"),
    (dict(steps=1001), "steps = 1001 is more than the 1000 timesteps"),
])
def test_sample_refuses_bad_arguments_by_name(model, kw, needle):
    with pytest.raises(UsageError, match=needle) as raised:
        sample(model, steps=kw.pop("steps", 2), **kw)
    assert "\n" not in str(raised.value)


def test_sample_accepts_integer_labels_of_every_kind(model):
    import numpy as np

    ref = sample(model, steps=2, classes=[1, 7], seed=3)
    for classes in ([np.int64(1), np.int64(7)], torch.tensor([1, 7]), list(torch.tensor([1, 7]))):
        torch.testing.assert_close(sample(model, steps=2, classes=classes, seed=3), ref, rtol=0, atol=0)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(sample(model, steps=2, classes=[1, 7], noise=noise)).all()


def test_non_finite_weights_stop_sampling_naming_the_first_step(model):
    import copy

    broken = copy.deepcopy(model)
    with torch.no_grad():
        next(broken.parameters()).fill_(math.inf)
    with pytest.raises(UsageError, match=r"sampling produced NaN/inf at step 0 of ddim x3 \(timestep \d+\)"):
        sample(broken, steps=3, num_samples=2)


def test_option_bounds_are_enforced_for_every_config():
    """``option(...)`` bounds hold whoever builds the config: a method's own class, ``make_config``
    from the CLI's text, or a user's config registered without a ``__post_init__``."""
    from dataclasses import dataclass

    from slimdiff.methods.dipgo import DiPGOConfig
    from slimdiff.methods.spec import MethodSpec, option

    for bad, needle in ((dict(skip_reused_steps="yes"), "skip_reused_steps must be true or false"),
                        (dict(opt_steps=2.5), "opt_steps must be an integer, got 2.5"),
                        (dict(alpha=math.nan), "alpha must be a finite number, got nan"),
                        (dict(batch=0), "batch must be >= 1, got 0")):
        with pytest.raises(UsageError, match=re.escape(needle)):
            DiPGOConfig(**bad)

    @dataclass(frozen=True)
    class Mine:
        mode: str = option("a", "a or b", choices=("a", "b"))
        scale: float = option(1.0, "in (0, 2]", low=0, low_open=True, high=2)

    spec = MethodSpec("mine", "reuse", "a user's method", lambda m, b, c, cfg: m, Mine)
    assert spec.make_config({"mode": "b", "scale": 2}) == Mine("b", 2)
    with pytest.raises(UsageError, match="unknown mode 'c'; choose one of a, b"):
        spec.make_config({"mode": "c"})
    with pytest.raises(UsageError, match="scale must be > 0 and <= 2, got 0"):
        spec.make_config({"scale": 0})
