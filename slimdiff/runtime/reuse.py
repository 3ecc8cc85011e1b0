"""Block reuse during sampling, driven by a boolean (steps x blocks) plan.

One runtime serves DiP-GO and every caching baseline (DeepCache-style uniform reuse,
Learning-to-Cache-style routers, fewer steps): each of them only produces a
:class:`ReusePlan`. At sampling step ``s`` block ``b`` is either **computed** or
**reused**:

* transformer blocks (our DiT, diffusers DiT, PixArt) reuse their own *residual
  contribution* ``output - input`` from the last step where they were computed, added to
  the current input (the residual stream keeps flowing; reusing the block's raw output,
  as DiP-GO's SD-UNet code does, would discard everything computed before the block);
* UNet blocks (``down_blocks[i]``, ``mid_block``, ``up_blocks[i]`` of ``UNet2DModel`` /
  ``UNet2DConditionModel``; the granularity of DiP-GO's SD code) reuse their own output
  (tensor or tuple of skip features) as the reference code does. A producer whose
  consumers (next block, skip-connected up blocks) are all reused at a step is not
  computed either -- its output would be thrown away -- and its MACs count as saved
  (DiP-GO's "cascade", :func:`effective_compute`).

A plan may also skip whole steps (``step_compute``): the model is then not called at all
and its last output is returned. With DDIM (eta = 0) that is *exactly* DDIM on the kept
timesteps, because a reused epsilon leaves the predicted ``x0`` unchanged; it is how the
``fewer-steps`` baseline runs inside an N-step sampling loop (its plan also records
``sampling_steps``: the true step count a user should pass to a sampler, which for DDIM
gives identical samples).

**Hooks.** :func:`apply_block_reuse` installs diffusers ``ModelHook`` s through
``HookRegistry`` (the mechanism of diffusers' own cache hooks): a stateful root hook on
the denoiser and one hook per block, removable with :func:`remove_block_reuse`.

**Step index, without the caller's help.** A plan is made for one sampler and step count
and stores that schedule's timesteps. The root hook reads the timestep of every call: the
schedule's first timestep starts a new trajectory (all caches are dropped), and every
following call must be at the schedule's next timestep (PLMS' repeated timestep is fine:
calls are counted). A call at any other timestep *during* a trajectory means another
sampler or step count and raises :class:`UsageError`; so do two off-schedule calls in a
row at falling timesteps (a whole trajectory of another schedule). A single off-schedule
call outside a trajectory (e.g. one forward to count MACs) runs the full model and
touches no state. This works unchanged inside diffusers pipelines, which reset nothing
themselves, once the plan is keyed to the pipeline's scheduler (:meth:`ReusePlan.rekeyed`;
``slimdiff.apply(pipe, result)`` does it). Samplers
with identical timesteps (our DDIM and DPM-Solver++ both use "trailing" spacing) can only
be told apart when the caller says which one runs: slimdiff's ``sample`` declares it
(:func:`slimdiff.diffusion.sampling.sampling_context`); external loops may do the same.

**CFG.** A guided call carries ``[cond; uncond]`` in one batch; caches are kept per batch
row, so the two branches never share a cache. A batch-size change inside a trajectory is
an error (pipelines that call the branches separately are not supported).

**Caveat.** Like every diffusers hook, a deep copy of a hooked model would still run the
original's hooks; the root hook detects it and raises -- re-apply the plan to the copy.

Per architecture (which units, reused how, who reads whose output, where the timestep
argument is, how a unit is called) is the Backbone's answer
(:meth:`~slimdiff.models.backbone.Backbone.reuse_units`, ``reuse_mode``, ``block_readers``,
``timestep_argument``, ``block_input``). (Over 500 lines: one runtime in one module -- the
plan, its MACs and the hooks that run it share the step state.)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook

from slimdiff.diffusion.sampling import current_sampler, current_timestep, schedule_timesteps
from slimdiff.diffusion.schedulers import SAMPLERS
from slimdiff.errors import UsageError
from slimdiff.models.backbone import Backbone, as_backbone

__all__ = [
    "ReusePlan", "BlockCosts", "apply_block_reuse", "remove_block_reuse", "get_block_reuse",
    "block_reuse_disabled", "soft_reuse", "SoftFrame", "reuse_blocks",
    "block_costs", "effective_compute", "plan_macs", "ReuseState", "BlockReuseRootHook", "root_hook", "install_plan",
    "uninstall_plan", "plan_disabled", "module_macs", "scheduler_timesteps",
]

ROOT_HOOK = "slimdiff_block_reuse"
BLOCK_HOOK = "slimdiff_block_reuse_block"


# --------------------------------------------------------------------------- blocks
def reuse_blocks(model: nn.Module) -> tuple[list[str], list[nn.Module], str]:
    """(names, modules, mode) of the reusable units (the Backbone's
    :meth:`~slimdiff.models.backbone.Backbone.reuse_units` and
    :attr:`~slimdiff.models.backbone.Backbone.reuse_mode`: "residual" or "output")."""
    bb = as_backbone(model)
    units = bb.reuse_units()
    return [n for n, _ in units], [m for _, m in units], bb.reuse_mode


def effective_compute(compute: torch.Tensor, names: Sequence[str], consumers: dict[str, list[str]] | None) -> torch.Tensor:
    """Which blocks really run: planned ones whose output some running block (or the model's
    output) reads. Without a consumer graph (transformers) this is ``compute`` itself.

    ``compute`` is a boolean table (..., blocks), or gates in [0, 1] (DiP-GO's SuperNet): a
    block then runs as much as ``gate * (1 - prod_readers (1 - reader's effective gate))``,
    differentiably, and binary gates give exactly the boolean result.
    """
    if consumers is None:
        return compute.clone()
    gates = compute.float() if compute.dtype == torch.bool else compute
    idx = {n: i for i, n in enumerate(names)}
    eff: list[torch.Tensor] = [gates[..., 0]] * len(names)
    for b in reversed(range(len(names))):  # consumers come later in execution order
        unread = torch.ones_like(gates[..., b])
        for r in consumers[names[b]]:
            unread = torch.zeros_like(unread) if r == "output" else unread * (1 - eff[idx[r]])
        eff[b] = gates[..., b] * (1 - unread)
    out = torch.stack(eff, -1)
    return out.bool() if compute.dtype == torch.bool else out


# --------------------------------------------------------------------------- plans
@dataclass
class ReusePlan:
    """A boolean (steps x blocks) compute table for one sampler and step count.

    ``compute[s, b]`` True = compute block ``b`` at step ``s``; row 0 is all True.
    ``step_compute[s]`` False skips the whole model call at step ``s`` (output reuse).
    ``timesteps`` are the schedule's timesteps (one per model call; PLMS has steps + 1).
    ``sampling_steps`` is metadata only: the fewer-steps baseline's true step count.
    ``origin`` is the plan as made when this one was re-keyed from it (:meth:`rekeyed`), so
    that re-keying again starts from the original rows; it is not saved.
    """

    compute: torch.Tensor
    sampler: str
    steps: int
    timesteps: list[float]
    blocks: list[str]
    step_compute: list[bool] = field(default_factory=list)
    sampling_steps: int | None = None
    origin: ReusePlan | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.compute = torch.as_tensor(self.compute, dtype=torch.bool, device="cpu").clone()
        if not self.step_compute:
            self.step_compute = [True] * len(self.timesteps)
        self.validate()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.compute.shape)  # type: ignore[return-value]

    def validate(self) -> None:
        s, n = len(self.timesteps), len(self.blocks)
        if self.compute.ndim != 2 or tuple(self.compute.shape) != (s, n):
            raise UsageError(
                f"reuse plan has shape {tuple(self.compute.shape)} but {self.sampler} x{self.steps} with "
                f"{n} blocks needs ({s}, {n}): make the plan for this sampler, step count and model"
            )
        if len(self.step_compute) != s:
            raise UsageError(f"step_compute has {len(self.step_compute)} entries, the schedule has {s} calls")
        if not bool(self.compute[0].all()) or not self.step_compute[0]:
            raise UsageError("a reuse plan must compute every block at step 0 (nothing is cached yet)")

    @classmethod
    def for_sampler(cls, compute: Any, sampler: str, steps: int, model: nn.Module, **kw) -> "ReusePlan":
        """A plan for our sampling loop (``slimdiff.sample``) with ``sampler`` x ``steps``."""
        return cls(compute, sampler, steps, schedule_timesteps(sampler, steps, model), reuse_blocks(model)[0], **kw)

    @classmethod
    def for_scheduler(cls, compute: Any, scheduler: Any, steps: int, model: nn.Module, **kw) -> "ReusePlan":
        """A plan for a diffusers pipeline using (a copy of) ``scheduler`` with ``steps`` steps."""
        return cls(compute, type(scheduler).__name__, steps, scheduler_timesteps(scheduler, steps),
                   reuse_blocks(model)[0], **kw)

    @classmethod
    def full(cls, sampler: str, steps: int, model: nn.Module) -> "ReusePlan":
        """The all-compute plan (identical to the original model)."""
        n_calls = len(schedule_timesteps(sampler, steps, model))
        return cls.for_sampler(torch.ones(n_calls, len(reuse_blocks(model)[0]), dtype=torch.bool, device="cpu"),
                               sampler, steps, model)

    def check_sampler(self, sampler: str, steps: int) -> None:
        """UsageError unless this plan was made for ``sampler`` x ``steps``."""
        if (sampler, int(steps)) != (self.sampler, self.steps):
            raise UsageError(f"this reuse plan was made for {self.sampler} x{self.steps} steps, not {sampler} "
                             f"x{steps}: {self.fix()}, or compress again for {sampler} x{steps}")

    def fix(self) -> str:
        """How to sample on this plan's schedule (the end of every schedule-mismatch error)."""
        if self.sampler in SAMPLERS:  # made by slimdiff's own sampling loop
            return (f"sample with --sampler {self.sampler} --steps {self.steps}; in a diffusers pipeline, install "
                    "the model with slimdiff.apply(pipe, result, num_inference_steps=N) for the N steps you run")
        return (f"call the pipeline with num_inference_steps={self.steps} (the plan is keyed to its {self.sampler}), "
                "or slimdiff.apply(pipe, result, num_inference_steps=N) again for the N steps you run")

    def rows_for(self, calls: int) -> tuple[list[int], bool]:
        """The plan row each of ``calls`` model calls takes, in order, and whether that runs the
        plan as made (the same MACs as the plan's own run).

        The plan's own call count: row by row. The number of calls the plan computes (a plan
        that skips steps, e.g. fewer-steps at its ``sampling_steps``): its computed rows in
        order, so the run is the plan's own fewer-step run. Any other count: call ``j`` takes
        row ``floor(j * rows / calls)``, the row at the same relative position (row 0, the
        all-compute one, always comes first); its MACs ratio differs from the plan's.
        """
        rows = len(self.timesteps)
        kept = [r for r, on in enumerate(self.step_compute) if on]
        if calls == rows:
            return list(range(rows)), True
        if calls == len(kept):
            return kept, True
        return [j * rows // calls for j in range(calls)], False

    def rekeyed(self, timesteps: Sequence[float], sampler: str, steps: int) -> "ReusePlan":
        """This plan on another schedule (``timesteps``: one per model call), rows taken by
        :meth:`rows_for`; ``sampler`` and ``steps`` name that schedule in errors. Call it on the
        plan as made (``plan.origin or plan``)."""
        rows = self.rows_for(len(timesteps))[0]
        same = rows == list(range(len(self.timesteps)))
        return ReusePlan(self.compute[rows], sampler, int(steps), [float(t) for t in timesteps], list(self.blocks),
                         [self.step_compute[r] for r in rows], self.sampling_steps if same else None, self)

    def to_dict(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "timesteps": self.timesteps, "blocks": self.blocks,
                "compute": ["".join("1" if v else "0" for v in row) for row in self.compute.tolist()],
                "step_compute": "".join("1" if v else "0" for v in self.step_compute),
                "sampling_steps": self.sampling_steps}

    @classmethod
    def from_dict(cls, d: dict) -> "ReusePlan":
        try:
            compute = torch.tensor([[c == "1" for c in row] for row in d["compute"]], dtype=torch.bool, device="cpu")
            return cls(compute.reshape(len(d["compute"]), -1), d["sampler"], int(d["steps"]),
                       [float(t) for t in d["timesteps"]], list(d["blocks"]),
                       [c == "1" for c in d.get("step_compute") or ""], d.get("sampling_steps"))
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"damaged reuse plan in the model's metadata ({e}); compress the model again") from e

    def reuse_fraction(self) -> float:
        """Fraction of (step, block) entries that are reused."""
        return float((~self.compute).float().mean())


def scheduler_timesteps(scheduler: Any, steps: int) -> list[float]:
    """Timesteps a diffusers pipeline calls its model at (one per call) after
    ``scheduler.set_timesteps(steps)``, computed on a copy so ``scheduler`` is unchanged."""
    import copy

    sch = copy.deepcopy(scheduler)
    sch.set_timesteps(steps)
    return [float(t) for t in sch.timesteps]


# --------------------------------------------------------------------------- MACs
@dataclass
class BlockCosts:
    """MACs of one forward of one image: per block and the rest (embedders, output layers)."""

    blocks: list[int]
    fixed: int
    names: list[str]
    consumers: dict[str, list[str]] | None

    @property
    def forward(self) -> int:
        return self.fixed + sum(self.blocks)

    def step_macs(self, compute: torch.Tensor, step_compute: Sequence[bool] | None = None) -> torch.Tensor:
        """MACs per step (per image, one branch) of a (steps x blocks) compute table."""
        eff = effective_compute(compute.bool(), self.names, self.consumers)
        per = self.fixed + eff.double() @ torch.tensor(self.blocks, dtype=torch.float64)
        if step_compute is not None:
            per = per * torch.tensor(step_compute, dtype=torch.float64)
        return per

    def macs(self, compute: torch.Tensor, step_compute: Sequence[bool] | None = None) -> float:
        """Sampling MACs per image and branch of a compute table (sum over steps)."""
        return float(self.step_macs(compute, step_compute).sum())


def module_macs(model: nn.Module, names: Sequence[str], full: contextlib.AbstractContextManager
                ) -> tuple[list[int], int]:
    """MACs of one forward of one example inside each named sub-module (children included) and
    in all, counted with ``torch.utils.flop_counter`` (attention under the MATH backend, as
    :mod:`slimdiff.eval.compute` does) while ``full`` keeps any plan from skipping work."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    bb = as_backbone(model)
    x, t, cond = bb.example_inputs(1)
    counter = FlopCounterMode(display=False)
    with full, sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        bb(x, t, cond)
    counts = counter.get_flop_counts()
    prefix = type(model).__name__ + "."
    return [sum(counts.get(prefix + n, {}).values()) // 2 for n in names], sum(counts["Global"].values()) // 2


def block_costs(model: nn.Module) -> BlockCosts:
    """Measure per-block MACs on one full forward of one example (:func:`module_macs`)."""
    names, _, _ = reuse_blocks(model)
    per, total = module_macs(model, names, block_reuse_disabled(model))
    return BlockCosts(per, total - sum(per), names, as_backbone(model).block_readers())


def plan_macs(model: nn.Module, plan: ReusePlan, cfg: float = 1.0, costs: BlockCosts | None = None) -> int:
    """Sampling MACs per image of ``plan`` (CFG doubles the batch), without running it."""
    costs = costs or block_costs(model)
    return round(costs.macs(plan.compute, plan.step_compute) * (2 if cfg != 1.0 else 1))


# --------------------------------------------------------------------------- state
@dataclass
class SoftFrame:
    """One step of a differentiable SuperNet pass: ``keep[b]`` gates in [0, 1] (None at step 0,
    where everything computes), the caches going in and the mixed caches coming out."""

    keep: torch.Tensor | None
    caches_in: list[Any]
    caches_out: list[Any] = field(default_factory=list)


class ReuseState:
    """Per-trajectory state shared by the root and block hooks."""

    def __init__(self, plan: ReusePlan, eff: torch.Tensor):
        self.plan, self.eff = plan, eff
        self.disabled = 0
        self.frame: SoftFrame | None = None
        self.reset()

    def reset(self) -> None:
        self.step: int | None = None  # step of the current call (None: full compute, no state)
        self.last: int | None = None  # last on-schedule step of the current trajectory
        self.batch: int | None = None
        self.caches: dict[int, Any] = {}
        self.root_out: Any = None
        self.off_t: float | None = None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * max(1.0, abs(b))


class BlockReuseRootHook(ModelHook):
    """Root hook: derives the step index from the timestep, resets per trajectory, skips
    whole steps the plan does not compute."""

    _is_stateful = True

    def __init__(self, state: ReuseState, t_index: int, t_name: str):
        super().__init__()
        self.state, self.t_index, self.t_name = state, t_index, t_name
        self.module: nn.Module | None = None

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self.module = module
        return module

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state.reset()
        return module

    def _timestep(self, args: tuple, kwargs: dict) -> tuple[float, int]:
        x = args[0] if args else next(iter(kwargs.values()))
        host_t = current_timestep()  # inside ``sample``: known on the host, no device read-back
        if host_t is not None:
            return host_t, int(x.shape[0])
        t = kwargs.get(self.t_name)
        if t is None and len(args) > self.t_index:
            t = args[self.t_index]
        if t is None:
            raise UsageError("block reuse needs the timestep of every call; pass it to the model")
        return float(torch.as_tensor(t).flatten()[0]), int(x.shape[0])

    def _locate(self, t: float, batch: int) -> int | None:
        st, plan = self.state, self.state.plan
        ctx = current_sampler()
        if ctx is not None:
            plan.check_sampler(*ctx)
        ts = plan.timesteps
        if st.last is not None and st.last + 1 < len(ts) and _close(t, ts[st.last + 1]):
            if batch != st.batch:
                raise UsageError(f"batch size changed from {st.batch} to {batch} inside a sampling trajectory: "
                                 "block reuse needs one call per step (CFG branches in one [cond; uncond] batch)")
            st.last += 1
            return st.last
        if _close(t, ts[0]):
            st.reset()
            st.last, st.batch = 0, batch
            return 0
        if st.last is not None and st.last + 1 < len(ts):
            raise UsageError(
                f"timestep {t:g} at call {st.last + 1} does not follow the reuse plan's {plan.sampler} x{plan.steps} "
                f"schedule (expected {ts[st.last + 1]:g}): {plan.fix()}"
            )
        if st.off_t is not None and t < st.off_t:
            raise UsageError(
                f"the model is sampled on a schedule other than its reuse plan's {plan.sampler} x{plan.steps} "
                f"(timestep {t:g} is not on it): {plan.fix()}"
            )
        st.off_t = t
        return None

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        # A deep copy's forward still routes to the original's hook chain (the registry's
        # closures are not copied); only the module handed in here is the copy.
        if module is not self.module:
            raise UsageError("this model is a copy of a model with a block-reuse plan; hooks do not survive copying: "
                             "call remove_block_reuse(copy) and apply_block_reuse(copy, plan)")
        return args, kwargs

    def new_forward(self, module: nn.Module, *args, **kwargs):
        st = self.state
        if st.disabled or st.frame is not None:
            st.step = None
            return self.fn_ref.original_forward(*args, **kwargs)
        step = self._locate(*self._timestep(args, kwargs))
        st.step = step
        if step is not None and not st.plan.step_compute[step]:
            return st.root_out
        out = self.fn_ref.original_forward(*args, **kwargs)
        if step is not None:
            st.root_out = out
        else:
            st.last = None
        return out


def _map(fn, *xs):
    """Apply ``fn`` leaf-wise over tensors nested in tuples/lists (UNet block outputs)."""
    if isinstance(xs[0], (tuple, list)):
        return type(xs[0])(_map(fn, *parts) for parts in zip(*xs))
    return fn(*xs)


class BlockReuseBlockHook(ModelHook):
    """Per-block hook: compute (and cache) or reuse, as the plan says for the current step."""

    def __init__(self, state: ReuseState, index: int, mode: str, backbone: type[Backbone]):
        super().__init__()
        self.state, self.index, self.mode = state, index, mode
        self._input = backbone.block_input  # how the unit is called: where its input is

    def new_forward(self, module: nn.Module, *args, **kwargs):
        st, b = self.state, self.index
        if st.frame is not None:
            return self._soft(st.frame, args, kwargs)
        if st.step is None or st.disabled:
            return self.fn_ref.original_forward(*args, **kwargs)
        if st.eff[st.step, b] or b not in st.caches:
            out = self.fn_ref.original_forward(*args, **kwargs)
            st.caches[b] = out - self._input(args, kwargs) if self.mode == "residual" else out
            return out
        return self._input(args, kwargs) + st.caches[b] if self.mode == "residual" else st.caches[b]

    def _soft(self, frame: SoftFrame, args: tuple, kwargs: dict):
        """SuperNet: always compute (the gate's gradient needs the fresh value) and mix."""
        out = self.fn_ref.original_forward(*args, **kwargs)
        fresh = out - self._input(args, kwargs) if self.mode == "residual" else out
        cached = frame.caches_in[self.index] if frame.caches_in else None
        if frame.keep is None or cached is None:
            mixed = fresh
        else:
            g = frame.keep[self.index]
            mixed = _map(lambda f, c: g * f + (1 - g) * c, fresh, cached)
        frame.caches_out[self.index] = mixed
        if mixed is fresh:
            return out
        # out + (mixed - fresh): bit-exact ``out`` when the gate keeps, ``input + cache`` when it reuses
        return out + (mixed - fresh) if self.mode == "residual" else mixed


# --------------------------------------------------------------------------- public API
def root_hook(model: nn.Module, name: str = ROOT_HOOK) -> BlockReuseRootHook | None:
    """The step-tracking root hook registered on ``model`` under ``name``, if any."""
    reg = getattr(model, "_diffusers_hook", None)
    return reg.get_hook(name) if reg is not None else None


def install_plan(model: nn.Module, state: ReuseState, units: Sequence[nn.Module],
                 unit_hook: Callable[[int], ModelHook], root_name: str, unit_name: str) -> nn.Module:
    """Register the step-tracking root hook on ``model`` and ``unit_hook(i)`` on each unit, all
    sharing ``state`` (the one mechanism behind block reuse and branch caches)."""
    HookRegistry.check_if_exists_or_initialize(model).register_hook(
        BlockReuseRootHook(state, *as_backbone(model).timestep_argument()), root_name)
    for i, unit in enumerate(units):
        HookRegistry.check_if_exists_or_initialize(unit).register_hook(unit_hook(i), unit_name)
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    return model


def uninstall_plan(model: nn.Module, root_name: str, unit_name: str) -> nn.Module:
    """Remove the hooks :func:`install_plan` registered under these names (a no-op without them)."""
    reg = getattr(model, "_diffusers_hook", None)
    if reg is not None:
        reg.remove_hook(root_name, recurse=False)
        for _, sub in model.named_modules():
            sub_reg = getattr(sub, "_diffusers_hook", None)
            if sub_reg is not None:
                sub_reg.remove_hook(unit_name, recurse=False)
        reg.invalidate_child_registries_cache()
    return model


@contextlib.contextmanager
def plan_disabled(state: ReuseState | None) -> Iterator[None]:
    """Units run in full (no cache read or written) inside the block; a no-op for ``None``."""
    if state is not None:
        state.disabled += 1
    try:
        yield
    finally:
        if state is not None:
            state.disabled -= 1


def apply_block_reuse(model: nn.Module, plan: ReusePlan) -> nn.Module:
    """Install ``plan`` on ``model`` (in place; returns it). Sampling then follows the plan."""
    if not isinstance(plan, ReusePlan):
        raise UsageError(f"apply_block_reuse needs a ReusePlan, got {type(plan).__name__}")
    if root_hook(model) is not None:
        raise UsageError("this model already has a block-reuse plan: call remove_block_reuse(model) first")
    bb = as_backbone(model)
    names, blocks, mode = reuse_blocks(model)
    if list(plan.blocks) != list(names):
        raise UsageError(f"the reuse plan is for {len(plan.blocks)} blocks ({', '.join(plan.blocks[:3])}, ...) but the "
                         f"model has {len(names)} ({', '.join(names[:3])}, ...): make the plan for this model")
    plan.validate()
    state = ReuseState(plan, effective_compute(plan.compute, names, bb.block_readers()))
    return install_plan(model, state, blocks, lambda i: BlockReuseBlockHook(state, i, mode, type(bb)), ROOT_HOOK,
                        BLOCK_HOOK)


def remove_block_reuse(model: nn.Module) -> nn.Module:
    """Remove the plan's hooks (a no-op without them); the model is the original again."""
    return uninstall_plan(model, ROOT_HOOK, BLOCK_HOOK)


def get_block_reuse(model: nn.Module) -> ReusePlan | None:
    """The plan installed on ``model``, if any."""
    hook = root_hook(model)
    return hook.state.plan if hook is not None else None


def _state(model: nn.Module) -> ReuseState | None:
    hook = root_hook(model)
    return hook.state if hook is not None else None


@contextlib.contextmanager
def block_reuse_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in full (no reuse, no state change) inside the block."""
    with plan_disabled(_state(model)):
        yield model


@contextlib.contextmanager
def soft_reuse(model: nn.Module, frame: SoftFrame) -> Iterator[SoftFrame]:
    """Run one SuperNet step: every block computes and mixes with ``frame``'s caches."""
    st = _state(model)
    if st is None:
        raise UsageError("soft_reuse needs apply_block_reuse(model, plan) first")
    n = len(st.plan.blocks)
    frame.caches_out = [None] * n
    st.frame = frame
    try:
        yield frame
    finally:
        st.frame = None
