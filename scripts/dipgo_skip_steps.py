"""Does a DiP-GO step that reuses every block do better when it reuses the model's output?

Learns one DiP-GO plan with ``skip_reused_steps=False`` (each fully reused step still runs
the embedders and the final layer on the cached block contributions), then scores it as it
is and with those steps turned into output reuse (the model is not called: with DDIM an
exact step skip). Both are scored the bench's way: FD and class accuracy on 2,000 samples,
SSIM / PSNR to the teacher from the same noise, MACs ratio. Writes
``bench/dipgo/skip_reused_steps.json``.

``--model-dir`` keeps the learned plan (a saved slimdiff model): a rerun loads it instead of
learning again.

Usage: ``OMP_NUM_THREADS=1 python scripts/dipgo_skip_steps.py [--budget 0.25] [--steps 25]``
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps of the plan and of sampling")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "runs" / "dipgo_skip_steps")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "dipgo" / "skip_reused_steps.json")
    args = ap.parse_args()

    import slimdiff
    from slimdiff.bench import write_json
    from slimdiff.compression.reuse_plans import called_steps
    from slimdiff.eval.evaluate import generate, score
    from slimdiff.eval.speed import environment
    from slimdiff.methods.base import Context
    from slimdiff.methods.dipgo import dipgo
    from slimdiff.runtime.reuse import apply_block_reuse, get_block_reuse, remove_block_reuse

    teacher = slimdiff.load("digits-dit").eval()
    if not (args.model_dir / "slimdiff.json").exists():
        ctx = Context(sampler="ddim", steps=args.steps, work_dir=args.model_dir.with_name(args.model_dir.name + "-work"))
        slimdiff.save(dipgo(slimdiff.load("digits-dit"), args.budget, ctx, skip_reused_steps=False), args.model_dir)
    model = slimdiff.load(str(args.model_dir)).eval()
    plan = get_block_reuse(model)
    if plan.steps != args.steps or plan.sampler != "ddim":
        raise SystemExit(f"{args.model_dir} holds a plan for {plan.sampler} x{plan.steps}; pass another --model-dir")
    skipped = [i for i, called in enumerate(called_steps(plan.compute)) if not called]
    ref, _ = generate(teacher, args.samples, steps=args.steps)
    rows = {}
    for name, step_compute in (("blocks reused, model called", plan.step_compute),
                               ("steps reusing every block skipped", called_steps(plan.compute))):
        remove_block_reuse(model)
        apply_block_reuse(model, dataclasses.replace(plan, step_compute=step_compute))
        x, y = generate(model, args.samples, steps=args.steps)
        r = score(model, x, y, teacher, steps=args.steps, reference_samples=ref)
        rows[name] = {k: r[k] for k in ("fd", "class_acc", "ssim", "psnr", "macs_ratio")}
        print(name, json.dumps(rows[name]), flush=True)
    out = {"model": "digits-dit", "sampler": "ddim", "steps": args.steps, "budget": args.budget,
           "samples": args.samples, "plan_from": str(args.model_dir), "steps_reusing_every_block": skipped,
           "results": rows, "environment": environment()}
    write_json(args.out, out)


if __name__ == "__main__":
    main()
