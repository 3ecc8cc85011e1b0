"""Noise schedules and samplers, all from diffusers.

A model's training objective and noise schedule travel with it as a
:class:`DiffusionConfig` (saved in ``slimdiff.json`` under ``"diffusion"``), so that
sampling and fine-tuning always use the schedule the model was trained with.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch.nn as nn

from slimdiff.errors import UsageError

OBJECTIVES = ("epsilon", "v_prediction", "flow")
SAMPLERS = ("ddpm", "ddim", "dpm", "euler")


@dataclass
class DiffusionConfig:
    """How a denoiser was trained: objective, schedule and pixel clipping.

    ``objective`` is "epsilon", "v_prediction" (DDPM-family schedules) or "flow"
    (rectified flow: ``x_t = (1 - s) x0 + s noise``, target ``noise - x0``, ``t = 1000 s``).
    """

    objective: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    clip_sample: bool = False

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UsageError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "DiffusionConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


def diffusion_config_of(model: nn.Module) -> DiffusionConfig:
    """The model's :class:`DiffusionConfig` from its record (default: DDPM eps)."""
    from slimdiff.result import record_of

    return DiffusionConfig.from_dict(record_of(model).diffusion)


def make_scheduler(name: str, config: DiffusionConfig):
    """A fresh diffusers scheduler ``name`` matching ``config``.

    ``ddpm``/``ddim``/``dpm`` (DPM-Solver++ 2M) need a DDPM-family objective; ``euler``
    is flow-matching Euler and needs ``objective="flow"``.
    """
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

    if name not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if (name == "euler") != (config.objective == "flow"):
        raise UsageError(
            f"sampler {name!r} does not fit a model trained with objective {config.objective!r}: "
            "use 'euler' for flow models and ddpm/ddim/dpm otherwise"
        )
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.num_train_timesteps, shift=1.0)
    common = dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type=config.objective,
    )
    if name == "ddpm":
        return DDPMScheduler(**common, clip_sample=config.clip_sample, variance_type="fixed_small")
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=config.clip_sample, set_alpha_to_one=False, timestep_spacing="trailing")
    return DPMSolverMultistepScheduler(
        **common, algorithm_type="dpmsolver++", solver_order=2, thresholding=False, timestep_spacing="trailing"
    )
