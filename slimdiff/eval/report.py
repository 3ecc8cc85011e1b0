"""Pictures and the markdown report of a benchmark (BENCHMARK.md "Outputs").

The plot primitives here draw what a method *recorded* (so a saved model can be drawn again
after loading), except DyDiT's token-skip maps, which need a sampling run of the routed
model. Each method's ``MethodSpec.draw`` picks its primitives
(:func:`slimdiff.bench.method_pictures` calls them for a model's chain):

- width methods (Diff-Pruning, random/magnitude width): :func:`kept_channels`, and for
  Diff-Pruning :func:`timestep_losses` (L_t / L_max with its threshold);
- TinyFusion: :func:`option_probabilities` over the search; depth baselines: :func:`kept_blocks`;
- DyDiT: :func:`width_per_timestep` (active heads and MLP channel groups per (timestep,
  block)) and :func:`token_keep_maps`;
- reuse methods (DiP-GO, DeepCache, L2C, fewer steps): :func:`reuse_plan`, the (step x block)
  compute plan.

The bench's own outputs are :func:`pareto`, :func:`sample_rows`, :func:`markdown` and the
README block (:func:`update_readme`). Nothing here imports :mod:`slimdiff.methods`: the
shared machinery below the methods draws with these primitives.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, layout: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def kept_channels(widths: dict[str, list[int]], path: Path, title: str) -> Path:
    """Bars of original vs kept output channels per pruned layer."""
    plt = _plt()
    names = list(widths)
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.22), 3.5))
    ax.bar(range(len(names)), [w[0] for w in widths.values()], color="#ddd", label="original")
    ax.bar(range(len(names)), [w[1] for w in widths.values()], color="#36c", label="kept")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
    ax.set_ylabel("output channels")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def timestep_losses(curves: dict[str, dict], threshold: float, path: Path, stride: int = 1) -> Path:
    """L_t / L_max over the timesteps Diff-Pruning accumulated (every ``stride``-th), one line per run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, trace in curves.items():
        losses = trace["losses"]
        top = max(losses)
        ax.plot([(trace.get("first_t") or 0) + i * stride for i in range(len(losses))], [v / top for v in losses], label=name)
    ax.axhline(threshold, color="k", ls="--", lw=0.8, label="threshold")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("L_t / L_max")
    ax.legend(fontsize=7)
    return _save(fig, path)


def option_probabilities(groups: list[dict], history: dict, path: Path) -> Path:
    """TinyFusion: one panel per group, one line per keep-option, over the search steps."""
    plt = _plt()
    steps, values = history["steps"], history["values"]  # values[record][group][option]
    fig, axes = plt.subplots(1, len(groups), figsize=(max(5.0, 2.6 * len(groups)), 2.8), sharey=True, squeeze=False)
    for j, (ax, g) in enumerate(zip(axes[0], groups)):
        final = values[-1][j]
        named = sorted(range(len(final)), key=lambda o: -final[o])[:6]  # the legend names the likeliest six
        for o, blocks in enumerate(g["options"]):
            ax.plot(steps, [v[j][o] for v in values],
                    label="keep " + ",".join(map(str, blocks)) if o in named else None)
        ax.set_title(f"group {j} ({g['shape']}, {len(final)} options)", fontsize=9)
        ax.set_xlabel("search step")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("option probability")
    fig.suptitle("TinyFusion: option probabilities over the search", fontsize=10)
    return _save(fig, path)


