"""The width baselines Diff-Pruning is compared with (BENCHMARK.md, "width").

Both run exactly Diff-Pruning's pruner, budget search and recovery
(:func:`slimdiff.compression.width.width_prune`); only the channel importance differs, and
with local ranking the pruned shapes are the same at the same budget (an equal-compute
comparison):

* ``random-width`` -- random importance (seed ``ctx.seed``);
* ``magnitude-width`` -- group L2 weight magnitude.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from slimdiff.compression.width import HEADS_HELP, draw_width, width_prune
from slimdiff.methods.base import Context
from slimdiff.methods.spec import MethodSpec, option

__all__ = ["WidthBaselineConfig", "RANDOM_WIDTH", "MAGNITUDE_WIDTH", "random_width", "magnitude_width", "SPECS"]


@dataclass(frozen=True)
class WidthBaselineConfig:
    """Options of the width baselines."""

    heads: str = option("dims", HEADS_HELP)


def _random(model: nn.Module, budget: float, ctx: Context, config: WidthBaselineConfig) -> nn.Module:
    """Random-importance width pruning with exactly Diff-Pruning's pruner, search and recovery."""
    return width_prune(model, budget, ctx, "random-width", "random", heads=config.heads, settings={"seed": ctx.seed})


def _magnitude(model: nn.Module, budget: float, ctx: Context, config: WidthBaselineConfig) -> nn.Module:
    """Magnitude (group L2) width pruning with exactly Diff-Pruning's pruner, search and recovery."""
    return width_prune(model, budget, ctx, "magnitude-width", "magnitude", heads=config.heads, settings={})


RANDOM_WIDTH = MethodSpec("random-width", "width", "baseline: random channel importance, Diff-Pruning's pruner",
                          _random, WidthBaselineConfig, draw=draw_width)
MAGNITUDE_WIDTH = MethodSpec("magnitude-width", "width",
                             "baseline: L2 weight-magnitude importance, Diff-Pruning's pruner",
                             _magnitude, WidthBaselineConfig, draw=draw_width)

random_width = RANDOM_WIDTH  # Python entry points: random_width(model, budget, ctx, heads="whole")
magnitude_width = MAGNITUDE_WIDTH

SPECS = (RANDOM_WIDTH, MAGNITUDE_WIDTH)
