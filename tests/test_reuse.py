"""The block-reuse runtime: exactness, caching semantics, MACs, state, pipelines, errors."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_MODELS, tiny_diffusers_dit, tiny_dit, tiny_unet

from slimdiff.diffusion.sampling import sample
from slimdiff.errors import UsageError
from slimdiff.eval.compute import macs_forward, macs_sampling
from slimdiff.models.backbone import as_backbone
from slimdiff.runtime.reuse import (
    ReusePlan,
    apply_block_reuse,
    block_costs,
    effective_compute,
    plan_macs,
    remove_block_reuse,
    reuse_blocks,
)

STEPS = 4


def _cfg(model) -> float:
    from slimdiff.models.backbone import as_backbone

    return 1.5 if as_backbone(model).conditioning == "class" else 1.0


def _random_plan(model, seed: int = 0, p: float = 0.5, sampler: str = "ddim", steps: int = STEPS) -> ReusePlan:
    full = ReusePlan.full(sampler, steps, model)
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(full.shape, generator=g) > p
    c[0] = True
    return ReusePlan.for_sampler(c, sampler, steps, model)


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_all_keep_plan_is_exact_and_remove_restores(kind):
    m = TINY_MODELS[kind]()
    cfg = _cfg(m)
    ref = sample(m, steps=STEPS, num_samples=2, cfg=cfg)
    apply_block_reuse(m, ReusePlan.full("ddim", STEPS, m))
    assert torch.equal(sample(m, steps=STEPS, num_samples=2, cfg=cfg), ref)
    remove_block_reuse(m)
    apply_block_reuse(m, _random_plan(m))
    assert not torch.equal(sample(m, steps=STEPS, num_samples=2, cfg=cfg), ref)
    remove_block_reuse(m)
    assert torch.equal(sample(m, steps=STEPS, num_samples=2, cfg=cfg), ref)


def _record_blocks(model, blocks):
    """Capture (input, output) of each block call, per block, in call order."""
    calls = {i: [] for i in range(len(blocks))}
    handles = [b.register_forward_hook(lambda mod, a, o, i=i: calls[i].append((a[0] if a else None, o)))
               for i, b in enumerate(blocks)]
    return calls, handles


def test_reused_residual_equals_cached_tensor():
    m = tiny_dit(depth=3)
    _, blocks, mode = reuse_blocks(m)
    assert mode == "residual"
    c = torch.ones(STEPS, 3, dtype=torch.bool)
    c[1:3, 1] = False  # block 1 computed at steps 0 and 3 only
    apply_block_reuse(m, ReusePlan.for_sampler(c, "ddim", STEPS, m))
    calls, handles = _record_blocks(m, blocks)
    # the patched forward runs inside the module call, so native hooks see what the block returns
    sample(m, steps=STEPS, num_samples=2, cfg=1.5)
    for h in handles:
        h.remove()
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = calls[1]
    cached = y0 - x0
    assert torch.equal(y1, x1 + cached) and torch.equal(y2, x2 + cached)
    assert not torch.equal(y3, x3 + cached)  # recomputed at step 3
    # the next block really saw the reused value
    assert torch.equal(calls[2][1][0], y1)


def test_reused_unet_block_returns_cached_output_and_skips_producers():
    m = tiny_unet()
    names, blocks, mode = reuse_blocks(m)
    assert mode == "output" and names == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    cons = as_backbone(m).block_readers()
    assert cons["mid_block"] == ["up_blocks.0"] and "up_blocks.0" in cons["down_blocks.1"]
    assert set(cons["down_blocks.0"]) == {"down_blocks.1", "up_blocks.0", "up_blocks.1"}
    c = torch.ones(STEPS, 5, dtype=torch.bool)
    c[1, 3] = False  # up_blocks.0 reused at step 1 -> mid and down_blocks.1 are not needed
    eff = effective_compute(c, names, cons)
    assert eff[1].tolist() == [True, False, False, False, True]
    apply_block_reuse(m, ReusePlan.for_sampler(c, "ddim", STEPS, m))
    calls, handles = _record_blocks(m, blocks)
    sample(m, steps=STEPS, num_samples=2)
    for h in handles:
        h.remove()
    assert calls[3][1][1] is calls[3][0][1]  # the cached object itself
    # MACs of the skipped producers count as saved
    costs = block_costs(m)
    assert plan_macs(m, ReusePlan.for_sampler(c, "ddim", STEPS, m), costs=costs) == \
        costs.macs(torch.ones_like(c)) - sum(costs.blocks[1:4])


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_plan_macs_match_flop_counter(kind):
    m = TINY_MODELS[kind]()
    plan = _random_plan(m, seed=1, p=0.6)
    costs = block_costs(m)
    assert costs.forward == macs_forward(m)
    cfg = _cfg(m)
    apply_block_reuse(m, plan)
    assert plan_macs(m, plan, cfg, costs) == macs_sampling(m, "ddim", STEPS, cfg=cfg)
    assert macs_sampling(m, "ddim", STEPS, cfg=cfg) < costs.forward * STEPS * (2 if cfg != 1 else 1)


def test_no_state_leak_between_calls_and_cfg_rows():
    m = tiny_dit(depth=3)
    apply_block_reuse(m, _random_plan(m, seed=3))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    a = sample(m, steps=STEPS, classes=[1, 2], cfg=1.5, noise=noise)
    sample(m, steps=STEPS, classes=[7], cfg=1.5, seed=9)  # a different call in between
    b = sample(m, steps=STEPS, classes=[1, 2], cfg=1.5, noise=noise)
    assert torch.equal(a, b)
    # each row (and each CFG branch of it) has its own cache: batched == one at a time
    for i, c in enumerate([1, 2]):
        one = sample(m, steps=STEPS, classes=[c], cfg=1.5, noise=noise[i:i + 1])
        torch.testing.assert_close(one[0], a[i], rtol=1e-4, atol=1e-4)


def test_aborted_trajectory_resets_and_single_offschedule_call_runs_full():
    m = tiny_dit(depth=2)
    plan = _random_plan(m, seed=4)
    apply_block_reuse(m, plan)
    ref = sample(m, steps=STEPS, num_samples=1)
    # abort after two steps, then sample again: a fresh trajectory
    seen = []

    def stop(i, t, x):
        seen.append(i)
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample(m, steps=STEPS, num_samples=1, callback=stop)
    assert torch.equal(sample(m, steps=STEPS, num_samples=1), ref)
    remove_block_reuse(m)
    full = macs_forward(m)
    apply_block_reuse(m, plan)
    assert macs_forward(m) == full  # one forward at an arbitrary timestep: full model


def _tiny_dit_pipeline(scheduler):
    from diffusers import AutoencoderKL, DiTPipeline

    tr = tiny_diffusers_dit(num_embeds_ada_norm=1000)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=4, sample_size=8).eval()
    return DiTPipeline(transformer=tr, vae=vae, scheduler=scheduler)


@pytest.mark.parametrize("sched", ["DDIMScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler"])
def test_diffusers_pipeline(sched):
    import diffusers

    kw = {"skip_prk_steps": True} if sched == "PNDMScheduler" else {}
    pipe = _tiny_dit_pipeline(getattr(diffusers, sched)(**kw))
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe([3, 5], num_inference_steps=STEPS, guidance_scale=2.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    ref = run()
    full = ReusePlan.for_scheduler(torch.ones(len(_timesteps(pipe)), 2, dtype=torch.bool), pipe.scheduler,
                                   STEPS, pipe.transformer)
    apply_block_reuse(pipe.transformer, full)
    assert (run() == ref).all()
    remove_block_reuse(pipe.transformer)
    c = torch.ones(full.shape, dtype=torch.bool)
    c[1:, 1] = False
    apply_block_reuse(pipe.transformer, ReusePlan.for_scheduler(c, pipe.scheduler, STEPS, pipe.transformer))
    a, b = run(), run()  # two pipeline calls: state resets per call
    assert (a == b).all() and not (a == ref).all()
    with pytest.raises(UsageError, match="schedule"):
        pipe([3], num_inference_steps=STEPS + 1, guidance_scale=2.0, output_type="np")


def _timesteps(pipe):
    s = copy.deepcopy(pipe.scheduler)
    s.set_timesteps(STEPS)
    return s.timesteps


def test_bad_input():
    m = tiny_dit(depth=2)
    with pytest.raises(UsageError, match="shape"):
        ReusePlan.for_sampler(torch.ones(STEPS + 1, 2, dtype=torch.bool), "ddim", STEPS, m)
    with pytest.raises(UsageError, match="step 0"):
        ReusePlan.for_sampler(torch.zeros(STEPS, 2, dtype=torch.bool), "ddim", STEPS, m)
    with pytest.raises(UsageError, match="blocks"):
        apply_block_reuse(tiny_dit(depth=3), ReusePlan.full("ddim", STEPS, m))
    plan = _random_plan(m, seed=2)
    apply_block_reuse(m, plan)
    with pytest.raises(UsageError, match="already"):
        apply_block_reuse(m, plan)
    with pytest.raises(UsageError, match="ddim x4"):
        sample(m, steps=STEPS - 1, num_samples=1)  # another step count
    with pytest.raises(UsageError, match="ddim x4"):
        sample(m, sampler="ddpm", steps=STEPS, num_samples=1)  # another sampler's schedule
    with pytest.raises(UsageError, match="made for ddim x4"):
        sample(m, sampler="dpm", steps=STEPS, num_samples=1)  # same timesteps; sample() declares the sampler
    with pytest.raises(UsageError, match="copy"):
        sample(copy.deepcopy(m), steps=STEPS, num_samples=1)
    with pytest.raises(UsageError, match="damaged"):
        ReusePlan.from_dict({"compute": ["11"]})
    assert ReusePlan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
