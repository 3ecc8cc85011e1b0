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
  method's student has that shape) trained from scratch with the teacher's recipe
- ``depth-kd-output``, ``depth-kd-masked``: tinyfusion recovered with output KD and with the
  paper's masked KD (``--kd``; the ``depth`` group recovers by fine-tuning): the paper's claim
  masked KD >= KD >= fine-tuning
- ``reuse``: dipgo, deepcache-style, l2c, l2c-block, fewer-steps and diffusers' caches
- ``reuse-skip``: dipgo, deepcache-style, l2c, l2c-block with ``skip_reused_steps=1``
- ``dydit`` and ``dydit-old``: DyDiT with the reference recipe and with slimdiff's earlier one
- ``dydit-calibrate``: the reference recipe plus the bias-shift calibration (beyond the paper):
  does it bring the realised MACs to the target where the reference recipe misses it?

Usage: ``OMP_NUM_THREADS=2 nohup python scripts/measure_fidelity.py [--groups width,depth]
[--samples 500] [--seeds 5] [--budgets 0.5,0.25] [--out bench/fidelity] [--recover-steps 300]
[--skip scratch] > fidelity.log &``. The second recovery length of the evidence issue is
``--recover-steps 3000 --out bench/fidelity-recover3000 --skip scratch --against bench/fidelity``
(``recovery.md``: each entry at both lengths, the rankings that flip, and each long entry
against training from scratch).
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
    "depth-scratch": (["scratch"], {"architecture": "first-depth"}),
    "depth-kd-output": (["tinyfusion"], {}),
    "depth-kd-masked": (["tinyfusion"], {}),
    "reuse": (["dipgo", "deepcache-style", "l2c", "l2c-block", "fewer-steps", "fbcache", "taylorseer", "magcache",
               "pab", "fastercache"], {}),
    "reuse-skip": (["dipgo", "deepcache-style", "l2c", "l2c-block"], {"skip_reused_steps": True}),
    "dydit": (["dydit"], {}),
    "dydit-old": (["dydit"], OLD_DYDIT),
    "dydit-calibrate": (["dydit"], {"calibrate": True}),
}
SETTINGS: dict[str, dict] = {"depth-kd-output": {"kd": "output"}, "depth-kd-masked": {"kd": "masked"}}
"""Bench settings of a group beyond the shared protocol (the recovery loss is one for a whole bench)."""
CROSS: list[tuple[str, str]] = [
    ("depth/tinyfusion", "depth-scratch/scratch"), ("depth/first-depth", "depth-scratch/scratch"),
    ("depth-kd-masked/tinyfusion", "depth-kd-output/tinyfusion"), ("depth-kd-output/tinyfusion", "depth/tinyfusion"),
    ("depth-kd-masked/tinyfusion", "depth/tinyfusion"), ("depth/tinyfusion", "depth-global/tinyfusion"),
    ("reuse-skip/dipgo", "reuse/dipgo"), ("dydit/dydit", "dydit-old/dydit"), ("dydit-calibrate/dydit", "dydit/dydit"),
    ("width/diff-pruning", "width-taylor-tp/diff-pruning"), ("dydit/dydit", "width/diff-pruning"),
]
"""Verdict pairs across groups (``group/method``, at every budget): every group samples the same
noises and labels per seed, so two groups' entries are paired like two entries of one bench."""
README_GROUPS = ("width", "depth", "depth-scratch", "reuse", "dydit")
"""The groups of every method at its default settings: the README's table (``--readme``)."""
FIDELITY_START, FIDELITY_END = "<!-- fidelity:start -->", "<!-- fidelity:end -->"
SCRATCH_OF = {"width": "width/scratch", "depth": "depth-scratch/scratch"}
"""The scratch baseline (``group/method``) with each group's student architecture: entries at
another recovery length are paired with it too (does compression plus recovery beat retraining?)."""


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
    ap.add_argument("--readme", action="store_true", help="also write the README's table of the default groups "
                    "(between its fidelity markers) from their results files")
    ap.add_argument("--against", type=Path, help="the same groups at another recovery length (e.g. bench/fidelity): "
                    "pair every entry with its namesake there and list the rankings that change (OUT/recovery.md)")
    ap.add_argument("--skip", default="", help="methods to leave out of every group, e.g. scratch (trained with the "
                    "teacher's recipe, so a second recovery length does not change it)")
    args = ap.parse_args()
    names = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = sorted(set(names) - set(GROUPS))
    if unknown:
        ap.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    budgets = [float(b) for b in args.budgets.split(",")]
    skip = {m.strip() for m in args.skip.split(",") if m.strip()}
    for name in names:
        methods, options = GROUPS[name]
        methods = [m for m in methods if m not in skip]
        if not methods:
            continue
        config = BenchConfig(model="digits-dit", budgets=budgets, methods=methods, samples=args.samples,
                             seeds=args.seeds, steps=args.steps, recover_steps=args.recover_steps, options=options,
                             progress=False, **SETTINGS.get(name, {}))
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
    cross_verdicts(args.out, budgets)
    if args.against:
        recovery_flips(args.out, args.against)
    if args.readme:
        from slimdiff.eval.report import replace_block

        changed = replace_block(ROOT / "README.md", FIDELITY_START, FIDELITY_END, readme_block(args.out))
        print("README.md updated" if changed else "README.md already up to date", flush=True)


