"""Measure Diff-Pruning (issue 4) and write bench/diff_pruning/results.json (+ PNG plots).

Reproduce (from the repository root; the full run needs the shipped ``digits-dit`` teacher)::

    OMP_NUM_THREADS=1 python scripts/measure_diff_pruning.py            # full settings
    OMP_NUM_THREADS=1 python scripts/measure_diff_pruning.py --quick    # tiny settings, ~1 min

1. **Quality at equal compute** (BENCHMARK.md section 1): the teacher pruned to budget 0.5 by
   ``diff-pruning`` (threshold 0.05 and threshold 0), ``random-width`` and ``magnitude-width``,
   each followed by the same recovery fine-tuning (``--recover-steps``), then scored with
   :func:`slimdiff.eval.evaluate.evaluate` (FD, class accuracy, SSIM/PSNR to the teacher on the
   same noise). Compression cost (gradient pass + search + recovery) in CPU-seconds.
2. **Speed** (section 2): :func:`slimdiff.eval.speed.method_speed` -- the one speed bench of
   every method (``slimdiff bench-speed``), restricted to Diff-Pruning, for both head modes.

Without the teacher (``--quick`` on a fresh checkout) section 1 runs on a random-init small
DiT so the pipeline is exercised; its numbers are then marked ``"teacher": "random-init"``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from slimdiff.compression.width import HEAD_MODES
from slimdiff.eval.evaluate import generate, score
from slimdiff.eval.speed import environment
from slimdiff.methods import diff_pruning as dp
from slimdiff.methods import width_baselines as wb
from slimdiff.methods.base import Context

OUT = Path("bench/diff_pruning")
FULL = dict(samples=1000, steps=50, cfg=1.5, recover_steps=300, batch_size=64, stride=1,
            repeats=9, budget=0.5, threshold=0.05)
QUICK = dict(samples=60, steps=5, cfg=1.5, recover_steps=2, batch_size=16, stride=100,
             repeats=3, budget=0.5, threshold=0.05)


def teacher(quick: bool, spec: str = "digits-dit") -> tuple[nn.Module, str]:
    """The teacher: a slimdiff model name/directory (default the shipped ``digits-dit``), or a
    ``.safetensors`` EMA state dict of a DiT-T/2 digits model (a training checkpoint, for
    provisional numbers before the teacher ships); in quick mode without one, a random DiT."""
    import slimdiff
    from slimdiff.models.registry import shipped_dir

    if spec.endswith(".safetensors"):
        from safetensors.torch import load_file

        from slimdiff.models.dit import DiT_models

        model = DiT_models["DiT-T/2"](input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
        missing, unexpected = model.load_state_dict(load_file(spec), strict=False)
        if unexpected or set(missing) != {"pos_embed"}:  # EMA files hold parameters; pos_embed is a fixed buffer
            raise SystemExit(f"{spec} is not a DiT-T/2 digits state dict (missing {missing}, unexpected {unexpected})")
        return model.eval(), f"checkpoint {spec}"
    if spec != "digits-dit" or (shipped_dir("digits-dit") / "slimdiff.json").is_file():
        return slimdiff.load(spec), spec
    if not quick:
        raise SystemExit("digits-dit is not shipped yet (slimdiff/weights/digits-dit); run with --quick or wait")
    from slimdiff.models.dit import DiT

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=4, num_heads=4, num_classes=10,
                learn_sigma=False)
    with torch.no_grad():  # DiT zero-initialises adaLN and the output layer: make every layer matter
        for p in model.parameters():
            p.normal_(0, p.shape[-1] ** -0.5 if p.ndim > 1 else 0.02)
    return model.eval(), "random-init"


def run_method(model: nn.Module, name: str, s: dict, work: Path, **kw) -> tuple[nn.Module, float]:
    """Compress a copy at the budget with equal recovery; return it and the CPU-seconds spent."""
    ctx = Context(steps=s["steps"], cfg=1.0, recover_steps=s["recover_steps"], batch_size=s["batch_size"],
                  work_dir=work / name, progress=False, seed=0, teacher=model)
    fn = {"random-width": wb.random_width, "magnitude-width": wb.magnitude_width}.get(name.split("@")[0])
    start = time.process_time()
    if fn is None:
        out = dp.diff_pruning(copy.deepcopy(model), s["budget"], ctx, kw.pop("threshold"), stride=s["stride"], **kw)
    else:
        out = fn(copy.deepcopy(model), s["budget"], ctx)
    return out, time.process_time() - start


def quality(s: dict, quick: bool, work: Path, spec: str) -> dict:
    """Section 1: FD / accuracy / SSIM of every method and baseline at the same budget."""
    model, source = teacher(quick, spec)
    ev = dict(steps=s["steps"], cfg=s["cfg"], seed=0)
    ref_x, ref_y = generate(model, s["samples"], **ev)
    rows = {"teacher": score(model, ref_x, ref_y, None, **ev)}
    jobs = {f"diff-pruning@{s['threshold']}": dict(threshold=s["threshold"]), "diff-pruning@0": dict(threshold=0.0),
            "random-width": {}, "magnitude-width": {}}
    for name, kw in jobs.items():
        out, cpu = run_method(model, name, s, work, **kw)
        x, y = generate(out, s["samples"], **ev)
        row = score(out, x, y, model, reference_samples=ref_x, **ev)
        entry = out.slimdiff_meta["method"]["chain"][-1]
        row.update(compress_cpu_s=cpu, settings=entry["settings"], measured=entry["measured"])
        extras = (out.slimdiff_meta.get("extras") or {}).get(entry["name"], {})
        row["timesteps"] = extras.get("timesteps")
        row["widths"] = extras.get("widths")
        rows[name] = row
        print(f"{name:22s} FD {row['fd']:.3f}  acc {row['class_acc']}  macs {row['macs_ratio']:.3f}  cpu {cpu:.0f}s",
              flush=True)
    return {"teacher": source, "settings": s, "rows": rows}


def speed(s: dict, quick: bool) -> dict:
    """Section 2: the shared speed bench (:mod:`slimdiff.eval.speed`, as ``slimdiff bench-speed``)
    on Diff-Pruning, once per head mode."""
    from slimdiff.eval.speed import method_speed

    return {f"heads={h}": method_speed("diff-pruning", quick, repeats=s["repeats"], heads=h) for h in HEAD_MODES}


def plots(res: dict, out: Path) -> list[str]:
    """Kept channels per layer and L_t / L_max with the threshold (Diff-Pruning's own pictures)."""
    from slimdiff.eval.report import kept_channels, timestep_losses

    rows, settings = res["quality"]["rows"], res["quality"]["settings"]
    name = next(k for k in rows if k.startswith("diff-pruning@") and k != "diff-pruning@0")
    files = []
    if rows[name]["widths"]:
        kept_channels(rows[name]["widths"], out / "kept_channels.png",
                      f"{name}: kept channels per layer (budget {settings['budget']})")
        files.append("kept_channels.png")
    timestep_losses({key: rows[key]["timesteps"] for key in (name, "diff-pruning@0")}, settings["threshold"],
                    out / "timestep_losses.png", stride=settings["stride"])
    return files + ["timestep_losses.png"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings (pipeline check, minutes)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default bench/diff_pruning[/quick])")
    ap.add_argument("--recover-steps", type=int, default=None)
    ap.add_argument("--teacher", default="digits-dit", help="model name/dir, or a DiT-T/2 EMA .safetensors checkpoint")
    ap.add_argument("--skip-speed", action="store_true", help="keep the speed section of an earlier results.json")
    ap.add_argument("--skip-quality", action="store_true", help="keep the quality section of an earlier results.json")
    args = ap.parse_args()
    s = dict(QUICK if args.quick else FULL)
    if args.recover_steps is not None:
        s["recover_steps"] = args.recover_steps
    out = args.out or (OUT / "quick" if args.quick else OUT)
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    res = {"command": "python scripts/measure_diff_pruning.py" + (" --quick" if args.quick else ""),
           "environment": environment(), "load_average_start": os.getloadavg()}
    for section, skip in (("quality", args.skip_quality), ("speed", args.skip_speed)):
        if skip and section in previous:  # keep an earlier run's section (partial re-runs)
            res[section] = previous[section]
    if not args.skip_quality:
        with tempfile.TemporaryDirectory(prefix="recover-", dir=out) as work:  # fresh: the trainer resumes
            res["quality"] = quality(s, args.quick, Path(work), args.teacher)
    if not args.skip_speed:
        res["speed"] = speed(s, args.quick)
    res["load_average_end"] = os.getloadavg()
    if "quality" in res:
        res["plots"] = plots(res, out)
    print(json.dumps({k: res[k] for k in ("load_average_start", "load_average_end")}))
    (out / "results.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
