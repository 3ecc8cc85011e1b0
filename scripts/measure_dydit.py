"""Measure DyDiT (issue 6) and write ``bench/dydit/results.json`` plus pictures.

1. **Quality at equal compute** (digits-dit, budget 0.5): DyDiT (``train_steps = N``, no
   extra recovery) vs static width pruning (Diff-Pruning, else magnitude-width) compressed to
   DyDiT's *measured* sampling-MACs ratio with ``recover_steps = N`` (the same number of
   optimiser steps, batch and lr). Both scored with slimdiff.eval.evaluate (FD, class
   accuracy, SSIM/PSNR to the teacher from the same noise).
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
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import slimdiff  # noqa: E402
from slimdiff.errors import UsageError  # noqa: E402
from slimdiff.eval.report import token_keep_maps, width_per_timestep  # noqa: E402
from slimdiff.eval.speed import environment  # noqa: E402
from slimdiff.methods.base import Context, compress  # noqa: E402


def teacher(quick: bool, spec: str = "digits-dit"):
    """``spec`` (default digits-dit), or (quick, when it is absent) a random-init DiT-M/2 on 8x8x1 digits."""
    try:
        return slimdiff.load(spec), spec
    except UsageError:
        if not quick:
            raise
        torch.manual_seed(0)
        return slimdiff.load("DiT-M/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False), "random DiT-M/2"


def quality(args, out: Path) -> dict:
    """DyDiT vs static width pruning at DyDiT's measured MACs, equal training steps."""
    import shutil

    from slimdiff.eval.evaluate import evaluate, generate

    model, name = teacher(args.quick, args.teacher)
    for old in out.glob("work-*"):  # the trainer resumes from a work dir: start fresh
        shutil.rmtree(old)
    common = dict(sampler="ddim", steps=args.sample_steps, cfg=args.cfg, batch_size=args.batch, lr=args.lr,
                  progress=not args.quiet, seed=0)
    t0 = time.process_time()
    dyn = compress(model, "dydit", args.budget, Context(work_dir=out / "work-dydit", **common),
                   {"train_steps": args.train_steps, "tune": args.tune})
    dyn_cpu = time.process_time() - t0
    slimdiff.save(dyn, out / "dydit-model", overwrite=True)
    ratio = dyn.slimdiff_meta["measured"]["macs_ratio"]
    static, static_name, static_cpu = None, None, None
    for method in ("diff-pruning", "magnitude-width"):
        try:
            t0 = time.process_time()
            static = compress(model, method, ratio, Context(work_dir=out / f"work-{method}", recover_steps=args.train_steps,
                                                            **common))
            static_name, static_cpu = method, time.process_time() - t0
            break
        except Exception as e:  # noqa: BLE001 - record why and try the next baseline
            print(f"{method} failed: {e}", file=sys.stderr)
    ev = dict(samples=args.samples, steps=args.sample_steps, cfg=args.cfg, sampler="ddim")
    ref, _ = generate(model, args.samples, sampler="ddim", steps=args.sample_steps, cfg=args.cfg)
    res = {"teacher": name, "budget": args.budget, "train_steps": args.train_steps, "tune": args.tune,
           "teacher_eval": evaluate(model, **ev)}
    from slimdiff.eval.evaluate import score

    def scored(m):
        x, y = generate(m, args.samples, sampler="ddim", steps=args.sample_steps, cfg=args.cfg)
        return score(m, x, y, model, reference_samples=ref, **{k: v for k, v in ev.items() if k != "samples"})

    res["dydit"] = {**scored(dyn), "measured": dyn.slimdiff_meta["measured"], "cpu_seconds": dyn_cpu}
    if static is not None:
        res["static"] = {"method": static_name, **scored(static), "measured": static.slimdiff_meta["measured"],
                         "cpu_seconds": static_cpu}
        res["dydit_fd_le_static"] = res["dydit"]["fd"] <= res["static"]["fd"]
    else:
        res["static"] = {"error": "no static width method ran (diff-pruning / magnitude-width)"}
    extras = dyn.slimdiff_meta["extras"]["dydit"]
    width_per_timestep(extras["tables"]["entries"], max(extras["config"]["heads"]), max(extras["config"]["groups"]),
                       out / "width_per_timestep.png")
    token_keep_maps(dyn, out / "token_keep_maps.png", steps=args.sample_steps, cfg=args.cfg)
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
