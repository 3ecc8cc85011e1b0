"""Measure DiP-GO against its step-reuse baselines (issue 7); writes bench/dipgo/results.json + PNGs.

1. Quality at equal MACs (BENCHMARK.md section 1): on ``digits-dit`` (DDIM 50, CFG 1.5) at
   budgets 0.5 and 0.25, DiP-GO vs DeepCache-style reuse vs L2C-style router vs fewer steps:
   FD (digits judge), class accuracy, SSIM/PSNR to the teacher from the same noise, MACs ratio.
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

import torch

import slimdiff
from slimdiff.eval.evaluate import evaluate, generate
from slimdiff.eval.report import reuse_plan
from slimdiff.eval.speed import environment
from slimdiff.methods.base import Context, compress
from slimdiff.models.dit import DiT_models
from slimdiff.runtime.reuse import get_block_reuse

METHODS = ("dipgo", "deepcache", "l2c", "fewer-steps")


def teacher(quick: bool):
    if not quick:
        return slimdiff.load("digits-dit"), "digits-dit"
    torch.manual_seed(0)
    m = DiT_models["DiT-M/2"](input_size=8, in_channels=1, num_classes=10, learn_sigma=False).eval()
    with torch.no_grad():  # DiT's zero-initialised adaLN/output layers would make every sample identical
        for p in m.parameters():
            p.normal_(0, 0.5 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.02)
    return m, "random DiT-M/2 (quick)"


def quality(args, out: Path) -> dict:
    model, name = teacher(args.quick)
    res: dict = {"teacher": name, "sampler": "ddim", "steps": args.steps, "cfg": args.cfg, "samples": args.samples,
                 "budgets": {}}
    ref_x, _ = generate(model, args.samples, steps=args.steps, cfg=args.cfg)
    res["teacher_scores"] = evaluate(model, None, samples=args.samples, steps=args.steps, cfg=args.cfg)
    for budget in args.budgets:
        row = {}
        for method in METHODS:
            ctx = Context(sampler="ddim", steps=args.steps, cfg=args.cfg, progress=False, seed=0)
            opts = {"opt_steps": args.opt_steps} if method in ("dipgo", "l2c") else {}
            t0 = time.process_time()
            student = compress(model, method, budget, ctx, opts)
            cost = time.process_time() - t0
            from slimdiff.eval.evaluate import score

            x, y = generate(student, args.samples, steps=args.steps, cfg=args.cfg)
            s = score(student, x, y, model, steps=args.steps, cfg=args.cfg, reference_samples=ref_x)
            row[method] = {**{k: s[k] for k in ("fd", "class_acc", "ssim", "psnr", "macs_ratio")},
                           "compress_cpu_s": cost, "settings": student.slimdiff_meta["method"]["chain"][-1]["settings"]}
            reuse_plan(get_block_reuse(student).to_dict(), out / f"plan_{method}_{budget}.png", f"{method} @ {budget}")
        res["budgets"][str(budget)] = row
        res["fd_floor"] = s["fd_floor"]
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
