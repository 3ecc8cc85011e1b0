"""Branch caching during sampling: named sub-modules computed or taken from a cache, step by step.

The runtime of the published caching methods whose unit is smaller than a block:

* **DeepCache** (Ma et al., CVPR 2024) on UNets: every resnet, attention, down/upsampler,
  down/up block and the mid block is a unit; at a retrieve step the units of the deep part
  return their output of the last full step and only the shallow skip branch runs;
* **Learning-to-Cache** (Ma et al., NeurIPS 2024) on transformers: each block's attention and
  MLP are two units whose (pre-gate) outputs are reused separately; the block's adaLN gates
  are still computed from the current condition (the reference's ``DiTBlock.forward``).

Both are a :class:`~slimdiff.runtime.reuse.ReusePlan` whose ``blocks`` are the units'
qualified module names and whose ``compute[s, u]`` says whether unit ``u`` runs at call ``s``
(a unit that does not run returns its cached output; a unit is cached whenever it runs).
The method modules build the plans; this module only runs them, so it knows nothing of
either method. The plan is bound to the sampler's timesteps, saved and restored exactly as
block-reuse plans are, and the step index is found by the block-reuse root hook
(:class:`~slimdiff.runtime.reuse.BlockReuseRootHook`: new trajectory at the schedule's first
timestep, an error on another schedule, off-schedule single calls run in full), registered
here under its own name so the two runtimes never touch each other's hooks.

Units may be nested (a DeepCache down block and its resnets): a unit inside a unit that
returns its cache is not called at all. :class:`UnitCosts` prices a compute row from one
counted forward (``torch.utils.flop_counter``: a unit's MACs include its children's), so the
MACs a plan saves are the MACs the hooks really skip.

Training (L2C's router) runs the units in a :class:`BranchFrame`: every unit computes and
records its fresh output; with gates, it returns ``g * fresh + (1 - g) * cached``
(reference ``router_models.py`` ``DiTBlock.forward``), differentiably in ``g``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
from diffusers.hooks import ModelHook

from slimdiff.errors import UsageError
from slimdiff.runtime.reuse import (  # one step tracker, one way to install hooks
    ReusePlan,
    ReuseState,
    get_block_reuse,
    install_plan,
    module_macs,
    plan_disabled,
    root_hook,
    uninstall_plan,
)

__all__ = ["apply_branch_cache", "remove_branch_cache", "get_branch_cache", "branch_cache_disabled", "branch_frame",
           "BranchFrame", "UnitCosts", "unit_costs", "restore_branch_cache", "check_no_plan"]

ROOT_HOOK = "slimdiff_branch_cache"
UNIT_HOOK = "slimdiff_branch_cache_unit"


@dataclass
class BranchFrame:
    """One training forward: ``gates[u]`` in [0, 1] (None: fresh outputs only), the cached
    outputs going in, and every unit's fresh output coming out."""

    gates: torch.Tensor | None = None
    caches_in: dict[int, Any] | None = None
    fresh: dict[int, Any] = field(default_factory=dict)


class BranchCacheUnitHook(ModelHook):
    """Per-unit hook: run (and cache) or return the cache, as the plan says for the current call."""

    def __init__(self, state: ReuseState, index: int):
        super().__init__()
        self.state, self.index = state, index

    def new_forward(self, module: nn.Module, *args, **kwargs):
        st, u = self.state, self.index
        if isinstance(st.frame, BranchFrame):
            return self._frame(st.frame, args, kwargs)
        if st.step is None or st.disabled:
            return self.fn_ref.original_forward(*args, **kwargs)
        if st.eff[st.step, u] or u not in st.caches:
            st.caches[u] = self.fn_ref.original_forward(*args, **kwargs)
        return st.caches[u]

    def _frame(self, frame: BranchFrame, args: tuple, kwargs: dict):
        out = self.fn_ref.original_forward(*args, **kwargs)
        frame.fresh[self.index] = out
        if frame.gates is None or not frame.caches_in or self.index not in frame.caches_in:
            return out
        g = frame.gates[self.index]
        return g * out + (1 - g) * frame.caches_in[self.index]


