"""DeepCache on UNets: exactness at interval 1, the published recurrence, the branch rule,
the budget rule, the non-uniform schedule, real MACs, save/load and errors."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_dit, tiny_unet, tiny_unet_cond

import slimdiff
from slimdiff.diffusion.sampling import Trajectory, initial_noise, sample
from slimdiff.errors import UsageError
from slimdiff.eval.compute import count_macs, macs_sampling
from slimdiff.methods import deepcache as DC
from slimdiff.methods.base import Context
from slimdiff.models.backbone import as_backbone
from slimdiff.result import record_of
from slimdiff.runtime.branch_cache import get_branch_cache, remove_branch_cache, unit_costs
from slimdiff.runtime.reuse import ReusePlan, get_block_reuse

STEPS = 7


def _ctx(**kw) -> Context:
    return Context(sampler="ddim", steps=STEPS, progress=False, **kw)


def _measured(m) -> dict:
    return record_of(m).result.chain[-1].measured


@pytest.mark.parametrize("factory", [tiny_unet, tiny_unet_cond])
def test_interval_one_is_the_original(factory):
    m = factory()
    ref = sample(m, steps=STEPS, num_samples=2)
    for budget, opts in ((1.0, {}), (0.3, {"interval": 1})):
        r = DC.deepcache(copy.deepcopy(m), budget, _ctx(), **opts)
        assert record_of(r).result.chain[-1].settings["interval"] == 1
        assert bool(get_branch_cache(r).compute.all())
        assert torch.equal(sample(r, steps=STEPS, num_samples=2), ref)


def _shallow(m, x, t, cached):
    """Branch 0 of tiny_unet by hand: UNet2DModel.forward with every unit below the last up
    block's last resnet replaced by that block's first resnet's output at the last full step."""
    t = torch.as_tensor(t).flatten().expand(x.shape[0])
    emb = m.time_embedding(m.time_proj(t).to(x.dtype))
    h = m.up_blocks[-1].resnets[-1](torch.cat([cached, m.conv_in(x)], 1), emb)
    return m.conv_out(m.conv_act(m.conv_norm_out(h)))


def test_retrieve_steps_follow_the_deepcache_recurrence():
    m, n = tiny_unet(), 3
    r = DC.deepcache(copy.deepcopy(m), 1.0, _ctx(), interval=n)
    assert DC.deepcache_units(m)[-1] == ("up_blocks.1", "up", 0, 0)
    cache = {}
    m.up_blocks[-1].resnets[0].register_forward_hook(lambda mod, a, out: cache.__setitem__("h", out))

    def model_fn(inp, t, i):
        return m(inp, t).sample if i % n == 0 else _shallow(m, inp, t, cache["h"])

    bb = as_backbone(m)
    traj = Trajectory(m, sampler="ddim", steps=STEPS, n=2)
    with torch.no_grad():
        want = traj.run(traj.start(initial_noise(bb, 2, 0)), model_fn)
    got = sample(r, steps=STEPS, num_samples=2)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, sample(m, steps=STEPS, num_samples=2), atol=1e-3)
    # the cached part is not computed: sampling MACs = full calls + hand-counted shallow calls
    x, t, _ = bb.example_inputs(1)
    full, shallow = count_macs(bb, x, t, None), count_macs(_shallow, m, x, t, torch.zeros(1, 16, 16, 16))
    n_full = len(range(0, STEPS, n))
    assert macs_sampling(r, steps=STEPS) == n_full * full + (STEPS - n_full) * shallow
    assert _measured(r)["retrieve_macs_ratio"] == pytest.approx(shallow / full)


def test_branch_rule_is_the_helpers():
    units = DC.deepcache_units(tiny_unet_cond())
    names = [u[0] for u in units]
    run = {n for n, c in zip(names, DC.retrieve_row(units, 1, 0)) if c}
    # block 1 / layer 0: down block 0 runs, down block 1 and the mid block are cached; up block
    # 1 from the output (up_blocks.0) runs but takes its first resnet (layer 1) from the cache
    assert run == {"down_blocks.0", "down_blocks.0.attentions.0", "down_blocks.0.resnets.0",
                   "down_blocks.0.downsamplers.0", "up_blocks.0", "up_blocks.0.resnets.1", "up_blocks.0.upsamplers.0",
                   "up_blocks.1", *[f"up_blocks.1.{k}.{j}" for k in ("resnets", "attentions") for j in (0, 1)]}
    run = {n for n, c in zip(names, DC.retrieve_row(units, 0, 1)) if c}
    # block 0 / layer 1 (its downsampler): the first resnet runs, the downsampler is cached
    assert run == {"down_blocks.0", "down_blocks.0.attentions.0", "down_blocks.0.resnets.0", "up_blocks.1",
                   *[f"up_blocks.1.{k}.{j}" for k in ("resnets", "attentions") for j in (0, 1)]}


