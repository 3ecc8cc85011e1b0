"""Resume is indistinguishable from an uninterrupted run (issue 24, "Resume and determinism").

A ``slimdiff`` subprocess is SIGKILLed at a checkpoint boundary of TinyFusion's search and
again mid-step of the shared recovery (or of ``slimdiff train``), then the same command is
rerun until it finishes; its saved tensors and ``slimdiff.json`` (probability history
included, CPU-second fields excluded) must equal an uninterrupted run's byte for byte. All
runs use one thread (the subprocesses get this process's thread count), so float reductions
match. The in-process test pins down the trainer's ``log``: the loss curve and a caller's
lists (as TinyFusion's probability history) hold every point after a resume.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_step, cli_main, tiny_dit

import slimdiff
from slimdiff.reproducible import is_time_key, without_times
from slimdiff.train.checkpoint import find_checkpoint

BIN = Path(sys.executable).parent / "slimdiff"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A tiny digits-shaped DiT of 4 blocks (two 1:2 groups for TinyFusion)."""
    return str(slimdiff.save(tiny_dit(in_channels=1, learn_sigma=False, depth=4), tmp_path_factory.mktemp("resume") / "m"))


def _same_result(ref: Path, run: Path) -> dict:
    """Assert ``run`` equals ``ref`` (tensor bytes, and JSON without CPU times); return ref's JSON."""
    assert (ref / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    docs = [json.loads((d / "slimdiff.json").read_text()) for d in (ref, run)]
    assert json.dumps(without_times(docs[0]), sort_keys=True) == json.dumps(without_times(docs[1]), sort_keys=True)
    return docs[0]


def _step_of(run_dir: Path, prefix: str) -> int:
    """The step of the newest complete checkpoint of the run folder under ``run_dir`` named ``prefix*``."""
    steps = [0]
    for d in run_dir.glob(f"{prefix}*") if run_dir.exists() else []:
        try:
            ckpt = find_checkpoint(d)
            steps.append(json.loads((ckpt / "state.json").read_text())["step"] if ckpt else 0)
        except (OSError, ValueError, KeyError):  # swapped out while we read
            pass
    return max(steps)


def _kill_when(cmd: list[str], ready, delay: float = 0.0, cwd: Path | None = None, timeout: float = 120.0) -> None:
    """Start ``cmd`` (in ``cwd``), SIGKILL it ``delay`` seconds after ``ready()`` first holds (or when it ends)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_tinyfusion_killed_in_search_and_recovery_matches_uninterrupted(teacher, tmp_path, monkeypatch, capsys):
    search, recover = 6, 40  # the search checkpoints every step, the recovery every 10 (steps // 4)
    args = ["compress", "--method", "tinyfusion", "--model", teacher, "--budget", "0.5", "--steps", "2",
            "--search-steps", str(search), "--recover-steps", str(recover), "--batch-size", "4", "--seed", "1"]
    assert cli_main(monkeypatch, *args, "-o", str(tmp_path / "ref")) == 0
    work = tmp_path / ".run.work"
    cmd = [str(BIN), *args, "-o", str(tmp_path / "run")]
    _kill_when(cmd, lambda: _step_of(work, "search-") >= 3)  # at a search checkpoint boundary
    assert 3 <= _step_of(work, "search-") < search, "the first kill must land inside the search"
    _kill_when(cmd, lambda: _step_of(work, "recover-") >= 10, delay=0.02)  # mid-step, well before the end
    assert _step_of(work, "search-") == search and _step_of(work, "recover-") < recover
    capsys.readouterr()
    assert cli_main(monkeypatch, *args, "-o", str(tmp_path / "run")) == 0
    assert "resumed from" in capsys.readouterr().out
    history = _same_result(tmp_path / "ref", tmp_path / "run")["extras"]["tinyfusion"]["probability_history"]
    assert history["steps"] == list(range(search + 1))  # every point, not only those after the resume


@pytest.mark.slow
def test_train_killed_mid_step_matches_uninterrupted(teacher, tmp_path, monkeypatch, capsys):
    steps = 40  # a checkpoint every 10: the kill lands well before the end, however fast the machine
    # the same relative -o in two folders: the record holds the command line, which must match
    args = ["train", "--model", teacher, "--steps", str(steps), "--batch-size", "4", "--checkpoint-every", "10",
            "--warmup", "3", "--resume", "-o", "out"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir(), run.mkdir()
    monkeypatch.chdir(ref)
    assert cli_main(monkeypatch, *args) == 0
    _kill_when([str(BIN), *args], lambda: checkpoint_step(run / "out") >= 10, delay=0.02, cwd=run)
    killed = checkpoint_step(run / "out")
    assert 10 <= killed < steps, "the kill must land mid-run"
    capsys.readouterr()
    monkeypatch.chdir(run)
    assert cli_main(monkeypatch, *args) == 0
    assert f"at step {killed}" in capsys.readouterr().out
    _same_result(ref / "out" / "model", run / "out" / "model")
    logs = [json.loads((find_checkpoint(d / "out") / "state.json").read_text())["info"]["log"] for d in (ref, run)]
    assert logs[0] == logs[1] and logs[0]["loss"]


def test_trainer_resume_keeps_loss_between_log_points_and_caller_log(tmp_path):
    """Checkpoints every 2 steps, logs every 3 (and at every checkpoint): interrupted after the
    checkpoint of step 2, the resumed run's loss curve and a caller's ``log`` list are the full ones."""
    from slimdiff.train.trainer import TrainConfig, train

    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-3, checkpoint_every=2, log_every=3, seed=5)

    def run(out: Path, stop_at: int | None = None) -> tuple[dict, dict]:
        model, log = tiny_dit(in_channels=1, learn_sigma=False).train(), {"seen": []}

        def begin(step: int) -> None:
            if step == stop_at:
                raise KeyboardInterrupt  # dies mid-run, after the checkpoint of step 2
            log["seen"].append(step)

        train(model, data, cfg, out, resume=True, progress=False, on_step_begin=begin, log=log)
        return model.state_dict(), log

    ref, ref_log = run(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", stop_at=3)
    got, got_log = run(tmp_path / "run")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert got_log == ref_log and ref_log["seen"] == list(range(6)) and [e[0] for e in ref_log["loss"]] == [2, 3, 4, 6]


def test_only_time_fields_are_left_out_of_the_comparison():
    record = {"measured": {"compress_cpu_s": 1.5, "recover_cpu_s": 2.0, "kept_blocks": [0, 2], "recover_steps": 4},
              "chain": [{"measured": {"search_cpu_s": 3.0, "cpu_seconds": 1.0, "macs_ratio": 0.5}}],
              "compress_wall_s": 9.0, "eval_wall_s": 1.0, "wall_ratio": 0.4, "samples_per_s": 10.0}
    assert without_times(record) == {"measured": {"kept_blocks": [0, 2], "recover_steps": 4},
                                      "chain": [{"measured": {"macs_ratio": 0.5}}],
                                      "samples_per_s": 10.0}
    assert not any(is_time_key(k) for k in ("cpu", "kd", "steps", "macs_sampling", "macs_ratio", "scpu_s"))


def test_rng_states_put_back_every_stream():
    from slimdiff.train.checkpoint import rng_states, set_rng_states

    gen = torch.Generator().manual_seed(3)
    saved = rng_states(torch.device("cpu"), data=gen)
    first = torch.rand(4), torch.rand(4, generator=gen)
    set_rng_states(saved, torch.device("cpu"), data=gen)
    again = torch.rand(4), torch.rand(4, generator=gen)
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and set(saved) == {"data", "torch"}


def test_rerunning_a_compress_into_its_output_is_accepted(tmp_path):
    """The same command into the same -o twice: only CPU seconds differ, so the second run is
    accepted (exit 0) instead of refused as "a different model"."""
    import slimdiff
    from conftest import tiny_dit
    from typer.testing import CliRunner

    from slimdiff.cli import app

    src = tmp_path / "tiny"
    slimdiff.save(tiny_dit(input_size=8, in_channels=1, learn_sigma=False, depth=4), src)
    args = ["compress", "--model", str(src), "--method", "first-depth", "--budget", "0.5", "--recover-steps", "2",
            "--batch-size", "4", "--steps", "3", "-o", str(tmp_path / "out")]
    for _ in range(2):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_dydit_killed_in_router_training_matches_uninterrupted(teacher, tmp_path, monkeypatch, capsys):
    """DyDiT's router training (the shared trainer with Gumbel gates, FLOPs target schedule and
    stratified timesteps) killed mid-step resumes to the uninterrupted run's bytes."""
    steps = 40  # checkpoints every steps // 4 = 10: the kill lands well before the end
    args = ["compress", "--method", "dydit", "--model", teacher, "--budget", "0.6", "--steps", "2",
            "--option", f"train_steps={steps}", "--option", "heldout_samples=2", "--batch-size", "4", "--seed", "1"]
    assert cli_main(monkeypatch, *args, "-o", str(tmp_path / "ref")) == 0
    work = tmp_path / ".run.work"
    _kill_when([str(BIN), *args, "-o", str(tmp_path / "run")], lambda: _step_of(work, "dydit-train-") >= 10,
               delay=0.02)
    assert 10 <= _step_of(work, "dydit-train-") < steps, "the kill must land inside the router training"
    capsys.readouterr()
    assert cli_main(monkeypatch, *args, "-o", str(tmp_path / "run")) == 0
    assert "resumed from" in capsys.readouterr().out
    _same_result(tmp_path / "ref", tmp_path / "run")


@pytest.mark.slow
def test_dipgo_killed_in_its_optimisation_matches_uninterrupted(teacher, tmp_path, monkeypatch):
    """DiP-GO's pruner optimisation (dropout and teacher trajectories from checkpointed RNGs)
    killed mid-step resumes to the uninterrupted run's plan and record, history included."""
    opt_steps = 40  # about 20 checkpoints per run: one every 2 steps
    args = ["compress", "--method", "dipgo", "--model", teacher, "--budget", "0.6", "--steps", "3",
            "--option", f"opt_steps={opt_steps}", "--seed", "1"]
    assert cli_main(monkeypatch, *args, "-o", str(tmp_path / "ref")) == 0
    work = tmp_path / ".run.work"
    _kill_when([str(BIN), *args, "-o", str(tmp_path / "run")], lambda: _step_of(work, "dipgo-") >= 10, delay=0.02)
    assert 10 <= _step_of(work, "dipgo-") < opt_steps, "the kill must land inside the optimisation"
    assert cli_main(monkeypatch, *args, "-o", str(tmp_path / "run")) == 0
    _same_result(tmp_path / "ref", tmp_path / "run")