def recovery_flips(out: Path, against: Path) -> dict:
    """Every entry under ``out`` next to the same ``group/method@budget`` under ``against`` (the
    same protocol at another recovery length), paired seed by seed, and every two methods of one
    group and budget whose verdict differs between the two lengths: the rankings that flip.
    Written to ``out/recovery.json`` and ``out/recovery.md``; returns the record."""
    import itertools
    import json

    from slimdiff.bench import environment, write_json
    from slimdiff.eval.report import _with_interval, provenance_line
    from slimdiff.eval.stats import better, paired, verdict

    def scored(root: Path, group: str) -> tuple[dict, int | None]:
        path = root / group / "results.json"
        if not path.exists():
            return {}, None
        results = json.loads(path.read_text())
        return ({k: e for k, e in results["entries"].items() if not e.get("skipped") and e.get("fd_seeds")},
                results["config"]["recover_steps"])

    rows, flips, scratch, lengths = [], [], [], set()
    for path in sorted(out.glob("*/results.json")):
        group = path.parent.name
        (mine, n), (theirs, m) = scored(out, group), scored(against, group)
        common = [k for k in mine if k in theirs and mine[k]["seeds"] == theirs[k]["seeds"]]
        if not common:
            continue
        lengths.add((m, n))
        if group in SCRATCH_OF:
            sgroup, smethod = SCRATCH_OF[group].split("/")
            others = scored(against, sgroup)[0]
            for key, e in mine.items():
                ref = others.get(f"{smethod}@{e['budget']:g}")
                if ref is not None and ref["seeds"] == e["seeds"]:
                    ka, kb = f"{group}/{key} at {n}", f"{SCRATCH_OF[group]}@{e['budget']:g}"
                    scratch.append(verdict(ka, kb, paired(e["fd_seeds"], ref["fd_seeds"], "fd")))
        for key in common:
            pair = paired(mine[key]["fd_seeds"], theirs[key]["fd_seeds"], "fd")
            rows.append({"entry": f"{group}/{key}", "short": _with_interval(theirs[key], "fd"),
                         "long": _with_interval(mine[key], "fd"),
                         "verdict": verdict(f"{group}/{key} at {n}", f"{group}/{key} at {m}", pair), **pair})
        for x, y in itertools.combinations(common, 2):
            if mine[x]["budget"] != mine[y]["budget"]:
                continue
            kx, ky = f"{group}/{x}", f"{group}/{y}"
            short, long = (paired(r[x]["fd_seeds"], r[y]["fd_seeds"], "fd") for r in (theirs, mine))
            name = {"a": kx, "b": ky, None: None}
            if better(short) != better(long):
                flips.append({"a": kx, "b": ky, "winner_at_short": name[better(short)],
                              "winner_at_long": name[better(long)], "short": verdict(kx, ky, short),
                              "long": verdict(kx, ky, long)})
    if not rows:
        return {}
    if len(lengths) != 1:
        raise ValueError(f"the groups under {out} and {against} ran at several pairs of recovery lengths: {lengths}")
    (m, n), = lengths
    env = environment()
    record = {"environment": env, "out": str(out), "against": str(against), "recover_steps": n,
              "against_recover_steps": m, "entries": rows, "flips": flips, "scratch": scratch}
    write_json(out / "recovery.json", record)
    lines = [f"# Recovery length: {n} steps against {m}", "", provenance_line(env), "",
             f"Every entry of `{out.name}` (recovery {n}) next to its namesake in `{against.name}` (recovery {m}), FD "
             "paired seed by seed (95% intervals).", "",
             f"| entry | FD at {m} | FD at {n} | verdict |", "|---|---|---|---|",
             *(f"| {r['entry']} | {r['short']} | {r['long']} | {r['verdict']} |" for r in rows), "",
             "## Rankings that change with the recovery length", ""]
    lines += [f"- `{f['a']}` vs `{f['b']}`: at {m}: {f['short']} At {n}: {f['long']}" for f in flips] or [
        "No two methods of one group and budget change their verdict between the two lengths."]
    if scratch:
        lines += ["", "## Against training from scratch", "",
                  f"Each entry at recovery {n} against the same architecture trained with the teacher's recipe "
                  f"(`scratch` in `{against.name}`).", "", *(f"- {v}" for v in scratch)]
    (out / "recovery.md").write_text("\n".join(lines) + "\n")
    return record


