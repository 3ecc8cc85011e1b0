"""The sampling loop on diffusers schedulers, with classifier-free guidance and seeded noise.

:class:`Trajectory` holds the one denoising loop (scheduler set-up, timesteps, guidance,
steps); :func:`sample` runs it for every command and method, DiP-GO's differentiable
SuperNet and L2C's trajectory recording run it with their own per-step model function
(``model_fn(inp, t, i)``). Two hooks let callers act per step: ``on_step_begin(i, t)`` runs
before the model is evaluated at step ``i`` and ``callback(i, t, x)`` runs after the
scheduler step. While a trajectory runs, :func:`current_sampler` tells runtimes which
sampler and step count are in use (DDIM and DPM-Solver++ share timesteps, so a reuse plan
cannot tell them apart otherwise), and :func:`current_timestep` the step's timestep.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from slimdiff.diffusion.schedulers import DiffusionConfig, diffusion_config_of, make_scheduler
from slimdiff.errors import UsageError
from slimdiff.utils import progress as progress_bar


ModelFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""A per-step model function ``(model input, timestep, step index) -> prediction``."""

_SAMPLER: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("slimdiff_sampler", default=None)


def current_sampler() -> tuple[str, int] | None:
    """``(sampler, steps)`` of the sampling run in progress, or None outside one."""
    return _SAMPLER.get()


_TIMESTEP: contextvars.ContextVar[float | None] = contextvars.ContextVar("slimdiff_timestep", default=None)


def current_timestep() -> float | None:
    """Host value of the timestep ``sample`` is calling the model at (None outside that call).

    Per-step runtimes (DyDiT's width tables, block-reuse plans) look their step up with it
    instead of reading the model's timestep tensor back from the device, which on a GPU
    would be a host sync in every step.
    """
    return _TIMESTEP.get()


@contextlib.contextmanager
def _model_call_at(t: torch.Tensor) -> Iterator[None]:
    token = _TIMESTEP.set(float(t))  # scheduler timesteps live on the host: no device sync
    try:
        yield
    finally:
        _TIMESTEP.reset(token)


@contextlib.contextmanager
def sampling_context(sampler: str, steps: int) -> Iterator[None]:
    """Declare the running sampler (``sample`` does this; external loops may too)."""
    token = _SAMPLER.set((sampler, int(steps)))
    try:
        yield
    finally:
        _SAMPLER.reset(token)


def schedule_timesteps(sampler: str, steps: int, model: nn.Module | None = None) -> list[float]:
    """Timesteps the loop visits for ``sampler`` x ``steps`` (the model's schedule; one per model call)."""
    sch = make_scheduler(sampler, diffusion_config_of(model) if model is not None else diffusion_config_of(nn.Module()))
    sch.set_timesteps(steps)
    return [float(t) for t in sch.timesteps]


