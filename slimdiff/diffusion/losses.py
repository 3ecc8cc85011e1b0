"""Training losses (epsilon / v-prediction / flow) with timestep sampling.

The forward (noising) process is diffusers' own: ``DDPMScheduler.add_noise`` and
``get_velocity`` for DDPM-family objectives; rectified flow for ``"flow"``. No ADM
``gaussian_diffusion`` copy: learned-sigma channels are ignored (fixed variance), which is
how every diffusers sampler uses them too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from slimdiff.diffusion.schedulers import DiffusionConfig


@dataclass
class NoisyBatch:
    """One training batch after the forward process: model input, timestep and target."""

    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor


class ForwardProcess:
    """Draws timesteps and noise and builds ``(x_t, t, target)`` for a :class:`DiffusionConfig`."""

    def __init__(self, config: DiffusionConfig):
        self.config = config
        if config.objective != "flow":
            from diffusers import DDPMScheduler

            self.scheduler = DDPMScheduler(
                num_train_timesteps=config.num_train_timesteps,
                beta_schedule=config.beta_schedule,
                beta_start=config.beta_start,
                beta_end=config.beta_end,
                prediction_type=config.objective,
            )

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform integer timesteps in [0, T) (DDPM family) or continuous ``t = T s``, s ~ U(0, 1) (flow)."""
        T = self.config.num_train_timesteps
        if self.config.objective == "flow":
            return torch.rand(n, generator=generator) * T
        return torch.randint(0, T, (n,), generator=generator)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> NoisyBatch:
        """Apply the forward process at ``t`` and return the regression target."""
        t = t.to(x0.device)
        if self.config.objective == "flow":
            s = (t.float() / self.config.num_train_timesteps).view(-1, *[1] * (x0.ndim - 1))
            return NoisyBatch((1 - s) * x0 + s * noise, t, noise - x0)
        x_t = self.scheduler.add_noise(x0, noise, t)
        target = noise if self.config.objective == "epsilon" else self.scheduler.get_velocity(x0, noise, t)
        return NoisyBatch(x_t, t, target)

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> NoisyBatch:
        """Timesteps and noise from ``generator`` (CPU), then :meth:`noisy`."""
        t = self.sample_timesteps(x0.shape[0], generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        return self.noisy(x0, noise, t)


def diffusion_loss(pred: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
    """Mean squared error to the objective's target."""
    return torch.mean((pred.float() - batch.target.float()) ** 2)
