"""How much does the benchmark's FD move with the sampling seed alone?

The bench scores every model on the same 2,000 noises (seed 0), so a difference between two
entries mixes the models' difference with the luck of that one draw. This script samples the
teacher with ``--seeds`` different seeds at each of several DDIM step counts (50 = the
teacher, 25 and 12 = the fewer-steps baseline at budgets 0.5 and 0.25) and records FD and
class accuracy per seed, their mean and standard deviation.

A difference between two bench entries smaller than about twice the per-seed standard
deviation is not evidence that one model is better.

Writes ``bench/digits/fd_noise.json``.

Usage: ``OMP_NUM_THREADS=1 python scripts/fd_noise.py [--seeds 5] [--steps 50,25,12]``
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="digits-dit")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", default="50,25,12")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "digits" / "fd_noise.json"))
    args = ap.parse_args()

    import slimdiff
    from slimdiff.bench import write_json
    from slimdiff.eval.evaluate import evaluate
    from slimdiff.eval.speed import environment

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
    write_json(Path(args.out), out)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