def kept_blocks(kept: list[int], depth: int, path: Path, title: str) -> Path:
    """One row of ``depth`` cells, filled where a block is kept."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, depth * 0.35), 1.4))
    ax.imshow([[i in kept for i in range(depth)]], cmap="Greens", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(depth))
    ax.set_yticks([])
    ax.set_xlabel("block")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def width_per_timestep(tables: list[dict], max_heads: int, max_groups: int, path: Path) -> Path:
    """DyDiT: active heads / MLP channel groups per (sampling step, block)."""
    import numpy as np

    plt = _plt()
    heads = np.array([[len(h) for h in e["heads"]] for e in tables]).T
    groups = np.array([[len(g) for g in e["groups"]] for e in tables]).T
    ticks = list(range(0, len(tables), max(1, len(tables) // 6)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, data, title, top in ((axes[0], heads, "active heads", max_heads),
                                 (axes[1], groups, "active MLP channel groups", max_groups)):
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=top)
        ax.set_xlabel("sampling step (t from high to low)")
        ax.set_ylabel("block")
        ax.set_xticks(ticks, [int(tables[i]["t"]) for i in ticks])
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    return _save(fig, path)


def token_keep_maps(model: nn.Module, path: Path, *, steps: int, cfg: float, n: int = 8) -> Path:
    """DyDiT: samples, and per token the fraction of blocks whose MLP ran, at early/middle/late steps."""
    from slimdiff.diffusion.sampling import sample
    from slimdiff.models.backbone import as_backbone
    from slimdiff.utils import to_uint8

    plt = _plt()
    routing = model.dydit
    pick = sorted({0, steps // 2, steps - 1})
    maps: dict[int, torch.Tensor] = {}

    def grab(i, t, x):
        if i in pick:
            maps[i] = torch.stack([r.keep_maps.float() for r in routing._routes]).mean(0).cpu()

    bb = as_backbone(model)
    classes = list(range(n)) if bb.conditioning == "class" else None
    x = sample(model, steps=steps, num_samples=n, classes=classes, cfg=cfg, callback=grab)
    grid, imgs = bb.token_grid, to_uint8(x)
    fig, axes = plt.subplots(1 + len(pick), n, figsize=(1.4 * n, 1.5 * (1 + len(pick))), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(imgs[j][..., :3].squeeze(), cmap="gray")
        for k, i in enumerate(pick):
            axes[k + 1, j].imshow(maps[i][j].reshape(grid).numpy(), cmap="magma", vmin=0, vmax=1)
            if j == 0:
                axes[k + 1, j].set_ylabel(f"step {i}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("samples, and the fraction of blocks whose MLP ran per token", fontsize=9)
    return _save(fig, path)


def reuse_plan(plan: dict, path: Path, title: str) -> Path:
    """The (step x block) plan: computed (green) or reused (white); skipped steps are white columns."""
    from slimdiff.runtime.reuse import ReusePlan

    plt = _plt()
    p = ReusePlan.from_dict(plan)
    c = p.compute.clone()
    if p.step_compute:
        c[torch.tensor([not v for v in p.step_compute])] = False
    fig, ax = plt.subplots(figsize=(max(4, c.shape[0] / 6), 3))
    ax.imshow(c.T.float().numpy(), aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("sampling step")
    ax.set_ylabel("block")
    ax.set_title(f"{title}: computed (green) / reused (white)", fontsize=9)
    return _save(fig, path)


def pareto(points: dict[str, tuple[float, ...]], path: Path, *, reference_fd: float | None = None,
           floor: float | None = None, title: str = "") -> Path:
    """MACs ratio vs FD, every point labelled without overlaps (:func:`place_labels`), its 95%
    interval as an error bar where ``points`` gives one (``(macs, fd)`` or ``(macs, fd, ci95)``),
    the Pareto front (lower-left is better) drawn."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    items = sorted(points.items(), key=lambda kv: (kv[1][0], kv[1][1]))
    front, best = [], math.inf
    for name, (macs, fd, *_) in items:
        if fd < best:
            front.append((macs, fd))
            best = fd
    for name, (macs, fd, *ci) in items:
        color = "#c33" if (macs, fd) in front else "#36c"
        ax.scatter(macs, fd, s=18, color=color, zorder=3)
        if ci and ci[0]:
            ax.errorbar(macs, fd, yerr=[[min(ci[0], fd * 0.99)], [ci[0]]], color=color, lw=0.8, capsize=2, zorder=2)
    if len(front) > 1:
        ax.step([m for m, _ in front], [f for _, f in front], where="post", color="#c33", lw=1, label="Pareto front")
    if reference_fd is not None:
        ax.axhline(reference_fd, color="k", lw=0.8, ls=":", label="teacher")
    if floor is not None:
        ax.axhline(floor, color="g", lw=0.8, ls="--", label="real-data floor")
    ax.set_xlabel("sampling MACs / teacher's")
    ax.set_yscale("log")  # FDs span orders of magnitude; the good region must stay readable
    ax.set_ylabel("FD (log scale, lower is better; bars: 95% over seeds)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()  # the final layout first: label boxes are measured where they will be drawn
    place_labels(ax, [(name, macs, fd) for name, (macs, fd, *_) in items])
    return _save(fig, path, layout=False)


LABEL_OFFSETS = [(4, 3), (4, -9), (-4, 3), (-4, -9), (4, 10), (4, -16), (-4, 10), (-4, -16)]
"""Offsets (points) tried in turn for a label: beside its point, right then left, then further out."""


def place_labels(ax: Any, labels: list[tuple[str, float, float]], fontsize: int = 6) -> list:
    """Annotate each ``(text, x, y)`` on ``ax`` at the first of :data:`LABEL_OFFSETS` (then ever
    further out, with a leader line) whose box overlaps no label placed before; returns the texts."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    placed, texts = [], []
    for text, x, y in labels:
        for k in range(40):
            dx, dy = LABEL_OFFSETS[k % len(LABEL_OFFSETS)]
            far = 1 + k // len(LABEL_OFFSETS)  # every round of offsets further out
            t = ax.annotate(text, (x, y), fontsize=fontsize, xytext=(dx * far, dy * far), textcoords="offset points",
                            ha="left" if dx > 0 else "right",
                            arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"} if far > 1 else None)
            box = t.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(b) for b in placed) or k == 39:
                break
            t.remove()
        placed.append(box)
        texts.append(t)
    return texts


def sample_rows(rows: dict[str, torch.Tensor], path: Path) -> Path:
    """One labelled row of samples per model (same noise and labels in every row)."""
    from slimdiff.utils import to_uint8

    plt = _plt()
    n = max(len(x) for x in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(0.8 * n + 1.6, 0.85 * len(rows)), squeeze=False)
    for r, (name, x) in enumerate(rows.items()):
        imgs = to_uint8(x)
        for j in range(n):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(imgs):
                ax.imshow(imgs[j][..., :3].squeeze(), cmap="gray", vmin=0, vmax=255)
            if j == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    return _save(fig, path)


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def _with_interval(e: dict, metric: str) -> str:
    """``mean +- half-width`` when the entry was scored on several seeds, else the value."""
    half = e.get(f"{metric}_ci95")
    return _fmt(e.get(metric)) if half is None else f"{_fmt(e.get(metric))} +- {_fmt(half, '.2g')}"


def _params_ratio(e: dict) -> float | None:
    if e.get("params_ratio") is not None:
        return e["params_ratio"]
    return e["params"] / e["reference_params"] if e.get("reference_params") else None


def budget_tables(results: dict) -> list[str]:
    """One markdown table per budget, rows sorted by FD (lower first); skipped entries say why.
    With several seeds, FD and SSIM read ``mean +- 95% interval``; "realised MACs" is the ratio
    counted over the bench's own samples (input-dependent models), "params" the parameter ratio."""
    head = ("| entry | kind | MACs ratio | realised MACs | params | FD | class acc | SSIM | PSNR | wall ratio | "
            "compress CPU-s |",
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = []
    for budget in results["config"]["budgets"]:
        rows = [(k, e) for k, e in results["entries"].items() if e["budget"] == budget]
        lines += [f"### Budget {budget}", "", *head]
        for key, e in sorted(rows, key=lambda kv: (kv[1].get("fd") is None, kv[1].get("fd") or 0)):
            if e.get("skipped"):
                lines.append(f"| {key} | {e['kind']} | - | - | - | skipped: {e['skipped']} | | | | | |")
                continue
            lines.append(f"| {key} | {e['kind']} | {_fmt(e['macs_ratio'])} | {_fmt(e.get('macs_ratio_realised'))} | "
                         f"{_fmt(_params_ratio(e))} | {_with_interval(e, 'fd')} | {_fmt(e['class_acc'])} | "
                         f"{_with_interval(e, 'ssim')} | {_fmt(e['psnr'])} | {_fmt(e['wall_ratio'])} | "
                         f"{_fmt(e['compress_cpu_s'], '.0f')} |")
        lines.append("")
    return lines


def verdict_lines(results: dict) -> list[str]:
    """The seed-paired verdicts (``results["pairs"]``): a claim only where the interval excludes zero."""
    pairs = results.get("pairs") or {}
    if not pairs:
        return []
    seeds = len(results["teacher"].get("seeds") or [1])
    return [f"## Verdicts (FD, paired over {seeds} seeds, 95% intervals)", "",
            *(f"- {p['verdict']}" for p in pairs.values()), ""]


def provenance_line(env: dict) -> str:
    """Which command at which commit wrote a report (files written before commands were recorded
    say so)."""
    return (f"Written by `{env.get('command') or 'a command not recorded'}` at commit "
            f"`{(env.get('git_commit') or 'unknown')[:12]}`.")


def markdown(results: dict) -> str:
    """The bench report: settings, the teacher, one table per budget (sorted by FD), chains, files."""
    cfg, teacher = results["config"], results["teacher"]
    lines = [f"# slimdiff bench: {cfg['model']}", "",
             f"Sampler {cfg['sampler']} x{cfg['steps']}, cfg {cfg['cfg']}, {cfg['samples']} samples (balanced labels, "
             f"seeds {cfg.get('seeds', 1)} from {cfg['seed']}; every model sees the teacher's noise of each seed), "
             f"recovery {cfg['recover_steps']} steps"
             + (f" and {cfg['long_recover_steps']} (entries `/r{cfg['long_recover_steps']}`)"
                if cfg.get("long_recover_steps") else "") + " "
             f"(batch {cfg['batch_size']}, lr {cfg['lr']}, kd {cfg['kd']}).", "", provenance_line(results["environment"]),
             "", f"Teacher: FD {_with_interval(teacher, 'fd')} (real-data floor {_fmt(teacher['fd_floor'])}; "
             f"subsample floor {_fmt(teacher['fd_floor_subsample_mean'])} +- {_fmt(teacher['fd_floor_subsample_std'])}), "
             f"class accuracy {_fmt(teacher['class_acc'])}, {teacher['params']:,} parameters.", ""]
    if results.get("pending"):
        lines += [f"**Unfinished**: {len(results['pending'])} entries still to run ({', '.join(results['pending'])}); "
                  "rerun the same command to resume.", ""]
    lines += budget_tables(results)
    lines += verdict_lines(results)
    if results.get("chains"):
        lines += ["## Chains", ""]
        for key, c in results["chains"].items():
            verdict = "beats" if c["beats_every_single"] else "does not beat"
            lines.append(f"- `{key}` (FD {_fmt(c['fd'])}) {verdict} every single method at budget {c['budget']} "
                         f"(best single: `{c['best_single']}`, FD {_fmt(c['best_single_fd'])}).")
        lines.append("")
    lines += ["## Pictures", "", "![Pareto front](pareto.png)", "", "![samples](samples.png)", ""]
    for key, files in results.get("pictures", {}).items():
        lines += [f"- {key}: " + ", ".join(f"[{Path(f).name}]({f})" for f in files)]
    return "\n".join(lines) + "\n"


README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def readme_block(results: dict, directory: str) -> str:
    """The README's bench section, generated from ``directory/results.json`` (never typed by hand)."""
    cfg, teacher = results["config"], results["teacher"]
    done = sum(1 for e in results["entries"].values() if not e.get("skipped"))
    lines = [README_START, "",
             f"`slimdiff bench --model {cfg['model']} --budgets {','.join(f'{b:g}' for b in cfg['budgets'])} "
             f"-o {directory}` ({cfg['samples']} samples, {cfg['sampler']} x{cfg['steps']}, recovery "
             f"{cfg['recover_steps']} steps; {done} entries in `{directory}/results.json`; full report: "
             f"[`{directory}/report.md`]({directory}/report.md)). Teacher FD {_fmt(teacher['fd'])}, class accuracy "
             f"{_fmt(teacher['class_acc'])}; real-data floor {_fmt(teacher['fd_floor'])}.", ""]
    if results.get("pending"):
        lines += [f"Unfinished: {len(results['pending'])} entries still to run (rerun the command to resume).", ""]
    lines += budget_tables(results)
    lines += verdict_lines(results)
    for key, c in (results.get("chains") or {}).items():
        verdict = "beats" if c["beats_every_single"] else "does not beat"
        lines.append(f"- `{key}` {verdict} every single method at its budget (best single `{c['best_single']}`).")
    lines += ["", f"![MACs vs FD]({directory}/pareto.png)", "", README_END]
    return "\n".join(lines)


def update_readme(readme: Path, results: dict, directory: str) -> bool:
    """Replace the block between the bench markers of ``readme``; returns whether it changed."""
    return replace_block(readme, README_START, README_END, readme_block(results, directory))


def replace_block(path: Path, start: str, end: str, block: str) -> bool:
    """Replace the text from marker ``start`` to marker ``end`` of the file ``path`` by ``block``
    (which carries both markers): how generated tables enter the README. Returns whether it changed."""
    text = path.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    new = head + block + rest.split(end, 1)[1]
    path.write_text(new)
    return new != text