def readme_block(out: Path) -> str:
    """The README's table: every entry of :data:`README_GROUPS` (each method with its defaults)
    under ``out``, one table per budget sorted by FD, as ``group/method@budget``; generated
    from the committed results files only, so a test can check that the README matches them."""
    import json

    from slimdiff.eval.report import _with_interval, budget_tables, provenance_line

    entries, budgets, teacher, cfg, lines = {}, set(), None, None, []
    for group in README_GROUPS:
        path = out / group / "results.json"
        if not path.exists():
            continue
        results = json.loads(path.read_text())
        teacher, cfg = teacher or results["teacher"], cfg or results["config"]
        budgets |= {e["budget"] for e in results["entries"].values()}
        entries |= {f"{group}/{key}": e for key, e in results["entries"].items()}
        lines.append(f"- [{group}]({path.relative_to(ROOT).as_posix().replace('results.json', 'report.md')}): "
                     f"{provenance_line(results['environment'])}")
    if teacher is None:
        raise FileNotFoundError(f"no results of {', '.join(README_GROUPS)} under {out}: run the groups first")
    config = {"budgets": sorted(budgets, reverse=True)}
    head = (f"{cfg['model']}, {cfg['sampler'].upper()} {cfg['steps']}, {len(teacher['seeds'])} seeds x {cfg['samples']} "
            f"samples paired with the "
            f"teacher's samples of the same noise; FD and SSIM as mean +- 95% interval. Teacher FD "
            f"{_with_interval(teacher, 'fd')}, class accuracy {teacher['class_acc']:.3g}; real-data floor "
            f"{teacher['fd_floor']:.3g}. Each method runs with its defaults; the recovery of the static methods is "
            f"{cfg['recover_steps']} steps; `scratch` is the student's architecture trained with the teacher's 8000-step recipe. "
            f"Variants, seed-paired verdicts and the papers' claims: [docs/FIDELITY.md](docs/FIDELITY.md).")
    return "\n".join([FIDELITY_START, "", head, "", *budget_tables({"config": config, "entries": entries}),
                      "Generated by `python scripts/measure_fidelity.py --readme` from:", "", *lines, "", FIDELITY_END])


def cross_verdicts(out: Path, budgets: list[float]) -> None:
    """The :data:`CROSS` pairs whose two entries exist, and each group's wall time (what the
    measurement costs on this machine), into ``out/cross.json`` and ``out/cross.md``."""
    import json

    from slimdiff.bench import environment, write_json
    from slimdiff.eval.report import provenance_line
    from slimdiff.eval.stats import paired, verdict

    pairs = {}
    for a, b in CROSS:
        for budget in budgets:
            ea, eb = (_entry(out, spec, budget) for spec in (a, b))
            if ea is None or eb is None or ea["seeds"] != eb["seeds"]:
                continue
            ka, kb = f"{a}@{budget:g}", f"{b}@{budget:g}"
            pair = paired(ea["fd_seeds"], eb["fd_seeds"], "fd")
            pairs[f"{ka} vs {kb}"] = {**pair, "a": ka, "b": kb, "verdict": verdict(ka, kb, pair)}
    hours = wall_hours(out)
    if not pairs and not hours:
        return
    env = environment()
    write_json(out / "cross.json", {"environment": env, "pairs": pairs, "wall_hours": hours})
    lines = ["# Fidelity: verdicts across groups", "", provenance_line(env), "",
             "FD, paired over the seeds every group shares (95% intervals); each side is `group/method@budget`.", "",
             *(f"- {p['verdict']}" for p in pairs.values()), "",
             "## What it cost", "",
             "Wall time of every finished entry (compression with its recovery, and scoring on every seed; "
             "the teacher's cached samples not counted), one process per group on this machine.", "",
             "| group | entries | hours |", "|---|---|---|",
             *(f"| {g} | {h['entries']} | {h['hours']:.2f} |" for g, h in hours.items()),
             f"| all | {sum(h['entries'] for h in hours.values())} | {sum(h['hours'] for h in hours.values()):.2f} |", ""]
    (out / "cross.md").write_text("\n".join(lines))
    print(json.dumps({k: p["verdict"] for k, p in pairs.items()}, indent=1), flush=True)


def wall_hours(out: Path) -> dict[str, dict]:
    """Per group directory under ``out``: finished entries and their summed wall hours
    (``compress_wall_s + eval_wall_s`` as each entry recorded them)."""
    import json

    hours = {}
    for results in sorted(out.glob("*/results.json")):
        entries = [e for e in json.loads(results.read_text())["entries"].values() if not e.get("skipped")]
        seconds = sum((e.get("compress_wall_s") or 0) + (e.get("eval_wall_s") or 0) for e in entries)
        hours[results.parent.name] = {"entries": len(entries), "hours": seconds / 3600}
    return hours


def _entry(out: Path, spec: str, budget: float) -> dict | None:
    """Group ``spec = group/method``'s entry at ``budget`` with per-seed FDs, or None."""
    import json

    group, method = spec.split("/")
    path = out / group / "results.json"
    if not path.exists():
        return None
    entry = json.loads(path.read_text())["entries"].get(f"{method}@{budget:g}")
    return entry if entry and not entry.get("skipped") and entry.get("fd_seeds") else None


if __name__ == "__main__":
    main()
