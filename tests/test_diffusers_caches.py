"""diffusers' caches as baselines: exact when off, measured MACs, state reset, tuning, save/load."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_dit

import slimdiff
from slimdiff.budget import BUDGET_TOLERANCE
from slimdiff.compression.reuse_plans import teacher_batch
from slimdiff.diffusion.sampling import sample, schedule_timesteps
from slimdiff.errors import UsageError
from slimdiff.eval.compute import count_macs, macs_sampling
from slimdiff.methods import get_method
from slimdiff.methods.base import Context
from slimdiff.methods.diffusers_caches import SPECS, restore_cache, tune
from slimdiff.models.convert import dit_to_diffusers
from slimdiff.result import record_of
from slimdiff.runtime.diffusers_cache import (
    apply_diffusers_cache,
    diffusers_cache_of,
    remove_diffusers_cache,
)

STEPS = 6
NAMES = [s.name for s in SPECS]


def _dit():
    return tiny_dit(depth=3, class_dropout_prob=0.1)


def _ctx(cfg: float = 1.0) -> Context:
    return Context(sampler="ddim", steps=STEPS, cfg=cfg, progress=False)


def _sample(model, cfg: float = 1.0, seed: int = 3):
    return sample(model, steps=STEPS, num_samples=2, cfg=cfg, seed=seed)


@pytest.mark.parametrize("name", NAMES)
def test_off_equals_original_sampling(name):
    """At budget 1 every knob is at its no-op end (threshold 0, interval / skip range 1): the
    cached model samples exactly like the uncached converted model (our DiT converts)."""
    dit = _dit()
    ref = _sample(dit_to_diffusers(dit), cfg=1.5)
    out = get_method(name)(dit, 1.0, _ctx(1.5), calib_samples=1)
    assert type(out).__name__ == "DiTTransformer2DModel" and diffusers_cache_of(out) is not None
    torch.testing.assert_close(_sample(out, cfg=1.5), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(_sample(dit, cfg=1.5), ref, rtol=1e-4, atol=1e-3)  # the converter's tolerance


@pytest.mark.parametrize("name,cfg", [("fbcache", 1.5), ("taylorseer", 1.0), ("pab", 1.0), ("fastercache", 1.0),
                                      ("fastercache", 1.5)])  # magcache: in the save/load test
def test_on_saves_measured_macs_and_resets_per_run(name, cfg):
    model = dit_to_diffusers(_dit())
    full = macs_sampling(model, steps=STEPS, cfg=cfg)
    out = get_method(name)(model, 0.9, _ctx(cfg), calib_samples=1)
    entry = record_of(out).result.chain[-1]
    assert entry.measured["calibration_macs_ratio"] <= 0.9
    assert macs_sampling(out, steps=STEPS, cfg=cfg) < full
    a, b = _sample(out, cfg), _sample(out, cfg)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # a fresh state every sampling run


def test_calibration_ratio_is_remeasurable_and_tuning_lands():
    """The recorded ratio is the final model's on the calibration run; a continuous knob lands
    within the tolerance when the ratio can get there (synthetic smooth response)."""
    model = dit_to_diffusers(_dit())
    ctx = _ctx()
    uncached = count_macs(lambda: _sample(model))
    out = get_method("fbcache")(model, 0.8, ctx, calib_samples=1)
    entry = record_of(out).result.chain[-1]
    noise, labels, _ = teacher_batch(out, 1, ctx.seed, sampler="ddim", steps=STEPS, cfg=1.0, with_target=False)

    def calibration_run():
        return sample(out, steps=STEPS, num_samples=1, classes=labels.tolist(), seed=ctx.seed, noise=noise)

    cached = count_macs(calibration_run)
    remove_diffusers_cache(out)
    assert cached / count_macs(calibration_run) == entry.measured["calibration_macs_ratio"] <= 0.8
    assert count_macs(lambda: _sample(out)) == uncached  # removal restores the full model
    value, ratio = tune(lambda v: 1 / (1 + v), 0.5, False, 1e4, "smooth")
    assert 0.5 - BUDGET_TOLERANCE <= ratio <= 0.5 and value > 0
    value, ratio = tune(lambda v: 1 / v, 0.3, True, 10, "integer")
    assert value == 4 and ratio == 0.25  # the smallest integer at or under the budget
    assert entry.settings["threshold"] == entry.measured["threshold"] > 0


def test_unreachable_budget_names_the_range():
    with pytest.raises(UsageError, match="reaches MACs ratios .* use a budget >="):
        get_method("pab")(_dit(), 0.1, _ctx(), calib_samples=1)  # attention alone cannot reach 0.1


@pytest.mark.parametrize("name", ["pab", "magcache"])
def test_save_load_restores_the_cache(name, tmp_path):
    model = dit_to_diffusers(_dit())
    full = macs_sampling(model, steps=STEPS)
    out = get_method(name)(model, 0.9, _ctx(), calib_samples=1)
    assert macs_sampling(out, steps=STEPS) < full
    expect = _sample(out)
    torch.testing.assert_close(_sample(out), expect, rtol=0, atol=0)
    slimdiff.save(out, tmp_path / name)
    loaded = slimdiff.load(tmp_path / name)
    assert diffusers_cache_of(loaded) is not None
    torch.testing.assert_close(_sample(loaded), expect, rtol=0, atol=1e-6)
    if name == "magcache":  # the magnitude ratios were calibrated on the calibration run
        params = record_of(loaded).result.extras["magcache"]["params"]
        ratios = params["mag_ratios"]
        assert len(ratios) == len(schedule_timesteps("ddim", STEPS)) == params["num_inference_steps"]
        assert ratios[0] == 1.0 and all(r > 0 for r in ratios) and len(set(ratios)) > 1


def test_runtime_refusals_and_run_detection_outside_sample():
    model = dit_to_diffusers(_dit())
    apply_diffusers_cache(model, "fbcache", {"threshold": 1e4})
    with pytest.raises(UsageError, match="already carries"):
        apply_diffusers_cache(model, "pab", {"spatial_attention_block_skip_range": 2})
    with pytest.raises(UsageError, match="chain at most one"):
        get_method("fbcache")(model, 0.5, _ctx())
    x = torch.randn(1, 4, 8, 8)
    y = torch.tensor([1])

    @torch.no_grad()
    def run():  # a hand-written loop: timesteps fall within a run, rise at the next one
        return [model(x, timestep=torch.tensor([t]), class_labels=y).sample for t in (900, 500, 100)]

    first, second = run(), run()
    copied = copy.deepcopy(model)  # the bench and chains deep-copy models: the copy has its own state
    with torch.no_grad():
        third = [copied(x, timestep=torch.tensor([t]), class_labels=y).sample for t in (900, 500, 100)]
    for a, b, c in zip(first, second, third):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert diffusers_cache_of(copied).managers[0] is not diffusers_cache_of(model).managers[0]
    with pytest.raises(UsageError, match="holds no settings"):
        restore_cache(dit_to_diffusers(_dit()), {})
    with pytest.raises(UsageError, match="unknown diffusers cache"):
        apply_diffusers_cache(dit_to_diffusers(_dit()), "teacache", {})


def test_applies_only_to_dit_models():
    from conftest import tiny_unet

    spec = get_method("fbcache")
    assert spec.applies(_dit()) and spec.applies(dit_to_diffusers(_dit())) and not spec.applies(tiny_unet())
    with pytest.raises(UsageError, match="apply to DiT models"):
        spec(tiny_unet(), 0.5, _ctx())


def test_taylorseer_forecasts_mlps_by_default_and_attention_only_as_option():
    """The official TaylorSeer-DiT forecasts attention and MLP outputs (default); diffusers'
    default patterns forecast attention only (``cache_mlp=False``), which saves less."""
    model = dit_to_diffusers(_dit())
    params = {"cache_interval": 3, "disable_cache_before_step": 3, "taylor_factors_dtype": "bfloat16"}
    macs = {}
    for mlp in (False, True):
        ids = [r"transformer_blocks\.\d+\.attn1"] + ([r"transformer_blocks\.\d+\.ff"] if mlp else [])
        apply_diffusers_cache(model, "taylorseer", {**params, "cache_identifiers": ids})
        macs[mlp] = macs_sampling(model, steps=STEPS)
        remove_diffusers_cache(model)
    assert macs[True] < macs[False] < macs_sampling(model, steps=STEPS)
    for cache_mlp, n in ((None, 2), (False, 1)):
        out = get_method("taylorseer")(dit_to_diffusers(_dit()), 0.9, _ctx(), calib_samples=1, cache_mlp=cache_mlp)
        ids = record_of(out).result.extras["taylorseer"]["params"]["cache_identifiers"]
        assert len(ids) == n and ids[0].endswith("attn1") and ids[-1].endswith("ff" if n == 2 else "attn1")


def test_fastercache_approximates_the_unconditional_half():
    """Our loop batches [cond; uncond]; FasterCache's CFG-Cache assumes [uncond; cond]. The run
    hook swaps the halves, so on a skipped step the conditional half is computed exactly and
    the unconditional half is the approximated one (as in the paper)."""
    model = dit_to_diffusers(_dit())
    x = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1)
    y = torch.tensor([3, 10])  # [cond; null]

    def call(t):
        return model(x, timestep=torch.tensor([t, t]), class_labels=y).sample

    plain = [call(t) for t in (900, 500)]
    apply_diffusers_cache(model, "fastercache", {"unconditional_batch_skip_range": 100,
                                                 "unconditional_batch_timestep_skip_range": [-1, 1001],
                                                 "spatial_attention_block_skip_range": 1})
    cached = [call(t) for t in (900, 500)]
    torch.testing.assert_close(cached[0], plain[0], rtol=0, atol=1e-6)  # first step: both computed
    torch.testing.assert_close(cached[1][:1], plain[1][:1], rtol=0, atol=1e-6)  # cond: computed
    assert not torch.allclose(cached[1][1:], plain[1][1:], atol=1e-4)  # uncond: approximated
