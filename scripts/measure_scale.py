"""Scale (BENCHMARK.md section 3): wall time and peak memory of each method's compression step,
and how they grow with the model (DiT-S/2, B/2, L/2, XL/2; random init, 32x32x4 latents) and,
for DiP-GO, with the number of sampling steps.

Every measurement runs in a fresh child process (``--child``), which reports its wall and CPU
time, its resident memory before the step and its peak resident memory (``ru_maxrss``: the
whole process, model included; torch allocates outside tracemalloc's view, so only the OS
peak is honest). The steps measured:

* ``diff-pruning``: importance (Diff-Pruning's gradient pass, calibration batch 4 of random
  latents, timesteps 0, 250, 500, 750: a random model's loss never meets the threshold) and
  pruning to budget 0.5 (budget search + pruning);
* ``tinyfusion``: one search step (LoRA + depth gates, batch 4) at the budget's 1:2 shape;
* ``dydit``: router installation + one training step (batch 4, with the complete-model loss);
* ``dipgo``: one pruner optimisation step over a DDIM trajectory (batch 1): the teacher's
  samples, the SuperNet trajectory and its backward. Also its memory against the number of
  steps (10 / 25 / 50) with nested checkpoints (``memory="flat"``, the default) and with
  per-step checkpoints (``"steps"``), on DiT-S/2 and the CIFAR10-shaped UNet (cheap enough to sweep).

Writes ``bench/scale/results.json``, ``report.md`` and ``cost_vs_size.png`` after every
measurement (so a long run can be read while it goes); measurements already in results.json
are kept unless ``--fresh``. Run it in the background, one measurement at a time::

    OMP_NUM_THREADS=1 nohup python scripts/measure_scale.py > runs/scale.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = ("DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2")
METHODS = ("diff-pruning", "tinyfusion", "dydit", "dipgo")
SWEEP_STEPS = (10, 25, 50)
SWEEP_MODELS = ("DiT-S/2", "UNet-CIFAR10")  # a transformer (residual caches) and a UNet (nested skip caches)
SWEEP_LATENT, SWEEP_BATCH = 32, 2  # the sweep's setting: trajectory state large enough to see (2 x 256 tokens)
TARGET = {"diff-pruning DiT-XL/2": {"wall_s": 600, "peak_rss_gb": 12}}
BATCH = {"diff-pruning": 4, "tinyfusion": 4, "dydit": 4, "dipgo": 1}


# --------------------------------------------------------------------------- child side
def _rss_gb() -> float:
    """Current resident memory of this process (GB, from /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def _latents(path: Path, size: int, n: int = 16) -> str:
    """A small random latents file (``--data`` format) for the training-based steps."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"latents": torch.randn(n, 4, size, size, generator=g), "labels": torch.randint(0, 1000, (n,), generator=g)},
              str(path))
    return str(path)


def _diff_pruning(model, batch: int, **_) -> dict:
    import torch

    from slimdiff.compression.width import prune_to_budget
    from slimdiff.methods.diff_pruning import accumulate_gradients

    g = torch.Generator().manual_seed(0)
    s = model.config.input_size
    x0, cond = torch.randn(batch, 4, s, s, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    t0 = time.perf_counter()
    trace = accumulate_gradients(model, x0, cond, threshold=0.05, stride=250)
    t1 = time.perf_counter()
    best, tried = prune_to_budget(model, 0.5, "taylor-paper", group_ranking="separate")  # Diff-Pruning's default
    return {"gradient_s": t1 - t0, "prune_s": time.perf_counter() - t1, "timesteps": trace.used,
            "search_trials": len(tried), "macs_ratio": best.macs_ratio}


def _tinyfusion(model, batch: int, work: Path, **_) -> dict:
    from slimdiff.compression.depth import resolve_depth
    from slimdiff.methods.base import Context
    from slimdiff.methods.tinyfusion import SearchConfig, search

    ctx = Context(steps=1, batch_size=batch, data=_latents(work / "latents.safetensors", model.config.input_size),
                  work_dir=work, progress=False)
    groups, chosen = resolve_depth(model, 0.5, ctx, None)
    result = search(model, groups, ctx, SearchConfig(steps=1))
    return {"keep": chosen["keep"], "kept": result.kept}


def _dydit(model, batch: int, work: Path, **_) -> dict:
    from slimdiff.methods.base import Context
    from slimdiff.methods.dydit import DyDiTConfig, cost_model, train_routers
    from slimdiff.runtime.routing import apply_dydit, default_config

    ctx = Context(steps=1, batch_size=batch, data=_latents(work / "latents.safetensors", model.config.input_size),
                  work_dir=work, progress=False)
    apply_dydit(model, default_config(model))
    train_routers(model, 0.5, ctx, DyDiTConfig(train_steps=1), cost_model(model))
    return {}


def _dipgo(model, batch: int, steps: int, memory: str, **_) -> dict:
    import torch

    from slimdiff.compression.reuse_plans import teacher_batch
    from slimdiff.methods.base import Context
    from slimdiff.methods.dipgo import DiPGOPruner, dipgo_loss
    from slimdiff.runtime.reuse import ReusePlan, apply_block_reuse, block_costs

    ctx = Context(sampler="ddim", steps=steps, progress=False)
    costs = block_costs(model)
    apply_block_reuse(model, ReusePlan.full("ddim", steps, model))
    model.requires_grad_(False)
    pruner = DiPGOPruner(steps, len(costs.blocks)).train()
    opt = torch.optim.Adam(pruner.parameters(), lr=0.05)
    t0 = time.perf_counter()
    noise, labels, target = teacher_batch(model, batch, 1, sampler="ddim", steps=steps, cfg=1.0)
    t1 = time.perf_counter()
    total, parts = dipgo_loss(model, pruner, costs, noise, labels, target, sampler=ctx.sampler, steps=steps, cfg=1.0,
                              budget=0.5, memory=memory)
    opt.zero_grad()
    total.backward()
    opt.step()
    return {"teacher_s": t1 - t0, "supernet_s": time.perf_counter() - t1, "loss": float(total.detach())}


STEPS = {"diff-pruning": _diff_pruning, "tinyfusion": _tinyfusion, "dydit": _dydit, "dipgo": _dipgo}


def child(method: str, size: str, latent: int, steps: int, memory: str, batch: int | None = None) -> dict:
    """Build the model, run one compression step, report time and memory (one JSON line)."""
    import torch

    from slimdiff.eval.models import build_model

    t0 = time.perf_counter()
    model = build_model(size, latent)
    build_s = time.perf_counter() - t0
    batch = batch or BATCH[method]
    rss0 = _rss_gb()
    with tempfile.TemporaryDirectory(prefix="scale-") as work:
        c0, t0 = time.process_time(), time.perf_counter()
        detail = STEPS[method](model, batch=batch, steps=steps, memory=memory, work=Path(work))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
    return {"method": method, "model": size, "latent": latent, "steps": steps, "memory": memory, "batch": batch,
            "params": sum(p.numel() for p in model.parameters()), "build_s": build_s, "wall_s": wall, "cpu_s": cpu,
            "rss_before_step_gb": rss0, "peak_rss_gb": peak, "threads": torch.get_num_threads(), **detail}


# --------------------------------------------------------------------------- parent side
def key(m: dict) -> str:
    return f"{m['method']} {m['model']} latent{m['latent']} steps{m['steps']} {m['memory']} batch{m['batch']}"


def measure(method: str, size: str, latent: int = 32, steps: int = 50, memory: str = "flat", batch: int = 1,
            timeout: float = 3600) -> dict:
    """One measurement in a fresh child process."""
    cmd = [sys.executable, __file__, "--child", method, size, "--latent", str(latent), "--steps", str(steps),
           "--memory", memory, "--batch", str(batch)]
    what = {"method": method, "model": size, "latent": latent, "steps": steps, "memory": memory, "batch": batch}
    start = time.time()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**what, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {**what, "error": (out.stderr.strip().splitlines() or ["no output"])[-1], "wall_total_s": time.time() - start}
    return json.loads(lines[-1])


def plan(args) -> list[dict]:
    """The measurements: Diff-Pruning (the target) first, then the DiP-GO step sweep, then the rest."""
    per_size = lambda method: [dict(method=method, size=size, latent=32, steps=1, memory="-",  # noqa: E731
                                    batch=BATCH[method]) for size in args.sizes]
    jobs = per_size("diff-pruning") if "diff-pruning" in args.methods else []
    jobs += [dict(method="dipgo", size=model, latent=SWEEP_LATENT, steps=n, memory=mem, batch=SWEEP_BATCH)
             for model in SWEEP_MODELS for mem in ("flat", "steps") for n in args.sweep]
    for method in ("tinyfusion", "dydit"):
        jobs += per_size(method) if method in args.methods else []
    if "dipgo" in args.methods:
        jobs += [dict(method="dipgo", size=size, latent=32, steps=50, memory="flat", batch=BATCH["dipgo"])
                 for size in args.sizes if size in args.dipgo_sizes]
    return jobs


def per_size(ms: list[dict]) -> list[dict]:
    """The per-model-size measurements (32x32x4 latents; DiP-GO's 50-step run at its batch, not the sweep)."""
    return [m for m in ms if "error" not in m and m["latent"] == 32 and
            (m["method"] != "dipgo" or (m["batch"], m["steps"], m["memory"]) == (BATCH["dipgo"], 50, "flat"))]


def report(res: dict) -> str:
    """report.md from results.json."""
    ms = [m for m in res["measurements"] if "error" not in m]
    lines = ["# Scale: cost of each compression step", "",
             f"Written by `python scripts/measure_scale.py` at commit `{(res.get('git_commit') or 'unknown')[:12]}`; "
             "numbers from results.json. CPU, one child process per measurement, random-init models; peak "
             f"memory is the process's peak RSS (model included). {res['environment']['cpu_count']} CPU cores shared "
             "with other work (wall times are noisy; memory is not).", "",
             "## Per model size (32x32x4 latents)", "",
             "| method | model | params | step | batch | wall s | CPU s | RSS before GB | peak RSS GB | details |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    what = {"diff-pruning": "importance + prune", "tinyfusion": "1 search step", "dydit": "conversion + 1 train step",
            "dipgo": "1 optimisation step, 50-step DDIM"}
    for m in sorted(per_size(ms), key=lambda m: (METHODS.index(m["method"]), m["params"])):
        detail = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in m.items()
                  if k in ("gradient_s", "prune_s", "search_trials", "keep", "teacher_s", "supernet_s")}
        lines.append(f"| {m['method']} | {m['model']} | {m['params'] / 1e6:.0f}M | {what[m['method']]} | {m['batch']} | "
                     f"{m['wall_s']:.1f} | {m['cpu_s']:.1f} | {m['rss_before_step_gb']:.2f} | {m['peak_rss_gb']:.2f} | "
                     f"{json.dumps(detail)} |")
    lines += ["", "## DiP-GO memory against the number of sampling steps", "",
              "| model | input | batch | checkpointing | steps | wall s | RSS before GB | peak RSS GB | peak - before GB |",
              "|---|---|---|---|---|---|---|---|---|"]
    sweep = [m for m in ms if m["method"] == "dipgo" and m not in per_size(ms)]
    for m in sorted(sweep, key=lambda m: (m["model"], m["latent"], m["batch"], m["memory"], m["steps"])):
        shape = "32x32x3" if m["model"].startswith("UNet") else f"{m['latent']}x{m['latent']}x4"
        lines.append(f"| {m['model']} | {shape} | {m['batch']} | {m['memory']} | {m['steps']} | {m['wall_s']:.1f} "
                     f"| {m['rss_before_step_gb']:.3f} | {m['peak_rss_gb']:.3f} | "
                     f"{m['peak_rss_gb'] - m['rss_before_step_gb']:.3f} |")
    lines += ["", "`flat` = nested reentrant checkpoints (the default with DDIM; UNet caches travel as flat tensor "
              "lists), `steps` = one "
              "checkpoint per step. What still grows under `flat` is DiP-GO's pruner (one query per step and block, "
              "self-attention over all of them) and one saved state per halving of the trajectory.", "",
              "## Targets", ""]
    for name, target in TARGET.items():
        method, model = name.split(" ")
        m = next((m for m in ms if m["method"] == method and m["model"] == model and m["latent"] == 32), None)
        if m is None:
            lines.append(f"- {name}: not measured")
            continue
        ok = m["wall_s"] <= target["wall_s"] and m["peak_rss_gb"] <= target["peak_rss_gb"]
        lines.append(f"- {name}: {m['wall_s'] / 60:.1f} min (target <= {target['wall_s'] / 60:.0f}), peak "
                     f"{m['peak_rss_gb']:.1f} GB (target <= {target['peak_rss_gb']}): {'met' if ok else 'NOT MET'}")
    errors = [m for m in res["measurements"] if "error" in m]
    if errors:
        lines += ["", "## Not measured", ""] + [f"- {key(m)}: {m['error']}" for m in errors]
    lines += ["", "![cost vs model size](cost_vs_size.png)", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """Wall time and peak memory against parameters, one line per method (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = per_size(res["measurements"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        pts = sorted((m["params"] / 1e6, m["wall_s"], m["peak_rss_gb"]) for m in ms if m["method"] == method)
        if not pts:
            continue
        p, w, r = zip(*pts)
        axes[0].plot(p, w, "o-", label=method)
        axes[1].plot(p, r, "o-", label=method)
    sizes = sorted({(m["params"] / 1e6, m["model"]) for m in ms if m["method"] == "diff-pruning"})
    for ax, label in zip(axes, ("wall time of the step (s)", "peak RSS (GB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.minorticks_off()
        ax.set_xticks([p for p, _ in sizes], [f"{n}\n{p:.0f}M" for p, n in sizes], fontsize=8)
        ax.set_xlabel("model (parameters)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("compression step cost against model size (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "MODEL"), help=argparse.SUPPRESS)
    ap.add_argument("--latent", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=50, help=argparse.SUPPRESS)
    ap.add_argument("--memory", default="flat", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--dipgo-sizes", default="DiT-S/2,DiT-B/2", help="sizes for DiP-GO's 50-step step (slow on CPU)")
    ap.add_argument("--sweep", default=",".join(map(str, SWEEP_STEPS)), help="DiP-GO step counts for the memory sweep")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "scale")
    ap.add_argument("--fresh", action="store_true", help="measure again what results.json already has")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.latent, args.steps, args.memory, args.batch)), flush=True)
        return
    from slimdiff.eval.speed import environment, git_commit

    args.sizes, args.methods = args.sizes.split(","), args.methods.split(",")
    args.dipgo_sizes, args.sweep = args.dipgo_sizes.split(","), [int(v) for v in args.sweep.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    old = json.loads(path.read_text()) if path.is_file() and not args.fresh else {}
    done = {key(m): m for m in old.get("measurements", []) if "error" not in m}
    res = {"command": " ".join(sys.argv), "environment": environment(), "git_commit": git_commit(),
           "batch": BATCH, "measurements": list(done.values())}
    for job in plan(args):
        k = key({**job, "model": job["size"]})
        if k in done:
            continue
        print(f"{time.strftime('%H:%M:%S')} {k} (load {os.getloadavg()[0]:.1f})", flush=True)
        m = measure(job["method"], job["size"], job["latent"], job["steps"], job["memory"], job["batch"], args.timeout)
        m["load_average"] = list(os.getloadavg())
        print("   ", {k2: m[k2] for k2 in ("wall_s", "peak_rss_gb", "error") if k2 in m}, flush=True)
        res["measurements"] = [x for x in res["measurements"] if key(x) != k] + [m]
        path.write_text(json.dumps(res, indent=2, default=float) + "\n")
        (args.out / "report.md").write_text(report(res))
        plot(res, args.out / "cost_vs_size.png")
    (args.out / "report.md").write_text(report(res))
    plot(res, args.out / "cost_vs_size.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
