"""One DyDiT run on digits-dit with the bench's settings (300 training steps, batch 64, lr 2e-4;
2000 samples, DDIM 50, scored against the teacher's samples from the same noise: one entry of
:class:`slimdiff.bench.Bench` in a temporary directory) and ``DyDiTConfig`` overrides given as
JSON; prints one JSON line. The warm-up ablation in bench/dydit/warmup.jsonl (at commit 55570b3) came from (the
0.5 row is the bench entry of that time)::

    for w in 0.25 0.1; do python scripts/dydit_ablation.py 0.5 "{\"warmup_frac\": $w}"; done
"""
from __future__ import annotations

import json
import sys
import tempfile
import warnings


def main(budget: float, overrides: dict) -> dict:
    from slimdiff.bench import Bench, BenchConfig, entry_key
    from slimdiff.methods import get_method

    get_method("dydit").make_config(overrides)  # unknown or ill-typed overrides are errors, not ignored
    config = BenchConfig(model="digits-dit", budgets=[budget], methods=["dydit"], options=overrides, progress=False,
                         device="cpu")  # every other field: the bench's defaults
    with tempfile.TemporaryDirectory(prefix="dydit-ablation-") as out:
        e = Bench(config, out).run_entries()[entry_key("dydit", budget)]
    return {"budget": budget, "over": overrides, "fd": e["fd"], "ssim": e.get("ssim"), "acc": e.get("class_acc"),
            "macs_ratio": e.get("macs_ratio"), "measured": e["chain"][-1]["measured"],
            "wall": e["compress_wall_s"] + e["eval_wall_s"]}


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    print(json.dumps(main(float(sys.argv[1]), json.loads(sys.argv[2]))))
