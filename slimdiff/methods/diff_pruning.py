"""Diff-Pruning (Fang et al., 2023): Taylor structural pruning over thresholded timesteps.

What the paper adds to the shared width pruner (:mod:`slimdiff.compression.width`, also behind
the baselines of :mod:`slimdiff.methods.width_baselines`), in order:

1. **Calibration** -- one fixed batch ``x0`` (``ctx.batch_size`` samples of ``ctx.data``,
   drawn with ``ctx.seed``: :func:`slimdiff.compression.calibration.calibration_batch`) and
   one fixed noise tensor, reused at every timestep. Data of another shape than the model's
   input is a :class:`~slimdiff.errors.UsageError` (never replaced by random inputs); a text
   model whose data has no captions gets the null prompt's embedding (slimdiff's null
   condition, the one its guidance and label dropout use); a model whose objective is not
   epsilon gets a warning (the reference's threshold is defined on the epsilon loss).
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
3. **Scores** -- ``importance="paper"`` (default): the importance of the ``ddpm_exp`` code that
   produced the paper's tables (:mod:`slimdiff.compression.importance`): per channel, the sum
   over the dependency group of ``sum_k (w_k g_k)^2`` (conv/linear out- and in-channels, ``g``
   the timestep-summed gradient) plus ``|w g|`` of GroupNorm affine weights, no normalisation,
   and every GroupNorm group (head) ranked on its own (``ddpm_exp/torch_pruning/importance.py``
   ~376-425, ``.../metapruner.py`` ~237-246). ``importance="taylor-tp"``: the repository's
   diffusers script ``ddpm_prune.py`` with pip torch-pruning 1.6:
   ``TaylorImportance(multivariable=False)`` (``sum_k |w_k g_k|``, mean over the group, no
   GroupNorm term) with the same slots removed in every GroupNorm group; it keeps exactly the
   channels that script keeps. The paper is the default because its numbers come from the
   former; at one ratio the two give different shapes (ratio 0.3 on 32 channels in 8 GroupNorm
   groups keeps 24 vs 16), which the budget search absorbs. The "Taylor" baseline
   (``multivariable=True``, every timestep) is :data:`slimdiff.methods.width_baselines.TAYLOR_WIDTH`.
4. **Pruning to the budget and recovery** -- :func:`slimdiff.compression.width.width_prune`:
   local ranking through torch-pruning's dependency graph (attention inner width and MLP
   hidden channels of transformers, every channel group of UNets; ``heads="dims"`` narrows
   heads, ``"whole"`` removes them), the ratio searched until the MACs are within 3% of the
   budget, then the shared recovery. ``residual_width=True`` (DiT, beyond the paper) also
   prunes the residual width (:mod:`slimdiff.compression.residual_width`).

Resume: with ``ctx.work_dir`` set (``slimdiff compress`` sets it) the gradient pass checkpoints
its trace and summed gradients atomically every :data:`CHECKPOINT_EVERY` timesteps into
``<work_dir>/diff-pruning-grads-<settings key>-<model fingerprint>``; a rerun after a crash
continues at the next timestep and gives bit-identical gradients, so the same pruned model
(:class:`_GradientCheckpoints`).
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from slimdiff.compression.calibration import calibration_batch, check_shape
from slimdiff.compression.width import HEAD_MODES, HEADS_HELP, RESIDUAL_HELP, draw_width, width_prune
from slimdiff.budget import check_budget
from slimdiff.errors import UsageError
from slimdiff.methods.base import Context, fingerprint, settings_key
from slimdiff.methods.spec import MethodSpec, check_options, option
from slimdiff.models.conditions import TextCondition

if TYPE_CHECKING:
    from slimdiff.eval.speed import SpeedSettings

__all__ = ["TimestepTrace", "check_threshold", "taylor_timesteps", "accumulate_gradients", "DiffPruningConfig",
           "IMPORTANCE_MODES", "gradient_pass", "compress", "diff_pruning", "speed_student", "DIFF_PRUNING", "SPECS"]

# option value -> (slimdiff.compression.width importance, group ranking)
IMPORTANCE_MODES = {"paper": ("taylor-paper", "separate"), "taylor-tp": ("taylor", "shared")}

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
                     backprop_stop_step: bool = False, trace: TimestepTrace | None = None,
                     after_step: Callable[[TimestepTrace], None] | None = None) -> TimestepTrace:
    """Sum gradients of ``loss_at(t)`` over ``timesteps`` (ascending) until the first ``t`` with
    ``L_t < threshold * L_max``; return which steps contributed.

    ``backprop_stop_step=False`` (the paper and ``ddpm_exp``): check first, so the stopping
    step adds no gradient. ``True`` (``ddpm_prune.py``): back-propagate first, so it does.
    The caller zeroes gradients beforehand; nothing here zeroes them (they accumulate).
    ``trace`` continues a resumed pass (its ``loss_max`` included; ``timesteps`` are then the
    ones left); ``after_step(trace)`` runs after every step that did not stop (checkpoints).
    """
    check_threshold(threshold)
    trace = trace if trace is not None else TimestepTrace()
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
        if after_step is not None:
            after_step(trace)
    return trace


CHECKPOINT_EVERY = 50
"""The gradient pass checkpoints every this many evaluated timesteps (with a work directory)."""


def _tensor_digest(*conds: torch.Tensor | TextCondition | None) -> str:
    """12 hex digits of sha256 over the tensors' shapes, dtypes and values: the calibration's resume key
    (a caption condition contributes its embeddings and mask)."""
    h = hashlib.sha256()
    tensors = [u for c in conds for u in ((c.embeds, c.mask) if isinstance(c, TextCondition) else (c,))]
    for t in tensors:
        if t is not None:
            t = t.detach().to("cpu").contiguous()
            h.update(f"{t.dtype}:{tuple(t.shape)};".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:12]


class _GradientCheckpoints:
    """Resumable state of the gradient pass in ``run``: the trace so far and the summed
    ``p.grad`` of every trainable parameter by name (safetensors), saved atomically every
    :data:`CHECKPOINT_EVERY` evaluated timesteps and once at the end (``done``).

    Bit-identical on resume with no RNG state: the noise comes from a generator seeded with
    ``seed``, the calibration batch is recomputed from the data and ``ctx.seed``, and the model
    runs in ``eval()`` (no dropout, no label dropout), so the only state is what is saved;
    reloaded gradients are added to exactly as autograd would have. A checkpoint whose ``key``
    (threshold, stride, stop convention, seed, calibration source, size and content, timestep
    count) differs from this run's is refused with a :class:`UsageError` (the folder name already
    holds the key's hash and the model's fingerprint, so only a foreign or edited folder differs).
    """

    def __init__(self, run: Path, key: dict, model: nn.Module, every: int):
        self.run, self.key, self.every = run, key, every
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def resume(self) -> tuple[TimestepTrace, bool]:
        """The saved trace and whether the pass had ended; puts the saved gradients back."""
        from slimdiff.train.checkpoint import find_checkpoint, load_state
        from slimdiff.train.trainer import _check_same_run

        path = find_checkpoint(self.run)
        if path is None:
            return TimestepTrace(), False
        state = load_state(path)
        _check_same_run(state["info"].get("key", {}), self.key, path)
        unknown = set(state["tensors"]) - set(self.params)
        if unknown:
            raise UsageError(f"the checkpoint in {path} holds gradients of parameters this model lacks "
                             f"({', '.join(sorted(unknown)[:3])}); delete it to start over")
        for name, grad in state["tensors"].items():
            p = self.params[name]
            p.grad = grad.to(p.device, p.dtype)
        return TimestepTrace(**state["info"]["trace"]), bool(state["info"]["done"])

    def save(self, trace: TimestepTrace, done: bool = False) -> None:
        """Checkpoint ``trace`` and the gradients (every ``every`` steps, and at the end)."""
        from slimdiff.train.checkpoint import save_state

        if done or len(trace.timesteps) % self.every == 0:
            grads = {n: p.grad for n, p in self.params.items() if p.grad is not None}
            save_state(self.run, step=len(trace.timesteps), tensors=grads,
                       info={"key": self.key, "trace": asdict(trace), "done": done})


def accumulate_gradients(model: nn.Module, x0: torch.Tensor, cond: torch.Tensor | None, *, threshold: float,
                         stride: int = 1, backprop_stop_step: bool = False, seed: int = 0,
                         progress: bool = False, work_dir: Path | None = None,
                         calibration: str = "given") -> TimestepTrace:
    """Diff-Pruning's gradient pass: zero grads, then :func:`taylor_timesteps` with the model's
    diffusion loss on ``x0`` and one fixed noise tensor at ``t = 0, stride, 2 stride, ...``.

    With ``work_dir`` the pass is resumable (:class:`_GradientCheckpoints`) in
    ``work_dir/diff-pruning-grads-<settings key>-<model fingerprint>``: a rerun after a crash
    continues at the next timestep and ends bit-identical to an uninterrupted pass.
    ``calibration`` names the batch's source (part of the resume key).
    """
    from slimdiff.diffusion.losses import ForwardProcess, diffusion_loss
    from slimdiff.diffusion.schedulers import diffusion_config_of
    from slimdiff.models.backbone import as_backbone

    bb = as_backbone(model)
    check_shape(x0, bb, "(x0)")
    objective = diffusion_config_of(model).objective
    if objective != "epsilon":
        warnings.warn(f"Diff-Pruning's threshold was defined on the epsilon loss; this model's objective is "
                      f"{objective!r}, so the timesteps it keeps may differ from the paper's", stacklevel=2)
    if not isinstance(stride, int) or stride < 1:
        raise UsageError(f"timestep stride must be a positive integer, got {stride!r}")
    process = ForwardProcess(diffusion_config_of(model))
    total = process.config.num_train_timesteps
    ckpt = None
    if work_dir is not None:
        key = {"threshold": threshold, "stride": stride, "backprop_stop_step": backprop_stop_step, "seed": seed,
               "calibration": calibration, "calibration_size": len(x0),
               "calibration_digest": _tensor_digest(x0, cond), "num_train_timesteps": total}
        run = Path(work_dir) / f"diff-pruning-grads-{settings_key(key)}-{fingerprint(model)[:12]}"
        ckpt = _GradientCheckpoints(run, key, model, CHECKPOINT_EVERY)
    device, dtype = bb.device, bb.dtype
    x0 = x0.to(device, dtype)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    cond = cond.to(device) if cond is not None else None

    def loss_at(t: int) -> torch.Tensor:
        batch = process.noisy(x0, noise, torch.full((len(x0),), t, dtype=torch.long))
        return diffusion_loss(bb(batch.x_t, batch.t, cond), batch)

    was_training = model.training
    model.eval()  # deterministic: no dropout, no label dropout (the reference also uses eval())
    model.zero_grad(set_to_none=True)
    trace, done = ckpt.resume() if ckpt is not None else (TimestepTrace(), False)
    steps: Sequence[int] = [] if done else range(0, total, stride)[len(trace.timesteps):]  # those left
    if progress and steps:
        from slimdiff.utils import progress as progress_bar

        steps = progress_bar(steps, "diff-pruning gradients")
    try:
        with torch.enable_grad():
            trace = taylor_timesteps(loss_at, steps, threshold, backprop_stop_step=backprop_stop_step,
                                     trace=trace, after_step=ckpt.save if ckpt is not None else None)
    finally:
        model.train(was_training)
    if ckpt is not None and not done:
        ckpt.save(trace, done=True)
    for p in model.parameters():  # parameters the loss does not reach have gradient zero
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    return trace


def gradient_pass(ctx: Context, *, threshold: float, stride: int, backprop_stop_step: bool = False,
                  calibration: tuple[torch.Tensor, torch.Tensor | None] | None = None
                  ) -> Callable[[nn.Module], tuple[dict, dict]]:
    """:func:`accumulate_gradients` on the calibration batch, as :func:`width_prune`'s ``prepare``
    (Diff-Pruning's and the Taylor baseline's): records the batch's source and size, and the trace.
    With ``ctx.work_dir`` (``slimdiff compress`` sets it) the pass resumes after a crash.
    ``calibration`` = ``(x0, cond)`` overrides the batch drawn from ``ctx.data``."""

    def prepare(m: nn.Module) -> tuple[dict, dict]:
        x0, cond, source = (*calibration, "given") if calibration is not None else calibration_batch(m, ctx)
        trace = accumulate_gradients(m, x0, cond, threshold=threshold, stride=stride,
                                     backprop_stop_step=backprop_stop_step, seed=ctx.seed, progress=ctx.progress,
                                     work_dir=ctx.work_dir, calibration=source)
        return {"calibration": source, "calibration_size": int(len(x0))}, {"timesteps": trace.to_dict()}

    return prepare


# --------------------------------------------------------------------------- method
@dataclass(frozen=True)
class DiffPruningConfig:
    """Diff-Pruning's options; the defaults are the paper's recipe (threshold: the reference's CIFAR-10 value)."""

    threshold: float = option(0.05, "relative-loss threshold: gradients stop at the first timestep with "
                                    "L_t < threshold * L_max (0 = all timesteps); the paper used 0.05 on CIFAR-10, "
                                    "0 on CelebA-HQ, 0.01 on LSUN Church/Bedroom, 0.1 for the ImageNet LDM", low=0, high=1)
    stride: int = option(1, "timestep stride of the gradient pass (1 = every training timestep, as in the paper)",
                         low=1)
    backprop_stop_step: bool = option(False, "back-propagate the stopping step too (ddpm_prune.py's convention)")
    heads: str = option("dims", HEADS_HELP, choices=HEAD_MODES)
    importance: str = option("paper", "channel scores: paper = ddpm_exp's (sum of (w*dw)^2 + GroupNorm |w*dw|, each "
                                      "GroupNorm group ranked on its own; the paper's tables); taylor-tp = "
                                      "ddpm_prune.py's torch-pruning TaylorImportance (the same slots in every group)",
                        choices=tuple(IMPORTANCE_MODES))
    residual_width: bool = option(False, RESIDUAL_HELP)

    def __post_init__(self) -> None:
        check_options(self)


def compress(model: nn.Module, budget: float, ctx: Context, config: DiffPruningConfig, *,
             calibration: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> nn.Module:
    """Diff-Pruning at ``budget`` (fraction of sampling MACs): see the module docstring.

    ``calibration`` = ``(x0, cond)`` overrides the batch drawn from ``ctx.data``.
    """
    threshold = float(config.threshold)
    importance, ranking = IMPORTANCE_MODES[config.importance]
    settings = {"threshold": threshold, "stride": config.stride, "backprop_stop_step": config.backprop_stop_step}

    prepare = gradient_pass(ctx, threshold=threshold, stride=config.stride,
                            backprop_stop_step=config.backprop_stop_step, calibration=calibration)
    return width_prune(model, budget, ctx, "diff-pruning", importance, heads=config.heads, settings=settings,
                       group_ranking=ranking, residual=config.residual_width, prepare=prepare)


def diff_pruning(model: nn.Module, budget: float, ctx: Context | None = None, threshold: float | None = None, *,
                 calibration: tuple[torch.Tensor, torch.Tensor | None] | None = None, **options) -> nn.Module:
    """The Python entry point: ``diff_pruning(model, 0.5, ctx, 0.05, stride=10, heads="whole")``.

    ``threshold`` and ``options`` (``stride``, ``backprop_stop_step``, ``heads``, ``importance``,
    ``residual_width``) override
    :class:`DiffPruningConfig`'s defaults (``None``: the default); ``calibration`` = ``(x0, cond)``
    overrides the batch drawn from ``ctx.data``.
    """
    config = DIFF_PRUNING.make_config({"threshold": threshold, **options})
    return compress(model, check_budget(budget), ctx or Context(), config, calibration=calibration)


def speed_student(model: nn.Module, settings: SpeedSettings) -> nn.Module:
    """The speed bench's student: the method itself at the bench's budget, threshold, stride,
    head mode and residual-width option (DiTs only), calibrated on seeded random example inputs, passed explicitly (the pruned
    shape is what it times, and with local ranking the shape does not depend on the scores)."""
    from slimdiff.compression.residual_width import supports
    from slimdiff.models.backbone import as_backbone

    ctx = settings.context()
    x0, _, cond = as_backbone(model).example_inputs(ctx.batch_size, torch.Generator().manual_seed(ctx.seed))
    residual = settings.residual_width and supports(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a non-epsilon objective does not change the shape this times
        return diff_pruning(model, settings.budget, ctx, settings.threshold, stride=settings.stride,
                            heads=settings.heads, calibration=(x0, cond), residual_width=residual)


DIFF_PRUNING = MethodSpec("diff-pruning", "width",
                          "Diff-Pruning: Taylor structural width pruning over thresholded timesteps",
                          compress, DiffPruningConfig, draw=draw_width, speed_student=speed_student)


SPECS = (DIFF_PRUNING,)
