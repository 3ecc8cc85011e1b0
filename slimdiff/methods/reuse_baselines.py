"""Step-reuse baselines on the same runtime as DiP-GO (:mod:`slimdiff.runtime.reuse`).

Each yields the unchanged model plus a :class:`ReusePlan` meeting the budget, recorded in
``extras`` and re-applied by ``slimdiff.load``, through the plan machinery shared with DiP-GO
(:mod:`slimdiff.compression.reuse_plans`); this module holds only how each builds its plan.
These are *today's* variants, named for what they are: the published DeepCache (UNets) and
Learning-to-Cache are separate methods.

* ``deepcache-style`` -- DeepCache-style uniform reuse (after Ma et al., CVPR 2024): every
  ``k``-th step computes everything; the steps between reuse a *centred* run of ``r`` blocks
  and compute the shallow blocks around it (for a UNet ``down_0 .. up_last`` order that run is
  the deep part, close to DeepCache's skip branch but at block, not layer, granularity; for a
  transformer, where no DeepCache is published, the middle blocks). The smallest interval
  that can meet the budget is chosen (DeepCache's quality ordering), then the fewest reused
  blocks that meet it.
* ``l2c-block`` -- a block-level, data-free Learning-to-Cache-style router (after Ma et al.,
  NeurIPS 2024): one learnable score per (step, block) through a sigmoid, trained *locally*:
  the previous step is computed in full (filling the caches), then at the step itself every
  block's output is ``s * fresh + (1 - s) * cached``; loss = MSE to the full output + ``lam``
  x MACs-weighted sum of ``s``. Thresholded to the budget with DiP-GO's post-processing.
  Differences from the paper: the inputs are the teacher's own trajectory states (data-free,
  like DiP-GO, so the two differ only in local vs. whole-trajectory optimisation), block
  granularity instead of separate attention/MLP branches, and any step may reuse (the
  paper's Algorithm 2; the released code alternates full and cache steps). It trains for
  :data:`slimdiff.compression.reuse_plans.OPT_STEPS` steps of 8 trajectories, about as many
  trajectories as DiP-GO's recipe.
* ``fewer-steps`` -- simply fewer sampler steps at the same MACs: ``k = floor(budget * S)``
  model calls. It is stored as a plan whose ``step_compute`` keeps the ``k`` steps of the
  ``S``-step schedule nearest to the ``k``-step schedule's timesteps (the skipped steps
  return the last output), plus ``sampling_steps = k``. With DDIM (eta = 0) a reused
  epsilon leaves the predicted x0 unchanged, so this *is* k-step DDIM (exactly so when
  ``k`` divides ``S``; tested); for multistep samplers (DPM-Solver++, PLMS) it is not, and
  ``sampling_steps`` is what to pass as ``--steps`` for true fewer-step sampling.

**Step skips, fairly.** ``skip_reused_steps`` (DiP-GO's option, *beyond the paper*, off by
default) turns a planned step that reuses every block into a skipped model call (its output
reused, its non-block MACs saved; :func:`~slimdiff.compression.reuse_plans.split_plan`).
``deepcache-style`` and ``l2c-block`` take the same option with the same conversion, so a
comparison gives all of them the mechanism or none. ``fewer-steps`` has no such option: it
*is* that mechanism alone -- every step it does not skip computes every block, and every
other step is a skipped call, exactly what ``skip_reused_steps`` makes of a step reusing
every block (``deepcache-style`` with ``r`` = all blocks and the option on is the uniform
special case, every ``k``-th step).

Models saved before the rename record the methods as ``deepcache`` / ``l2c``: their plans still
load (:data:`LEGACY_NAMES`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimdiff.compression.reuse_plans import (
    OPT_STEPS,
    draw_plan,
    finish,
    prepare,
    restore_plan,
    split_plan,
    table_cost,
    teacher_batch,
    threshold_plan,
)
from slimdiff.diffusion.sampling import Trajectory, schedule_timesteps
from slimdiff.errors import UsageError
from slimdiff.methods.base import Context
from slimdiff.methods.spec import MethodSpec, NoOptions, check_options, option
from slimdiff.runtime.reuse import (
    BlockCosts,
    ReusePlan,
    SoftFrame,
    apply_block_reuse,
    block_reuse_disabled,
    remove_block_reuse,
    soft_reuse,
)
from slimdiff.utils import progress


# --------------------------------------------------------------------------- DeepCache
def deepcache_table(steps: int, blocks: int, interval: int, reused: int) -> torch.Tensor:
    """Every ``interval``-th step full; otherwise a centred run of ``reused`` blocks is reused."""
    c = torch.ones(steps, blocks, dtype=torch.bool)
    start = (blocks - reused) // 2
    for s in range(steps):
        if s % interval:
            c[s, start:start + reused] = False
    return c


def deepcache_search(costs: BlockCosts, steps: int, budget: float,
                     skip_reused_steps: bool = False) -> tuple[torch.Tensor, int, int]:
    """(table, interval, reused): smallest interval, then fewest reused blocks, meeting ``budget``
    (``skip_reused_steps``: a step reusing every block costs nothing)."""
    n = len(costs.blocks)
    full = costs.macs(torch.ones(steps, n, dtype=torch.bool))
    for k in range(2, steps + 1):
        for r in range(1, n + 1):
            c = deepcache_table(steps, n, k, r)
            if table_cost(costs, c, skip_reused_steps) <= budget * full:
                return c, k, r
    raise UsageError(f"budget {budget:g} is below what DeepCache-style uniform reuse reaches for {steps} steps; "
                     "use a larger budget or more steps" + ("" if skip_reused_steps else
                                                            ", or --option skip_reused_steps=1"))


SKIP_HELP = ("beyond the paper: a step that reuses every block skips the model call (reuses its output), as "
             "DiP-GO's option of the same name")


@dataclass(frozen=True)
class DeepCacheStyleConfig:
    """deepcache-style's option (the schedule itself is chosen from the budget)."""

    skip_reused_steps: bool = option(False, SKIP_HELP)

    def __post_init__(self) -> None:
        check_options(self)


