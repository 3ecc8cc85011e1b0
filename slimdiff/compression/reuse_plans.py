"""Reuse plans: the machinery DiP-GO and the step-reuse baselines share.

Every reuse method yields the unchanged model plus a (step x block) :class:`ReusePlan` on
the runtime of :mod:`slimdiff.runtime.reuse`. This module holds what they have in common:

* **post-processing** of per-(step, block) reuse scores to a table meeting the budget
  exactly (:func:`threshold_plan`: the DiP-GO paper's ranked search, or the reference code's
  greedy sweep), with optional whole-step scores and steps that reuse every block skipping
  the model call (:func:`split_plan`, :func:`called_steps`), and the MACs of a table;
* **set-up and result**: :func:`prepare` (one reuse method per model, block MACs, a
  reachable budget), :func:`finish` (install the plan, record it), :func:`restore_plan` (the
  restorer of every reuse method) and :func:`draw_plan` (their report picture);
* **data**: :func:`teacher_batch`, seeded noise and the original model's samples from it,
  the data-free training signal of the learned planners (DiP-GO, L2C), which share
  :data:`OPT_STEPS`.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimdiff.errors import UsageError
from slimdiff.methods.base import Context, record
from slimdiff.runtime.reuse import (
    BlockCosts,
    ReusePlan,
    apply_block_reuse,
    block_costs,
    block_reuse_disabled,
    get_block_reuse,
    remove_block_reuse,
)

OPT_STEPS = 150
"""Default optimisation steps of the learned planners (DiP-GO, and L2C so that both get equal
optimisation). On digits-dit at budget 0.5 (DDIM 50, 2000 samples) 30 DiP-GO steps left long
stale reuse runs (FD 8.9, SSIM 0.985 to the teacher, bench/digits); 150 steps gave FD 5.8,
SSIM 0.997 (bench/dipgo/opt_steps_150.json). The reference runs 500."""


def check_opt_steps(opt_steps: Any) -> int:
    """A learned planner's optimisation steps, checked (``None``: :data:`OPT_STEPS`)."""
    steps = OPT_STEPS if opt_steps is None else opt_steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise UsageError(f"--opt-steps must be a non-negative integer, got {opt_steps!r}")
    return steps


# --------------------------------------------------------------------------- post-processing
def split_plan(table: torch.Tensor, n_blocks: int, skip_reused_steps: bool = False) -> tuple[torch.Tensor, list[bool]]:
    """``(compute, step_compute)`` of a table (S, N) or, with a step-gate column, (S, N + 1).

    A step whose gate is off, or (``skip_reused_steps``) that reuses every block, skips the
    model call; its compute row is cleared (nothing runs there).
    """
    compute = table[:, :n_blocks].clone()
    steps = table[:, n_blocks].tolist() if table.shape[1] > n_blocks else [True] * table.shape[0]
    if skip_reused_steps:
        steps = [s and c for s, c in zip(steps, called_steps(compute))]
    compute[~torch.tensor(steps, dtype=torch.bool)] = False
    return compute, steps


def table_cost(costs: BlockCosts, table: torch.Tensor, skip_reused_steps: bool = False) -> float:
    """Sampling MACs per image and branch of a table (S, N) or (S, N + 1) (see :func:`split_plan`)."""
    return costs.macs(*split_plan(table, len(costs.blocks), skip_reused_steps))


def called_steps(compute: torch.Tensor) -> list[bool]:
    """``step_compute`` of a plan whose steps that reuse every block skip the model call."""
    return [True] + [bool(row.any()) for row in compute[1:]]


def minimum_fraction(costs: BlockCosts, steps: int, step_skips: bool = False) -> float:
    """Cheapest reachable fraction: everything reused after step 0; ``step_skips`` (step
    gates, or steps reusing every block skip the call): only step 0 runs."""
    c = torch.zeros(steps, len(costs.blocks), dtype=torch.bool)
    c[0] = True
    return table_cost(costs, c, step_skips) / table_cost(costs, torch.ones_like(c))


def check_reachable(costs: BlockCosts, steps: int, budget: float, step_skips: bool = False) -> None:
    """UsageError when ``budget`` is below :func:`minimum_fraction`."""
    low = minimum_fraction(costs, steps, step_skips)
    if budget < low - 1e-12:
        what = "step 0 always runs" if step_skips else "step 0 and the non-block layers always run"
        raise UsageError(
            f"budget {budget:g} is below what block reuse can reach ({low:.4f} of the sampling MACs: {what}): "
            "use a budget >= that, fewer steps, or chain a depth/width method first"
        )


