"""Sampling loops on diffusers schedulers, with classifier-free guidance and seeded noise.

``sample`` is the one loop every command and method uses. Two hooks let methods act per
step: ``on_step_begin(i, t)`` runs before the model is evaluated at step ``i`` (DiP-GO's
reuse plan and DyDiT's per-step routing read the step index from it) and
``callback(i, t, x)`` runs after the scheduler step. While a trajectory runs,
:func:`current_sampler` tells runtimes which sampler and step count are in use (DDIM and
DPM-Solver++ share timesteps, so a reuse plan cannot tell them apart otherwise).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from slimdiff.diffusion.schedulers import DiffusionConfig, diffusion_config_of, make_scheduler
from slimdiff.errors import UsageError
from slimdiff.utils import progress as progress_bar


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
    bad = [c for c in classes if not 0 <= int(c) < k]
    if bad:
        raise UsageError(f"class label(s) {bad} out of range: this model has classes 0..{k - 1}")
    labels = torch.tensor([int(c) for c in classes], dtype=torch.long)
    if num_samples and num_samples != len(labels):
        labels = labels.repeat(-(-num_samples // len(labels)))[:num_samples]
    return len(labels), labels


def initial_noise(bb, n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded starting noise: the same seed gives the same tensor on every device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, bb.in_channels, bb.sample_size, bb.sample_size, generator=gen).to(device)


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
) -> torch.Tensor:
    """Run a full sampling trajectory and return the final samples ``(N, C, H, W)``.

    Class-conditional models get ``classes`` (default ``0..K-1`` cycled), text models
    get ``cond``: caption embeddings, or a :class:`~slimdiff.models.backbone.TextCondition`
    with an attention mask for padded captions. ``cfg > 1`` applies classifier-free guidance with the
    backbone's null condition; on an unconditional model any ``cfg != 1`` is a
    :class:`UsageError` (never silently dropped). The model's own :class:`DiffusionConfig` is used unless
    ``diffusion`` overrides it.
    """
    from slimdiff.models.backbone import as_backbone, cat_conditions

    bb = as_backbone(model)
    if not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 0:
        raise UsageError(f"guidance scale must be a finite number >= 0 (1 = off), got {cfg!r}")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise UsageError(f"number of samples must be a positive integer, got {num_samples!r}")
    guided = cfg != 1.0
    if guided and bb.conditioning is None:
        raise UsageError("guidance (cfg != 1) needs a conditional model; this one is unconditional: use --cfg 1")
    device = next(model.parameters()).device
    n, labels = resolve_classes(bb, num_samples if cond is None else len(cond), classes)
    if bb.conditioning == "class":
        cond = labels
    elif bb.conditioning == "text" and cond is None:
        cond = bb.example_cond(n, torch.Generator().manual_seed(seed))
    cond = cond.to(device) if cond is not None else None
    scheduler = make_scheduler(sampler, diffusion or diffusion_config_of(model))
    scheduler.set_timesteps(steps)
    x = (initial_noise(bb, n, seed, device) if noise is None else noise.to(device)) * getattr(scheduler, "init_noise_sigma", 1.0)
    x_dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed + 1)
    timesteps = scheduler.timesteps
    it = progress_bar(enumerate(timesteps), f"{sampler} x{steps}", progress, total=len(timesteps))
    cond_in = cat_conditions([cond, bb.null_cond(cond, n).to(device)]) if guided else None
    with sampling_context(sampler, steps):
        for i, t in it:
            if on_step_begin is not None:
                on_step_begin(i, t)
            inp = (scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x).to(x_dtype)
            with _model_call_at(t):
                if guided:
                    c, u = bb(torch.cat([inp, inp]), t, cond_in).float().chunk(2)
                    pred = u + cfg * (c - u)
                else:
                    pred = bb(inp, t, cond).float()
            x = scheduler.step(pred, t, x, generator=gen).prev_sample
            if callback is not None:
                callback(i, t, x)
    return x
