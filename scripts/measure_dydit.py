"""Measure DyDiT (issue 6) and write ``bench/dydit/results.json`` plus pictures.

1. **Quality at equal compute** (digits-dit, budget 0.5): DyDiT (``train_steps = N``, no
   extra recovery) vs static width pruning (Diff-Pruning, else magnitude-width) compressed to
   DyDiT's *measured* sampling-MACs ratio with ``recover_steps = N`` (the same number of
   optimiser steps, batch and lr): entries of the bench protocol (:class:`slimdiff.bench.Bench`
   in ``OUT/bench``, students kept in ``OUT/bench/models``), scored with FD, class accuracy,
   SSIM/PSNR to the teacher from the same noise.
2. **Pictures**: active heads / MLP channel groups per timestep (per block) from the saved
   per-step tables; token-keep maps (fraction of blocks whose MLP ran, per token) over
   generated samples at early / middle / late steps.
3. **Realised speedup**: :func:`slimdiff.eval.speed.method_speed`, the one speed bench of
   every method (``slimdiff bench-speed``), restricted to DyDiT.

``--quick`` runs everything at toy sizes (random-init teacher if digits-dit is absent).
Numbers come only from this script.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import slimdiff  # noqa: E402
from slimdiff.bench import Bench, BenchConfig, entry_key, entry_scores  # noqa: E402
from slimdiff.errors import UsageError  # noqa: E402
from slimdiff.eval.models import build_model  # noqa: E402
from slimdiff.eval.speed import environment  # noqa: E402
from slimdiff.result import record_of  # noqa: E402

STATIC = ("diff-pruning", "magnitude-width")  # the static width method, in order of preference


def teacher(quick: bool, spec: str = "digits-dit"):
    """``spec`` (default digits-dit), or (quick, when it is absent) a random-init DiT-M/2 on 8x8x1 digits."""
    try:
        return slimdiff.load(spec), spec
    except UsageError:
        if not quick:
            raise
        model = build_model("DiT-M/2", 8, init="none", in_channels=1, num_classes=10, learn_sigma=False)
        return model, "random DiT-M/2"


def quality(args, out: Path) -> dict:
    """DyDiT vs static width pruning at DyDiT's measured MACs, equal training steps: two runs of
    the bench protocol (:class:`slimdiff.bench.Bench`, fresh in ``OUT/bench``; the students
    are kept in ``OUT/bench/models``), DyDiT's pictures copied to ``OUT``."""
    model, name = teacher(args.quick, args.teacher)
    config = BenchConfig(model=name, budgets=[args.budget], methods=["dydit"], samples=args.samples, sampler="ddim",
                         steps=args.sample_steps, cfg=args.cfg, recover_steps=args.train_steps, batch_size=args.batch,
                         lr=args.lr, options={"tune": args.tune}, progress=not args.quiet, device="cpu")
    bench = Bench(config, out / "bench", model, save_models=True, fresh=True)

    def measured(entry: dict) -> dict:  # the student's end-to-end measurements, from its saved record
        return record_of(slimdiff.load(bench.model_dir(entry_key(entry["method"], entry["budget"])))).result.measured

    dyn = bench.run_entries()[entry_key("dydit", args.budget)]
    dyn_measured = measured(dyn)
    ratio = dyn_measured["macs_ratio"]
    res = {"teacher": name, "budget": args.budget, "train_steps": args.train_steps, "tune": args.tune,
           "teacher_eval": entry_scores(bench.teacher()[1]),
           "dydit": {**entry_scores(dyn), "measured": dyn_measured, "cpu_seconds": dyn["compress_cpu_s"]}}
    static = None
    for method in STATIC:
        try:
            entry = bench.run_entries([(method, ratio)])[entry_key(method, ratio)]
        except Exception as e:  # noqa: BLE001 - record why and try the next baseline
            print(f"{method} failed: {e}", file=sys.stderr)
            continue
        if entry.get("skipped"):
            print(f"{method} failed: {entry['skipped']}", file=sys.stderr)
            continue
        static = entry
        break
    if static is not None:
        res["static"] = {"method": static["method"], **entry_scores(static), "measured": measured(static),
                         "cpu_seconds": static["compress_cpu_s"]}
        res["dydit_fd_le_static"] = res["dydit"]["fd"] <= res["static"]["fd"]
    else:
        res["static"] = {"error": "no static width method ran (diff-pruning / magnitude-width)"}
    for picture in dyn["pictures"]:  # the bench's DyDiT pictures (per-step widths, token-keep maps)
        shutil.copyfile(out / "bench" / picture, out / Path(picture).name.removeprefix("dydit-"))
    return res


def speed(args) -> dict:
    """Section 3: the shared speed bench (:mod:`slimdiff.eval.speed`, as ``slimdiff bench-speed``) on DyDiT."""
    from slimdiff.eval.speed import method_speed

    return method_speed("dydit", args.quick, repeats=args.repeats, budget=args.budget)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="toy sizes (seconds); for testing the script")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--tune", default="full")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--sample-steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip", default="", help="comma list of parts to skip: quality,speed")
    p.add_argument("--teacher", default="digits-dit", help="model to compress (slimdiff.load spec)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "dydit")
    args = p.parse_args()
    args.train_steps = args.train_steps if args.train_steps is not None else (3 if args.quick else 300)
    args.samples = args.samples or (20 if args.quick else 500)
    args.sample_steps = args.sample_steps or (4 if args.quick else 50)
    if args.quick:
        args.batch, args.repeats = 8, 2
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    res = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "environment": environment(), "loadavg_start": os.getloadavg(),
           "command": " ".join(sys.argv)}
    if "quality" not in skip:
        res["quality"] = quality(args, args.out)
    if "speed" not in skip:
        res["speed"] = speed(args)
    res["loadavg_end"] = os.getloadavg()
    path = args.out / ("results_quick.json" if args.quick else "results.json")
    if path.is_file():  # keep the parts skipped this time from an earlier run
        old = json.loads(path.read_text())
        res = {**{k: v for k, v in old.items() if k in ("quality", "speed") and k in skip}, **res}
        if skip:
            res["earlier_parts_from"] = {k: old.get("command") for k in skip if k in old}
    path.write_text(json.dumps(res, indent=2, default=float) + "\n")
    summary = {"speed": [{k: e[k] for k in ("model", "theoretical_speedup", "measured_speedup", "realisation")}
                         for e in res.get("speed", {}).get("entries", [])]}
    if "quality" in res:
        summary.update(dydit_fd=res["quality"]["dydit"]["fd"], static_fd=res["quality"]["static"].get("fd"),
                       macs_ratio=res["quality"]["dydit"]["macs_ratio"])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
