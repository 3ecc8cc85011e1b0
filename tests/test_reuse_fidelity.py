"""Fidelity options of DiP-GO and the reuse baselines (issue 21): the pruner's attention, the
cascade-weighted sparsity, the SSIM window, the reference optimiser, the step-skip conversion
shared by every reuse baseline (off by default), and the pre-rename method names on load."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_dit, tiny_unet

import slimdiff
from slimdiff.compression import reuse_plans as P
from slimdiff.diffusion.sampling import sample
from slimdiff.errors import UsageError
from slimdiff.methods import dipgo as D
from slimdiff.methods.base import Context, compress
from slimdiff.runtime.reuse import block_costs, get_block_reuse

STEPS = 4


def _ctx() -> Context:
    return Context(sampler="ddim", steps=STEPS, progress=False)


def _logits_after_perturbing_step(attention: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    pr = D.DiPGOPruner(STEPS, 3, attention=attention).eval()  # no dropout
    with torch.no_grad():
        pr.w3.normal_()  # the zero-initialised last layer would hide every difference
        before = pr()
        pr.queries.weight.view(STEPS, 3, -1)[step] += 1.0
        return before, pr()


def test_pruner_attends_within_each_step_by_default_and_over_all_queries_as_option():
    before, after = _logits_after_perturbing_step("step", 2)
    assert not torch.allclose(before[2], after[2])  # the step's own logits follow its queries
    torch.testing.assert_close(before[[0, 1, 3]], after[[0, 1, 3]])  # other steps never see them
    before, after = _logits_after_perturbing_step("all", 2)
    assert not torch.allclose(before[0], after[0])  # "all": every query attends to every other
    assert D.DiPGOPruner(STEPS, 3).attention == "step"
    with pytest.raises(UsageError, match="pruner_attention"):
        D.DiPGOPruner(STEPS, 3, attention="cross")


def test_encoder_output_is_used_unlike_the_reference():
    """The reference's EncoderLayer.forward returns its input (a no-op); ours changes the heads' input."""
    torch.manual_seed(0)
    layer = D.EncoderLayer(16).eval()
    x = torch.randn(4, 3, 16)
    y = layer(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    assert layer.q.out_features == 4 and layer.ffn[0].out_features == 4  # q/k and FFN at dim / 4, as the reference


def test_cascade_weights_credit_the_producers_a_unet_block_frees():
    unet = block_costs(tiny_unet())
    casc = D.cascade_macs(unet)
    assert all(c >= own for c, own in zip(casc, unet.blocks))
    assert any(c > own for c, own in zip(casc, unet.blocks))  # some up block frees producers
    last = len(unet.blocks) - 1  # the last block feeds the output: reusing it frees every block only it reads
    assert casc[last] > unet.blocks[last]
    keep = torch.ones(STEPS, len(unet.blocks))
    assert float(D.sparsity_loss(keep, unet, "cascade")) > float(D.sparsity_loss(keep, unet, "own"))
    dit = block_costs(tiny_dit(depth=3))
    assert D.cascade_macs(dit) == dit.blocks  # transformers: no consumer graph, the two weightings agree
    keep = torch.rand(STEPS, 3)
    assert float(D.sparsity_loss(keep, dit, "cascade")) == pytest.approx(float(D.sparsity_loss(keep, dit, "own")))
    with pytest.raises(UsageError, match="sparsity_cost"):
        D.sparsity_loss(keep, dit, "flops")


@pytest.mark.parametrize("size, window", [(8, 5), (16, 9), (32, 11)])
def test_ssim_window_fits_the_image(size, window):
    """5 px on 8 x 8 digits (what the docs say), the reference's 11 from 20 px up."""
    from pytorch_msssim import ssim

    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, size, size, generator=g)
    target[0, 0, 0, 0] = 0.0  # the loss shifts by the batch minimum: make it 0, so the two compare exactly
    x = target + 0.1 * torch.randn(target.shape, generator=g)
    want = 1 - ssim(x, target, data_range=float(target.max() - target.min()), win_size=window)
    torch.testing.assert_close(D.consistency_loss(x, target), want)


@pytest.mark.parametrize("options", [
    {},  # the reference recipe: SGD lr 0.2, alpha 1, step attention, cascade sparsity
    {"optimizer": "adam", "lr": 0.05, "alpha": 0.1, "pruner_attention": "all", "sparsity_cost": "own"},
    {"postprocess": "greedy"},
])
def test_dipgo_options_run_end_to_end_on_a_unet(options):
    r = compress(tiny_unet(), "dipgo", 0.7, _ctx(), {"opt_steps": 2, **options})
    settings = r.slimdiff_meta["method"]["chain"][0]["settings"]
    for key, value in options.items():
        assert settings[key] == value
    ratio = r.slimdiff_meta["measured"]["macs_ratio"]
    if options.get("postprocess") == "greedy":
        assert ratio > 0.7  # the reference's sweep stops above the budget
    else:
        assert ratio <= 0.7


