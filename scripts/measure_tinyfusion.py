"""Measure TinyFusion against the depth baselines (BENCHMARK.md sections 1 and 2).

Writes ``bench/tinyfusion/results.json`` and ``bench/tinyfusion/probabilities.png``:

1. **Quality at equal recovery** on ``digits-dit`` (12 -> 6 blocks, ``keep=1:2``): TinyFusion
   and every depth baseline (bi / first / last / stride / random) are cut and then
   recovered with the same steps, optimiser and loss (``--kd``, default fine-tune only);
   each is scored with the protocol's FD, class accuracy and SSIM/PSNR to the teacher: the
   entries of a bench (:class:`slimdiff.bench.Bench`, in ``OUT/work`` while it runs).
2. **Recovery losses** for TinyFusion's choice: fine-tune only vs output KD vs hidden KD
   (unmasked, "plain") vs masked KD, same steps (its kept blocks through the shared depth
   ending, :func:`slimdiff.compression.depth.finish_depth`, scored with the same protocol).
3. **Option probabilities over the search**, plotted per group.
4. **Speed**: :func:`slimdiff.eval.speed.method_speed`, the one speed bench of every method
   (``slimdiff bench-speed``), restricted to TinyFusion.

``--quick`` runs everything with tiny settings (a random-init DiT-M/2 on digits instead of
the teacher, a few steps, few samples, DiT-S/2 with 2 repeats) to check that the script works;
its numbers mean nothing.

Usage: ``OMP_NUM_THREADS=1 python scripts/measure_tinyfusion.py [--quick] [--part all|quality|speed]``
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ("bi-depth", "first-depth", "last-depth", "stride-depth", "random-depth")
KD_MODES = ("none", "output", "hidden", "masked")
SCORES = ("fd", "class_acc", "ssim", "psnr", "macs_ratio", "params", "fd_floor")  # the protocol's scores kept
BUDGET = 1.0  # every entry's: ``keep`` gives the depth


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings: checks the script runs")
    ap.add_argument("--model", default="digits-dit")
    ap.add_argument("--keep", default="1:2")
    ap.add_argument("--search-steps", type=int, default=500)
    ap.add_argument("--recover-steps", type=int, default=500)
    ap.add_argument("--kd", default="none", help="recovery of the method-vs-baselines comparison")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--speed-model", default=None, help="one model for the speed part (default: the bench's)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "tinyfusion"))
    ap.add_argument("--part", choices=("all", "quality", "speed", "shapes"), default="all",
                    help="run one part and merge it into an existing results.json")
    ap.add_argument("--shapes", default="6:12", help="[--part shapes] other TinyFusion keep patterns, ';'-separated")
    args = ap.parse_args()
    if args.quick:
        args.model, args.search_steps, args.recover_steps, args.batch_size = "quick", 4, 2, 16
        args.samples, args.steps, args.speed_model, args.repeats = 40, 5, "DiT-S/2", 2
    return args


def _teacher(args) -> torch.nn.Module:
    """``args.model`` loaded by name, or (``--quick``) a random-init 12-block DiT on 8x8x1 digits."""
    import slimdiff
    from slimdiff.diffusion.schedulers import DiffusionConfig
    from slimdiff.models.dit import DiT
    from slimdiff.result import ModelRecord, set_record

    if args.model != "quick":
        return slimdiff.load(args.model)
    torch.manual_seed(args.seed)  # random init, adaLN not zeroed (else every block is the identity)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=12, num_heads=4, num_classes=10,
                learn_sigma=False)
    for b in model.blocks:
        torch.nn.init.normal_(b.adaLN_modulation[1].weight, std=0.02)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
    return set_record(model, ModelRecord("quick", DiffusionConfig().to_dict())).eval()


def _bench(args, teacher, out: Path, methods: tuple[str, ...], keep: str):
    """A fresh bench (:class:`slimdiff.bench.Bench`) in ``out`` running ``methods`` with ``keep``
    (which overrides the budget), keeping each student to read its record."""
    from slimdiff.bench import Bench, BenchConfig

    config = BenchConfig(model=args.model, budgets=[BUDGET], methods=list(methods), samples=args.samples,
                         sampler=args.sampler, steps=args.steps, cfg=args.cfg, seed=args.seed,
                         recover_steps=args.recover_steps, batch_size=args.batch_size, kd=args.kd,
                         options={"keep": keep, "search_steps": args.search_steps}, progress=False, device="cpu")
    return Bench(config, out, teacher, save_models=True, fresh=True)


def _row(measured: dict, scores: dict) -> dict:
    """One table row: the kept blocks, what the method measured, and the protocol's scores
    (``scores``: a bench entry, or :func:`slimdiff.eval.evaluate.score`'s result)."""
    return {"kept_blocks": measured["kept_blocks"], **measured, **{k: scores[k] for k in SCORES}}


def _entry(bench, method: str) -> dict:
    """The table row of ``method``'s entry (run now, or read back)."""
    from slimdiff.bench import entry_key

    entry = bench.run_entries([(method, BUDGET)])[entry_key(method, BUDGET)]
    return _row(entry["chain"][-1]["measured"], entry)


def _extras(bench, method: str) -> dict:
    """What ``method`` recorded in its saved student (``extras``: TinyFusion's search log)."""
    import slimdiff
    from slimdiff.bench import entry_key
    from slimdiff.result import record_of

    return record_of(slimdiff.load(bench.model_dir(entry_key(method, BUDGET)))).result.extras[method]


def quality(args, work: Path) -> tuple[dict, dict]:
    """Method vs baselines at equal recovery (bench entries), TinyFusion's KD ablation (its
    kept blocks recovered with each loss, scored with the same protocol), and the search log."""
    from slimdiff.compression.depth import finish_depth
    from slimdiff.eval.evaluate import generate, score
    from slimdiff.methods.base import Context
    from slimdiff.result import record_of

    bench = _bench(args, _teacher(args), work / "bench", ("tinyfusion", *BASELINES), args.keep)
    teacher, teacher_scores, ref = bench.teacher()
    depth = len(teacher.blocks) if hasattr(teacher, "blocks") else None
    results: dict = {"teacher": {"depth": depth, **{k: teacher_scores[k] for k in SCORES}}}
    results["tinyfusion"], search = _entry(bench, "tinyfusion"), _extras(bench, "tinyfusion")
    for name in BASELINES:
        results[name] = _entry(bench, name)
    protocol = dict(sampler=args.sampler, steps=args.steps, cfg=args.cfg, seed=args.seed)
    kd_results = {}
    for kd in KD_MODES:
        if kd == args.kd:
            kd_results[kd] = results["tinyfusion"]
            continue
        ctx = Context(**protocol, recover_steps=args.recover_steps, kd=kd, batch_size=args.batch_size,
                      work_dir=work / f"tf-{kd}", progress=False, teacher=teacher)
        m = finish_depth(copy.deepcopy(teacher), results["tinyfusion"]["kept_blocks"], ctx, "tinyfusion",
                         {"keep": args.keep, "kd_ablation": kd}, {})
        x, y = generate(m, args.samples, **protocol)
        kd_results[kd] = _row(record_of(m).result.chain[-1].measured,
                              score(m, x, y, teacher, reference_samples=ref, **protocol))
    best_baseline = min(BASELINES, key=lambda n: results[n]["fd"])
    summary = {
        "tinyfusion_fd": results["tinyfusion"]["fd"],
        "best_baseline": best_baseline,
        "best_baseline_fd": results[best_baseline]["fd"],
        "tinyfusion_beats_every_baseline": all(results["tinyfusion"]["fd"] < results[n]["fd"] for n in BASELINES),
        "kd_fd": {k: v["fd"] for k, v in kd_results.items()},
    }
    return {"methods": results, "kd_ablation": kd_results, "summary": summary}, search


def other_shapes(args, work: Path) -> dict:
    """TinyFusion with other group shapes (same depth, recovery and scoring as the main table):
    one bench per shape, since a bench gives its methods one ``keep``."""
    teacher = _teacher(args)
    out = {}
    for keep in args.shapes.split(";"):
        shape_bench = _bench(args, teacher, work / f"tf-{keep.replace(':', 'of')}", ("tinyfusion",), keep)
        row, extras = _entry(shape_bench, "tinyfusion"), _extras(shape_bench, "tinyfusion")
        out[f"tinyfusion keep={keep}"] = {**row, "probabilities": extras["probabilities"],
                                          "environment": _environment(args)}
    return out


def speed(args) -> dict:
    """Section 2: the shared speed bench (:mod:`slimdiff.eval.speed`, as ``slimdiff bench-speed``) on TinyFusion."""
    from slimdiff.eval.speed import method_speed

    return method_speed("tinyfusion", args.quick, repeats=args.repeats,
                        **({"models": (args.speed_model,)} if args.speed_model and not args.quick else {}))


def _environment(args) -> dict:
    import peft

    from slimdiff.eval.speed import environment

    return {**environment(), "peft": peft.__version__, "load_average_start": os.getloadavg(), "args": vars(args)}


def report(results: dict) -> str:
    """Markdown tables of ``results`` (every number comes from results.json)."""
    lines = ["# TinyFusion vs depth baselines", "", "Written by `scripts/measure_tinyfusion.py`; see results.json.", ""]
    q = results.get("quality")
    if q:
        a = q["environment"]["args"]
        lines += [f"## Quality: {a['model']}, keep {a['keep']}, search {a['search_steps']} steps, recovery "
                  f"{a['recover_steps']} steps ({a['kd']}), {a['samples']} samples, {a['sampler']} {a['steps']} steps, "
                  f"cfg {a['cfg']}", "", "| model | kept blocks | FD | class acc | SSIM | PSNR | MACs ratio |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in q["methods"].items():
            kept = r.get("kept_blocks", "all")
            lines.append(f"| {name} | {kept} | {r['fd']:.2f} | {r['class_acc']:.3f} | {r['ssim'] or float('nan'):.3f} "
                         f"| {r['psnr'] or float('nan'):.2f} | {r['macs_ratio']:.3f} |")
        for name, r in (q.get("other_shapes") or {}).items():
            lines.append(f"| {name} | {r['kept_blocks']} | {r['fd']:.2f} | {r['class_acc']:.3f} | {r['ssim']:.3f} "
                         f"| {r['psnr']:.2f} | {r['macs_ratio']:.3f} |")
        lines += ["", f"FD floor (real train vs test): {q['methods']['teacher']['fd_floor']:.2f}", "",
                  "## TinyFusion recovery loss (same kept blocks, same steps)", "", "| recovery | FD | class acc |",
                  "|---|---|---|"]
        lines += [f"| {kd} | {r['fd']:.2f} | {r['class_acc']:.3f} |" for kd, r in q["kd_ablation"].items()]
        lines += ["", f"Summary: {json.dumps(q['summary'])}", "", "![probabilities](probabilities.png)", ""]
    sp = results.get("speed")
    if sp and "entries" in sp:  # written by slimdiff.eval.speed (files from before it had another layout)
        from slimdiff.eval.speed import entries_table

        lines += ["## Speed (`slimdiff bench-speed --methods tinyfusion`)", ""] + entries_table(sp["entries"])
    return "\n".join(lines) + "\n"


def main() -> None:
    args = _args()
    out = Path(args.out) / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() and args.part != "all" else {}
    env = _environment(args)
    if args.part in ("all", "quality"):
        work = out / "work"
        shutil.rmtree(work, ignore_errors=True)  # never resume a stale search / recovery
        t0 = time.time()
        q, search = quality(args, work)
        from slimdiff.eval.report import option_probabilities

        option_probabilities(search["groups"], search["probability_history"], out / "probabilities.png")
        q["wall_s"] = time.time() - t0
        q["environment"] = {**env, "load_average_end": os.getloadavg()}
        results["quality"] = q
        results["search"] = {k: search[k] for k in ("groups", "probabilities", "probability_history", "search")}
        shutil.rmtree(work, ignore_errors=True)
    if args.part == "shapes":
        work = out / "work"
        shutil.rmtree(work, ignore_errors=True)
        results.setdefault("quality", {}).setdefault("other_shapes", {}).update(other_shapes(args, work))
        shutil.rmtree(work, ignore_errors=True)
    if args.part in ("all", "speed"):
        t1 = time.time()
        s = speed(args)
        s["wall_s"] = time.time() - t1
        s["environment"] = {**env, "load_average_end": os.getloadavg()}
        results["speed"] = s
    path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / "report.md").write_text(report(results))
    brief = {}
    if "quality" in results:
        brief["quality"] = results["quality"]["summary"]
    if "entries" in results.get("speed", {}):
        brief["speed"] = [{k: e[k] for k in ("model", "theoretical_speedup", "measured_speedup", "realisation", "met")}
                          for e in results["speed"]["entries"]]
    print(json.dumps(brief, indent=2))


if __name__ == "__main__":
    main()
