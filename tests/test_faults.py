"""Faults: ``kill -9`` at a seeded point of ``slimdiff finetune``, ``slimdiff compress
--method dipgo`` and a compress with ``--recover-steps``, then the same command again: it
resumes from the last checkpoint (finished work is not redone) and the result is
bit-identical to an uninterrupted run (CPU, same seed, same thread count).

A NaN/inf loss stopping a run with the last good checkpoint kept is covered by
``tests/test_train.py::test_nan_loss_stops_and_keeps_last_checkpoint`` and the ``nan-loss``
rows of ``tests/test_bad_input.py``.
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest
from conftest import cli_main, kill_at_checkpoint, tiny_dit

import slimdiff
from slimdiff.methods import dipgo as dipgo_module

BIN = Path(sys.executable).parent / "slimdiff"
KILL_POINTS = random.Random(10)  # seeded: the step after which each run is killed


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    """A tiny digits-shaped DiT saved as a slimdiff directory."""
    return str(slimdiff.save(tiny_dit(in_channels=1, learn_sigma=False), tmp_path_factory.mktemp("faults") / "m"))


def _comparable(doc):
    """A slimdiff.json without the timings (the only thing a resumed run may change)."""
    if isinstance(doc, dict):
        return {k: _comparable(v) for k, v in doc.items() if not re.search(r"cpu|seconds", k)}
    if isinstance(doc, list):
        return [_comparable(v) for v in doc]
    return doc


def _kill_and_rerun(monkeypatch, args, tmp_path: Path, work: str, target: int, total: int) -> int:
    """Run ``args`` uninterrupted (-o ref) and killed at checkpoint ``target``, then rerun the
    killed command; check the two results are identical and return the step killed at."""
    assert cli_main(monkeypatch, *args, "-o", str(tmp_path / "ref")) == 0
    run = tmp_path / "run"
    killed = kill_at_checkpoint([str(BIN), *args, "-o", str(run)], tmp_path / work.format(name="run"), target)
    assert target <= killed < total, f"the kill must land mid-run (last checkpoint {killed} of {total})"
    return killed


def _same_result(ref: Path, run: Path) -> None:
    assert (ref / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    docs = [_comparable(json.loads((d / "slimdiff.json").read_text())) for d in (ref, run)]
    assert docs[0] == docs[1]


def test_finetune_resumes_after_kill(student, tmp_path, monkeypatch, capsys):
    steps = 24
    args = ["finetune", "--model", student, "--steps", str(steps), "--batch-size", "8", "--checkpoint-every", "1",
            "--resume"]
    killed = _kill_and_rerun(monkeypatch, args, tmp_path, "{name}", KILL_POINTS.randint(3, 10), steps)
    capsys.readouterr()
    assert cli_main(monkeypatch, *args, "-o", str(tmp_path / "run")) == 0
    assert f"at step {killed}" in capsys.readouterr().out  # resumed, not restarted
    _same_result(tmp_path / "ref" / "model", tmp_path / "run" / "model")


def test_dipgo_search_resumes_after_kill(student, tmp_path, monkeypatch):
    steps = 30
    args = ["compress", "--method", "dipgo", "--model", student, "--budget", "0.7", "--steps", "4",
            "--opt-steps", str(steps), "--seed", "3"]
    killed = _kill_and_rerun(monkeypatch, args, tmp_path, ".{name}.work", KILL_POINTS.randint(3, 12), steps)
    real, calls = dipgo_module.dipgo_loss, []

    def counted(*a, **kw):  # the real loss, counted: how many optimisation steps the rerun does
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(dipgo_module, "dipgo_loss", counted)
    assert cli_main(monkeypatch, *args, "-o", str(tmp_path / "run")) == 0
    assert len(calls) == steps - killed
    _same_result(tmp_path / "ref", tmp_path / "run")
    assert not (tmp_path / ".run.work").exists()  # work is removed once the result is saved


def test_recovery_resumes_after_kill(student, tmp_path, monkeypatch, capsys):
    steps = 24  # recovery checkpoints every steps // 4
    args = ["compress", "--method", "magnitude-width", "--model", student, "--budget", "0.7", "--steps", "2",
            "--recover-steps", str(steps), "--batch-size", "8"]
    killed = _kill_and_rerun(monkeypatch, args, tmp_path, ".{name}.work", KILL_POINTS.choice([6, 12]), steps)
    capsys.readouterr()
    assert cli_main(monkeypatch, *args, "-o", str(tmp_path / "run")) == 0
    assert f"at step {killed}" in capsys.readouterr().out
    _same_result(tmp_path / "ref", tmp_path / "run")


def test_a_second_run_into_one_output_is_refused_at_start(student, tmp_path, monkeypatch, capsys):
    """While a run holds ``--out`` (its lock), another compress, bench or train into it stops at once
    with one line (exit 2) and writes nothing; the lock is gone when the holder ends."""
    from slimdiff.atomic import exclusive
    from slimdiff.bench import Bench, BenchConfig, run_bench
    from slimdiff.errors import UsageError

    out = tmp_path / "o"
    lock = tmp_path / ".o.lock"
    with exclusive(out, "test holder"):
        assert lock.exists()
        code = cli_main(monkeypatch, "compress", "--method", "first-depth", "--model", student, "-o", str(out))
        assert code == 2 and "in use by another slimdiff run" in capsys.readouterr().err
        with pytest.raises(UsageError, match="in use by another slimdiff run"):
            run_bench(BenchConfig(model=student, methods=["first-depth"], samples=4, steps=2, progress=False), out)
    # scripts drive a Bench directly (measure_fidelity): its entries are refused too while another process holds it
    bench_out = tmp_path / "b"
    bench = Bench(BenchConfig(model=student, methods=["first-depth"], samples=4, steps=2, progress=False), bench_out)
    with exclusive(bench_out, "test holder"):
        with pytest.raises(UsageError, match="in use by another slimdiff run"):
            bench.run_entries([("first-depth", 0.5)])
        with pytest.raises(UsageError, match="in use by another slimdiff run"):
            bench.run()
    with exclusive(out, "test holder"):
        code = cli_main(monkeypatch, "train", "--data", "digits", "--model", "DiT-M/2", "--steps", "1", "-o", str(out))
        assert code == 2 and "in use by another slimdiff run" in capsys.readouterr().err
    assert not out.exists() and not lock.exists()
    assert cli_main(monkeypatch, "compress", "--method", "first-depth", "--budget", "0.6", "--model", student,
                    "-o", str(out)) == 0
    assert not lock.exists() and (out / "slimdiff.json").is_file()
