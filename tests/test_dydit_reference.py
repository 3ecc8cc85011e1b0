"""DyDiT against the reference code (alibaba-damo-academy/DyDiT): router, gates, timesteps,
target schedule, realised MACs, and the deviations kept as named options (off by default)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_dit

import slimdiff
from slimdiff.errors import UsageError
from slimdiff.eval.compute import macs_sampling
from slimdiff.methods.base import Context, compress
from slimdiff.methods.dydit import (
    DyDiTConfig,
    dydit,
    realised_macs,
    stratified_timesteps,
    target_schedule,
)
from slimdiff.result import record_of
from slimdiff.runtime.routed import hard_gate
from slimdiff.runtime.routing import RoutingConfig, apply_dydit, default_config

LEGACY_OPTIONS = dict(token_router="linear", gate_tau=1.0, width_init_bias=4.0, token_init_bias=4.0,
                      router_init="zeros", t_sampling="uniform", router_lr=1e-2, hold_frac=0.05, warmup_frac=0.25,
                      calibrate=True, frozen_router_recovery=True)
"""This project's DyDiT before the reference defaults, as named options."""
OLD_CONFIG_KEYS = {"heads", "groups", "tokens", "tau", "init_bias", "cache_size"}
"""The routing config a saved model recorded before the token-router type was recorded."""


def _ctx(tmp_path, **kw):
    return Context(**{**dict(steps=3, batch_size=4, work_dir=tmp_path / "work", progress=False), **kw})


def _model():
    return tiny_dit(depth=2, num_heads=2, in_channels=1)


def test_reference_router_and_gate_defaults_and_the_linear_option():
    model = tiny_dit(depth=2, num_heads=4, hidden_size=64)
    routing = apply_dydit(model, default_config(model))
    cfg = routing.config
    assert (cfg.tau, cfg.init_bias, cfg.token_init_bias, cfg.token_router, cfg.router_init) == \
        (5.0, 15.0, 35.0, "mlp", "xavier")
    r = routing.routers[0]
    first, act, out = r.token  # dynamic_model.py 63-66: D -> D/16 -> ReLU -> 1
    assert (first.in_features, first.out_features, out.out_features) == (64, 4, 1) and isinstance(act, torch.nn.ReLU)
    assert torch.equal(first.bias, torch.zeros(4)) and first.weight.abs().sum() > 0  # Xavier, bias 0 (_basic_init)
    assert torch.equal(out.bias, torch.tensor([35.0])) and torch.equal(r.head.bias, torch.full((3,), 15.0))
    assert r.head.weight.abs().sum() > 0 and r.token_macs() == 64 * 4 + 4
    lin = tiny_dit(depth=2, num_heads=4, hidden_size=64)
    routing = apply_dydit(lin, default_config(lin, token_router="linear", router_init="zeros", init_bias=4.0))
    r = routing.routers[0]
    assert type(r.token) is torch.nn.Linear and r.token_out is r.token and r.token_macs() == 64
    assert torch.equal(r.token.weight, torch.zeros(1, 64)) and torch.equal(r.head.weight, torch.zeros(3, 64))
    assert torch.equal(r.head.bias, torch.full((3,), 4.0))
    with pytest.raises(UsageError, match="token router"):
        RoutingConfig(heads=[2], groups=[2], token_router="conv")
    with pytest.raises(UsageError, match="router init"):
        RoutingConfig(heads=[2], groups=[2], router_init="normal")


def test_gate_is_the_reference_gumbel_sigmoid():
    """dynamic_model.py 18-47: logistic (two-Gumbel) noise, hard at 0.5, straight-through soft gradient."""
    torch.manual_seed(0)
    logits = torch.full((200_000,), 1.0)
    for tau in (5.0, 1.0):  # P(on) = sigmoid(logit) whatever tau: the noise is logistic
        assert abs(float(hard_gate(logits, tau, noise=True).mean()) - torch.sigmoid(torch.tensor(1.0)).item()) < 0.005
    x = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
    gate = hard_gate(x, 5.0, noise=False)  # eval: sigmoid(logit) > 0.5, no noise
    assert torch.equal(gate.detach(), torch.tensor([0.0, 1.0, 1.0]))
    gate.sum().backward()
    s = torch.sigmoid(x.detach() / 5.0)
    assert torch.allclose(x.grad, s * (1 - s) / 5.0)