def resolve_classes(bb, num_samples: int | None, classes: Sequence[int] | None) -> tuple[int, torch.Tensor | None]:
    """Number of samples and class labels: given ``classes`` (validated), or ``0..K-1`` cycled."""
    if classes is not None and len(classes) and bb.conditioning != "class":
        raise UsageError("this model is not class-conditional; drop --classes")
    if bb.conditioning != "class":
        return (num_samples or 1), None
    k = bb.num_classes
    if classes is None or not len(classes):
        n = num_samples or k
        return n, torch.arange(n) % k
    not_int = [c for c in classes if not _is_integer(c)]
    if not_int:
        raise UsageError(f"classes must be integer class labels, got {not_int[0]!r}; pass whole numbers 0..{k - 1}")
    bad = [int(c) for c in classes if not 0 <= int(c) < k]
    if bad:
        raise UsageError(f"class label(s) {bad} out of range: this model has classes 0..{k - 1}")
    labels = torch.tensor([int(c) for c in classes], dtype=torch.long)
    if num_samples and num_samples != len(labels):
        labels = labels.repeat(-(-num_samples // len(labels)))[:num_samples]
    return len(labels), labels


def check_steps(model: nn.Module, steps: int, diffusion: DiffusionConfig | None = None) -> None:
    """``steps`` sampling steps fit the model's schedule: at most its training timesteps."""
    train_steps = (diffusion or diffusion_config_of(model)).num_train_timesteps
    if steps > train_steps:
        raise UsageError(f"steps = {steps} is more than the {train_steps} timesteps this model was trained with; "
                         f"use at most {train_steps} sampling steps")


def _is_integer(value: Any) -> bool:
    """An integer label: a Python / NumPy int or an integer 0-d tensor, not a bool or a float (1.5 is no class, and
    neither is 1.0: a float label is a mistake to point out, not to round)."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.dtype.is_floating_point and not value.dtype.is_complex \
            and value.dtype != torch.bool
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def check_noise(noise: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Starting ``noise`` given by the caller: a finite tensor of ``shape`` ``(N, C, H, W)``."""
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise UsageError(f"noise must be a floating-point tensor of shape {shape}, got {type(noise).__name__}")
    if tuple(noise.shape) != tuple(shape):
        raise UsageError(f"noise has shape {tuple(noise.shape)}; this model and {shape[0]} sample(s) need {shape} "
                         "(N, channels, size, size)")
    if not bool(torch.isfinite(noise).all()):
        raise UsageError("noise holds NaN or inf values; pass finite starting noise")


class NonFiniteWatch:
    """Records, without a host sync per step, the first sampling step whose output is not
    finite (NaN/inf from the weights or the model's arithmetic); :meth:`check` raises once at the end."""

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def __call__(self, i: int, t: torch.Tensor, x: torch.Tensor) -> None:
        bad = ~torch.isfinite(x).all()
        self.first = torch.where(bad & (self.first < 0), torch.full_like(self.first, i), self.first)

    def check(self, timesteps: torch.Tensor, sampler: str, steps: int) -> None:
        i = int(self.first)  # one host sync per sampling run
        if i >= 0:
            raise UsageError(f"sampling produced NaN/inf at step {i} of {sampler} x{steps} (timestep "
                             f"{float(timesteps[i]):g}); the model's weights or its arithmetic are not finite "
                             "there (check the weights, the dtype, or a lower --cfg)")


def initial_noise(bb, n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded starting noise: the same seed gives the same tensor on every device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, bb.in_channels, bb.sample_size, bb.sample_size, generator=gen).to(device)


def guide(cond: torch.Tensor, uncond: torch.Tensor, cfg: float, channels: int | None = None) -> torch.Tensor:
    """Classifier-free guidance ``u + cfg (c - u)`` of conditional/unconditional predictions
    ``(N, C, H, W)`` on the first ``channels`` channels; the rest are the conditional prediction.

    ``channels=None`` guides every channel (diffusers' ``DiTPipeline``: all latent channels).
    ``channels=3`` is the official DiT's ``forward_with_cfg`` (facebookresearch/DiT
    ``models.py`` 258-266, "for exact reproducibility reasons"): it guides channels 0-2 only
    and passes ``model_out[:, 3:]`` through, and ``sample.py`` 64 keeps the conditional half,
    so channel 3 of the epsilon and the learned-sigma values are the conditional prediction's.
    """
    if channels is None:
        return uncond + cfg * (cond - uncond)
    mixed = uncond[:, :channels] + cfg * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([mixed, cond[:, channels:]], dim=1)


class Trajectory:
    """The fixed parts of one sampling run and its one loop.

    Holds the scheduler with its timesteps, the model's condition (the ``[cond; uncond]``
    batch under guidance), the step generator and the model's dtype. :meth:`run` is the
    denoising loop; :meth:`step` one step of it. The model is evaluated through a per-step
    function ``model_fn(inp, t, i) -> prediction`` (default :meth:`predict`), which is
    where DiP-GO's differentiable SuperNet and L2C's trajectory recording plug in; they use
    :meth:`guided` for the guidance combination and :meth:`batch` for the guided batch.
    Callers validate their inputs first (:func:`sample` does).
    """

    def __init__(self, model: nn.Module, *, sampler: str, steps: int, n: int, cond: Any = None, cfg: float = 1.0,
                 seed: int = 0, diffusion: DiffusionConfig | None = None, guidance_channels: int | None = None):
        """``cond``: class labels, caption embeddings (random ones when None on a text model) or None;
        ``guidance_channels``: see :func:`sample` (validated there)."""
        from slimdiff.models.backbone import as_backbone, cat_conditions

        self.bb = as_backbone(model)
        self.sampler, self.steps, self.cfg = sampler, steps, cfg
        self.guidance_channels = guidance_channels
        self.use_cfg = cfg != 1.0
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.bb.conditioning == "text" and cond is None:
            cond = self.bb.example_cond(n, torch.Generator().manual_seed(seed))
        cond = cond.to(self.device) if cond is not None else None
        self.cond = cat_conditions([cond, self.bb.null_cond(cond, n).to(self.device)]) if self.use_cfg else cond
        self.scheduler = make_scheduler(sampler, diffusion or diffusion_config_of(model))
        self.scheduler.set_timesteps(steps)
        self.timesteps = self.scheduler.timesteps
        self.gen = torch.Generator().manual_seed(seed + 1)

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        """The first ``x`` from starting noise (scaled by the scheduler's initial sigma)."""
        return noise.to(self.device) * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def batch(self, inp: torch.Tensor) -> torch.Tensor:
        """The model's input batch: ``[inp; inp]`` under guidance (rows match :attr:`cond`)."""
        return torch.cat([inp, inp]) if self.use_cfg else inp

    def guided(self, inp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's prediction at ``inp``, with classifier-free guidance on the first
        :attr:`guidance_channels` channels (None: all); the others are the conditional prediction."""
        out = self.bb(self.batch(inp), t, self.cond).float()
        if not self.use_cfg:
            return out
        c, u = out.chunk(2)
        return guide(c, u, self.cfg, self.guidance_channels)

    def predict(self, inp: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        """The default model function: :meth:`guided`, with ``t`` published to runtimes
        (:func:`current_timestep`)."""
        with _model_call_at(t):
            return self.guided(inp, t)

    def model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The model's input at step ``i`` from ``x``: scaled as the scheduler asks, in the model's dtype."""
        scale = getattr(self.scheduler, "scale_model_input", None)
        return (scale(x, self.timesteps[i]) if scale is not None else x).to(self.dtype)

    def step(self, x: torch.Tensor, i: int, model_fn: ModelFn | None = None) -> torch.Tensor:
        """Sampling step ``i`` from ``x``: the next ``x`` (differentiable when ``model_fn`` is)."""
        t = self.timesteps[i]
        pred = (model_fn or self.predict)(self.model_input(x, i), t, i)
        return self.scheduler.step(pred, t, x, generator=self.gen).prev_sample

    def run(self, x: torch.Tensor, model_fn: ModelFn | None = None, *,
            on_step_begin: Callable[[int, torch.Tensor], None] | None = None,
            callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
            progress: bool = False) -> torch.Tensor:
        """Every step from ``x`` (see :func:`sample` for the hooks); returns the final ``x``."""
        n = len(self.timesteps)
        it = progress_bar(range(n), f"{self.sampler} x{self.steps}", progress, total=n)
        with sampling_context(self.sampler, self.steps):
            for i in it:
                if on_step_begin is not None:
                    on_step_begin(i, self.timesteps[i])
                x = self.step(x, i, model_fn)
                if callback is not None:
                    callback(i, self.timesteps[i], x)
        return x


def prepare(
    model: nn.Module,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    num_samples: int | None = None,
    classes: Sequence[int] | None = None,
    cond: torch.Tensor | None = None,
    cfg: float = 1.0,
    seed: int = 0,
    noise: torch.Tensor | None = None,
    diffusion: DiffusionConfig | None = None,
    guidance_channels: int | None = None,
) -> tuple[Trajectory, torch.Tensor]:
    """:func:`sample`'s arguments checked and its run set up: the :class:`Trajectory` and the first ``x``.

    Shared with MACs counting (:func:`slimdiff.eval.compute.macs_sampling`), which prices one
    model call of exactly the run ``sample`` would make.
    """
    from slimdiff.models.backbone import as_backbone

    bb = as_backbone(model)
    if not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 0:
        raise UsageError(f"guidance scale must be a finite number >= 0 (1 = off), got {cfg!r}")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise UsageError(f"number of samples must be a positive integer, got {num_samples!r}")
    if guidance_channels is not None and (isinstance(guidance_channels, bool) or not isinstance(guidance_channels, int)
                                          or not 1 <= guidance_channels <= bb.in_channels):
        raise UsageError(f"guidance_channels must be None (all channels) or an integer in 1..{bb.in_channels} "
                         f"(3 = the official DiT's), got {guidance_channels!r}")
    if cfg != 1.0 and bb.conditioning is None:
        raise UsageError("guidance (cfg != 1) needs a conditional model; this one is unconditional: use --cfg 1")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise UsageError(f"seed must be an integer, got {seed!r}")
    check_steps(model, steps, diffusion)
    n, labels = resolve_classes(bb, num_samples if cond is None else len(cond), classes)
    if noise is not None:
        check_noise(noise, (n, bb.in_channels, bb.sample_size, bb.sample_size))
    traj = Trajectory(model, sampler=sampler, steps=steps, n=n, cond=labels if bb.conditioning == "class" else cond,
                      cfg=cfg, seed=int(seed), diffusion=diffusion, guidance_channels=guidance_channels)
    return traj, traj.start(initial_noise(bb, n, int(seed), traj.device) if noise is None else noise)


@torch.no_grad()
def sample(
    model: nn.Module,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    num_samples: int | None = None,
    classes: Sequence[int] | None = None,
    cond: torch.Tensor | None = None,
    cfg: float = 1.0,
    seed: int = 0,
    noise: torch.Tensor | None = None,
    diffusion: DiffusionConfig | None = None,
    on_step_begin: Callable[[int, torch.Tensor], None] | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = False,
    guidance_channels: int | None = None,
) -> torch.Tensor:
    """Run a full sampling trajectory and return the final samples ``(N, C, H, W)``.

    Class-conditional models get ``classes`` (default ``0..K-1`` cycled), text models
    get ``cond``: caption embeddings, or a :class:`~slimdiff.models.backbone.TextCondition`
    with an attention mask for padded captions. ``cfg > 1`` applies classifier-free guidance with the
    backbone's null condition; on an unconditional model any ``cfg != 1`` is a
    :class:`UsageError` (never silently dropped). The model's own :class:`DiffusionConfig` is used unless
    ``diffusion`` overrides it.

    ``guidance_channels`` (:func:`guide`): None (default) guides every predicted channel, as
    diffusers' ``DiTPipeline`` does; 3 reproduces the official DiT's ``forward_with_cfg``, which
    guides channels 0-2 only and takes the rest from the conditional prediction (needed to match
    official DiT samples and FIDs exactly). Between 1 and the model's input channels.

    Every argument is checked first (:class:`UsageError` naming it): ``classes`` are integer
    labels (``1.5`` or NaN is no class), ``seed`` an integer, ``noise`` a finite tensor of shape
    ``(N, C, H, W)``, ``steps`` at most the model's training timesteps. A step whose output is
    NaN/inf (non-finite weights, an fp16 overflow) makes the run end with a :class:`UsageError`
    naming the first such step (tracked on the device: no host sync per step).
    """
    traj, x = prepare(model, sampler=sampler, steps=steps, num_samples=num_samples, classes=classes, cond=cond,
                      cfg=cfg, seed=seed, noise=noise, diffusion=diffusion, guidance_channels=guidance_channels)
    watch = NonFiniteWatch(traj.device)

    def after_step(i: int, t: torch.Tensor, x: torch.Tensor) -> None:
        watch(i, t, x)
        if callback is not None:
            callback(i, t, x)

    x = traj.run(x, on_step_begin=on_step_begin, callback=after_step, progress=progress)
    watch.check(traj.timesteps, sampler, steps)
    return x
