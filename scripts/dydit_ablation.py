"""One DyDiT run on digits-dit with the bench's settings (300 training steps, batch 64, lr 2e-4;
2000 samples, DDIM 50, scored against bench/digits/teacher_samples.safetensors) and
``DyDiTConfig`` overrides given as JSON; prints one JSON line. The warm-up ablation in
bench/dydit/warmup.jsonl came from (the 0.5 row is the bench entry of that time)::

    for w in 0.25 0.1; do python scripts/dydit_ablation.py 0.5 "{\"warmup_frac\": $w}"; done
"""
from __future__ import annotations

import copy
import json
import sys
import time
import warnings


def main(budget: float, overrides: dict) -> dict:
    from safetensors.torch import load_file

    from slimdiff import load
    from slimdiff.eval.evaluate import generate, score
    from slimdiff.methods.base import Context
    from slimdiff.methods.dydit import DyDiTConfig, dydit

    teacher = load("digits-dit").eval()
    ref = load_file("bench/digits/teacher_samples.safetensors")["x"]
    ctx = Context(sampler="ddim", steps=50, cfg=1.0, data="digits", seed=0, batch_size=64, lr=2e-4,
                  progress=False, teacher=teacher)
    start = time.time()
    student = dydit(copy.deepcopy(teacher), budget, ctx, config=DyDiTConfig(**{"train_steps": 300, **overrides}))
    student.eval()
    x, y = generate(student, 2000, sampler="ddim", steps=50, cfg=1.0, seed=0, progress=False)
    s = score(student, x, y, teacher, sampler="ddim", steps=50, cfg=1.0, seed=0, reference_samples=ref)
    return {"budget": budget, "over": overrides, "fd": s["fd"], "ssim": s.get("ssim"), "acc": s.get("class_acc"),
            "macs_ratio": s.get("macs_ratio"), "measured": student.slimdiff_meta["method"]["chain"][-1]["measured"],
            "wall": time.time() - start}


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    print(json.dumps(main(float(sys.argv[1]), json.loads(sys.argv[2]))))
