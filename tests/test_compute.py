"""MACs, parameter counts and latency ratios (slimdiff.eval.compute)."""
from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn as nn
from conftest import linear_conv_macs

from slimdiff.errors import UsageError
from slimdiff.eval.compute import (
    count_flops_by_op,
    count_macs,
    latency_ratio,
    macs_forward,
    macs_sampling,
    params,
    params_ratio,
)
from slimdiff.models.dit import DiT

CFG = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def tiny_dit(**overrides) -> DiT:
    torch.manual_seed(0)
    return DiT(**{**CFG, **overrides}).eval()


def dit_inputs(batch: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g), torch.arange(batch) % 10


def test_count_macs_of_a_linear_layer_is_exact():
    lin = nn.Linear(16, 32)
    assert count_macs(lin, torch.randn(4, 16)) == 4 * 16 * 32
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, torch.randn(2, 3, 5, 5)) == 2 * 8 * 5 * 5 * 3 * 3 * 3


@pytest.mark.parametrize("batch,depth", [(1, 2), (3, 3)])
def test_attention_macs_are_counted(batch, depth):
    model = tiny_dit(depth=depth)
    x, t, y = dit_inputs(batch)
    total = count_macs(model, x, t, y)
    tokens = (8 // 2) ** 2
    width = model.blocks[0].attn.qkv.out_features // 3  # heads * head_dim
    attention = 2 * tokens**2 * width * depth * batch  # Q K^T and A V
    assert total - linear_conv_macs(model, x, t, y) == attention
    assert count_flops_by_op(model, x, t, y)["aten.bmm"] == 2 * attention


def test_params_counts_parameters_not_buffers():
    model = tiny_dit()
    expected = sum(v.numel() for k, v in model.state_dict().items() if k != "pos_embed")
    assert params(model) == expected
    assert params(nn.Linear(3, 4)) == 16


def test_macs_forward_matches_a_direct_count_and_scales_with_batch():
    model = tiny_dit()
    one = macs_forward(model, 1)
    assert one == count_macs(model, *dit_inputs(1))
    assert macs_forward(model, 4) == 4 * one
    with pytest.raises(UsageError):
        macs_forward(model, 0)


def test_macs_sampling_is_steps_times_forward_and_doubles_with_cfg():
    model = tiny_dit()
    fwd = macs_forward(model, 1)
    assert macs_sampling(model, sampler="ddim", steps=3) == 3 * fwd
    assert macs_sampling(model, sampler="ddim", steps=3, batch=2) == 3 * fwd  # per generated image
    assert macs_sampling(model, sampler="ddim", steps=3, cfg=2.0) == 2 * 3 * fwd


class SkipOddCalls(nn.Module):
    """A block that runs only on even calls and passes its input through otherwise (like a reuse cache)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block, self.calls = block, 0

    def forward(self, x, c):
        self.calls += 1
        return self.block(x, c) if self.calls % 2 == 1 else x


def test_macs_sampling_honours_work_skipped_during_sampling():
    model = tiny_dit(depth=3)
    fwd = macs_forward(model, 1)
    x, t, y = dit_inputs(1)
    with torch.no_grad():
        tokens, c = model.embed(x, t, y)
    block_macs = count_macs(model.blocks[1], tokens, c)
    model.blocks[1] = SkipOddCalls(model.blocks[1])
    steps = 4
    assert macs_sampling(model, steps=steps) == steps * fwd - (steps // 2) * block_macs
    assert model.blocks[1].calls == steps


def test_latency_ratio_recovers_a_known_sleep_ratio():
    calls = {"fast": 0, "slow": 0}

    def make(name, seconds):
        def fn():
            calls[name] += 1
            time.sleep(seconds)

        return fn

    res = latency_ratio({"fast": make("fast", 0.02), "slow": make("slow", 0.05)}, reference="fast", warmup=1, repeats=5)
    assert calls == {"fast": 6, "slow": 6}
    assert res["fast"]["ratio"] == 1.0
    assert 2.0 < res["slow"]["ratio"] < 3.0, res["slow"]
    assert res["slow"]["median_s"] >= 0.05 and len(res["slow"]["times_s"]) == 5
    assert res["settings"] == {"reference": "fast", "warmup": 1, "repeats": 5, "order": "round-robin, rotating"}


def test_latency_ratio_rejects_bad_arguments():
    with pytest.raises(UsageError, match="reference"):
        latency_ratio({"a": lambda: None}, reference="b")
    with pytest.raises(UsageError, match="repeats"):
        latency_ratio({"a": lambda: None}, reference="a", repeats=0)


def test_params_ratio_counts_shared_parameters_once_and_refuses_empty_reference():
    small, big = tiny_dit(depth=1), tiny_dit()
    assert params_ratio(big, big) == 1.0
    assert params_ratio(small, big) == pytest.approx(params(small) / params(big)) and params_ratio(small, big) < 1
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight  # one tensor, two layers
    assert params_ratio(tied, nn.Sequential(nn.Linear(4, 4))) == pytest.approx(24 / 20)
    with pytest.raises(UsageError, match="no parameters"):
        params_ratio(small, nn.ReLU())
