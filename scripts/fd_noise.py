"""How much does the benchmark's FD move with the sampling seed alone?

The bench scores every model on the same 2,000 noises (seed 0), so a difference between two
entries mixes the models' difference with the luck of that one draw. This script samples the
teacher with ``--seeds`` different seeds at each of several DDIM step counts (50 = the
teacher, 25 and 12 = the fewer-steps baseline at budgets 0.5 and 0.25) and records FD and
class accuracy per seed, their mean and standard deviation.

A difference between two bench entries smaller than about twice the per-seed standard
deviation is not evidence that one model is better. Much of that noise is shared by two
models sampled from the same noises, so ``--paired FILE`` compares this run seed by seed
with an earlier one (e.g. a compressed model against the teacher at fewer steps): the mean
and standard deviation of the per-seed FD differences, and how many seeds this run wins.

``--model`` is a shipped name, a model directory, or a bench entry of a reuse method
(``bench/digits/entries/dipgo@0.5.json``: the teacher ``--teacher`` plus the recorded plan).

Writes ``bench/digits/fd_noise.json`` (or ``--out``).

Usage: ``OMP_NUM_THREADS=1 python scripts/fd_noise.py [--seeds 5] [--steps 50,25,12]
[--model M] [--paired bench/digits/fd_noise.json] [--out FILE]``
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def paired(rows: list[dict], others: list[dict]) -> dict:
    """Per (this run's steps, the other run's steps): statistics of FD(this) - FD(other) over common seeds."""
    out = {}
    for mine in sorted({r["steps"] for r in rows}, reverse=True):
        for theirs in sorted({r["steps"] for r in others}, reverse=True):
            a = {r["seed"]: r["fd"] for r in rows if r["steps"] == mine}
            b = {r["seed"]: r["fd"] for r in others if r["steps"] == theirs}
            diffs = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
            if diffs:
                out[f"{mine} vs {theirs}"] = {
                    "diff_mean": statistics.mean(diffs), "diff_std": statistics.stdev(diffs) if len(diffs) > 1 else None,
                    "wins": sum(d < 0 for d in diffs), "seeds": len(diffs), "diffs": diffs}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="digits-dit", help="name, model directory or reuse bench entry (.json)")
    ap.add_argument("--teacher", default="digits-dit", help="the teacher a bench entry's plan applies to")
    ap.add_argument("--paired", help="an earlier fd_noise json to compare with, seed by seed")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", default="50,25,12")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "digits" / "fd_noise.json"))
    args = ap.parse_args()

    import slimdiff
    from slimdiff.bench import write_json
    from slimdiff.eval.evaluate import evaluate
    from slimdiff.eval.speed import environment

    if args.model.endswith(".json"):
        from slimdiff.bench import entry_model

        model = entry_model(json.loads(Path(args.model).read_text()), slimdiff.load(args.teacher)).eval()
    else:
        model = slimdiff.load(args.model).eval()
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        for seed in range(args.seeds):
            t0 = time.process_time()
            r = evaluate(model, samples=args.samples, steps=steps, seed=seed)
            rows.append({"steps": steps, "seed": seed, "fd": r["fd"], "class_acc": r["class_acc"],
                         "cpu_s": time.process_time() - t0})
            print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for steps in sorted({r["steps"] for r in rows}, reverse=True):
        fds = [r["fd"] for r in rows if r["steps"] == steps]
        summary[str(steps)] = {"fd_mean": statistics.mean(fds), "fd_std": statistics.stdev(fds) if len(fds) > 1 else None,
                               "fd_min": min(fds), "fd_max": max(fds)}
    out = {"model": args.model, "sampler": "ddim", "samples": args.samples, "cfg": 1.0, "rows": rows,
           "summary": summary, "environment": environment()}
    if args.paired:
        out["paired"] = {"against": args.paired, **paired(rows, json.loads(Path(args.paired).read_text())["rows"])}
    write_json(Path(args.out), out)
    print(json.dumps({k: out[k] for k in ("summary", "paired") if k in out}, indent=2))


if __name__ == "__main__":
    main()