def apply_branch_cache(model: nn.Module, plan: ReusePlan) -> nn.Module:
    """Install ``plan`` (units = qualified sub-module names of ``model``) in place; returns ``model``."""
    if not isinstance(plan, ReusePlan):
        raise UsageError(f"apply_branch_cache needs a ReusePlan, got {type(plan).__name__}")
    if root_hook(model, ROOT_HOOK) is not None:
        raise UsageError("this model already has a branch-cache plan: call remove_branch_cache(model) first")
    try:
        units = [model.get_submodule(n) for n in plan.blocks]
    except AttributeError as e:
        raise UsageError(f"the branch-cache plan names a module this model lacks ({e}): make the plan for this "
                         "model") from e
    plan.validate()
    state = ReuseState(plan, plan.compute)
    return install_plan(model, state, units, lambda i: BranchCacheUnitHook(state, i), ROOT_HOOK, UNIT_HOOK)


def remove_branch_cache(model: nn.Module) -> nn.Module:
    """Remove the plan's hooks (a no-op without them); the model is the original again."""
    return uninstall_plan(model, ROOT_HOOK, UNIT_HOOK)


def get_branch_cache(model: nn.Module) -> ReusePlan | None:
    """The branch-cache plan installed on ``model``, if any."""
    hook = root_hook(model, ROOT_HOOK)
    return hook.state.plan if hook is not None else None


def check_no_plan(model: nn.Module) -> None:
    """UsageError when ``model`` already carries a reuse plan (block reuse or branch cache)."""
    if get_block_reuse(model) is not None or get_branch_cache(model) is not None:
        raise UsageError("the model already carries a reuse plan: chain at most one reuse method")


def restore_branch_cache(model: nn.Module, extras: dict | None) -> None:
    """Re-apply a recorded branch-cache plan (the restorer of DeepCache and Learning-to-Cache)."""
    if not extras:
        raise UsageError("the model's metadata names a branch-cache method but holds no plan; compress the model again")
    remove_branch_cache(model)
    apply_branch_cache(model, ReusePlan.from_dict(extras))


def _state(model: nn.Module) -> ReuseState:
    hook = root_hook(model, ROOT_HOOK)
    if hook is None:
        raise UsageError("this model has no branch-cache plan: apply_branch_cache(model, plan) first")
    return hook.state


@contextlib.contextmanager
def branch_cache_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in full (no cache read or written) inside the block; a no-op without a plan."""
    hook = root_hook(model, ROOT_HOOK)
    with plan_disabled(hook.state if hook is not None else None):
        yield model


@contextlib.contextmanager
def branch_frame(model: nn.Module, frame: BranchFrame) -> Iterator[BranchFrame]:
    """Run forwards in training mode (see :class:`BranchFrame`) inside the block."""
    st = _state(model)
    frame.fresh = {}
    st.frame = frame
    try:
        yield frame
    finally:
        st.frame = None


# --------------------------------------------------------------------------- MACs
@dataclass
class UnitCosts:
    """MACs of one forward of one image: in all, and inside each unit (children included)."""

    total: int
    units: list[int]
    names: list[str]

    def row_macs(self, row: Sequence[bool] | torch.Tensor) -> int:
        """MACs of one call computing the units where ``row`` is True: the total less every
        skipped unit that is not inside another skipped unit (those are never called)."""
        skipped = [n for n, c in zip(self.names, [bool(v) for v in row]) if not c]
        top = [n for n in skipped if not any(n.startswith(p + ".") for p in skipped)]
        per = dict(zip(self.names, self.units))
        return self.total - sum(per[n] for n in top)

    def macs(self, compute: torch.Tensor, step_compute: Sequence[bool] | None = None) -> int:
        """Sampling MACs per image and branch of a (calls x units) table; a call whose
        ``step_compute`` is False is skipped (costs nothing)."""
        steps = [True] * len(compute) if step_compute is None else step_compute
        return sum(self.row_macs(row) for row, s in zip(compute, steps) if s)


def unit_costs(model: nn.Module, names: Sequence[str]) -> UnitCosts:
    """Count one full forward of one example and attribute the MACs to the named units
    (:func:`slimdiff.runtime.reuse.module_macs`)."""
    per, total = module_macs(model, names, branch_cache_disabled(model))
    return UnitCosts(total, per, list(names))
