"""DeepCache (Ma, Fang, Wang; CVPR 2024) on UNets, as the official code runs it.

Every ``interval``-th sampling call (a "cache step"; DeepCache's 1:N with N = ``interval``)
runs the whole UNet and caches every sub-module's output. The calls between ("retrieve
steps") run only the *shallow skip branch* chosen by ``cache_block_id`` / ``cache_layer_id``:
the deeper down path, the mid block and the deeper up path return their cached outputs, the
up layer at the branch concatenates the cached deep feature with the fresh skip feature, and
the shallower up layers and the output head run. The branch rule is the official helper's
(``DeepCache/extension/deepcache.py``, ``is_skip_step`` and ``wrap_modules``): down units of
block ``b`` / layer ``l`` (layer = resnet/attention index, the downsampler is layer
``len(resnets)``) are cached when ``b > block`` or ``b == block and l >= layer``; up units,
numbered from the output (block ``len(up_blocks) - 1 - i``, layer ``len(resnets) - 1 - j``), when
``b > block`` or ``b == block and l > layer``; the mid block always. The helper's
``cache_branch_id`` is ``3 * block + layer`` on SD (two resnets and a downsampler per block);
the default branch 0 is the helper's default (``set_params``) and the README's (the DDPM
experiments' ``--branch 2`` counts in their own model's numbering). The cached modules are not
called, so the MACs counted during sampling are the real ones. Calls are indexed by the
block-reuse step tracker (:mod:`slimdiff.runtime.branch_cache`); the helper's
``scheduler.timesteps.index(t)`` gives the same index except at PLMS's repeated timestep.

**Schedules.** ``uniform`` (the helper's only mode, the default): calls ``0, N, 2N, ...`` are
cache steps. ``non-uniform`` (the older patched pipelines, ``sd/pipeline_stable_diffusion.py``
86-96 and 726-739, and ``experiments/ddpm/.../deepcache_denoising.py`` 19-31 and 56-60):
``ceil(S / N)`` cache steps from ``sample_from_quad_center(S, ceil(S / N), center, pow)``,
densest around call ``center``; ``pow`` starts at ``power`` and drops by 0.02 until the count
is right. The reference takes ``(-center) ** (1 / pow)`` in complex arithmetic and keeps the
real part (``np.int32`` of a complex array); :func:`quad_center_steps` reproduces that.

**Budget rule** (ours; the paper fixes N by hand): the branch is kept (default: the shallowest,
as published) and ``interval`` is the *smallest* N whose sampling MACs -- full calls at the
counted full-forward MACs, retrieve calls at the counted MACs of the shallow branch -- are at
most the budget (a smaller N is DeepCache's better-quality side). An explicit ``interval``
overrides the budget (like TinyFusion's ``keep``). Budget 1.0 gives N = 1: the original model.

DeepCache is published for UNets only; on transformers use ``deepcache-style`` (centred
block-run reuse, :mod:`slimdiff.methods.reuse_baselines`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from slimdiff.budget import BUDGET_NOTE, far_below
from slimdiff.compression.reuse_plans import draw_plan, with_legacy_block_plans
from slimdiff.diffusion.sampling import schedule_timesteps
from slimdiff.errors import UsageError
from slimdiff.methods.base import Context, record
from slimdiff.methods.spec import MethodSpec, check_options, option
from slimdiff.models.backbone import as_backbone
from slimdiff.runtime.branch_cache import (
    UnitCosts,
    apply_branch_cache,
    check_no_plan,
    get_branch_cache,
    restore_branch_cache,
    unit_costs,
)
from slimdiff.runtime.reuse import ReusePlan

SCHEDULES = ("uniform", "non-uniform")


@dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache's options (defaults: the official helper's ``set_params`` branch and mode)."""

    interval: int = option(0, "N of DeepCache's 1:N: a full UNet call every N-th call; 0 = the smallest N whose "
                              "MACs fit the budget (an explicit N overrides the budget)", low=0)
    cache_block_id: int = option(0, "down/up block of the cached skip branch (0 = the shallowest, the paper's "
                                    "default); deeper units are taken from the cache at retrieve steps", low=0)
    cache_layer_id: int = option(0, "layer of the skip branch inside that block (resnet index; the downsampler is "
                                    "len(resnets)); the helper's cache_branch_id = 3 * block + layer on SD", low=0)
    schedule: str = option("uniform", "cache steps 'uniform' (0, N, 2N, ...; the helper) or 'non-uniform' "
                                      "(the pipelines' sample_from_quad_center: denser around `center`)", choices=SCHEDULES)
    power: float = option(1.2, "non-uniform: starting power of sample_from_quad_center (the reference's 1.2; > 1: it "
                               "is lowered towards 1)", low=1, low_open=True)
    center: int | None = option(None, "non-uniform: call index where cache steps are densest (the reference "
                                      "requires it; default: the middle of the schedule)", low=0)

    def __post_init__(self) -> None:
        check_options(self)


