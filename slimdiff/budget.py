"""Budgets and cost models: one currency, one check, one split across a chain.

A **budget** is a fraction of the original model's *sampling* MACs (per image, for one
sampler, step count and guidance scale, end to end) in (0, 1]. It is checked once, where
it enters (:func:`check_budget`: the CLI, the bench config, ``methods.base.compress``), and
split across a chain once (:func:`chain_step_budget`); methods receive a checked float.

A **cost model** answers "how many MACs does this configuration cost?" for one kind of
change without running the model (:class:`CostModel`). The implementations:

==============================================  =========================================
``ForwardCost`` (here)                          a model: its measured sampling MACs
``compression.depth.DepthCost``                 a number of kept blocks
``methods.dydit.DyDiTCost``                     realised routing decisions (heads, groups, tokens)
``runtime.reuse.BlockCosts``                    a (steps x blocks) compute table of a reuse plan
==============================================  =========================================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch.nn as nn

from slimdiff.errors import UsageError

# A budget is met when the reached MACs ratio is at most this far (relative) above it: the
# granularity of whole blocks, heads and aligned channel widths rarely lands exactly on it.
BUDGET_TOLERANCE = 0.03

BUDGET_NOTE = "budget_note"
"""Settings key of a method's record entry saying why its result lands far below its budget
(whole blocks, integral intervals): ``methods.base.compress`` warns with it."""


def far_below(budget: float, reached: float) -> bool:
    """``reached`` (a MACs ratio) is more than :data:`BUDGET_TOLERANCE` (relative) below ``budget``:
    the result gives away more compute than the budget allows, which is worth a warning."""
    return reached < budget * (1 - BUDGET_TOLERANCE)


def over_budget(budget: float, reached: float) -> bool:
    """``reached`` (a MACs ratio) is more than :data:`BUDGET_TOLERANCE` (relative) above ``budget``:
    the budget is not met (routers that realise more than their target, a chain whose methods
    each met their share on their own inputs but not end to end)."""
    return reached > budget * (1 + BUDGET_TOLERANCE)


@runtime_checkable
class CostModel(Protocol):
    """MACs per image of a configuration (what "configuration" is depends on the method)."""

    def macs(self, *configuration: Any) -> Any: ...


def check_budget(budget: Any) -> float:
    """A budget is a fraction of the original's sampling MACs in (0, 1]."""
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise UsageError(f"budget must be a number in (0, 1], got {budget!r}") from None
    if not 0 < b <= 1:
        raise UsageError(f"budget must be in (0, 1] (a fraction of the original's sampling MACs), got {b}")
    return b


def chain_step_budget(budget: float, reached: float, remaining: int) -> float:
    """The budget of the next of ``remaining`` methods of a chain, as a fraction of *its input's*
    MACs, when the chain so far has ``reached`` (a fraction of the original's): the geometric
    share ``(budget / reached) ** (1 / remaining)``, at most 1."""
    return min(1.0, (budget / reached) ** (1 / remaining)) if reached > 0 else 1.0


@dataclass(frozen=True)
class ForwardCost:
    """Measured sampling MACs per image of a model under one sampler, step count and guidance
    (``torch.utils.flop_counter``; see :mod:`slimdiff.eval.compute`)."""

    sampler: str = "ddim"
    steps: int = 50
    cfg: float = 1.0

    def macs(self, model: nn.Module) -> int:
        from slimdiff.eval.compute import macs_sampling

        return macs_sampling(model, sampler=self.sampler, steps=self.steps, cfg=self.cfg)
