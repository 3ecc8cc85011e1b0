"""The width baselines Diff-Pruning is compared with (BENCHMARK.md, "width"; the paper's Table 1).

All run exactly Diff-Pruning's pruner, budget search and recovery
(:func:`slimdiff.compression.width.width_prune`); only the channel importance differs, and
with local ranking the pruned shapes are the same at the same budget (an equal-compute
comparison). Like Diff-Pruning they rank channels inside each GroupNorm group (head) on their
own by default (``group_ranking="separate"``: the ``ddpm_exp`` pruner every row of the paper's
tables went through); ``"shared"`` is torch-pruning 1.6's rule (``ddpm_prune.py``).

* ``random-width`` -- random importance (seed ``ctx.seed``);
* ``magnitude-width`` -- group L2 weight magnitude (torch-pruning's ``MagnitudeImportance``);
* ``taylor`` -- standard first-order Taylor importance: gradients of the diffusion loss summed
  over *every* timestep (no threshold; otherwise Diff-Pruning's gradient pass, same batch and
  noise), scored ``|sum_k w_k g_k|`` per channel (torch-pruning's
  ``TaylorImportance(multivariable=True)``): ``ddpm_prune.py --pruner taylor`` ("standard
  first-order taylor expansion"). ``importance="paper"`` is ``ddpm_exp/prune.py --pruner
  taylor`` instead, Diff-Pruning's own score over every timestep (the two reference scripts
  disagree on the score; they agree on using every timestep).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from slimdiff.compression.width import (
    GROUP_RANKING_HELP,
    GROUP_RANKINGS,
    HEAD_MODES,
    HEADS_HELP,
    RESIDUAL_HELP,
    draw_width,
    width_prune,
)
from slimdiff.methods.base import Context
from slimdiff.methods.spec import MethodSpec, check_options, option

__all__ = ["WidthBaselineConfig", "TaylorConfig", "RANDOM_WIDTH", "MAGNITUDE_WIDTH", "TAYLOR_WIDTH", "random_width",
           "magnitude_width", "taylor_width", "SPECS"]

TAYLOR_IMPORTANCE = {"multivariable": "taylor-multivariable", "paper": "taylor-paper"}


@dataclass(frozen=True)
class WidthBaselineConfig:
    """Options of the width baselines."""

    heads: str = option("dims", HEADS_HELP, choices=HEAD_MODES)
    group_ranking: str = option("separate", GROUP_RANKING_HELP, choices=GROUP_RANKINGS)
    residual_width: bool = option(False, RESIDUAL_HELP + "; Diff-Pruning has the same option")

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class TaylorConfig(WidthBaselineConfig):
    """Options of the Taylor baseline."""

    stride: int = option(1, "timestep stride of the gradient pass (1 = every training timestep, as in the reference)",
                         low=1)
    importance: str = option("multivariable", "multivariable = |sum_k w_k g_k| per channel (ddpm_prune.py's taylor); "
                                              "paper = Diff-Pruning's score (ddpm_exp/prune.py's taylor)",
                        choices=tuple(TAYLOR_IMPORTANCE))


def _random(model: nn.Module, budget: float, ctx: Context, config: WidthBaselineConfig) -> nn.Module:
    """Random-importance width pruning with exactly Diff-Pruning's pruner, search and recovery."""
    return width_prune(model, budget, ctx, "random-width", "random", heads=config.heads, settings={"seed": ctx.seed},
                       group_ranking=config.group_ranking, residual=config.residual_width)


def _magnitude(model: nn.Module, budget: float, ctx: Context, config: WidthBaselineConfig) -> nn.Module:
    """Magnitude (group L2) width pruning with exactly Diff-Pruning's pruner, search and recovery."""
    return width_prune(model, budget, ctx, "magnitude-width", "magnitude", heads=config.heads, settings={},
                       group_ranking=config.group_ranking, residual=config.residual_width)


def _taylor(model: nn.Module, budget: float, ctx: Context, config: TaylorConfig) -> nn.Module:
    """First-order Taylor width pruning over every timestep (see the module docstring)."""
    from slimdiff.methods.diff_pruning import gradient_pass

    prepare = gradient_pass(ctx, threshold=0.0, stride=config.stride)
    return width_prune(model, budget, ctx, "taylor", TAYLOR_IMPORTANCE[config.importance], heads=config.heads,
                       settings={"stride": config.stride}, group_ranking=config.group_ranking,
                       residual=config.residual_width, prepare=prepare)


RANDOM_WIDTH = MethodSpec("random-width", "width", "baseline: random channel importance, Diff-Pruning's pruner",
                          _random, WidthBaselineConfig, draw=draw_width)
MAGNITUDE_WIDTH = MethodSpec("magnitude-width", "width",
                             "baseline: L2 weight-magnitude importance, Diff-Pruning's pruner",
                             _magnitude, WidthBaselineConfig, draw=draw_width)
TAYLOR_WIDTH = MethodSpec("taylor", "width",
                          "baseline: first-order Taylor importance |sum w*grad| over every timestep (no threshold), "
                          "Diff-Pruning's pruner",
                          _taylor, TaylorConfig, draw=draw_width)

random_width = RANDOM_WIDTH  # Python entry points: random_width(model, budget, ctx, heads="whole")
magnitude_width = MAGNITUDE_WIDTH
taylor_width = TAYLOR_WIDTH

SPECS = (RANDOM_WIDTH, MAGNITUDE_WIDTH, TAYLOR_WIDTH)