# --------------------------------------------------------------------------- units and rule
def deepcache_units(model: nn.Module) -> list[tuple[str, str, int, int]]:
    """``(name, part, block, layer)`` of every unit the official helper wraps
    (``wrap_modules``): part ``down``/``mid``/``up``; up blocks and layers numbered from the output."""
    m = model
    units: list[tuple[str, str, int, int]] = []
    for b, blk in enumerate(m.down_blocks):
        n_res = len(blk.resnets)
        for j in range(len(getattr(blk, "attentions", None) or [])):
            units.append((f"down_blocks.{b}.attentions.{j}", "down", b, j))
        for j in range(n_res):
            units.append((f"down_blocks.{b}.resnets.{j}", "down", b, j))
        for j in range(len(getattr(blk, "downsamplers", None) or [])):
            units.append((f"down_blocks.{b}.downsamplers.{j}", "down", b, n_res))
        units.append((f"down_blocks.{b}", "down", b, 0))
    if getattr(m, "mid_block", None) is not None:
        units.append(("mid_block", "mid", 0, 0))
    n_up = len(m.up_blocks)
    for i, blk in enumerate(m.up_blocks):
        b, n_res = n_up - 1 - i, len(blk.resnets)
        for j in range(len(getattr(blk, "attentions", None) or [])):
            units.append((f"up_blocks.{i}.attentions.{j}", "up", b, n_res - 1 - j))
        for j in range(n_res):
            units.append((f"up_blocks.{i}.resnets.{j}", "up", b, n_res - 1 - j))
        for j in range(len(getattr(blk, "upsamplers", None) or [])):
            units.append((f"up_blocks.{i}.upsamplers.{j}", "up", b, 0))
        units.append((f"up_blocks.{i}", "up", b, 0))
    return units


def retrieve_row(units: list[tuple[str, str, int, int]], block: int, layer: int) -> torch.Tensor:
    """Which units run at a retrieve step (``is_skip_step`` of the helper, negated)."""
    def cached(part: str, b: int, l: int) -> bool:
        if part == "mid" or b > block:
            return True
        if b < block:
            return False
        return l >= layer if part == "down" else l > layer

    return torch.tensor([not cached(p, b, l) for _, p, b, l in units], dtype=torch.bool)


def quad_center_steps(total: int, n: int, center: int, power: float = 1.2) -> list[int] | None:
    """The reference's ``sample_from_quad_center`` (see the module docs); None when no power
    above 1 gives ``n`` distinct steps (the reference raises)."""
    import numpy as np

    p = power
    while p > 1:
        # Python's (-c) ** (1/p) is complex for c > 0, as in the reference (pipeline lines 86-96)
        start = complex(-center) ** (1 / p) if center > 0 else 0.0
        x = np.linspace(start, (total - center) ** (1 / p), n + 1)
        vals = np.unique(np.real(x ** p).astype(np.int32))
        steps = [0] + [int(v) + center for v in vals[1:-1]]
        if len(steps) == n:
            return sorted(steps)
        p -= 0.02
    return None