def test_deepcache_style_step_skips_are_off_by_default_and_then_equal_fewer_steps():
    m = tiny_dit(depth=4)
    plain = get_block_reuse(compress(m, "deepcache-style", 0.5, _ctx()))
    assert all(plain.step_compute)  # off by default: every step calls the model
    r = compress(m, "deepcache-style", 0.5, _ctx(), {"skip_reused_steps": True})
    plan = get_block_reuse(r)
    settings = r.slimdiff_meta["method"]["chain"][0]["settings"]
    assert (settings["interval"], settings["reused_blocks"], settings["skip_reused_steps"]) == (2, 4, True)
    assert plan.step_compute == [True, False, True, False] and not plan.compute[[1, 3]].any()
    costs = block_costs(m)
    full = costs.macs(torch.ones(plan.shape, dtype=torch.bool))
    ratio = r.slimdiff_meta["measured"]["macs_ratio"]  # measured on the model, end to end
    assert ratio == pytest.approx(costs.macs(plan.compute, plan.step_compute) / full) and ratio <= 0.5
    assert ratio < P.table_cost(costs, torch.tensor([[True] * 4, [False] * 4] * 2)) / full  # the calls are saved
    # every other step skipped: the fewer-steps plan at the same budget, sample for sample
    few = compress(m, "fewer-steps", 0.5, _ctx())
    assert get_block_reuse(few).step_compute == plan.step_compute
    assert torch.equal(sample(r, steps=STEPS, num_samples=2), sample(few, steps=STEPS, num_samples=2))


def test_l2c_block_step_skips_reach_budgets_block_reuse_cannot():
    m = tiny_dit(depth=3)
    low = P.minimum_fraction(block_costs(m), STEPS)  # block reuse alone: non-block layers at every step
    budget = (low + 1 / STEPS) / 2
    opts = {"opt_steps": 1, "batch": 1}
    with pytest.raises(UsageError, match="below what block reuse can reach"):
        compress(m, "l2c-block", budget, _ctx(), opts)  # off by default
    r = compress(m, "l2c-block", budget, _ctx(), {**opts, "skip_reused_steps": True})
    plan = get_block_reuse(r)
    assert not all(plan.step_compute) and plan.step_compute == P.called_steps(plan.compute)
    assert r.slimdiff_meta["measured"]["macs_ratio"] <= budget
    with pytest.raises(UsageError, match="skip_reused_steps"):
        compress(m, "l2c-block", 0.5, _ctx(), {**opts, "skip_reused_steps": 2})


def _resave_under(tmp_path, new: str, old: str):
    """A model compressed with ``new``, saved as a save from before the rename holds it (``old``)."""
    r = compress(tiny_dit(depth=3), new, 0.8, _ctx(), {"opt_steps": 1, "batch": 1} if new == "l2c-block" else {})
    slimdiff.save(r, tmp_path / "m")
    path = tmp_path / "m" / "slimdiff.json"
    meta = json.loads(path.read_text())
    meta["name"] = meta["method"]["name"] = meta["method"]["chain"][0]["name"] = old
    del meta["method"]["chain"][0]["settings"]["skip_reused_steps"]
    meta["extras"] = {old: meta["extras"].pop(new)}
    path.write_text(json.dumps(meta))
    return r, meta["extras"][old]


def test_legacy_wrapper_restores_block_plans_and_passes_the_rest_on(tmp_path):
    from slimdiff.runtime.reuse import remove_block_reuse

    r, extras = _resave_under(tmp_path, "deepcache-style", "deepcache")
    seen = []
    restore = P.with_legacy_block_plans(lambda model, ex: seen.append(ex))
    m = remove_block_reuse(r)
    restore(m, extras)  # a block plan: restore_plan, not the wrapped restorer
    assert seen == [] and get_block_reuse(m).to_dict() == extras
    other = {**extras, "blocks": ["blocks.0.attn"] * len(extras["blocks"])}  # e.g. a branch-cache plan
    restore(m, other)
    assert seen == [other]


@pytest.mark.parametrize("old, new", [("deepcache", "deepcache-style"), ("l2c", "l2c-block")])
def test_models_saved_under_the_old_names_still_load_their_plan(tmp_path, old, new):
    """Needs the published methods' restorers wrapped with ``with_legacy_block_plans``."""
    r, _ = _resave_under(tmp_path, new, old)
    loaded = slimdiff.load(tmp_path / "m")
    assert get_block_reuse(loaded).to_dict() == get_block_reuse(r).to_dict()
    assert torch.equal(sample(loaded, steps=STEPS, num_samples=2), sample(r, steps=STEPS, num_samples=2))
