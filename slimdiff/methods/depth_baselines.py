"""Depth-pruning baselines that TinyFusion is compared with (BENCHMARK.md, "depth").

Each keeps ``k`` of the ``L`` blocks and then shares TinyFusion's ending
(:func:`slimdiff.compression.depth.finish_depth`): the dropped blocks are removed, and the
same recovery (fine-tune or KD with the kept-block layer map) runs for the same steps.
``k`` comes from ``keep`` (an N:M pattern as for TinyFusion; only its total kept count is
used, so a baseline and TinyFusion at ``keep=1:2`` have the same depth) or else from the
budget (:func:`slimdiff.compression.depth.depth_for_budget`).

* ``bi-depth`` -- ShortGPT's Block Influence, ``BI_i = 1 - E[cos(h_in, h_out)]`` over tokens of
  calibration inputs (128 training images noised at uniform random timesteps, with their
  labels; text models get the null prompt because slimdiff data has no captions). The
  ``L - k`` blocks with the lowest BI (the ones that change the residual stream least) are
  removed. The TinyFusion repo's ``prune_by_score.py`` additionally never removes the last
  block; we follow the ShortGPT paper and do not special-case it.
* ``first-depth`` / ``last-depth`` -- keep blocks ``0..k-1`` / ``L-k..L-1``.
* ``stride-depth`` -- keep one block per stride, centred: ``floor((i + 1/2) L / k)``
  (12 -> 6 keeps 1, 3, ..., 11: the teacher blocks TinyFusion's KD map ``2i + 1`` uses).
* ``random-depth`` -- ``k`` blocks drawn uniformly without replacement (seed ``ctx.seed``).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from slimdiff.compression.depth import (
    check_depth_prunable,
    depth_for_budget,
    depth_prunable,
    draw_depth,
    finish_depth,
    parse_keep,
)
from slimdiff.errors import UsageError
from slimdiff.methods.base import Context
from slimdiff.methods.spec import MethodSpec, option
from slimdiff.models.backbone import TextCondition, as_backbone

__all__ = ["block_influence", "select_blocks", "STRATEGIES", "CALIBRATION_SAMPLES", "DepthBaselineConfig", "SPECS"]

CALIBRATION_SAMPLES = 128
"""Images used for Block Influence (as in the TinyFusion repo's ``prune_by_score.py``)."""


def _calibration_batches(model: nn.Module, ctx: Context, samples: int, batch: int, dataset=None):
    """Yield ``(x_t, t, cond)``: the shared calibration samples (the null condition where the
    data has none for the model) noised at random timesteps with the same seeded generator."""
    from slimdiff.compression.calibration import calibration_batches
    from slimdiff.diffusion.losses import ForwardProcess
    from slimdiff.diffusion.schedulers import diffusion_config_of

    bb = as_backbone(model)
    gen = torch.Generator().manual_seed(ctx.seed)
    process = ForwardProcess(diffusion_config_of(model))
    for x0, cond in calibration_batches(model, ctx, samples, batch, dataset=dataset, generator=gen, missing="null"):
        noisy = process.draw(x0.to(bb.device, bb.dtype), gen)
        if isinstance(cond, TextCondition):
            cond = cond.to(bb.device, bb.dtype)
        elif cond is not None:
            cond = cond.to(bb.device)
        yield noisy.x_t, noisy.t, cond


@torch.no_grad()
def block_influence(model: nn.Module, ctx: Context, samples: int = CALIBRATION_SAMPLES, batch: int = 32,
                    dataset=None) -> list[float]:
    """ShortGPT Block Influence of every block: ``1 - mean cosine(input, output)`` per token."""
    bb = check_depth_prunable(model, "bi-depth")
    sums = torch.zeros(len(bb.blocks), dtype=torch.float64)
    count = 0

    def hook(i: int):
        def fn(_m, args, kwargs, output):
            h_in, h_out = bb.block_input(args, kwargs), bb.block_output(output)
            sums[i] += torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1).sum().double().cpu()

        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(bb.blocks)]
    was_training = model.training
    model.eval()
    try:
        for x, t, cond in _calibration_batches(model, ctx, samples, batch, dataset):
            bb(x, t, cond)
            count += x.shape[0] * math.prod(bb.token_grid)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return (1 - sums / max(1, count)).tolist()


def select_blocks(strategy: str, depth: int, k: int, seed: int = 0, scores: list[float] | None = None) -> list[int]:
    """Indices (increasing) of the ``k`` blocks a baseline keeps."""
    if not 1 <= k <= depth:
        raise UsageError(f"cannot keep {k} of {depth} blocks; keep between 1 and {depth}")
    if strategy == "first":
        return list(range(k))
    if strategy == "last":
        return list(range(depth - k, depth))
    if strategy == "stride":
        return [math.floor((i + 0.5) * depth / k) for i in range(k)]
    if strategy == "random":
        return sorted(torch.randperm(depth, generator=torch.Generator().manual_seed(seed))[:k].tolist())
    if strategy == "bi":
        if scores is None or len(scores) != depth:
            raise UsageError("the bi strategy needs one Block Influence score per block")
        order = sorted(range(depth), key=lambda i: (-scores[i], i))  # most influential first
        return sorted(order[:k])
    raise UsageError(f"unknown depth strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


STRATEGIES = ("bi", "first", "last", "stride", "random")


def _target_depth(model: nn.Module, budget: float, ctx: Context, keep: str | None) -> tuple[int, dict]:
    depth = len(check_depth_prunable(model).blocks)
    if keep is not None:
        return sum(g.n for g in parse_keep(str(keep), depth)), {"keep": str(keep), "keep_from": "keep"}
    k, facts = depth_for_budget(model, budget, ctx)
    return k, {"keep_from": f"budget {budget:g}", **facts}


@dataclass(frozen=True)
class DepthBaselineConfig:
    """The depth baselines' option."""

    keep: str | None = option(None, "N:M group shape(s) giving the depth, e.g. 1:2 (default: from the budget)")


def _compress(strategy: str, model: nn.Module, budget: float, ctx: Context, config: DepthBaselineConfig) -> nn.Module:
    """Depth baseline ``strategy``: keep the ``k`` blocks it selects, then the shared recovery."""
    name = f"{strategy}-depth"
    start = time.process_time()
    depth = len(check_depth_prunable(model, name).blocks)
    k, settings = _target_depth(model, budget, ctx, config.keep)
    extras: dict = {}
    scores = block_influence(model, ctx) if strategy == "bi" else None
    if scores is not None:
        extras["block_influence"] = scores
    kept = select_blocks(strategy, depth, k, ctx.seed, scores)
    return finish_depth(model, kept, ctx, name, {**settings, "depth": k}, extras, cost_s=time.process_time() - start)


_HELP = {
    "bi": "ShortGPT Block Influence depth pruning (drop blocks with the most similar input/output)",
    "first": "keep the first k blocks",
    "last": "keep the last k blocks",
    "stride": "keep k blocks at a uniform stride",
    "random": "keep k random blocks (seeded)",
}
SPECS = tuple(MethodSpec(f"{s}-depth", "depth", f"[baseline] {_HELP[s]}", functools.partial(_compress, s),
                         DepthBaselineConfig, draw=draw_depth, applies=depth_prunable) for s in STRATEGIES)