def _deepcache_style(model: nn.Module, budget: float, ctx: Context, config: DeepCacheStyleConfig) -> nn.Module:
    """DeepCache-style uniform reuse at ``budget`` (see the module docs)."""
    skip = config.skip_reused_steps
    costs = prepare(model, budget, ctx, skip)
    steps = len(schedule_timesteps(ctx.sampler, ctx.steps, model))
    table, k, r = deepcache_search(costs, steps, budget, skip)
    compute, step_compute = split_plan(table, len(costs.blocks), skip)
    return finish(model, "deepcache-style", compute, ctx, costs,
                  {"interval": k, "reused_blocks": r, "skip_reused_steps": skip}, {}, budget=budget,
                  step_compute=step_compute,
                  why=f"deepcache-style reuses runs of whole blocks every interval (here {k}, {r} blocks reused): "
                      "the next finer schedule costs more than the budget")


# --------------------------------------------------------------------------- L2C
def _teacher_inputs(model: nn.Module, noise: torch.Tensor, labels: torch.Tensor | None,
                    ctx: Context) -> tuple[Trajectory, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The teacher's sampling run from ``noise`` (no reuse) and the (model input, timestep) of
    each of its steps, recorded by the loop's model function."""
    traj = Trajectory(model, sampler=ctx.sampler, steps=ctx.steps, n=noise.shape[0], cond=labels, cfg=ctx.cfg,
                      seed=ctx.seed)
    inputs = []

    def record(inp: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        inputs.append((inp, t))
        return traj.predict(inp, t, i)

    with block_reuse_disabled(model), torch.no_grad():
        traj.run(traj.start(noise), record)
    return traj, inputs


def _soft_call(model: nn.Module, traj: Trajectory, x: torch.Tensor, t: torch.Tensor, keep: torch.Tensor | None,
               caches: list) -> tuple[torch.Tensor, list]:
    """The model's raw output on ``traj``'s (guided) batch, every block mixing with ``caches``
    by ``keep`` (None: fresh), and the mixed caches."""
    with soft_reuse(model, SoftFrame(keep, caches)) as frame:
        out = traj.bb(traj.batch(x), t, traj.cond).float()
    return out, frame.caches_out


def l2c_train(model: nn.Module, costs: BlockCosts, ctx: Context, opt_steps: int, batch: int = 8,
              lam: float = 1e-3, lr: float = 0.05) -> tuple[torch.Tensor, list[float]]:
    """Train per-(step, block) router scores; returns p_reuse = 1 - sigmoid(score) and losses."""
    steps = len(schedule_timesteps(ctx.sampler, ctx.steps, model))
    logits = nn.Parameter(torch.full((steps, len(costs.blocks)), 3.0))
    opt = torch.optim.Adam([logits], lr=lr)
    w = torch.tensor(costs.blocks, dtype=torch.float32) / costs.forward
    losses: list[float] = []
    it = progress(range(opt_steps), f"L2C x{opt_steps}", ctx.progress)
    for s in it:
        noise, labels, _ = teacher_batch(model, batch, ctx.seed + 7919 * (s + 1), sampler=ctx.sampler,
                                         steps=ctx.steps, cfg=ctx.cfg, with_target=False)
        traj, inputs = _teacher_inputs(model, noise, labels, ctx)
        total = torch.zeros(())
        for i in range(1, steps):
            with torch.no_grad():
                _, caches = _soft_call(model, traj, *inputs[i - 1], None, [])
                full, _ = _soft_call(model, traj, *inputs[i], None, [])
            gate = torch.sigmoid(logits[i])
            out, _ = _soft_call(model, traj, *inputs[i], gate, caches)
            total = total + F.mse_loss(out, full) + lam * (gate * w).sum()
        opt.zero_grad()
        (total / max(1, steps - 1)).backward()
        opt.step()
        losses.append(float(total.detach()) / max(1, steps - 1))
    return 1 - torch.sigmoid(logits.detach()), losses


@dataclass(frozen=True)
class L2CBlockConfig:
    """l2c-block's options (the router's optimisation about as long as DiP-GO's)."""

    opt_steps: int = option(OPT_STEPS, "router optimisation steps (8 trajectories each: about DiP-GO's 500 x 2)",
                            low=0)
    batch: int = option(8, "teacher trajectories per optimisation step", low=1)
    lam: float = option(1e-3, "weight of the MACs-weighted sparsity term", low=0)
    skip_reused_steps: bool = option(False, SKIP_HELP)

    def __post_init__(self) -> None:
        check_options(self)


def _l2c_block(model: nn.Module, budget: float, ctx: Context, config: L2CBlockConfig) -> nn.Module:
    """Train the router, threshold it to ``budget`` with DiP-GO's post-processing."""
    batch, lam = config.batch, config.lam
    opt_steps = config.opt_steps
    skip = config.skip_reused_steps
    costs = prepare(model, budget, ctx, skip)
    start = time.process_time()
    apply_block_reuse(model, ReusePlan.full(ctx.sampler, ctx.steps, model))
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        p_reuse, losses = l2c_train(model, costs, ctx, opt_steps, batch=batch, lam=lam)
    finally:
        remove_block_reuse(model)
    compute, step_compute = split_plan(threshold_plan(p_reuse, costs, budget, skip_reused_steps=skip),
                                       len(costs.blocks), skip)
    return finish(model, "l2c-block", compute, ctx, costs,
                  {"opt_steps": opt_steps, "batch": batch, "lam": lam, "skip_reused_steps": skip},
                  {"search_cpu_s": time.process_time() - start, "losses": losses[-5:]}, budget=budget,
                  step_compute=step_compute)


# --------------------------------------------------------------------------- fewer steps
def fewer_steps_mask(model: nn.Module, sampler: str, steps: int, k: int) -> list[bool]:
    """Keep the ``k`` calls of the ``steps`` schedule nearest to the ``k``-step schedule's timesteps."""
    full = torch.tensor(schedule_timesteps(sampler, steps, model))
    few = schedule_timesteps(sampler, k, model)
    keep = [False] * len(full)
    for t in few:
        free = torch.tensor([not v for v in keep])
        dist = (full - t).abs().masked_fill(~free, math.inf)
        keep[int(dist.argmin())] = True
    keep[0] = True
    return keep


def _fewer_steps(model: nn.Module, budget: float, ctx: Context, config: NoOptions) -> nn.Module:
    """``floor(budget * steps)`` model calls as a step-skipping plan (see the module docs)."""
    costs = prepare(model, budget, ctx)
    n_calls = len(schedule_timesteps(ctx.sampler, ctx.steps, model))
    k = math.floor(budget * ctx.steps + 1e-9)
    if k < 1:
        raise UsageError(f"budget {budget:g} x {ctx.steps} steps leaves no sampling step; use a budget >= {1 / ctx.steps:g}")
    mask = fewer_steps_mask(model, ctx.sampler, ctx.steps, k)
    table = torch.ones(n_calls, len(costs.blocks), dtype=torch.bool)
    return finish(model, "fewer-steps", table, ctx, costs, {"sampling_steps": k}, {}, step_compute=mask,
                  sampling_steps=k, budget=budget,
                  why=f"fewer-steps keeps whole steps: {k} of {ctx.steps} (floor(budget x steps))")


_REUSE = dict(restore=restore_plan, draw=draw_plan)
DEEPCACHE_STYLE = MethodSpec("deepcache-style", "reuse",
                             "DeepCache-style uniform reuse of a centred block run (every k-th step full)",
                             _deepcache_style, DeepCacheStyleConfig, **_REUSE)
L2C_BLOCK = MethodSpec("l2c-block", "reuse", "block-level, data-free Learning-to-Cache-style per-step router",
                       _l2c_block, L2CBlockConfig, **_REUSE)
FEWER_STEPS = MethodSpec("fewer-steps", "reuse", "simply fewer sampler steps at the same MACs", _fewer_steps, **_REUSE)
SPECS = (DEEPCACHE_STYLE, L2C_BLOCK, FEWER_STEPS)
deepcache_style, l2c_block, fewer_steps = DEEPCACHE_STYLE, L2C_BLOCK, FEWER_STEPS

LEGACY_NAMES = {"deepcache": "deepcache-style", "l2c": "l2c-block"}
"""Names these methods were saved under before the rename (old name -> current). A saved chain
names its method and :func:`slimdiff.io.load` restores by that name, which now belongs to the
published DeepCache / Learning-to-Cache: their restorers hand such a recorded block plan to
:func:`~slimdiff.compression.reuse_plans.restore_plan`
(:func:`~slimdiff.compression.reuse_plans.with_legacy_block_plans`)."""

__all__ = ["deepcache_style", "l2c_block", "fewer_steps", "deepcache_table", "deepcache_search", "fewer_steps_mask",
           "l2c_train", "SPECS", "L2CBlockConfig", "DeepCacheStyleConfig", "LEGACY_NAMES"]
