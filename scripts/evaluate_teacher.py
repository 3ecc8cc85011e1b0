"""Evaluate a shipped teacher (issue 3's acceptance) and write ``bench/teacher/results.json``.

Usage: ``python scripts/evaluate_teacher.py [--model digits-dit] [--samples 1000] [--cfgs 1.0,1.5]
[--seeds 0,1,2] [--out DIR]``; ``--out`` defaults to ``bench/teacher`` for ``digits-dit`` and to
``bench/teacher-<name>`` for another model (``bench/teacher-mnist-dit``). FD and class accuracy
use the judge of the shipped data set whose images the model makes (digits or mnist).
Every guidance scale is evaluated at the first seed (DDIM 50 steps); the default scale of
``slimdiff eval`` is then evaluated at every seed to report FD's spread over seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import slimdiff
from slimdiff.data.datasets import builtin_for_shape
from slimdiff.eval.evaluate import evaluate
from slimdiff.eval.judge import judge_info
from slimdiff.models.backbone import as_backbone
from slimdiff.result import record_of

BENCH = Path(__file__).resolve().parent.parent / "bench"


def provenance() -> dict:
    """Library versions, machine and git commit (:func:`slimdiff.eval.speed.environment`), load and time."""
    from slimdiff.eval.speed import environment

    return {**environment(), "slimdiff": slimdiff.__version__, "load_average": os.getloadavg(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="digits-dit")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--cfgs", default="1.0,1.5")
    ap.add_argument("--default-cfg", type=float, default=1.0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or BENCH / ("teacher" if args.model == "digits-dit" else f"teacher-{args.model}")
    model = slimdiff.load(args.model)
    bb = as_backbone(model)
    data = builtin_for_shape((bb.in_channels, bb.sample_size, bb.sample_size))
    cfgs = [float(c) for c in args.cfgs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    for cfg in cfgs:
        for seed in seeds if cfg == args.default_cfg else seeds[:1]:
            t0 = time.perf_counter()
            r = evaluate(model, samples=args.samples, cfg=cfg, seed=seed, progress=True)
            r["wall_s"] = time.perf_counter() - t0
            runs.append(r)
            print(json.dumps({k: r[k] for k in ("cfg", "seed", "fd", "fd_floor", "class_acc")}), flush=True)
    default = [r for r in runs if r["cfg"] == args.default_cfg]
    fds = [r["fd"] for r in default]
    summary = {
        "model": args.model, "sampler": "ddim", "steps": 50, "samples": args.samples, "default_cfg": args.default_cfg,
        "fd_mean": float(np.mean(fds)), "fd_std": float(np.std(fds, ddof=1)) if len(fds) > 1 else None,
        "class_acc_mean": float(np.mean([r["class_acc"] for r in default])),
        "fd_floor": default[0]["fd_floor"],
        "acceptance": {"class_acc_ge_0.90": all(r["class_acc"] >= 0.90 for r in default),
                       "fd_le_2x_floor": all(r["fd"] <= 2 * r["fd_floor"] for r in default)},
        "judge": judge_info(data=data), "training": record_of(model).provenance.get("training"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"summary": summary, "runs": runs, "provenance": provenance()}, indent=2))
    print(json.dumps(summary["acceptance"]), f"-> {out / 'results.json'}")
