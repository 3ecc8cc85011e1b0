"""Measure DiP-GO against its step-reuse baselines (issue 7); writes bench/dipgo/results.json + PNGs.

1. Quality at equal MACs (BENCHMARK.md section 1, run by :class:`slimdiff.bench.Bench`): on
   ``digits-dit`` (DDIM 50) at budgets 0.5 and 0.25, DiP-GO vs DeepCache-style reuse vs
   L2C-style router vs fewer steps: FD (digits judge), class accuracy, SSIM/PSNR to the
   teacher from the same noise, MACs ratio. The bench's own files go to ``OUT/bench``.
2. Speed (section 2): :func:`slimdiff.eval.speed.method_speed`, the one speed bench of every
   method (``slimdiff bench-speed``), restricted to DiP-GO.
3. The plans drawn as steps x blocks heat maps.

``--quick``: a random-init DiT-M/2 on 8x8x1 stands in for the teacher (FD numbers then only
prove the pipeline runs), 10 steps, few samples; the quick speed bench for speed.
Run: ``OMP_NUM_THREADS=1 python scripts/measure_dipgo.py [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import slimdiff
from slimdiff.bench import Bench, BenchConfig, entry_key, entry_scores
from slimdiff.eval.models import build_model
from slimdiff.eval.report import reuse_plan
from slimdiff.eval.speed import environment

METHODS = ("dipgo", "deepcache-style", "l2c-block", "fewer-steps")


def teacher(quick: bool):
    if not quick:
        return slimdiff.load("digits-dit"), "digits-dit"
    # normal init: DiT's zero-initialised adaLN/output layers would make every sample identical
    model = build_model("DiT-M/2", 8, init="normal", in_channels=1, num_classes=10, learn_sigma=False)
    return model, "random DiT-M/2 (quick)"


def quality(args, out: Path) -> dict:
    """Section 1: the bench protocol (:class:`slimdiff.bench.Bench`, fresh in ``OUT/bench``) on
    the four methods at every budget; the plans drawn as ``plan_<method>_<budget>.png``."""
    model, name = teacher(args.quick)
    config = BenchConfig(model=name, budgets=args.budgets, methods=list(METHODS), samples=args.samples,
                         steps=args.steps, cfg=args.cfg, recover_steps=0, options={"opt_steps": args.opt_steps},
                         progress=False, device="cpu")
    bench = Bench(config, out / "bench", model, fresh=True)
    teacher_scores = entry_scores(bench.teacher()[1])
    entries = bench.run_entries()
    res: dict = {"teacher": name, "sampler": "ddim", "steps": args.steps, "cfg": args.cfg, "samples": args.samples,
                 "budgets": {}, "teacher_scores": teacher_scores}
    for budget in args.budgets:
        row = {}
        for method in METHODS:
            e = entries[entry_key(method, budget)]
            row[method] = {**{k: e[k] for k in ("fd", "class_acc", "ssim", "psnr", "macs_ratio")},
                           "compress_cpu_s": e["compress_cpu_s"], "settings": e["chain"][-1]["settings"]}
            reuse_plan(e["extras"][method], out / f"plan_{method}_{budget}.png", f"{method} @ {budget}")
        res["budgets"][str(budget)] = row
    res["fd_floor"] = teacher_scores["fd_floor"]
    return res


def speed(args) -> dict:
    """Section 2: the shared speed bench (:mod:`slimdiff.eval.speed`, as ``slimdiff bench-speed``) on DiP-GO."""
    from slimdiff.eval.speed import method_speed

    return method_speed("dipgo", args.quick, repeats=args.repeats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench/dipgo"))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--opt-steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    args.samples = args.samples or (40 if args.quick else 2000)
    args.steps = args.steps or (10 if args.quick else 50)
    args.opt_steps = args.opt_steps if args.opt_steps is not None else (2 if args.quick else 30)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = {"quick": args.quick, "load_average": os.getloadavg(), "environment": environment(),
           "quality": quality(args, args.out), "speed": speed(args)}
    res["wall_s"] = time.time() - t0
    res["load_average_end"] = os.getloadavg()
    (args.out / "results.json").write_text(json.dumps(res, indent=2, default=float))
    print(json.dumps({"budgets": res["quality"]["budgets"], "speed": [
        {k: e[k] for k in ("model", "theoretical_speedup", "measured_speedup", "realisation", "met")}
        for e in res["speed"]["entries"]]}, indent=1, default=float))


if __name__ == "__main__":
    main()