def threshold_plan(p_reuse: torch.Tensor, costs: BlockCosts, budget: float, method: str = "search",
                   skip_reused_steps: bool = False) -> torch.Tensor:
    """Table meeting ``budget`` (fraction of the all-compute MACs) from scores ``p_reuse``
    (S, N), or (S, N + 1) whose last column scores skipping the whole step (see
    :func:`split_plan`); ``skip_reused_steps``: steps that reuse every block cost nothing.

    The plan's MACs are within one block's MACs below the budget, plus one step's non-block
    MACs when a last reused block empties a step (``skip_reused_steps``); UNets: plus the
    producers a block frees. With step scores, when the bisection's last reused entry is a
    whole step, the plan instead keeps that step and reuses the next-ranked *block* entries
    as far as the budget needs, if that lands closer to it; if no block entries can, the
    shortfall may reach one step's non-block MACs.
    """
    steps, n = p_reuse.shape[0], len(costs.blocks)
    gated = p_reuse.shape[1] == n + 1
    check_reachable(costs, steps, budget, gated or skip_reused_steps)
    target = budget * table_cost(costs, torch.ones(p_reuse.shape, dtype=torch.bool))
    cost = partial(table_cost, costs, skip_reused_steps=skip_reused_steps)
    check_postprocess(method, gated)
    if method == "sweep":
        return _sweep(p_reuse, cost, target)
    order = torch.argsort(p_reuse[1:].flatten(), descending=True, stable=True)

    def table(reused: torch.Tensor) -> torch.Tensor:
        c = torch.ones(p_reuse.shape, dtype=torch.bool)
        flat = c[1:].flatten()
        flat[reused] = False
        c[1:] = flat.view(steps - 1, -1)
        return c

    def cheapest(prefix: torch.Tensor, entries: torch.Tensor) -> int:
        """Fewest leading ``entries`` that, reused besides ``prefix``, meet the target."""
        lo, hi = 0, entries.numel()
        while lo < hi:
            mid = (lo + hi) // 2
            if cost(table(torch.cat([prefix, entries[:mid]]))) <= target:
                hi = mid
            else:
                lo = mid + 1
        return lo

    k = cheapest(order[:0], order)  # cost(table(order)) <= target is guaranteed by check_reachable
    best = table(order[:k])
    if gated and k > 0 and int(order[k - 1]) % (n + 1) == n:
        blocks = order[k:][order[k:] % (n + 1) != n]
        alt = table(torch.cat([order[:k - 1], blocks[:cheapest(order[:k - 1], blocks)]]))
        if cost(best) < cost(alt) <= target:
            best = alt
    return best


def check_postprocess(method: str, step_gates: bool) -> None:
    """UsageError unless ``method`` is a post-processing :func:`threshold_plan` can run."""
    if method not in ("search", "sweep"):
        raise UsageError(f"unknown post-processing {method!r}; use 'search' (paper) or 'sweep' (reference code)")
    if method == "sweep" and step_gates:
        raise UsageError("postprocess 'sweep' is not available with step gates: they need postprocess='search' "
                         "(the reference's sweep ranks blocks only)")


def _sweep(p_reuse: torch.Tensor, cost, target: float) -> torch.Tensor:
    """The reference code's greedy sweep (``prune(expected_ratio, prune_threshold=0.95)``)."""
    c = torch.ones(p_reuse.shape, dtype=torch.bool)
    thr = 0.95
    while thr > -1e-9:
        for b in reversed(range(p_reuse.shape[1])):
            for t in torch.argsort(p_reuse[1:, b], descending=True, stable=True).tolist():
                if p_reuse[t + 1, b] > thr and c[t + 1, b]:
                    c[t + 1, b] = False
                    if cost(c) <= target:
                        return c
        thr -= 0.05
    c[1:] = False
    return c


# --------------------------------------------------------------------------- set-up and result
def finish(model: nn.Module, name: str, compute: torch.Tensor, ctx: Context, costs: BlockCosts, settings: dict,
           measured: dict, **plan_kw) -> nn.Module:
    """Install the final plan on the unchanged model and record it (every reuse method ends here)."""
    remove_block_reuse(model)
    plan = ReusePlan.for_sampler(compute, ctx.sampler, ctx.steps, model, **plan_kw)
    apply_block_reuse(model, plan)
    full = costs.macs(torch.ones(plan.shape, dtype=torch.bool))
    measured = {**measured, "plan_macs_ratio": costs.macs(plan.compute, plan.step_compute) / full,
                "reused_fraction": plan.reuse_fraction()}
    return record(model, name, {"sampler": ctx.sampler, "steps": ctx.steps, **settings}, measured, plan.to_dict())


def prepare(model: nn.Module, budget: float, ctx: Context, step_skips: bool = False) -> BlockCosts:
    """Refuse a model that already has a plan; measure block MACs; check the budget is reachable."""
    if get_block_reuse(model) is not None:
        raise UsageError("the model already carries a reuse plan: chain at most one reuse method")
    costs = block_costs(model)
    check_reachable(costs, len(ReusePlan.full(ctx.sampler, ctx.steps, model).timesteps), budget, step_skips)
    return costs


def restore_plan(model: nn.Module, extras: dict | None) -> None:
    """Re-apply a recorded reuse plan (the restorer of every reuse method)."""
    if not extras:
        raise UsageError("the model's metadata names a reuse method but holds no plan; compress the model again")
    apply_block_reuse(model, ReusePlan.from_dict(extras))


def draw_plan(name: str, extras: dict, model: nn.Module, out: Path, ctx: dict) -> list[Path]:
    """The report picture of a reuse method: its (step x block) plan."""
    from slimdiff.eval.report import reuse_plan

    return [reuse_plan(extras, out / f"{name}-plan.png", name)] if extras and "compute" in extras else []


# --------------------------------------------------------------------------- data
def teacher_batch(model: nn.Module, n: int, seed: int, *, sampler: str, steps: int, cfg: float,
                  with_target: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Noise, labels and the original model's samples from that noise (no reuse)."""
    from slimdiff.diffusion.sampling import initial_noise, sample
    from slimdiff.models.backbone import as_backbone

    bb = as_backbone(model)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, bb.num_classes, (n,), generator=gen) if bb.conditioning == "class" else None
    noise = initial_noise(bb, n, seed, bb.device)
    if not with_target:
        return noise, labels, None
    with block_reuse_disabled(model):
        target = sample(model, sampler=sampler, steps=steps, num_samples=n,
                        classes=labels.tolist() if labels is not None else None, cfg=cfg, seed=seed, noise=noise)
    return noise, labels, target
