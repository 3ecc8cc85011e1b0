"""Learning-to-Cache on transformers: exactness of a router that reuses nothing, pre-gate
branch reuse, branches really skipped (counted MACs), training, schedules, save/load, errors."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_diffusers_dit, tiny_dit, tiny_pixart, tiny_unet

import slimdiff
from slimdiff.diffusion.sampling import sample
from slimdiff.errors import UsageError
from slimdiff.eval.compute import macs_sampling
from slimdiff.methods import learning_to_cache as L
from slimdiff.methods.base import Context
from slimdiff.models.backbone import as_backbone
from slimdiff.result import record_of
from slimdiff.runtime.branch_cache import (
    BranchFrame,
    apply_branch_cache,
    branch_frame,
    get_branch_cache,
    remove_branch_cache,
    unit_costs,
)
from slimdiff.runtime.reuse import ReusePlan, get_block_reuse

STEPS = 6
FAST = {"opt_steps": 4, "batch": 4}


def _ctx(**kw) -> Context:
    return Context(sampler="ddim", steps=STEPS, progress=False, **kw)


def _dit():
    return tiny_dit(in_channels=1)  # the default digits data is 1 x 8 x 8


def _latents(tmp_path, model) -> str:
    """A small latents file at ``model``'s input shape (with captions for a text model)."""
    bb = as_backbone(model)
    arrays = {"latents": np.random.default_rng(0).standard_normal((8, bb.in_channels, 8, 8)).astype(np.float32)}
    if bb.conditioning == "text":
        arrays["encoder_hidden_states"] = np.random.default_rng(1).standard_normal((8, 3, 16)).astype(np.float32)
    else:
        arrays["labels"] = np.arange(8) % bb.num_classes
    np.savez(tmp_path / "lat.npz", **arrays)
    return str(tmp_path / "lat.npz")


def _measured(m) -> dict:
    return record_of(m).result.chain[-1].measured


def test_units_are_attention_and_mlp_of_each_block():
    assert L.branch_units(_dit()) == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    assert L.branch_units(tiny_pixart()) == ["transformer_blocks.0.attn1", "transformer_blocks.0.ff",
                                             "transformer_blocks.1.attn1", "transformer_blocks.1.ff"]


def test_router_reusing_nothing_is_the_original():
    m = _dit()
    ref = sample(m, steps=STEPS, num_samples=2, cfg=1.5)
    r = L.l2c(copy.deepcopy(m), 1.0, _ctx(), threshold=0.0, **FAST)
    assert bool(get_branch_cache(r).compute.all())
    assert torch.equal(sample(r, steps=STEPS, num_samples=2, cfg=1.5), ref)
    # a training forward whose gates keep every fresh branch is the model's output
    bb = as_backbone(m)
    x, t, y = bb.example_inputs(2)
    apply_branch_cache(m, ReusePlan(torch.ones(STEPS, 4, dtype=torch.bool), "ddim", STEPS,
                                    get_branch_cache(r).timesteps, L.branch_units(m)))
    with branch_frame(m, BranchFrame()) as f:
        want = bb(x, t, y)
    cached = {u: torch.randn_like(v) for u, v in f.fresh.items()}
    with branch_frame(m, BranchFrame(torch.ones(4), cached)):
        assert torch.equal(bb(x, t, y), want)


def test_reused_branch_is_the_pre_gate_output_and_the_gate_is_recomputed():
    m = _dit()
    table = torch.ones(STEPS, 4, dtype=torch.bool)
    table[1:, 0] = False  # block 0's attention reused after step 0
    plan = ReusePlan(table, "ddim", STEPS, slimdiff.diffusion.sampling.schedule_timesteps("ddim", STEPS, m),
                     L.branch_units(m))
    apply_branch_cache(m, plan)
    attn, block = [], []
    m.blocks[0].attn.register_forward_hook(lambda mod, a, o: attn.append(o))
    m.blocks[0].register_forward_hook(lambda mod, a, o: block.append((a, o)))
    sample(m, steps=STEPS, num_samples=2)
    assert len(attn) == STEPS and all(o is attn[0] for o in attn)  # the cached pre-gate tensor
    # the rest of the block runs: the original block at step 1 with its attention returning the cache
    ref = _dit().blocks[0]
    ref.attn.forward = lambda *a, **k: attn[0]
    (x1, c1), out1 = block[1]
    assert torch.allclose(ref(x1, c1), out1, atol=1e-6)
    assert not torch.allclose(ref(x1, block[0][0][1]), out1, atol=1e-4)  # the gate follows the current condition


@pytest.mark.parametrize("factory", ["dit", "diffusers-dit", "pixart"])
def test_trained_router_skips_branches(factory, tmp_path):
    m = {"dit": _dit, "diffusers-dit": tiny_diffusers_dit, "pixart": tiny_pixart}[factory]()
    ctx = _ctx() if factory == "dit" else _ctx(data=_latents(tmp_path, m))
    full = macs_sampling(m, steps=STEPS)
    r = L.l2c(copy.deepcopy(m), 0.6, ctx, **FAST)
    plan = get_branch_cache(r)
    ratio = macs_sampling(r, steps=STEPS) / full  # torch.utils.flop_counter over a real sampling run
    assert ratio == pytest.approx(_measured(r)["plan_macs_ratio"], rel=1e-9) and ratio <= 0.6
    calls = {n: 0 for n in plan.blocks}
    for n in plan.blocks:  # a branch's first Linear runs only when the branch is computed
        first = next(x for x in r.get_submodule(n).modules() if isinstance(x, torch.nn.Linear))
        first.register_forward_hook(lambda mod, a, o, n=n: calls.__setitem__(n, calls[n] + 1))
    sample(r, steps=STEPS, num_samples=1)
    assert [calls[n] for n in plan.blocks] == plan.compute.sum(0).tolist()  # reused branches are never called


