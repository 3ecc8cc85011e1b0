"""Quick models: random-init stand-ins for the speed bench, the measurement scripts and tests.

One factory, :func:`build_model`, makes every such model by name: a DiT size (``DiT-S/2``,
``DiT-M/2``, ...; our DiT via :func:`slimdiff.load`, so it carries a record like any loaded
model) or one of :data:`UNETS` (diffusers ``UNet2DModel``). Random weights are enough where
only shapes and costs matter (speed, memory), or where a script only proves that its pipeline
runs (``--quick``); DiT's zero-initialised adaLN and output layers are woken up first
(``init``), because with them every block would be a no-op and every sample identical.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from slimdiff.errors import UsageError

UNETS = ("UNet-CIFAR10", "UNet-tiny")
INITS = ("wake", "normal", "none")


def model_kind(name: str) -> str:
    """"dit" or "unet" for a quick-model name, else :class:`UsageError`."""
    from slimdiff.models.dit import DiT_models

    if name in UNETS:
        return "unet"
    if name in DiT_models:
        return "dit"
    raise UsageError(f"unknown bench model {name!r}; use a DiT size name (DiT-S/2, DiT-B/2, ...) or one of "
                     f"{', '.join(UNETS)}")


def ddpm_cifar10_unet() -> nn.Module:
    """google/ddpm-cifar10-32's UNet2DModel shape (35.7M parameters), random init."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=32, attention_head_dim=None)


def tiny_unet() -> nn.Module:
    """A small UNet2DModel (16x16x3) for tests."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)


@torch.no_grad()
def wake_zero_init_(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Give every all-zero weight matrix (DiT's adaLN-Zero and output layers) N(0, std^2)
    entries, so every block contributes to the output. Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.ndim >= 2 and not p.any():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@torch.no_grad()
def normal_init_(model: nn.Module, gain: float = 0.5) -> nn.Module:
    """Redraw every parameter from the global generator: weights N(0, (gain / sqrt(fan-in))^2),
    everything else N(0, 0.02^2); a random teacher whose samples differ from one another.
    Returns ``model``."""
    for p in model.parameters():
        p.normal_(0, gain / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.02)
    return model


def build_model(name: str, latent_size: int = 32, seed: int = 0, *, init: str = "wake", **config) -> nn.Module:
    """A random-init model ``name`` in eval mode, fp32 on the CPU (``torch.manual_seed(seed)`` first).

    A DiT gets ``latent_size`` x ``latent_size`` inputs with 4 channels unless ``config`` says
    otherwise (``config``: further DiT options such as ``in_channels=1, num_classes=10,
    learn_sigma=False``); a UNet takes no options. ``init``: ``"wake"`` (the speed bench's:
    :func:`wake_zero_init_` with ``seed``), ``"normal"`` (:func:`normal_init_`) or ``"none"``
    (the constructors' initialisation).
    """
    import slimdiff

    if init not in INITS:
        raise UsageError(f"unknown init {init!r}; use one of {', '.join(INITS)}")
    torch.manual_seed(seed)
    if model_kind(name) == "unet":
        if config:
            raise UsageError(f"{name} takes no options (got {', '.join(config)})")
        model = ddpm_cifar10_unet() if name == "UNet-CIFAR10" else tiny_unet()
    else:
        model = slimdiff.load(name, **{"input_size": latent_size, "in_channels": 4, **config})
    if init == "wake":
        wake_zero_init_(model, seed)
    elif init == "normal":
        normal_init_(model)
    return model.eval()


__all__ = ["UNETS", "INITS", "model_kind", "build_model", "ddpm_cifar10_unet", "tiny_unet", "wake_zero_init_",
           "normal_init_"]