def full_steps(calls: int, interval: int, schedule: str, power: float, center: int | None) -> list[bool] | None:
    """Which calls are cache (full) steps; None when the non-uniform rule finds none for ``interval``."""
    if interval == 1:
        return [True] * calls
    if schedule == "uniform":
        return [s % interval == 0 for s in range(calls)]
    picked = quad_center_steps(calls, math.ceil(calls / interval), calls // 2 if center is None else center, power)
    return None if picked is None else [s in picked for s in range(calls)]


def _check(model: nn.Module, config: DeepCacheConfig, calls: int) -> None:
    bb = as_backbone(model)
    if bb.is_transformer:
        raise UsageError("DeepCache is published for UNets (it caches a UNet skip branch); on a transformer use "
                         "--method deepcache-style (centred block-run reuse)")
    check_no_plan(model)
    n_down = len(model.down_blocks)
    if not 0 <= config.cache_block_id < n_down:
        raise UsageError(f"cache_block_id must be in 0..{n_down - 1} (this UNet has {n_down} down blocks), "
                         f"got {config.cache_block_id}")
    n_layers = len(model.down_blocks[config.cache_block_id].resnets)
    if not 0 <= config.cache_layer_id <= n_layers:
        raise UsageError(f"cache_layer_id must be in 0..{n_layers} (down block {config.cache_block_id} has {n_layers} "
                         f"resnets; {n_layers} = its downsampler), got {config.cache_layer_id}")
    if config.interval > calls:
        raise UsageError(f"interval must be in 1..{calls} (or 0: from the budget), got {config.interval}")
    if config.center is not None and config.center >= calls:
        raise UsageError(f"center must be a call index in 0..{calls - 1}, got {config.center}")


def deepcache_table(units, calls: int, interval: int, config: DeepCacheConfig) -> torch.Tensor | None:
    """The (calls x units) compute table of ``interval`` (None: no non-uniform schedule for it)."""
    full = full_steps(calls, interval, config.schedule, config.power, config.center)
    if full is None:
        return None
    row = retrieve_row(units, config.cache_block_id, config.cache_layer_id)
    return torch.stack([torch.ones_like(row) if f else row for f in full])


def choose_interval(units, costs: UnitCosts, calls: int, budget: float,
                    config: DeepCacheConfig) -> tuple[int, torch.Tensor, float, str | None]:
    """``(interval, table, MACs ratio, note)``: the explicit interval, else the smallest whose MACs fit
    ``budget``; ``note`` says why the ratio is far below the budget (:data:`BUDGET_NOTE`), when it is."""
    retrieve = costs.row_macs(retrieve_row(units, config.cache_block_id, config.cache_layer_id))

    def ratio(table: torch.Tensor) -> float:  # rows are all-compute (full) or the retrieve row
        n_full = int(table.all(1).sum())
        return (n_full * costs.total + (calls - n_full) * retrieve) / (calls * costs.total)

    if config.interval:
        table = deepcache_table(units, calls, config.interval, config)
        if table is None:
            raise UsageError(f"the non-uniform schedule finds no {math.ceil(calls / config.interval)} distinct cache "
                             f"steps for interval {config.interval}: raise power or use schedule=uniform")
        return config.interval, table, ratio(table), f"interval {config.interval} was given: it sets the MACs"
    tables = {k: t for k in range(1, calls + 1) if (t := deepcache_table(units, calls, k, config)) is not None}
    fits = [k for k, t in tables.items() if ratio(t) <= budget * (1 + 1e-12)]
    if not fits:
        raise UsageError(f"budget {budget:g} is below what DeepCache reaches with this branch "
                         f"({min(map(ratio, tables.values())):.4f} of the sampling MACs): use a larger budget, a "
                         "shallower branch (cache_block_id/cache_layer_id 0) or more steps")
    k, shorter = fits[0], [j for j in tables if j < fits[0]]
    note = None
    if shorter and far_below(budget, ratio(tables[k])):
        note = (f"the interval is a whole number of calls: N={k} costs {ratio(tables[k]):.3f} of the sampling MACs, "
                f"N={shorter[-1]} would cost {ratio(tables[shorter[-1]]):.3f}")
    return k, tables[k], ratio(tables[k]), note


def _deepcache(model: nn.Module, budget: float, ctx: Context, config: DeepCacheConfig) -> nn.Module:
    """DeepCache at ``budget`` (see the module docs for the interval rule)."""
    start = time.process_time()
    timesteps = schedule_timesteps(ctx.sampler, ctx.steps, model)
    _check(model, config, len(timesteps))
    units = deepcache_units(model)
    names = [u[0] for u in units]
    costs = unit_costs(model, names)
    interval, table, ratio, note = choose_interval(units, costs, len(timesteps), budget, config)
    apply_branch_cache(model, ReusePlan(table, ctx.sampler, ctx.steps, timesteps, names))
    retrieve = retrieve_row(units, config.cache_block_id, config.cache_layer_id)
    measured = {"plan_macs_ratio": ratio, "retrieve_macs_ratio": costs.row_macs(retrieve) / costs.total,
                "full_steps": int(table.all(1).sum()), "search_cpu_s": time.process_time() - start}
    settings = {"sampler": ctx.sampler, "steps": ctx.steps, "interval": interval,
                "cache_block_id": config.cache_block_id, "cache_layer_id": config.cache_layer_id,
                "schedule": config.schedule, "power": config.power, "center": config.center,
                **({BUDGET_NOTE: note} if note else {})}
    return record(model, "deepcache", settings, measured, get_branch_cache(model).to_dict())


def applies(model: nn.Module) -> bool:
    """DeepCache is defined for UNets."""
    return not as_backbone(model).is_transformer


DEEPCACHE = MethodSpec("deepcache", "reuse", "DeepCache (CVPR 2024) on UNets: cache the deep part, recompute the "
                       "shallow skip branch between full steps", _deepcache, DeepCacheConfig, restore=with_legacy_block_plans(restore_branch_cache),
                       draw=draw_plan, applies=applies)
SPECS = (DEEPCACHE,)
deepcache = DEEPCACHE

__all__ = ["deepcache", "DeepCacheConfig", "deepcache_units", "retrieve_row", "quad_center_steps", "full_steps",
           "deepcache_table", "choose_interval", "SPECS"]
