"""Sampling MACs from one counted call, progress lines off a terminal, and the warning for a
result far below its budget (issue 23, item 6)."""
from __future__ import annotations

import io
import re
import time
import warnings

import pytest
import torch
from conftest import tiny_diffusers_dit, tiny_dit, tiny_unet

import slimdiff.diffusion.sampling as sampling
from slimdiff.eval.compute import count_macs, fixed_cost_per_call, macs_sampling
from slimdiff.methods.base import Context, compress
from slimdiff.result import record_of
from slimdiff.utils import ProgressTask, progress

MODELS = {"dit": tiny_dit, "diffusers-dit": tiny_diffusers_dit, "unet": tiny_unet}


def loop_macs(model, sampler: str, steps: int, cfg: float, batch: int) -> int:
    """MACs per image of the whole sampling loop, counted call by call (the reference)."""
    total = count_macs(sampling.sample, model, sampler=sampler, steps=steps, cfg=cfg, num_samples=batch, seed=0)
    return round(total / batch)


@pytest.fixture
def sample_calls(monkeypatch) -> list:
    """Records every call of ``sample`` that ``macs_sampling`` makes (the real loop)."""
    calls, real = [], sampling.sample

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample", spy)
    return calls


# --------------------------------------------------------------------------- MACs of a sampling run
@pytest.mark.parametrize("name,cfg", [("dit", 1.0), ("dit", 3.0), ("diffusers-dit", 1.0), ("diffusers-dit", 3.0),
                                      ("unet", 1.0)])  # the UNet is unconditional: no guidance
@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_static_model_is_priced_from_one_call_exactly(name, cfg, sampler, sample_calls):
    model = MODELS[name]()
    assert fixed_cost_per_call(model)
    fast = macs_sampling(model, sampler=sampler, steps=5, cfg=cfg, batch=2)
    assert not sample_calls  # no sampling loop ran
    assert fast == loop_macs(model, sampler, 5, cfg, 2)


def test_a_reuse_plan_goes_through_the_real_loop(sample_calls, tmp_path):
    model = tiny_dit()
    static = macs_sampling(model, steps=6)
    reused = compress(model, "fewer-steps", 0.5, Context(steps=6, progress=False, work_dir=tmp_path))
    assert not fixed_cost_per_call(reused)
    sample_calls.clear()
    macs = macs_sampling(reused, steps=6)
    assert len(sample_calls) == 1
    assert macs == loop_macs(reused, "ddim", 6, 1.0, 1) < static


def test_one_call_is_much_faster_than_the_loop():
    """Measured at 50 steps on the tiny DiT: about 20-40x here (printed with -s)."""
    model = tiny_dit()

    def seconds(fn) -> float:
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    fast = seconds(lambda: macs_sampling(model, steps=50))
    loop = seconds(lambda: loop_macs(model, "ddim", 50, 1.0, 1))
    print(f"macs_sampling at 50 steps: one call {fast * 1e3:.1f} ms, whole loop {loop * 1e3:.1f} ms, "
          f"{loop / fast:.1f}x")
    assert loop > 5 * fast


# --------------------------------------------------------------------------- progress off a terminal
class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


LINE = re.compile(r"demo: (\d+)/20 \((\d+)%\), \d+s elapsed, ETA \d+s")


def test_progress_prints_a_line_every_tenth_when_not_a_terminal():
    out = io.StringIO()
    assert list(progress(range(20), "demo", stream=out)) == list(range(20))
    lines = out.getvalue().splitlines()
    assert [int(LINE.fullmatch(line).group(1)) for line in lines] == list(range(2, 21, 2))
    assert lines[-1].startswith("demo: 20/20 (100%)")


def test_progress_lines_carry_the_note_and_follow_time_without_a_total():
    out = io.StringIO()
    with ProgressTask("train", stream=out, interval=0.0) as task:
        task.update(3, "loss 0.5")
        task.update(7, "loss 0.4")
    assert out.getvalue().splitlines() == ["train: 3, 0s elapsed | loss 0.5", "train: 7, 0s elapsed | loss 0.4"]
    resumed = io.StringIO()
    with ProgressTask("train", 100, start=40, stream=resumed) as task:
        for done in range(41, 101):
            task.update(done)
    assert [line.split(",")[0] for line in resumed.getvalue().splitlines()] == [
        f"train: {d}/100 ({d}%)" for d in range(50, 101, 10)]


