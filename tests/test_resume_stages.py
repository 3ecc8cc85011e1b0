"""Resume of Diff-Pruning's gradient pass and of DiP-GO's optimisation is bit-identical
(issue 24, "Resume and determinism").

Each stage is interrupted right after a checkpoint (in process: an exception raised from the
loss, the global RNG then scrambled), rerun, and compared with an uninterrupted run: the
pruned model's tensor bytes and its ``slimdiff.json`` without CPU seconds
(:func:`slimdiff.reproducible.without_times`), or the pruner and the full optimisation
history. A SIGKILLed ``slimdiff compress --method diff-pruning`` subprocess is resumed the same
way. Everything runs on the CPU with this process's thread count.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_step, cli_main, kill_at_checkpoint, tiny_dit

import slimdiff
from slimdiff.diffusion import losses
from slimdiff.errors import UsageError
from slimdiff.methods import diff_pruning as dp
from slimdiff.methods import dipgo as dipgo_module
from slimdiff.methods.base import Context
from slimdiff.reproducible import without_times

BIN = Path(sys.executable).parent / "slimdiff"
STRIDE, THRESHOLD, EVERY = 50, 0.05, 3  # 20 timesteps at most, a checkpoint every 3


class Interrupted(Exception):
    """Stands in for a crash mid-pass."""


def _count_losses(monkeypatch, module, name: str, stop_at: int | None = None) -> list[int]:
    """Wrap ``module.name`` (a loss) to count its calls and raise :class:`Interrupted` at call ``stop_at``."""
    real, calls = getattr(module, name), []

    def counted(*a, **kw):
        calls.append(1)
        if len(calls) == stop_at:
            raise Interrupted
        return real(*a, **kw)

    monkeypatch.setattr(module, name, counted)
    return calls


def _saved_files(out: Path) -> tuple[bytes, str]:
    """The saved tensors' bytes and the record without time fields."""
    doc = json.loads((out / "slimdiff.json").read_text())
    return (out / "model.safetensors").read_bytes(), json.dumps(without_times(doc), sort_keys=True)


def _saved(model, out: Path) -> tuple[bytes, str]:
    """:func:`_saved_files` of ``model`` saved to ``out``."""
    return _saved_files(slimdiff.save(model, out))


def _diff_pruning(work: Path | None):
    ctx = Context(data="digits", batch_size=4, steps=2, seed=2, progress=False, work_dir=work)
    return dp.diff_pruning(tiny_dit(in_channels=1, learn_sigma=False), 0.6, ctx, THRESHOLD, stride=STRIDE)


def test_diff_pruning_gradient_pass_resumes_bit_identical(tmp_path, monkeypatch):
    monkeypatch.setattr(dp, "CHECKPOINT_EVERY", EVERY)
    ref = _saved(_diff_pruning(None), tmp_path / "ref")  # no work dir: no checkpoints
    trace = json.loads(ref[1])["extras"]["diff-pruning"]["timesteps"]
    evaluated = len(trace["losses"])
    assert evaluated > 2 * EVERY + 1, "the pass must outlast two checkpoints for the test to mean anything"

    work = tmp_path / "work"
    calls = _count_losses(monkeypatch, losses, "diffusion_loss", stop_at=2 * EVERY + 2)
    with pytest.raises(Interrupted):
        _diff_pruning(work)
    assert checkpoint_step(work) == 2 * EVERY
    monkeypatch.undo()
    monkeypatch.setattr(dp, "CHECKPOINT_EVERY", EVERY)
    torch.manual_seed(12345)  # no global RNG state is needed: the pass draws none
    calls = _count_losses(monkeypatch, losses, "diffusion_loss")
    assert _saved(_diff_pruning(work), tmp_path / "run") == ref
    assert len(calls) == evaluated - 2 * EVERY  # continued at the next timestep, not from t = 0

    calls.clear()  # the finished pass is kept: a rerun (a crash in recovery) evaluates nothing
    assert _saved(_diff_pruning(work), tmp_path / "again") == ref and not calls


def test_diff_pruning_checkpoint_of_other_settings_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(dp, "CHECKPOINT_EVERY", EVERY)
    _diff_pruning(tmp_path)
    (state,) = tmp_path.glob("diff-pruning-grads-*/checkpoint/state.json")
    doc = json.loads(state.read_text())
    doc["info"]["key"]["threshold"] = 0.5
    state.write_text(json.dumps(doc))
    with pytest.raises(UsageError, match="other settings"):
        _diff_pruning(tmp_path)


