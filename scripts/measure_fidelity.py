"""The fidelity issues' measurements: each paper method with its published defaults against the
variants and baselines the issues name, on ``digits-dit``, seed-paired (``slimdiff bench``).

Each group is one bench directory under ``--out`` (default ``bench/fidelity``), because an
option such as ``importance=taylor-tp`` applies to every benched method that declares it;
the teacher's samples are shared through one sample cache, so the teacher is sampled once per
seed for all groups. Every entry is resumable: rerun the same command after an interruption.

Groups (``--groups``, default all, in this order):

- ``width``: diff-pruning (paper importance), taylor, magnitude-width, random-width, reinit, and
  scratch (Diff-Pruning's architecture trained from scratch with the teacher's recipe: 8000 steps)
- ``width-taylor-tp``: diff-pruning with ``importance=taylor-tp`` (``ddpm_prune.py``)
- ``depth``: tinyfusion (local N:M), bi-depth (reference), oracle-depth, first-depth, stride-depth
- ``depth-global``: tinyfusion with ``search_space=global`` (the earlier default)
- ``depth-scratch``: the depth students' architecture (first ``budget x depth`` blocks; every depth
  method's student has that shape) trained from scratch with the teacher's recipe, next to
  tinyfusion and first-depth, with paired verdicts against both
- ``reuse``: dipgo, deepcache-style, l2c, l2c-block, fewer-steps and diffusers' caches
- ``reuse-skip``: dipgo, deepcache-style, l2c, l2c-block with ``skip_reused_steps=1``
- ``dydit`` and ``dydit-old``: DyDiT with the reference recipe and with slimdiff's earlier one

Usage: ``OMP_NUM_THREADS=2 nohup python scripts/measure_fidelity.py [--groups width,depth]
[--samples 500] [--seeds 5] [--budgets 0.5,0.25] [--out bench/fidelity] > fidelity.log &``
Each group writes ``DIR/results.json`` and ``DIR/report.md`` (with the paired verdicts).
"""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OLD_DYDIT = {"token_router": "linear", "gate_tau": 1.0, "width_init_bias": 4.0, "token_init_bias": 4.0,
             "router_init": "zeros", "t_sampling": "uniform", "calibrate": True, "frozen_router_recovery": True}
GROUPS: dict[str, tuple[list[str], dict]] = {
    "width": (["diff-pruning", "taylor", "magnitude-width", "random-width", "reinit", "scratch"], {}),
    "width-taylor-tp": (["diff-pruning"], {"importance": "taylor-tp"}),
    "depth": (["tinyfusion", "bi-depth", "oracle-depth", "first-depth", "stride-depth"], {}),
    "depth-global": (["tinyfusion"], {"search_space": "global"}),
    "depth-scratch": (["tinyfusion", "first-depth", "scratch"], {"architecture": "first-depth"}),
    "reuse": (["dipgo", "deepcache-style", "l2c", "l2c-block", "fewer-steps", "fbcache", "taylorseer", "magcache",
               "pab", "fastercache"], {}),
    "reuse-skip": (["dipgo", "deepcache-style", "l2c", "l2c-block"], {"skip_reused_steps": True}),
    "dydit": (["dydit"], {}),
    "dydit-old": (["dydit"], OLD_DYDIT),
}
PAIRS: dict[str, list[tuple[str, str]]] = {"depth-scratch": [("tinyfusion", "scratch"), ("first-depth", "scratch")]}
"""Verdict pairs beyond the bench's default ones (a scratch entry's kind is width, so a depth method
is not paired with it by kind)."""


def main() -> None:
    from slimdiff.bench import Bench, BenchConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", default=",".join(GROUPS))
    ap.add_argument("--budgets", default="0.5,0.25")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--recover-steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "fidelity")
    args = ap.parse_args()
    names = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = sorted(set(names) - set(GROUPS))
    if unknown:
        ap.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    for name in names:
        methods, options = GROUPS[name]
        budgets = [float(b) for b in args.budgets.split(",")]
        pairs = [f"{a}@{b:g}:{c}@{b:g}" for a, c in PAIRS.get(name, []) for b in budgets]
        config = BenchConfig(model="digits-dit", budgets=budgets, methods=methods, samples=args.samples,
                             seeds=args.seeds, steps=args.steps, recover_steps=args.recover_steps, options=options,
                             pairs=pairs, progress=False)
        out = args.out / name
        print(f"== {name}: {', '.join(methods)} {options or ''} -> {out}", flush=True)
        bench = Bench(config, out, sample_cache=args.out / "samples")
        results = bench.run()
        for key, e in results["entries"].items():
            line = (f"skipped: {e['skipped']}" if e.get("skipped") else
                    f"MACs {e['macs_ratio']:.3f} (realised {e['macs_ratio_realised']:.3f}) "
                    f"FD {e['fd']:.2f} +- {e['fd_ci95'] or 0:.2f}")
            print(f"   {key}: {line}", flush=True)
        for pair in results["pairs"].values():
            print(f"   {pair['verdict']}", flush=True)


if __name__ == "__main__":
    main()