def test_progress_on_a_terminal_is_a_bar():
    out = Terminal()
    with ProgressTask("demo", 20, stream=out) as task:
        assert task.bar is not None
        task.update(20)
    assert not LINE.search(out.getvalue())


def test_training_logs_lines_when_stdout_is_not_a_terminal(capsys, tmp_path):
    from slimdiff.compression.calibration import model_dataset
    from slimdiff.train.trainer import TrainConfig, train

    model = tiny_dit(in_channels=1)
    ctx = Context(steps=4, progress=True, work_dir=tmp_path)
    cfg = TrainConfig(steps=10, batch_size=4, log_every=1, checkpoint_every=10, lr_schedule="constant")
    train(model, model_dataset(model, ctx), cfg, tmp_path / "run", progress=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train: ")]
    assert [line.split(",")[0] for line in lines] == [f"train: {d}/10 ({10 * d}%)" for d in range(1, 11)]
    assert all(re.search(r"\| loss \d+\.\d{4} \| \d+ samples/s$", line) for line in lines)


# --------------------------------------------------------------------------- far below the budget
def _compress_warnings(model, method: str, budget: float, ctx: Context, settings: dict | None = None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compress(model, method, budget, ctx, settings)
    return result, [str(w.message) for w in caught if "below the budget" in str(w.message)]


def test_tinyfusion_far_below_the_budget_warns_with_the_reason(tmp_path):
    """On a 4-block DiT whose embedders cost 7%, 2 blocks cost 0.536 > 0.5 x 1.03: 1 block (0.304) is kept."""
    model = tiny_dit(depth=4, in_channels=1, patch_size=4)
    ctx = Context(steps=4, batch_size=8, progress=False, work_dir=tmp_path)
    result, messages = _compress_warnings(model, "tinyfusion", 0.5, ctx, {"search_steps": 2})
    ratio = record_of(result).result.measured["macs_ratio"]
    assert ratio == pytest.approx(0.304, abs=1e-3)
    assert messages == [f"the result costs {ratio:.3f} of the original's sampling MACs, more than 3% below the "
                        "budget 0.5 (tinyfusion: depth pruning keeps whole blocks: 1 of 4 cost 0.304 of its input's "
                        "sampling MACs, 2 would cost 0.536)"]


def test_deepcache_far_below_the_budget_warns_and_a_close_result_does_not():
    ctx = Context(steps=7, progress=False)
    result, messages = _compress_warnings(tiny_unet(), "deepcache", 0.4, ctx)
    assert record_of(result).result.measured["macs_ratio"] == pytest.approx(0.374, abs=1e-3)
    assert len(messages) == 1 and "deepcache: the interval is a whole number of calls: N=4 costs 0.374" in messages[0]
    assert "N=3 would cost 0.499" in messages[0]
    _, messages = _compress_warnings(tiny_unet(), "deepcache", 0.5, ctx)  # 0.499: within the tolerance
    assert messages == []


@pytest.mark.parametrize("method, budget, reason", [
    ("fewer-steps", 0.45, "fewer-steps: fewer-steps keeps whole steps: 2 of 6"),
    ("deepcache-style", 0.6, "deepcache-style: deepcache-style reuses runs of whole blocks every interval"),
])
def test_reuse_plans_far_below_the_budget_say_why(method, budget, reason):
    result, messages = _compress_warnings(tiny_dit(depth=2, in_channels=1), method, budget, Context(steps=6, progress=False))
    assert record_of(result).result.measured["macs_ratio"] < budget * 0.97
    assert len(messages) == 1 and reason in messages[0], messages


def test_a_learned_plan_far_below_its_budget_records_the_block_granularity():
    """DiP-GO / l2c-block end in ``finish``: a plan far below the budget records the size of one block call."""
    from slimdiff.compression.reuse_plans import finish, prepare
    from slimdiff.methods.base import BUDGET_NOTE

    model, ctx = tiny_dit(depth=2, in_channels=1), Context(steps=6, progress=False)
    costs = prepare(model, 0.9, ctx)
    compute = torch.zeros(6, 2, dtype=torch.bool)
    compute[0] = True  # only the first call computes: far below 0.9
    settings = record_of(finish(model, "dipgo", compute, ctx, costs, {}, {}, budget=0.9)).result.chain[-1].settings
    assert settings[BUDGET_NOTE].startswith("a reuse plan moves in whole block calls: one costs up to 0.")
    close = record_of(finish(model, "dipgo", torch.ones(6, 2, dtype=torch.bool), ctx, costs, {}, {}, budget=0.9))
    assert BUDGET_NOTE not in close.result.chain[-1].settings