def test_stratified_timesteps_as_the_reference_and_used_in_training(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    t = stratified_timesteps(4096, g, num_timesteps=1000)
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    assert torch.equal(t // 250, torch.arange(4096) % 4)  # train.py 237-250: sample i in bin i mod 4
    assert all(len(set(t[k::4].tolist())) > 200 for k in range(4))  # uniform inside its bin
    flow = stratified_timesteps(8, g, num_timesteps=1000, continuous=True)
    assert flow.is_floating_point() and torch.equal((flow // 250).long(), torch.arange(8) % 4)
    from slimdiff.train import trainer

    seen, real_train = [], trainer.train

    def spy(*args, **kwargs):
        seen.append(kwargs.get("sample_timesteps"))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(trainer, "train", spy)
    for mode in ("stratified", "uniform"):
        dydit(_model(), 0.5, _ctx(tmp_path), config=DyDiTConfig(train_steps=1, t_sampling=mode, heldout_samples=0))
    assert torch.equal(seen[0](8, torch.Generator()) // 250, torch.arange(8) % 4) and seen[1] is None


def test_target_schedule_holds_then_warms_up_as_the_reference():
    cfg = DyDiTConfig()
    ref = target_schedule(0.5, 200_000, cfg)  # train0.5.sh: hold 100 steps, warm-up 1000 steps from step 0
    assert ref(0) == ref(99) == 1.0 and ref(100) == pytest.approx(0.95) and ref(1000) == ref(150_000) == 0.5
    short = target_schedule(0.5, 200, cfg)  # the same fractions of a 200-step run: no hold, 1-step warm-up
    assert short(0) == 1.0 and short(1) == short(199) == 0.5
    old = target_schedule(0.5, 200, DyDiTConfig(hold_frac=0.05, warmup_frac=0.25))
    assert old(9) == 1.0 and old(25) == pytest.approx(0.75) and old(50) == 0.5


@torch.no_grad()
def test_realised_macs_counts_whole_sampling_runs():
    model = tiny_dit(depth=3, num_heads=4, hidden_size=32)
    routing = apply_dydit(model, default_config(model, router_init="zeros"))  # all on for any input
    original = macs_sampling(tiny_dit(depth=3, num_heads=4, hidden_size=32), steps=3)
    all_on = realised_macs(model, steps=3, samples=1)
    assert all_on == macs_sampling(model, steps=3) / original > 1.0  # every route on: only the routers' cost added
    g = torch.Generator().manual_seed(3)
    for lin in (m for m in routing.modules() if isinstance(m, torch.nn.Linear)):
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
        lin.bias.copy_(0.3 * torch.randn(lin.bias.shape, generator=g))
    cut = realised_macs(model, steps=3, samples=1)
    assert cut == macs_sampling(model, steps=3) / original < 0.95
    other = realised_macs(model, steps=3, samples=4, seed=7, classes=[1, 2, 3, 4], cfg=2.0)
    assert 0 < other < 1 and other != cut and routing.mode == "dynamic"


def test_recovery_steps_join_training_unless_frozen_router_recovery(tmp_path):
    ctx = _ctx(tmp_path, recover_steps=2)
    joint = dydit(_model(), 0.5, ctx, config=DyDiTConfig(train_steps=2, heldout_samples=0))
    assert record_of(joint).result.chain[0].measured["train_steps"] == 4  # the paper: routers train with weights
    frozen = dydit(_model(), 0.5, ctx, config=DyDiTConfig(train_steps=2, heldout_samples=0, frozen_router_recovery=True,
                                                          calibrate=True, calibrate_samples=2, calibrate_iters=4))
    m = record_of(frozen).result.chain[0].measured
    assert m["train_steps"] == 2 and "before_recovery" in m["calibration"]
    assert m["calibration"]["ratio_after"] <= 0.5


def test_old_behaviour_as_named_options_and_an_old_saved_model_loads_as_linear(tmp_path):
    """This project's earlier DyDiT (linear token router, tau 1, bias 4, zero weights, uniform t,
    calibration, frozen-router recovery) as options; its saved record, without the fields added
    since, loads with linear routers."""
    model = tiny_dit(depth=3, num_heads=4, in_channels=1)
    model.slimdiff_meta = {"name": "tiny"}
    out = compress(model, "dydit", 0.6, _ctx(tmp_path, recover_steps=1), {"train_steps": 2, **LEGACY_OPTIONS})
    entry = record_of(out).result.chain[0]
    assert entry.measured["calibration"]["ratio_after"] <= 0.6  # calibration's promise: on its own samples
    assert 0 < entry.measured["realised_ratio_heldout"] < 1  # what users get, recorded next to it
    r = out.dydit.routers[0]
    assert type(r.token) is torch.nn.Linear and out.dydit.config.tau == 1.0
    path = slimdiff.save(out, tmp_path / "old")
    meta = json.loads((path / "slimdiff.json").read_text())
    config = meta["extras"]["dydit"]["config"]
    meta["extras"]["dydit"]["config"] = {k: v for k, v in config.items() if k in OLD_CONFIG_KEYS}
    assert set(meta["extras"]["dydit"]["config"]) == OLD_CONFIG_KEYS  # the record format before this change
    (path / "slimdiff.json").write_text(json.dumps(meta))
    loaded = slimdiff.load(str(path))
    assert type(loaded.dydit.routers[0].token) is torch.nn.Linear
    assert loaded.dydit.config.token_router == "linear" and loaded.dydit.config.tau == 1.0
    x = torch.randn(2, 1, 8, 8)
    t, y = torch.full((2,), float(next(iter(out.dydit.tables)))), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), out(x, t, y))


@pytest.mark.parametrize("option,value,match", [
    ("token_router", "conv", "token_router"), ("router_init", "normal", "router_init"),
    ("t_sampling", "sorted", "t_sampling"), ("gate_tau", 0.0, "gate_tau"), ("warmup_frac", 1.5, "warmup_frac"),
    ("router_lr", -1.0, "router_lr"), ("heldout_samples", -1, "heldout_samples")])
def test_bad_options(option, value, match, tmp_path):
    with pytest.raises(UsageError, match=match):
        compress(_model(), "dydit", 0.5, _ctx(tmp_path), {option: value})


def test_router_init_is_seeded_by_the_context(tmp_path):
    """Xavier router weights come from ``ctx.seed``, not the global RNG (a rerun resumes its training)."""
    runs = []
    for noise in (1, 9):
        torch.rand(noise)  # another global RNG state
        runs.append(dydit(_model(), 0.5, _ctx(tmp_path), config=DyDiTConfig(train_steps=0, heldout_samples=0)))
    a, b = (m.dydit.state_dict() for m in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