@pytest.fixture(scope="module")
def cond_unet_macs() -> int:
    return macs_sampling(tiny_unet_cond(), steps=STEPS)


@pytest.mark.parametrize("branch", [(0, 1), (1, 0)])
def test_measured_macs_are_the_plans(branch, cond_unet_macs):
    m = tiny_unet_cond()
    r = DC.deepcache(m, 1.0, _ctx(), interval=2, cache_block_id=branch[0], cache_layer_id=branch[1])
    ratio = macs_sampling(r, steps=STEPS) / cond_unet_macs
    assert ratio == pytest.approx(_measured(r)["plan_macs_ratio"], rel=1e-9) and ratio < 1


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_interval_is_the_smallest_meeting_the_budget(budget):
    m = tiny_unet()
    r = DC.deepcache(copy.deepcopy(m), budget, _ctx())
    k = record_of(r).result.chain[-1].settings["interval"]
    assert _measured(r)["plan_macs_ratio"] <= budget
    units = DC.deepcache_units(m)
    costs = unit_costs(m, [u[0] for u in units])
    if k > 1:
        finer = DC.deepcache_table(units, STEPS, k - 1, DC.DeepCacheConfig())
        assert costs.macs(finer) > budget * costs.total * STEPS


def _reference_quad_center(total, n_samples, center, pow=1.2):
    """DeepCache's sample_from_quad_center as the official pipelines write it (numpy, complex base)."""
    while pow > 1:
        x = np.linspace((-center) ** (1 / pow), (total - center) ** (1 / pow), n_samples + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy's ComplexWarning: the reference keeps the real part
            idx = [0] + [v + center for v in np.unique(np.int32(x ** pow))[1:-1]]
        if len(idx) == n_samples:
            return sorted(int(i) for i in idx)
        pow -= 0.02
    return None


@pytest.mark.parametrize("total,n,center", [(50, 10, 25), (50, 10, 10), (50, 17, 40), (20, 5, 0), (7, 3, 3)])
def test_non_uniform_schedule_is_the_reference(total, n, center):
    assert DC.quad_center_steps(total, n, center) == _reference_quad_center(total, n, center)


def test_non_uniform_plan():
    m = tiny_unet()
    r = DC.deepcache(m, 1.0, _ctx(), interval=2, schedule="non-uniform", center=3)
    full = get_branch_cache(r).compute.all(1).tolist()
    assert [i for i, f in enumerate(full) if f] == DC.quad_center_steps(STEPS, 4, 3)
    assert macs_sampling(r, steps=STEPS) / macs_sampling(tiny_unet(), steps=STEPS) == pytest.approx(
        _measured(r)["plan_macs_ratio"], rel=1e-9)


def test_save_load_restores_the_plan(tmp_path):
    m = tiny_unet()
    r = DC.deepcache(copy.deepcopy(m), 0.5, _ctx())
    want = sample(r, steps=STEPS, num_samples=2)
    slimdiff.save(r, tmp_path / "dc")
    loaded = slimdiff.load(tmp_path / "dc")
    plan = get_branch_cache(loaded)
    assert plan is not None and torch.equal(plan.compute, get_branch_cache(r).compute)
    assert torch.equal(sample(loaded, steps=STEPS, num_samples=2), want)
    remove_branch_cache(loaded)
    assert torch.equal(sample(loaded, steps=STEPS, num_samples=2), sample(m, steps=STEPS, num_samples=2))


def test_block_plans_saved_under_the_old_name_still_load():
    m = tiny_unet()
    DC.deepcache.restore(m, ReusePlan.full("ddim", STEPS, m).to_dict())  # a deepcache-style plan of before
    assert get_block_reuse(m) is not None and get_branch_cache(m) is None


def test_errors():
    assert not DC.deepcache.applies(tiny_dit()) and DC.deepcache.applies(tiny_unet())
    with pytest.raises(UsageError, match="deepcache-style"):
        DC.deepcache(tiny_dit(), 0.5, _ctx())
    for opts, match in (({"cache_block_id": 2}, "cache_block_id must be in 0..1"),
                        ({"cache_layer_id": 2}, "cache_layer_id must be in 0..1"),
                        ({"schedule": "quad"}, "unknown schedule 'quad'; choose one of uniform, non-uniform"),
                        ({"interval": STEPS + 1}, "interval must be in"),
                        ({"power": 1.0}, "power must be > 1")):
        with pytest.raises(UsageError, match=match):
            DC.deepcache(tiny_unet(), 0.5, _ctx(), **opts)
    with pytest.raises(UsageError, match="below what DeepCache reaches"):
        DC.deepcache(tiny_unet(), 0.05, _ctx())
    r = DC.deepcache(tiny_unet(), 0.5, _ctx())
    with pytest.raises(UsageError, match="already carries a reuse plan"):
        DC.deepcache(r, 0.5, _ctx())
