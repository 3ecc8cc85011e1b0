"""``slimdiff bench`` end to end on a tiny random digits-shaped DiT, including a resume after kill -9."""
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
from conftest import tiny_dit
from typer.testing import CliRunner

import slimdiff
from slimdiff.bench import BenchConfig, chain_verdicts, run_bench
from slimdiff.cli import app
from slimdiff.errors import UsageError

METHODS = ["magnitude-width", "first-depth", "dipgo", "first-depth+dipgo"]
FAST = dict(budgets=[0.5], samples=20, steps=3, recover_steps=2, batch_size=8, latency_batch=2, latency_repeats=1,
            options={"opt_steps": 2}, progress=False, seeds=2)
NUMBERS = ("macs_ratio", "fd", "class_acc", "ssim", "psnr", "params", "macs_sampling")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "teacher"
    slimdiff.save(tiny_dit(input_size=8, in_channels=1, learn_sigma=False, depth=4), path)
    return path


@pytest.fixture(scope="module")
def uninterrupted(teacher_dir, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench") / "full"
    return run_bench(BenchConfig(model=str(teacher_dir), methods=METHODS, **FAST), out), out


def test_bench_writes_every_entry_report_and_plots(uninterrupted):
    results, out = uninterrupted
    assert set(results["entries"]) == {f"{m}@0.5" for m in METHODS} and results["pending"] == []
    for key, e in results["entries"].items():
        assert not e.get("skipped"), key
        assert 0 < e["macs_ratio"] <= 0.5 * 1.03, key  # the budget is met, measured end to end
        assert e["fd"] > 0 and 0 <= e["class_acc"] <= 1 and e["compress_cpu_s"] >= 0 and e["wall_ratio"] > 0
        assert e["pictures"] and all((out / p).stat().st_size > 0 for p in e["pictures"]), key
    assert results["entries"]["magnitude-width@0.5"]["recover_steps"] == 2
    assert results["environment"]["libraries"]["torch"] and results["teacher"]["fd_floor"] > 0
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["entries"]["dipgo@0.5"]["fd"] == results["entries"]["dipgo@0.5"]["fd"]
    report = (out / "report.md").read_text()
    assert all(f"| {m}@0.5 |" in report for m in METHODS) and "## Chains" in report
    for name in ("pareto.png", "samples.png"):
        assert (out / name).stat().st_size > 1000
    chain = results["chains"]["first-depth+dipgo@0.5"]
    singles = [e["fd"] for k, e in results["entries"].items() if "+" not in k]
    assert chain["beats_every_single"] == (chain["fd"] < min(singles))


def test_bench_resumes_after_kill_and_matches_uninterrupted(teacher_dir, uninterrupted, tmp_path):
    results, _ = uninterrupted
    out = tmp_path / "resumed"
    script = (f"import torch; torch.set_num_threads(1)\n"
              f"from slimdiff.bench import BenchConfig, run_bench\n"
              f"run_bench(BenchConfig(model={str(teacher_dir)!r}, methods={METHODS!r}, **{FAST!r}), {str(out)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = out / "entries" / f"{METHODS[0]}@0.5.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the bench died before finishing its first entry"
    kept = first.read_text()
    # the interrupted entry's time so far (written by the killed attempt, or none yet), plus a
    # marker of 1000 s: the resumed entry reports the sum over its attempts
    spent = out / "work" / f"{METHODS[1]}@0.5" / "spent.json"
    before = json.loads(spent.read_text()) if spent.exists() else {"cpu_s": 0.0, "wall_s": 0.0}
    spent.parent.mkdir(parents=True, exist_ok=True)
    spent.write_text(json.dumps({k: v + 1000.0 for k, v in before.items()}))
    resumed = run_bench(BenchConfig(model=str(teacher_dir), methods=METHODS, **FAST), out)
    assert first.read_text() == kept  # finished work is kept, not recomputed
    second = resumed["entries"][f"{METHODS[1]}@0.5"]
    assert second["compress_cpu_s"] >= before["cpu_s"] + 1000 and second["compress_wall_s"] >= 1000
    assert not spent.parent.exists()  # the work directory goes once the entry is written
    assert set(resumed["entries"]) == set(results["entries"])
    for key, e in results["entries"].items():
        for field in NUMBERS:
            assert resumed["entries"][key][field] == e[field], (key, field)


def test_a_reuse_entry_rebuilds_its_student_from_the_record(teacher_dir, uninterrupted):
    """The teacher plus the entry's recorded plan samples what the bench scored; a weight-changing
    entry cannot be rebuilt from its record and says so."""
    from safetensors.torch import load_file

    from slimdiff.bench import entry_model
    from slimdiff.eval.compute import macs_sampling
    from slimdiff.eval.evaluate import generate

    results, out = uninterrupted
    teacher = slimdiff.load(teacher_dir).eval()
    entry = results["entries"]["dipgo@0.5"]
    student = entry_model(entry, teacher)
    assert macs_sampling(student, sampler="ddim", steps=3) == entry["macs_sampling"] < macs_sampling(teacher, steps=3)
    x, _ = generate(student, FAST["samples"], sampler="ddim", steps=3, seed=0)
    saved = load_file(out / "samples" / "dipgo@0.5.safetensors")["x"]
    torch.testing.assert_close(x[: len(saved)], saved, rtol=0, atol=0)
    with pytest.raises(UsageError, match="only reuse entries"):
        entry_model(results["entries"]["magnitude-width@0.5"], teacher)


def test_run_entries_for_a_script(teacher_dir, uninterrupted, tmp_path):
    """A script's entries (:meth:`Bench.run_entries`, a teacher passed in) give the numbers of the
    same entries of a full bench; ``save_models`` keeps the student; a rerun reads the entry back
    and ``fresh`` starts over."""
    from slimdiff.bench import Bench, entry_key, entry_scores
    from slimdiff.result import record_of

    results, _ = uninterrupted
    config = BenchConfig(model="in memory", methods=["dipgo"], **FAST)
    bench = Bench(config, tmp_path / "b", slimdiff.load(teacher_dir), save_models=True)
    key = entry_key("dipgo", 0.5)
    entry = bench.run_entries([("dipgo", 0.5)])[key]
    for field in NUMBERS:
        assert entry[field] == results["entries"][key][field], field
    scores = entry_scores(entry)
    assert scores["fd"] == entry["fd"] and not {"chain", "extras", "pictures", "method"} & set(scores)
    saved = record_of(slimdiff.load(bench.model_dir(key))).result
    assert [e.to_dict() for e in saved.chain] == entry["chain"] and saved.measured["macs_ratio"] == entry["macs_ratio"]
    path = tmp_path / "b" / "entries" / f"{key}.json"
    stamp = path.stat().st_mtime_ns
    again = Bench(config, tmp_path / "b", slimdiff.load(teacher_dir)).run_entries([("dipgo", 0.5)])[key]
    assert again == entry and path.stat().st_mtime_ns == stamp
    Bench(config, tmp_path / "b", fresh=True)
    assert not path.exists() and (tmp_path / "b" / "bench.json").exists()
    with pytest.raises(UsageError, match="unknown method"):
        bench.run_entries([("no-such", 0.5)])


def test_bench_refuses_a_directory_of_other_settings(teacher_dir, uninterrupted):
    _, out = uninterrupted
    with pytest.raises(UsageError, match="other settings.*samples"):
        run_bench(BenchConfig(model=str(teacher_dir), methods=METHODS, **{**FAST, "samples": 10}), out)


def test_bench_reports_a_method_that_does_not_apply(tmp_path):
    """A 1-block model has nothing to depth-prune: the entry says so instead of crashing the bench."""
    path = tmp_path / "teacher"
    slimdiff.save(tiny_dit(input_size=8, in_channels=1, learn_sigma=False, depth=1), path)
    results = run_bench(BenchConfig(model=str(path), methods=["first-depth"], **FAST), tmp_path / "out")
    assert "block" in results["entries"]["first-depth@0.5"]["skipped"]
    assert "skipped" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("kwargs, message", [
    (dict(budgets=[0]), "budget must be in"),
    (dict(budgets=["abc"]), "budget must be a number"),
    (dict(methods=["no-such"]), "unknown method"),
    (dict(methods=["first-depth+nope"]), "unknown method"),
    (dict(samples=0), "--samples"),
    (dict(options={"no_such": 1}), "no_such are not an option of any method"),
    (dict(options={"opt_steps": "many"}), "opt_steps must be an integer"),
])
def test_bench_bad_settings(kwargs, message, teacher_dir, tmp_path):
    with pytest.raises(UsageError, match=message):
        run_bench(BenchConfig(model=str(teacher_dir), **{**FAST, "methods": METHODS, **kwargs}), tmp_path / "b")


def test_chain_verdict_compares_with_the_best_single_at_its_budget():
    entries = {"a@0.5": {"method": "a", "budget": 0.5, "fd": 3.0}, "b@0.5": {"method": "b", "budget": 0.5, "fd": 2.0},
               "b@0.25": {"method": "b", "budget": 0.25, "fd": 1.0},
               "a+b@0.5": {"method": "a+b", "budget": 0.5, "fd": 2.5}}
    verdict = chain_verdicts(entries)["a+b@0.5"]
    assert verdict["best_single"] == "b@0.5" and verdict["best_single_fd"] == 2.0
    assert verdict["beats_every_single"] is False


def test_cli_bench_json_reads_back_a_finished_run(teacher_dir, uninterrupted):
    """Rerunning the CLI on a finished directory recomputes nothing and prints the table."""
    results, out = uninterrupted
    cli = CliRunner().invoke(app, ["bench", "--model", str(teacher_dir), "--budgets", "0.5", "--methods",
                                   ",".join(METHODS), "--samples", "20", "--steps", "3", "--recover-steps", "2",
                                   "--batch-size", "8", "--option", "opt_steps=2", "--seeds", "2", "-o", str(out), "--json"])
    assert cli.exit_code == 0, cli.output
    rows = {r["entry"]: r for r in json.loads(cli.stdout.strip().splitlines()[-1])["rows"]}
    assert rows["dipgo@0.5"]["fd"] == results["entries"]["dipgo@0.5"]["fd"]


def test_a_bench_table_is_generated_from_its_results(uninterrupted):
    """scripts/readme_bench.py's table holds every entry of the results file, with its interval."""
    from slimdiff.eval.report import README_END, README_START, _with_interval, readme_block

    results, _ = uninterrupted
    block = readme_block(results, "bench/x")
    assert block.startswith(README_START) and block.endswith(README_END)
    for key, e in results["entries"].items():
        assert f"| {key} |" in block and (e.get("skipped") or f"| {_with_interval(e, 'fd')} |" in block), key
        assert e.get("skipped") or "+-" in _with_interval(e, "fd"), key  # two seeds: an interval


def test_entries_are_scored_on_paired_seeds(uninterrupted):
    """Every entry holds its per-seed values, their mean and interval; the teacher's samples of
    every seed are cached; the named pairs carry seed-paired differences and a verdict line."""
    from slimdiff.eval.stats import summary

    results, out = uninterrupted
    assert results["teacher"]["seeds"] == [0, 100_003] and (out / "teacher_samples_s1.safetensors").exists()
    for key, e in results["entries"].items():
        assert e["seeds"] == results["teacher"]["seeds"], key
        assert len(e["fd_seeds"]) == 2 and e["fd"] == pytest.approx(summary(e["fd_seeds"])["mean"]), key
        assert e["fd_ci95"] == pytest.approx(summary(e["fd_seeds"])["ci95"]) and e["fd_ci95"] > 0, key
        assert 0 < e["macs_ratio_realised"] <= 0.5 * 1.1 and 0 < e["params_ratio"] <= 1, key
    pair = results["pairs"]["first-depth+dipgo@0.5 vs dipgo@0.5"]
    chain, single = results["entries"]["first-depth+dipgo@0.5"], results["entries"]["dipgo@0.5"]
    assert pair["diff_seeds"] == pytest.approx([a - b for a, b in zip(chain["fd_seeds"], single["fd_seeds"])])
    assert "dipgo@0.5 vs magnitude-width@0.5" not in results["pairs"]  # not the same kind
    assert results["entries"]["first-depth@0.5"]["kept_blocks"] == [0, 1]
    report = (out / "report.md").read_text()
    assert "## Verdicts (FD, paired over 2 seeds" in report and pair["verdict"] in report


def test_seed_zero_is_the_single_seed_protocol(teacher_dir, uninterrupted, tmp_path):
    """A 1-seed bench scores exactly the first seed of a multi-seed one (labels i % K, same noise)."""
    results, _ = uninterrupted
    one = run_bench(BenchConfig(model=str(teacher_dir), methods=["dipgo"], **{**FAST, "seeds": 1}), tmp_path / "one")
    assert one["entries"]["dipgo@0.5"]["fd"] == results["entries"]["dipgo@0.5"]["fd_seeds"][0]
    assert one["entries"]["dipgo@0.5"]["fd_ci95"] is None


def test_long_recovery_entries_and_shared_sample_cache(teacher_dir, tmp_path):
    """With long_recover_steps a static entry runs twice (keyed /rN), a reuse entry once; a
    shared sample cache serves the teacher's samples to a second bench directory."""
    from slimdiff.bench import Bench

    config = BenchConfig(model=str(teacher_dir), methods=["first-depth", "dipgo"], long_recover_steps=3,
                         **{**FAST, "seeds": 1})
    cache = tmp_path / "cache"
    results = run_bench(config, tmp_path / "a", sample_cache=cache)
    assert set(results["entries"]) == {"first-depth@0.5", "first-depth@0.5/r3", "dipgo@0.5"}
    assert results["entries"]["first-depth@0.5/r3"]["recover_steps"] == 3
    assert results["entries"]["first-depth@0.5"]["recover_steps"] == 2
    cached = sorted(cache.iterdir())
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    Bench(config, tmp_path / "b", sample_cache=cache).teacher()
    assert cached[0].stat().st_mtime_ns == stamp and not (tmp_path / "b" / "teacher_samples.safetensors").exists()
    with pytest.raises(UsageError, match="long-recover-steps"):
        BenchConfig(recover_steps=5, long_recover_steps=5)
    with pytest.raises(UsageError, match="--seeds"):
        BenchConfig(seeds=0)


def test_a_run_that_lists_fewer_entries_keeps_the_earlier_ones_in_the_report(teacher_dir, uninterrupted, tmp_path):
    """Another budget or method set in a bench directory of the same protocol: the report shows the
    earlier entries next to this run's (so a run with one budget cannot drop the other's from
    results.json), and pending counts only this run's entries."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(uninterrupted[1], out)
    before = json.loads((out / "results.json").read_text())
    results = run_bench(BenchConfig(model=str(teacher_dir), methods=["dipgo"], **FAST), out)
    assert set(results["entries"]) == set(before["entries"]) and results["pending"] == []
    assert results["entries"]["first-depth@0.5"] == before["entries"]["first-depth@0.5"]
    assert "first-depth@0.5" in (out / "report.md").read_text()
