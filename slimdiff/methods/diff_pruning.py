"""Diff-Pruning (Fang et al., 2023): Taylor structural pruning over thresholded timesteps.

What the paper adds to the shared width pruner (:mod:`slimdiff.compression.width`, also behind
the baselines of :mod:`slimdiff.methods.width_baselines`), in order:

1. **Calibration** -- one fixed batch ``x0`` (``ctx.batch_size`` samples of ``ctx.data``,
   drawn with ``ctx.seed``: :func:`slimdiff.compression.calibration.calibration_batch`) and
   one fixed noise tensor, reused at every timestep.
2. **Gradients over thresholded timesteps** -- the diffusion loss ``L_t`` (the model's own
   objective, mean squared error as in the reference's ``ddpm_prune.py``) is evaluated at
   ``t = 0, s, 2s, ...`` upward (stride ``s``, default 1 = all 1000 training steps, as in the
   paper; a larger stride is a speed knob for CPU runs). Gradients are *summed* over the
   steps; the loop stops at the first ``t`` with ``L_t < threshold * L_max`` (``L_max`` the
   running maximum, ``threshold=0`` = every step). **Stop convention**: the reference has
   two. ``ddpm_exp/`` (which produced the paper's numbers) and the paper's definition of the
   kept steps (``L_t / L_max > T``) leave the stopping step *out*; ``ddpm_prune.py``
   back-propagates first, so the stopping step is *in*. We follow the paper by default
   (``backprop_stop_step=False``) and offer the other with ``backprop_stop_step=True``.
3. **Scores** -- ``torch_pruning.importance.TaylorImportance(multivariable=False)``:
   per channel ``sum_k |w_k * sum_t g_t,k|`` reduced over its dependency group (the
   reference's choice; the plain "taylor" baseline would be ``multivariable=True``).
4. **Pruning to the budget and recovery** -- :func:`slimdiff.compression.width.width_prune`:
   local ranking through torch-pruning's dependency graph (attention inner width and MLP
   hidden channels of transformers, every channel group of UNets; ``heads="dims"`` narrows
   heads, ``"whole"`` removes them), the ratio searched until the MACs are within 3% of the
   budget, then the shared recovery.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from slimdiff.compression.calibration import calibration_batch, check_shape
from slimdiff.compression.width import HEADS_HELP, draw_width, width_prune
from slimdiff.budget import check_budget
from slimdiff.errors import UsageError
from slimdiff.methods.base import Context
from slimdiff.methods.spec import MethodSpec, option

if TYPE_CHECKING:
    from slimdiff.eval.speed import SpeedSettings

__all__ = ["TimestepTrace", "check_threshold", "taylor_timesteps", "accumulate_gradients", "DiffPruningConfig",
           "compress", "diff_pruning", "speed_student", "DIFF_PRUNING", "SPECS"]

# --------------------------------------------------------------------------- timesteps
@dataclass
class TimestepTrace:
    """Which timesteps contributed gradients, and their losses."""

    timesteps: list[int] = field(default_factory=list)  # evaluated, in order
    losses: list[float] = field(default_factory=list)  # L_t of each evaluated step
    used: list[int] = field(default_factory=list)  # back-propagated (gradients summed)
    stop_t: int | None = None  # the step that met L_t < threshold * L_max (None: ran to the end)
    loss_max: float = 0.0

    def to_dict(self) -> dict:
        return {"timesteps_used": len(self.used), "first_t": self.used[0] if self.used else None,
                "last_t": self.used[-1] if self.used else None, "stop_t": self.stop_t, "loss_max": self.loss_max,
                "losses": [round(v, 6) for v in self.losses]}


def check_threshold(threshold: float) -> float:
    """Diff-Pruning's threshold is a fraction of the largest loss, in [0, 1] (0 = all timesteps)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 <= value <= 1:
        raise UsageError(f"threshold must be in [0, 1] (a fraction of the largest loss; 0 = all timesteps), "
                         f"got {threshold!r}")
    return value


def taylor_timesteps(loss_at: Callable[[int], torch.Tensor], timesteps: Iterable[int], threshold: float, *,
                     backprop_stop_step: bool = False) -> TimestepTrace:
    """Sum gradients of ``loss_at(t)`` over ``timesteps`` (ascending) until the first ``t`` with
    ``L_t < threshold * L_max``; return which steps contributed.

    ``backprop_stop_step=False`` (the paper and ``ddpm_exp``): check first, so the stopping
    step adds no gradient. ``True`` (``ddpm_prune.py``): back-propagate first, so it does.
    The caller zeroes gradients beforehand; nothing here zeroes them (they accumulate).
    """
    check_threshold(threshold)
    trace = TimestepTrace()
    for t in timesteps:
        loss = loss_at(int(t))
        value = float(loss.detach())
        trace.timesteps.append(int(t))
        trace.losses.append(value)
        trace.loss_max = max(trace.loss_max, value)
        stop = value < threshold * trace.loss_max
        if backprop_stop_step or not stop:
            loss.backward()
            trace.used.append(int(t))
        if stop:
            trace.stop_t = int(t)
            break
    return trace


