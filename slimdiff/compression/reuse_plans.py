"""Reuse plans: the machinery DiP-GO and the step-reuse baselines share.

Every reuse method yields the unchanged model plus a (step x block) :class:`ReusePlan` on
the runtime of :mod:`slimdiff.runtime.reuse`. This module holds what they have in common:

* **post-processing** of per-(step, block) reuse scores to a table meeting the budget
  (:func:`threshold_plan`: our ranked search, within one block below the budget, or the DiP-GO
  reference code's greedy sweep, which ends just above it), with optional whole-step scores,
  and steps that reuse every block skipping the model call (:func:`split_plan`,
  :func:`called_steps`; every reuse method offers it as ``skip_reused_steps``, off by default,
  so that comparisons are fair), and the MACs of a table;
* **set-up and result**: :func:`prepare` (one reuse method per model, block MACs, a
  reachable budget), :func:`finish` (install the plan, record it), :func:`restore_plan` (the
  restorer of every reuse method; :func:`with_legacy_block_plans` for the pre-rename names) and
  :func:`draw_plan` (their report picture);
* **data**: :func:`teacher_batch`, seeded noise and the original model's samples from it,
  the data-free training signal of the learned planners (DiP-GO, L2C), which share
  :data:`OPT_STEPS`.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial, wraps
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimdiff.budget import BUDGET_NOTE, far_below
from slimdiff.errors import UsageError
from slimdiff.methods.base import Context, record
from slimdiff.runtime.branch_cache import check_no_plan
from slimdiff.runtime.reuse import (
    BlockCosts,
    ReusePlan,
    apply_block_reuse,
    block_costs,
    block_reuse_disabled,
    effective_compute,
    remove_block_reuse,
    reuse_blocks,
)

OPT_STEPS = 150
"""Default optimisation steps of the block-level L2C router (``l2c-block``), 8 trajectories each:
1200 teacher trajectories, about DiP-GO's reference recipe (500 steps x 2 = 1000,
:data:`slimdiff.methods.dipgo.OPT_STEPS_DIPGO`), so the two learned planners get about equal
optimisation. (DiP-GO's earlier Adam recipe ran 150 x 8: on digits-dit at budget 0.5, DDIM 50,
30 steps left long stale reuse runs, FD 8.9, and 150 gave FD 5.8: ``bench/dipgo/opt_steps_150.json``
at commit 55570b3.)"""


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


POSTPROCESS = ("search", "greedy")
"""Post-processings of :func:`threshold_plan`: ``search`` (ours, the default: rank and bisect to
within one block *below* the budget) and ``greedy`` (the reference code's sweep, which stops
*above* it)."""


def threshold_plan(p_reuse: torch.Tensor, costs: BlockCosts, budget: float, method: str = "search",
                   skip_reused_steps: bool = False) -> torch.Tensor:
    """Table meeting ``budget`` (fraction of the all-compute MACs) from scores ``p_reuse``
    (S, N), or (S, N + 1) whose last column scores skipping the whole step (see
    :func:`split_plan`); ``skip_reused_steps``: steps that reuse every block cost nothing.

    ``method="search"`` (default): rank the (step > 0, entry) scores and bisect on how many of
    the top ones are reused, for the fewest that meet the budget. The plan's MACs are within one
    block's MACs below the budget, plus one step's non-block MACs when a last reused block empties
    a step (``skip_reused_steps``); UNets: plus the producers a block frees. With step scores, when
    the bisection's last reused entry is a whole step, the plan instead keeps that step and reuses
    the next-ranked *block* entries as far as the budget needs, if that lands closer to it; if no
    block entries can, the shortfall may reach one step's non-block MACs.

    ``method="greedy"``: the reference code's sweep (:func:`_greedy`); it ends *above* the budget.
    """
    steps, n = p_reuse.shape[0], len(costs.blocks)
    gated = p_reuse.shape[1] == n + 1
    check_reachable(costs, steps, budget, gated or skip_reused_steps)
    target = budget * table_cost(costs, torch.ones(p_reuse.shape, dtype=torch.bool))
    cost = partial(table_cost, costs, skip_reused_steps=skip_reused_steps)
    check_postprocess(method, gated)
    if method == "greedy":
        return _greedy(p_reuse, costs, cost, target)
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
    if method not in POSTPROCESS:
        raise UsageError(f"unknown post-processing {method!r}; use 'search' (ours, within one block below the "
                         "budget) or 'greedy' (the reference code's sweep)")
    if method == "greedy" and step_gates:
        raise UsageError("postprocess 'greedy' is not available with step gates: they need postprocess='search' "
                         "(the reference's sweep ranks blocks only)")


def _greedy(p_reuse: torch.Tensor, costs: BlockCosts, cost, target: float) -> torch.Tensor:
    """The reference code's greedy sweep (dip-go ``src/DiPGO/extension/unethelper.py``
    ``UNetHelper.prune(expected_ratio, prune_threshold=0.95)``, ~1030-1132).

    For each threshold 0.95, 0.90, ..., 0.05, 0 and each block in reverse order: visit that
    block's steps > 0 by falling ``p_reuse``; reuse those above the threshold, with the
    producers they leave unread (the reference's cascade nodes), unless that would reach the
    budget -- then stop this block and go on with the next. The reference checks the pruned
    fraction with ``>= expected_ratio`` before adding, so the plan never reaches the budget: it
    ends *above* it, by less than the smallest entry it could still reuse. (The reference's
    ``while actual < expected`` and its break after a block never fire for that reason: it
    always runs every threshold.) We measure MACs with :func:`table_cost` instead of the
    reference's per-block FLOPs ratios averaged over steps (the same up to the non-block layers,
    which SD-1.5 hardly has).
    """
    c = torch.ones(p_reuse.shape, dtype=torch.bool)
    for level in range(19, -1, -1):  # thresholds 0.95 .. 0.0 in steps of 0.05 (the reference stops below 0)
        thr = level * 0.05
        for b in reversed(range(p_reuse.shape[1])):
            for t in torch.argsort(p_reuse[1:, b], descending=True, stable=True).tolist():
                s = t + 1
                if not c[s, b] or p_reuse[s, b] <= thr:
                    continue
                trial = c.clone()
                trial[s, b] = False
                trial[s] = effective_compute(trial[s], costs.names, costs.consumers)  # the cascade, marked
                if cost(trial) <= target:
                    break  # would reach the budget: the reference stops this block here
                c = trial
    return c


# --------------------------------------------------------------------------- set-up and result
def finish(model: nn.Module, name: str, compute: torch.Tensor, ctx: Context, costs: BlockCosts, settings: dict,
           measured: dict, *, budget: float, why: str | None = None, **plan_kw) -> nn.Module:
    """Install the final plan on the unchanged model and record it (every reuse method ends here).

    A plan far below ``budget`` records why (:data:`~slimdiff.budget.BUDGET_NOTE`): ``why``, or
    the granularity every block-reuse plan has (one block at one call)."""
    remove_block_reuse(model)
    plan = ReusePlan.for_sampler(compute, ctx.sampler, ctx.steps, model, **plan_kw)
    apply_block_reuse(model, plan)
    full = costs.macs(torch.ones(plan.shape, dtype=torch.bool))
    ratio = costs.macs(plan.compute, plan.step_compute) / full
    measured = {**measured, "plan_macs_ratio": ratio, "reused_fraction": plan.reuse_fraction()}
    if far_below(budget, ratio):
        calls, blocks = plan.shape
        settings = {**settings, BUDGET_NOTE: why or (
            f"a reuse plan moves in whole block calls: one costs up to {max(costs.blocks) / full:.3f} of the sampling "
            f"MACs here ({blocks} blocks x {calls} calls), and the plan is kept within the budget")}
    return record(model, name, {"sampler": ctx.sampler, "steps": ctx.steps, **settings}, measured, plan.to_dict())


def prepare(model: nn.Module, budget: float, ctx: Context, step_skips: bool = False) -> BlockCosts:
    """Refuse a model that already has a plan; measure block MACs; check the budget is reachable."""
    check_no_plan(model)  # block reuse or a branch cache (DeepCache, Learning-to-Cache)
    costs = block_costs(model)
    check_reachable(costs, len(ReusePlan.full(ctx.sampler, ctx.steps, model).timesteps), budget, step_skips)
    return costs


def restore_plan(model: nn.Module, extras: dict | None) -> None:
    """Re-apply a recorded reuse plan (the restorer of every reuse method)."""
    if not extras:
        raise UsageError("the model's metadata names a reuse method but holds no plan; compress the model again")
    apply_block_reuse(model, ReusePlan.from_dict(extras))


def with_legacy_block_plans(restore: Callable[[nn.Module, Any], None]) -> Callable[[nn.Module, Any], None]:
    """``restore``, except for a block-reuse plan recorded under the same method name before the
    rename (``deepcache`` -> ``deepcache-style``, ``l2c`` -> ``l2c-block``; extras whose ``blocks``
    are the model's reuse blocks), which :func:`restore_plan` re-applies. The published DeepCache
    and Learning-to-Cache, registered under the old names, wrap their restorers with it."""
    def restorer(model: nn.Module, extras: dict | None) -> None:
        if extras and list(extras.get("blocks") or []) == reuse_blocks(model)[0]:
            restore_plan(model, extras)
        else:
            restore(model, extras)

    return wraps(restore)(restorer)


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