@pytest.mark.slow
def test_diff_pruning_killed_in_gradient_pass_matches_uninterrupted(tmp_path, monkeypatch):
    student = str(slimdiff.save(tiny_dit(in_channels=1, learn_sigma=False), tmp_path / "m"))
    args = ["compress", "--method", "diff-pruning", "--model", student, "--budget", "0.6", "--steps", "2",
            "--threshold", "0", "--option", "stride=10", "--batch-size", "2", "--seed", "1"]
    total = 1000 // 10  # timesteps evaluated; the real CHECKPOINT_EVERY (50) in the subprocess
    assert cli_main(monkeypatch, *args, "-o", str(tmp_path / "ref")) == 0
    killed = kill_at_checkpoint([str(BIN), *args, "-o", str(tmp_path / "run")], tmp_path / ".run.work", 50)
    assert 50 <= killed < total, f"the kill must land inside the pass (last checkpoint {killed})"
    calls = _count_losses(monkeypatch, losses, "diffusion_loss")
    assert cli_main(monkeypatch, *args, "-o", str(tmp_path / "run")) == 0
    assert len(calls) == total - killed
    assert _saved_files(tmp_path / "ref") == _saved_files(tmp_path / "run")


def _dipgo(work: Path):
    """DiP-GO's optimisation alone (12 steps, a checkpoint every 4) on a tiny digits DiT."""
    from slimdiff.compression.reuse_plans import prepare
    from slimdiff.runtime.reuse import ReusePlan, apply_block_reuse

    model = tiny_dit(in_channels=1, learn_sigma=False)
    ctx = Context(steps=3, seed=4, progress=False, work_dir=work)
    costs = prepare(model, 0.6, ctx, False)
    apply_block_reuse(model, ReusePlan.full(ctx.sampler, ctx.steps, model))
    return dipgo_module.optimise(model, costs, 0.6, ctx, opt_steps=12, loss="ssim", checkpoint_every=4)


def test_dipgo_optimisation_resumes_bit_identical(tmp_path, monkeypatch):
    ref_pruner, ref_history = _dipgo(tmp_path / "ref")
    calls = _count_losses(monkeypatch, dipgo_module, "dipgo_loss", stop_at=7)  # after the checkpoint of step 4
    with pytest.raises(Interrupted):
        _dipgo(tmp_path / "run")
    assert checkpoint_step(tmp_path / "run") == 4
    monkeypatch.undo()
    torch.manual_seed(999)  # the checkpoint's RNG states, not the process's, drive the pruner's dropout
    calls = _count_losses(monkeypatch, dipgo_module, "dipgo_loss")
    pruner, history = _dipgo(tmp_path / "run")
    assert len(calls) == 12 - 4
    assert history == ref_history and [h["step"] for h in history] == list(range(12))
    ref_state, state = ref_pruner.state_dict(), pruner.state_dict()
    assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)
    rng = (tmp_path / "run").glob("dipgo-*/checkpoint/rng.safetensors")
    from safetensors.torch import load_file

    assert set(load_file(str(next(rng)))) == {"torch"}  # CPU run: no GPU stream to keep


def test_gradient_pass_of_a_text_model_checkpoints_its_caption_batch(tmp_path):
    """The resume key digests caption conditions too (a PixArt calibration batch is a TextCondition)."""
    import numpy as np

    from conftest import tiny_pixart

    rng = np.random.default_rng(0)
    data = tmp_path / "latents.npz"
    np.savez(data, latents=rng.standard_normal((8, 4, 8, 8)).astype(np.float32),
             encoder_hidden_states=rng.standard_normal((8, 8, 16)).astype(np.float32),
             encoder_attention_mask=np.ones((8, 8), dtype=np.int64))
    ctx = Context(data=str(data), batch_size=4, steps=2, seed=2, progress=False, work_dir=tmp_path / "work")
    first = dp.diff_pruning(tiny_pixart(), 0.7, ctx, THRESHOLD, stride=STRIDE)
    again = dp.diff_pruning(tiny_pixart(), 0.7, ctx, THRESHOLD, stride=STRIDE)  # from the finished checkpoint
    assert _saved(first, tmp_path / "a") == _saved(again, tmp_path / "b")