def accumulate_gradients(model: nn.Module, x0: torch.Tensor, cond: torch.Tensor | None, *, threshold: float,
                         stride: int = 1, backprop_stop_step: bool = False, seed: int = 0,
                         progress: bool = False) -> TimestepTrace:
    """Diff-Pruning's gradient pass: zero grads, then :func:`taylor_timesteps` with the model's
    diffusion loss on ``x0`` and one fixed noise tensor at ``t = 0, stride, 2 stride, ...``."""
    from slimdiff.diffusion.losses import ForwardProcess, diffusion_loss
    from slimdiff.diffusion.schedulers import diffusion_config_of
    from slimdiff.models.backbone import as_backbone

    bb = as_backbone(model)
    check_shape(x0, bb, "(x0)")
    if not isinstance(stride, int) or stride < 1:
        raise UsageError(f"timestep stride must be a positive integer, got {stride!r}")
    process = ForwardProcess(diffusion_config_of(model))
    device, dtype = bb.device, bb.dtype
    x0 = x0.to(device, dtype)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    cond = cond.to(device) if cond is not None else None
    steps: Sequence[int] = range(0, process.config.num_train_timesteps, stride)
    if progress:
        from rich.progress import track

        steps = track(steps, description="diff-pruning gradients", transient=True)

    def loss_at(t: int) -> torch.Tensor:
        batch = process.noisy(x0, noise, torch.full((len(x0),), t, dtype=torch.long))
        return diffusion_loss(bb(batch.x_t, batch.t, cond), batch)

    was_training = model.training
    model.eval()  # deterministic: no dropout, no label dropout (the reference also uses eval())
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            trace = taylor_timesteps(loss_at, steps, threshold, backprop_stop_step=backprop_stop_step)
    finally:
        model.train(was_training)
    for p in model.parameters():  # parameters the loss does not reach have gradient zero
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    return trace


# --------------------------------------------------------------------------- method
@dataclass(frozen=True)
class DiffPruningConfig:
    """Diff-Pruning's options; the defaults are the paper's recipe (threshold: the reference's CIFAR-10 value)."""

    threshold: float = option(0.05, "relative-loss threshold: gradients stop at the first timestep with "
                                    "L_t < threshold * L_max (0 = all timesteps)")
    stride: int = option(1, "timestep stride of the gradient pass (1 = every training timestep, as in the paper)")
    backprop_stop_step: bool = option(False, "back-propagate the stopping step too (ddpm_prune.py's convention)")
    heads: str = option("dims", HEADS_HELP)


def compress(model: nn.Module, budget: float, ctx: Context, config: DiffPruningConfig, *,
             calibration: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> nn.Module:
    """Diff-Pruning at ``budget`` (fraction of sampling MACs): see the module docstring.

    ``calibration`` = ``(x0, cond)`` overrides the batch drawn from ``ctx.data``.
    """
    threshold = check_threshold(config.threshold)
    settings = {"threshold": threshold, "stride": config.stride, "backprop_stop_step": config.backprop_stop_step}

    def prepare(m: nn.Module) -> tuple[dict, dict]:
        x0, cond, source = (*calibration, "given") if calibration is not None else calibration_batch(m, ctx)
        trace = accumulate_gradients(m, x0, cond, threshold=threshold, stride=config.stride,
                                     backprop_stop_step=config.backprop_stop_step, seed=ctx.seed,
                                     progress=ctx.progress)
        return {"calibration": source, "calibration_size": int(len(x0))}, {"timesteps": trace.to_dict()}

    return width_prune(model, budget, ctx, "diff-pruning", "taylor", heads=config.heads, settings=settings,
                       prepare=prepare)


def diff_pruning(model: nn.Module, budget: float, ctx: Context | None = None, threshold: float | None = None, *,
                 calibration: tuple[torch.Tensor, torch.Tensor | None] | None = None, **options) -> nn.Module:
    """The Python entry point: ``diff_pruning(model, 0.5, ctx, 0.05, stride=10, heads="whole")``.

    ``threshold`` and ``options`` (``stride``, ``backprop_stop_step``, ``heads``) override
    :class:`DiffPruningConfig`'s defaults (``None``: the default); ``calibration`` = ``(x0, cond)``
    overrides the batch drawn from ``ctx.data``.
    """
    config = DIFF_PRUNING.make_config({"threshold": threshold, **options})
    return compress(model, check_budget(budget), ctx or Context(), config, calibration=calibration)


def speed_student(model: nn.Module, settings: SpeedSettings) -> nn.Module:
    """The speed bench's student: the method itself at the bench's budget, threshold, stride
    and head mode, calibrated on seeded random latents (the pruned shape is what it times)."""
    ctx = settings.context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random calibration latents are intended for a speed bench
        return diff_pruning(model, settings.budget, ctx, settings.threshold, stride=settings.stride,
                            heads=settings.heads)


DIFF_PRUNING = MethodSpec("diff-pruning", "width",
                          "Diff-Pruning: Taylor structural width pruning over thresholded timesteps",
                          compress, DiffPruningConfig, draw=draw_width, speed_student=speed_student)


SPECS = (DIFF_PRUNING,)
