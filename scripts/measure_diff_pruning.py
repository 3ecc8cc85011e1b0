"""Measure Diff-Pruning (issue 4) and write bench/diff_pruning/results.json (+ PNG plots).

Reproduce (from the repository root)::

    OMP_NUM_THREADS=1 python scripts/measure_diff_pruning.py            # full settings
    OMP_NUM_THREADS=1 python scripts/measure_diff_pruning.py --quick    # tiny settings, ~1 min

1. **Quality at equal compute** (BENCHMARK.md section 1): entries of the bench protocol
   (:class:`slimdiff.bench.Bench`): the teacher (``--teacher``, default the shipped
   ``digits-dit``) pruned to budget 0.5 by ``diff-pruning`` (threshold 0.05 and threshold 0),
   ``random-width`` and ``magnitude-width``, each followed by the same recovery fine-tuning
   (``--recover-steps``), then scored against the teacher's samples from the same noise (FD,
   class accuracy, SSIM/PSNR). Compression cost (gradient pass + search + recovery) in CPU-seconds.
2. **Speed** (section 2): :func:`slimdiff.eval.speed.method_speed` -- the one speed bench of
   every method (``slimdiff bench-speed``), restricted to Diff-Pruning, for both head modes.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch.nn as nn

from slimdiff.compression.width import HEAD_MODES
from slimdiff.eval.speed import environment

OUT = Path("bench/diff_pruning")
FULL = dict(samples=1000, steps=50, cfg=1.5, recover_steps=300, batch_size=64, stride=1,
            repeats=9, budget=0.5, threshold=0.05)
QUICK = dict(samples=60, steps=5, cfg=1.5, recover_steps=2, batch_size=16, stride=100,
             repeats=3, budget=0.5, threshold=0.05)


def teacher(spec: str = "digits-dit") -> tuple[nn.Module, str]:
    """The teacher: a slimdiff model name/directory (default the shipped ``digits-dit``), or a
    ``.safetensors`` EMA state dict of a DiT-T/2 digits model (a training checkpoint)."""
    import slimdiff

    if not spec.endswith(".safetensors"):
        return slimdiff.load(spec), spec
    from safetensors.torch import load_file

    from slimdiff.eval.models import build_model

    model = build_model("DiT-T/2", 8, init="none", in_channels=1, num_classes=10, learn_sigma=False)
    missing, unexpected = model.load_state_dict(load_file(spec), strict=False)
    if unexpected or set(missing) != {"pos_embed"}:  # EMA files hold parameters; pos_embed is a fixed buffer
        raise SystemExit(f"{spec} is not a DiT-T/2 digits state dict (missing {missing}, unexpected {unexpected})")
    return model, f"checkpoint {spec}"


def quality(s: dict, work: Path, spec: str) -> dict:
    """Section 1: FD / accuracy / SSIM of every method and baseline at the same budget.

    Entries of the bench protocol (:class:`slimdiff.bench.Bench`), one bench per Diff-Pruning
    threshold (a bench passes one set of options to its methods), in ``work``; the students
    are kept there to read back what each recorded (timestep losses, layer widths)."""
    import slimdiff
    from slimdiff.bench import Bench, BenchConfig, entry_key, entry_scores
    from slimdiff.result import record_of

    model, source = teacher(spec)
    benches: dict[float, Bench] = {}

    def bench(threshold: float) -> Bench:
        if threshold not in benches:
            config = BenchConfig(model=source, budgets=[s["budget"]], methods=["diff-pruning"], samples=s["samples"],
                                 steps=s["steps"], cfg=s["cfg"], recover_steps=s["recover_steps"],
                                 batch_size=s["batch_size"], options={"threshold": threshold, "stride": s["stride"]},
                                 progress=False, device="cpu")
            benches[threshold] = Bench(config, work / f"threshold-{threshold:g}", model, save_models=True)
        return benches[threshold]

    rows = {"teacher": entry_scores(bench(s["threshold"]).teacher()[1])}
    jobs = {f"diff-pruning@{s['threshold']}": ("diff-pruning", s["threshold"]),
            "diff-pruning@0": ("diff-pruning", 0.0),
            "random-width": ("random-width", s["threshold"]), "magnitude-width": ("magnitude-width", s["threshold"])}
    for name, (method, threshold) in jobs.items():
        b, key = bench(threshold), entry_key(method, s["budget"])
        e = b.run_entries([(method, s["budget"])])[key]
        entry = e["chain"][-1]
        extras = record_of(slimdiff.load(b.model_dir(key))).result.extras.get(method, {})
        row = {**entry_scores(e), "compress_cpu_s": e["compress_cpu_s"], "settings": entry["settings"],
               "measured": entry["measured"], "timesteps": extras.get("timesteps"), "widths": extras.get("widths")}
        rows[name] = row
        print(f"{name:22s} FD {row['fd']:.3f}  acc {row['class_acc']}  macs {row['macs_ratio']:.3f}  "
              f"cpu {row['compress_cpu_s']:.0f}s", flush=True)
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
            res["quality"] = quality(s, Path(work), args.teacher)
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
