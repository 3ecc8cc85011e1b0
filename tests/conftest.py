"""Shared tiny models: real architectures, random weights, a forward well under 50 ms.

Import them in tests as ``from conftest import tiny_dit, TINY_MODELS`` (pytest puts this
folder on ``sys.path``). Every factory takes ``seed`` and keyword overrides of the config,
returns the model in ``eval()`` mode, and gives outputs of order one (no zero-initialised
output layers), so comparisons against them are not trivially satisfied.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread: tiny models gain nothing from more, and on a shared 2-core machine
# a busy neighbour makes 2 OpenMP threads spin-wait: a 10 ms UNet forward took 1.8 s.
torch.set_num_threads(int(os.environ.get("SLIMDIFF_TEST_THREADS", "1")))

from diffusers import (  # noqa: E402
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)

from slimdiff.models.dit import DiT  # noqa: E402


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, bias_std: float = 0.1) -> nn.Module:
    """Overwrite every parameter with random values: weights ~ N(0, 1/fan_in), biases
    ~ N(0, bias_std^2), norm scales ~ 1 + N(0, bias_std^2). Trained-looking, never zero
    (unlike DiT's zero-initialised adaLN and output layers). Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.ndim >= 2:
            p.copy_(noise / math.sqrt(p[0].numel()))
        elif name.endswith("weight"):
            p.copy_(1 + bias_std * noise)
        else:
            p.copy_(bias_std * noise)
    return model


@torch.no_grad()
def tie_dit_embedders_(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Copy block 0's timestep/class embedder into every block, as in converted official
    DiT checkpoints (diffusers keeps one copy per block). Returns ``model``."""
    ref = model.transformer_blocks[0].norm1.emb.state_dict()
    for blk in model.transformer_blocks[1:]:
        blk.norm1.emb.load_state_dict(ref)
    return model


def tiny_dit(seed: int = 0, **kw) -> DiT:
    """Our DiT: 8x8x4 input, patch 2 (16 tokens), width 32, 2 blocks x 2 heads, 10 classes,
    learned sigma (8 output channels)."""
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
               num_classes=10, learn_sigma=True)
    cfg.update(kw)
    torch.manual_seed(seed)
    return randomize_(DiT(**cfg), seed).eval()


def tiny_diffusers_dit(seed: int = 0, **kw) -> DiTTransformer2DModel:
    """diffusers DiT: 8x8x4, patch 2, width 32 (2 heads x 16), 2 layers, 10 classes, out 8,
    norm_eps 1e-6 (official DiT's), embedders identical across blocks."""
    cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
               sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1, norm_eps=1e-6)
    cfg.update(kw)
    torch.manual_seed(seed)
    return tie_dit_embedders_(randomize_(DiTTransformer2DModel(**cfg), seed)).eval()


def tiny_pixart(seed: int = 0, **kw) -> PixArtTransformer2DModel:
    """PixArt: 8x8x4, patch 2, width 32 (2 heads x 16), 2 layers, captions of width 16."""
    cfg = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=2,
               attention_head_dim=16, cross_attention_dim=32, caption_channels=16,
               use_additional_conditions=False, norm_num_groups=1)
    cfg.update(kw)
    torch.manual_seed(seed)
    return randomize_(PixArtTransformer2DModel(**cfg), seed).eval()


def tiny_unet(seed: int = 0, **kw) -> UNet2DModel:
    """UNet2DModel: 16x16x3, channels (16, 32), Down/AttnDown, 1 layer per block, 8 groups.
    Pass ``num_class_embeds=K + 1`` for a class-conditional one (last row = null class)."""
    cfg = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
               down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
               layers_per_block=1, norm_num_groups=8, attention_head_dim=8)
    cfg.update(kw)
    torch.manual_seed(seed)
    return randomize_(UNet2DModel(**cfg), seed).eval()


def tiny_unet_cond(seed: int = 0, **kw) -> UNet2DConditionModel:
    """UNet2DConditionModel: 8x8x4, channels (16, 32), CrossAttnDown/Down, text width 32."""
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=8,
               cross_attention_dim=32, attention_head_dim=8)
    cfg.update(kw)
    torch.manual_seed(seed)
    return randomize_(UNet2DConditionModel(**cfg), seed).eval()


TINY_MODELS = {
    "dit": tiny_dit,
    "diffusers-dit": tiny_diffusers_dit,
    "pixart": tiny_pixart,
    "unet2d": tiny_unet,
    "unet2d-condition": tiny_unet_cond,
}
"""Backbone kind -> factory of a tiny model of that kind."""


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    """Each tiny model in turn (``request.param`` is its Backbone kind)."""
    return request.param, TINY_MODELS[request.param]()


# --------------------------------------------------------------------------- processes and runs
def checkpoint_step(root) -> int:
    """Highest step a resume would start from, over every run directory under ``root``
    (training, search and DiP-GO checkpoints); 0 if there is none yet."""
    import json
    from pathlib import Path

    from slimdiff.train.checkpoint import find_checkpoint

    # os.walk, not Path.glob: checkpoint folders appear and vanish while we look (glob raises)
    runs = {Path(root)} | {Path(d).parent for d, _, files in os.walk(root) if "state.json" in files}
    steps = [0]
    for run in runs:
        try:
            ckpt = find_checkpoint(run)
            steps.append(json.loads((ckpt / "state.json").read_text())["step"] if ckpt else 0)
        except (OSError, ValueError, KeyError):  # swapped out between the two reads
            pass
    return max(steps)


def kill_at_checkpoint(cmd: list[str], root, step: int, timeout: float = 120.0) -> int:
    """Run ``cmd`` with this process's thread count (so float reductions match), SIGKILL it as
    soon as a checkpoint of ``step`` or later appears under ``root``; return the step it left."""
    import signal
    import subprocess
    import time

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while checkpoint_step(root) < step and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return checkpoint_step(root)


def cli_main(monkeypatch, *argv: str) -> int:
    """Run ``slimdiff.cli.main`` (the console-script entry point) in this process; its exit code."""
    import sys

    from slimdiff import cli

    monkeypatch.setattr(sys, "argv", ["slimdiff", *argv])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return exited.value.code


class Evil:
    """Unpickling this creates the file ``path`` (a stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def evil_pickle(marker) -> bytes:
    """Pickle bytes (a checkpoint-like dict) whose unpickling creates ``marker``."""
    import pickle

    return pickle.dumps({"state_dict": Evil(marker)}, protocol=2)


def linear_conv_macs(model: nn.Module, *inputs) -> int:
    """MACs of every nn.Linear / nn.Conv2d call, from the layer shapes (independent of FlopCounterMode)."""
    total = 0

    def hook(m, args, out):
        nonlocal total
        if isinstance(m, nn.Linear):
            total += args[0].numel() // m.in_features * m.in_features * m.out_features
        else:
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    return total