def test_threshold_is_raised_to_the_budget_never_lowered():
    m = _dit()
    costs = unit_costs(m, L.branch_units(m))
    scores = torch.rand(STEPS, 4, generator=torch.Generator().manual_seed(0))
    routed = L.router_calls(STEPS, False)
    for budget in (0.4, 0.7, 0.9):
        thr = L.l2c_table(scores, routed, L.budget_threshold(scores, routed, costs, budget))
        assert costs.macs(thr) <= budget * costs.total * STEPS
    r = L.l2c(copy.deepcopy(m), 0.9, _ctx(), threshold=0.99, **FAST)  # the reference's STE threshold wins
    assert _measured(r)["threshold_used"] == 0.99 and _measured(r)["plan_macs_ratio"] < 0.9
    with pytest.raises(UsageError, match="below what Learning-to-Cache reaches"):
        L.l2c(copy.deepcopy(m), 0.1, _ctx(), **FAST)


def test_alternate_is_the_released_codes_schedule():
    # dynamic_models.py: caches dropped (a full call) when cur_timestep = 19 - i is odd
    assert L.router_calls(6, True) == [False, True, False, True, False, True]
    assert L.router_calls(5, True) == [False, True, False, True, False]
    assert L.router_calls(4, False) == [False, True, True, True]
    r = L.l2c(_dit(), 0.8, _ctx(), alternate=True, threshold=0.99, **FAST)
    full = get_branch_cache(r).compute.all(1).tolist()
    assert full == [True, False] * 3  # threshold 0.99 reuses every branch of the routed calls


def test_skip_reused_steps_is_an_option_off_by_default():
    m = _dit()
    ref_macs = macs_sampling(m, steps=STEPS)
    plain = L.l2c(copy.deepcopy(m), 0.8, _ctx(), alternate=True, threshold=0.99, **FAST)
    assert get_branch_cache(plain).step_compute == [True] * STEPS
    r = L.l2c(copy.deepcopy(m), 0.8, _ctx(), alternate=True, threshold=0.99, skip_reused_steps=True, **FAST)
    assert get_branch_cache(r).step_compute == [True, False] * 3 and _measured(r)["skipped_calls"] == 3
    assert macs_sampling(r, steps=STEPS) / ref_macs == pytest.approx(_measured(r)["plan_macs_ratio"], rel=1e-9)
    assert _measured(r)["plan_macs_ratio"] < _measured(plain)["plan_macs_ratio"]
    outs = []
    embed = next(x for x in r.modules() if isinstance(x, torch.nn.Conv2d))  # the patch embedding
    embed.register_forward_hook(lambda mod, a, o: outs.append(o))
    sample(r, steps=STEPS, num_samples=1)
    assert len(outs) == 3  # the skipped calls never run the model


def test_training_follows_the_loss():
    m = _dit()
    base = L.L2CConfig(opt_steps=30, batch=4, lr=0.05, lam=0.0)
    ctx = _ctx()
    names = L.branch_units(m)
    apply_branch_cache(m, ReusePlan(torch.ones(STEPS, 4, dtype=torch.bool), "ddim", STEPS,
                                    slimdiff.diffusion.sampling.schedule_timesteps("ddim", STEPS, m), names))
    routed = L.router_calls(STEPS, False)
    gen = torch.Generator().manual_seed(ctx.seed)
    init = torch.sigmoid(torch.stack([torch.randn(4, generator=gen) for _ in range(STEPS)]))  # Router: randn
    s0, _ = L.l2c_train(m, ctx, base, routed)
    s1, _ = L.l2c_train(m, ctx, L.L2CConfig(opt_steps=30, batch=4, lr=0.05, lam=10.0), routed)
    # without the sparsity term the routers move towards computing; a large lambda pushes them to reuse
    assert s0[1:].mean() > init[1:].mean() > s1[1:].mean()
    assert torch.equal(s0[0], init[0])  # the first call is never routed, never trained


def test_save_load_restores_the_plan(tmp_path):
    r = L.l2c(_dit(), 0.6, _ctx(), **FAST)
    want = sample(r, steps=STEPS, num_samples=2)
    slimdiff.save(r, tmp_path / "l2c")
    loaded = slimdiff.load(tmp_path / "l2c")
    assert torch.equal(get_branch_cache(loaded).compute, get_branch_cache(r).compute)
    assert torch.equal(sample(loaded, steps=STEPS, num_samples=2), want)
    remove_branch_cache(loaded)
    assert get_branch_cache(loaded) is None


def test_block_plans_saved_under_the_old_name_still_load():
    m = _dit()
    L.l2c.restore(m, ReusePlan.full("ddim", STEPS, m).to_dict())  # an l2c-block plan of before
    assert get_block_reuse(m) is not None and get_branch_cache(m) is None


def test_errors():
    assert not L.l2c.applies(tiny_unet()) and L.l2c.applies(_dit())
    with pytest.raises(UsageError, match="l2c-block"):
        L.l2c(tiny_unet(), 0.5, _ctx(), **FAST)
    for opts, match in (({"threshold": 1.0}, "threshold must be >= 0 and < 1"), ({"batch": 0}, "batch must be >= 1")):
        with pytest.raises(UsageError, match=match):
            L.l2c(_dit(), 0.5, _ctx(), **{**FAST, **opts})
