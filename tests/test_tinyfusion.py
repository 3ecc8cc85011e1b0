"""TinyFusion (learnable N:M depth pruning) and the depth baselines, on tiny real models."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_diffusers_dit, tiny_dit, tiny_pixart, tiny_unet

from slimdiff.errors import UsageError
from slimdiff.io import export_diffusers, load, save
from slimdiff.budget import BUDGET_TOLERANCE
from slimdiff.methods.base import Context, compress, sampling_macs
from slimdiff.compression.depth import (
    MAX_OPTIONS,
    depth_for_budget,
    extract_blocks,
    group_end_layer_map,
    group_options,
    kept_layer_map,
    layer_map,
    masked_blocks,
    parse_keep,
    search_space_of,
    shape_for_depth,
)
from slimdiff.methods.depth_baselines import block_influence, select_blocks
from slimdiff.methods.tinyfusion import DepthGates, SearchConfig, search, tinyfusion
from slimdiff.models.backbone import as_backbone

# Depth-4 models with one input channel, so the digits data can train / calibrate them.
FACTORIES = {
    "dit": lambda seed=0: tiny_dit(seed, depth=4, in_channels=1),
    "diffusers-dit": lambda seed=0: tiny_diffusers_dit(seed, num_layers=4, in_channels=1, out_channels=2),
    "pixart": lambda seed=0: tiny_pixart(seed, num_layers=4, in_channels=1, out_channels=2),
}


def _ctx(tmp_path: Path, **kw) -> Context:
    return Context(**{"steps": 4, "batch_size": 8, "work_dir": tmp_path, "progress": False, **kw})


def _out(model, inputs):
    with torch.no_grad():
        return as_backbone(model)(*inputs)


def _inputs(model, batch: int = 3):
    return as_backbone(model).example_inputs(batch, torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- group shapes
def test_keep_patterns_cover_the_depth():
    assert [g.shape for g in parse_keep("1:2", 6)] == ["1:2"] * 3
    groups = parse_keep("2:4,1:2", 12)
    assert [g.shape for g in groups] == ["2:4", "1:2", "2:4", "1:2"]
    assert [g.start for g in groups] == [0, 4, 6, 10]
    assert [g.shape for g in parse_keep("2:4,1:2,1:2,2:4", 12)] == ["2:4", "1:2", "1:2", "2:4"]
    opts = group_options(2, 4)
    assert opts.shape == (math.comb(4, 2), 4) and bool((opts.sum(1) == 2).all())


@pytest.mark.parametrize("spec,msg", [("1:5", "does not divide"), ("3:2", "N > M"), ("0:2", ">= 1"),
                                      ("a:b", "integers"), ("", "pattern")])
def test_bad_group_shapes_are_usage_errors(spec, msg):
    with pytest.raises(UsageError, match=msg):
        parse_keep(spec, 12)


def test_unet_is_refused(tmp_path):
    with pytest.raises(UsageError, match="transformer blocks"):
        tinyfusion(tiny_unet(), 0.5, _ctx(tmp_path), keep="1:2")
    with pytest.raises(UsageError, match="transformer blocks"):
        compress(tiny_unet(), "stride-depth", 0.5, _ctx(tmp_path), {"keep": "1:2"})


def test_shape_for_depth_is_the_finest_local_shape_by_default():
    """The paper's search space: 1:2 for half the blocks, 1:4 for a quarter, 3:4 for three quarters."""
    assert shape_for_depth(12, 6) == "1:2"
    assert shape_for_depth(28, 14) == "1:2"  # the paper's TinyDiT-D14 preset DiT-XL-1-2
    assert shape_for_depth(12, 3) == "1:4"
    assert shape_for_depth(12, 9) == "3:4"
    assert shape_for_depth(28, 21) == "3:4"
    assert shape_for_depth(12, 4) == "1:3"
    assert shape_for_depth(12, 12) == "1:1"
    mixed = shape_for_depth(28, 13)  # no uniform local shape keeps 13 of 28: groups of 4, spread evenly
    groups = parse_keep(mixed, 28)
    assert sum(g.n for g in groups) == 13 and {g.m for g in groups} == {4} and {g.n for g in groups} == {1, 2}
    assert shape_for_depth(12, 1) == "1:12"  # fewer kept blocks than the smallest groups: one group
    assert shape_for_depth(7, 3) == "3:7"  # a prime depth has no local shape
    for depth, k in [(12, 5), (12, 11), (28, 13), (28, 7), (10, 3)]:
        groups = parse_keep(shape_for_depth(depth, k), depth)
        assert sum(g.n for g in groups) == k and len(groups) > 1, (depth, k)
    with pytest.raises(UsageError, match="search space"):
        shape_for_depth(12, 6, "wide")


def test_shape_for_depth_global_is_the_widest_shape():
    """search_space="global" (beyond the paper): one group over every block where it fits."""
    assert shape_for_depth(12, 6, "global") == "6:12"  # 924 options, first-k is among them
    assert shape_for_depth(12, 9, "global") == "9:12"
    assert shape_for_depth(12, 3, "global") == "3:12"
    assert shape_for_depth(28, 14, "global") == "2:4"  # 14:28 and 7:14 have too many options
    groups = parse_keep(shape_for_depth(28, 13, "global"), 28)  # 13:28 would have 37M options
    assert sum(g.n for g in groups) == 13 and all(math.comb(g.m, g.n) <= MAX_OPTIONS for g in groups)
    assert search_space_of(parse_keep("6:12", 12)) == "global"
    assert search_space_of(parse_keep("1:2", 12)) == search_space_of(parse_keep("2:2", 4)) == "local"


@pytest.mark.parametrize("budget", [0.6, 0.5])
def test_depth_for_budget_is_the_largest_depth_within_budget(budget, tmp_path):
    """Within the shared 3% tolerance: half the blocks of a 4-block DiT meet budget 0.5."""
    model, ctx = FACTORIES["dit"](), _ctx(tmp_path)
    full = sampling_macs(model, ctx)
    k, _ = depth_for_budget(model, budget, ctx)
    at_k = sampling_macs(extract_blocks(copy.deepcopy(model), list(range(k))), ctx)
    above = sampling_macs(extract_blocks(copy.deepcopy(model), list(range(k + 1))), ctx)
    assert at_k <= budget * (1 + BUDGET_TOLERANCE) * full < above
    if budget == 0.5:
        assert k == 2
    with pytest.raises(UsageError, match="below what one block costs"):
        depth_for_budget(model, 0.01, ctx)


def test_depth_cost_model_is_the_measured_line(tmp_path):
    """``DepthCost.macs(k)`` (the cost model of depth pruning) equals the measured sampling MACs
    of the first ``k`` blocks for every ``k`` of a uniform DiT."""
    from slimdiff.budget import CostModel
    from slimdiff.compression.depth import DepthCost

    model, ctx = FACTORIES["dit"](), _ctx(tmp_path)
    cost = DepthCost.measure(model, ctx)
    assert isinstance(cost, CostModel)
    for k in range(1, cost.depth + 1):
        measured = sampling_macs(extract_blocks(copy.deepcopy(model), list(range(k))), ctx)
        assert cost.macs(k) == pytest.approx(measured, rel=1e-9)


# --------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_extracted_equals_masked_exactly(kind):
    model = FACTORIES[kind]()
    x = _inputs(model)
    for kept in ([1, 2], [0, 3], [3]):
        mask = [1.0 if i in kept else 0.0 for i in range(4)]
        with masked_blocks(model, mask):
            want = _out(model, x)
        small = extract_blocks(copy.deepcopy(model), kept)
        assert len(as_backbone(small).blocks) == len(kept)
        assert torch.equal(_out(small, x), want), (kind, kept)


def test_masked_with_all_kept_is_the_model():
    model = FACTORIES["dit"]()
    x = _inputs(model)
    with masked_blocks(model, [1, 1, 1, 1]):
        assert torch.equal(_out(model, x), _out(FACTORIES["dit"](), x))


def test_untied_diffusers_embedders_keep_block_0():
    model = FACTORIES["diffusers-dit"]()
    with torch.no_grad():
        model.transformer_blocks[2].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    with pytest.raises(UsageError, match="block 0 cannot be removed"):
        extract_blocks(copy.deepcopy(model), [1, 2])
    assert len(extract_blocks(model, [0, 2]).transformer_blocks) == 2


def test_group_end_layer_map_is_the_references():
    """The reference's hard-coded maps (train_masked_kd.py ~185-193) follow from the groups."""
    d14 = group_end_layer_map([2 * i + (i % 2) for i in range(14)], parse_keep("1:2", 28))
    assert d14 == {i: 2 * i + 1 for i in range(14)}  # whichever block of each pair was kept
    per_group = [3, 3, 2, 3, 2, 3, 3]  # D19 from groups of 4: the last kept block of each group
    kept = [4 * j + i for j, n in enumerate(per_group) for i in range(n)]
    d19 = group_end_layer_map(kept, parse_keep(",".join(f"{n}:4" for n in per_group), 28))
    assert d19 == dict(zip([2, 5, 7, 10, 12, 15, 18], [3, 7, 11, 15, 19, 23, 27]))
    assert group_end_layer_map([0, 1], parse_keep("1:2", 4)) == {1: 1}  # a group without kept blocks has no pair
    assert layer_map([0, 3], parse_keep("1:2", 4)) == {0: 1, 1: 3}
    with pytest.raises(UsageError, match="KD layer map"):
        layer_map([0, 3], parse_keep("1:2", 4), "nearest")


def test_kept_layer_map():
    """kd_map="kept" (deviation): student block i <- the teacher block it was cut from."""
    assert kept_layer_map([1, 3, 4]) == {0: 1, 1: 3, 2: 4}
    assert layer_map([0, 3], parse_keep("1:2", 4), "kept") == {0: 0, 1: 3}


# --------------------------------------------------------------------------- the search
def test_sampled_masks_are_valid_n_of_m():
    groups = parse_keep("2:4,1:2", 12)
    gates = DepthGates(groups)
    gates.tau = 0.5
    mask = gates.sample(64)
    assert mask.shape == (64, 12)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for j, g in enumerate(groups):
        part = mask[:, g.start : g.start + g.m]
        assert bool((part.sum(1) == g.n).all())
        assert bool((part[:, None, :] == gates.options(j)[None]).all(-1).any(-1).all())  # each row is an option
    assert len({tuple(r) for r in mask[:, :4].tolist()}) > 1  # uniform logits: several options drawn


def test_gradients_reach_the_logits():
    model = FACTORIES["dit"]()
    gates = DepthGates(parse_keep("1:2", 4))
    gates.attach(model)
    x, t, y = _inputs(model, 4)
    as_backbone(model)(x, t, y).square().mean().backward()
    grads = [lg.grad for lg in gates.logits]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    gates.detach_from(model)
    assert not hasattr(model, "tinyfusion_gates")


def _toy_with_a_destructive_block(tmp_path: Path):
    """A 2-block DiT briefly trained on digits, whose block 1 is then replaced by random
    weights with 3x larger residual branches: keeping block 0 alone (option 0 of 1:2) is
    clearly the better sub-network. (A block that merely *swamps* the stream with one huge
    vector is not a fair toy: the straight-through estimator is a linearisation, and there
    the loss is far from linear in the gate.)"""
    from conftest import randomize_

    from slimdiff.compression.calibration import model_dataset
    from slimdiff.train.trainer import TrainConfig, train

    model = tiny_dit(0, depth=2, in_channels=1, learn_sigma=False)
    cfg = TrainConfig(steps=40, batch_size=32, lr=3e-3, ema_decay=0, lr_schedule="constant", checkpoint_every=1000)
    model = train(model, model_dataset(model, _ctx(tmp_path)), cfg, tmp_path / "pretrain", progress=False)
    with torch.no_grad():
        randomize_(model.blocks[1], seed=5)
        model.blocks[1].mlp.fc2.weight.mul_(3.0)
        model.blocks[1].attn.proj.weight.mul_(3.0)
    return model


def test_search_raises_the_probability_of_the_better_option(tmp_path):
    model = _toy_with_a_destructive_block(tmp_path)
    result = search(model, parse_keep("1:2", 2), _ctx(tmp_path, batch_size=16), SearchConfig(steps=6))
    p0 = [h[0][0] for h in result.history]  # option 0 keeps block 0 and drops block 1
    assert p0[0] == pytest.approx(0.5)
    assert p0[-1] == result.probabilities[0][0] > 0.65 and result.kept == [0]
    assert all(b > a for a, b in zip(p0[:-1], p0[1:]))


def test_search_on_diffusers_dit_with_lora(tmp_path):
    model = FACTORIES["diffusers-dit"]()
    before = copy.deepcopy(model.state_dict())
    result = search(model, parse_keep("1:2", 4), _ctx(tmp_path), SearchConfig(steps=2, lora_rank=4))
    assert len(result.kept) == 2 and all(sum(p) == pytest.approx(1) for p in result.probabilities)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # searched on a copy


def test_text_models_cannot_be_searched_without_captions(tmp_path):
    with pytest.raises(UsageError, match="caption"):
        search(FACTORIES["pixart"](), parse_keep("1:2", 4), _ctx(tmp_path), SearchConfig(steps=1))


# --------------------------------------------------------------------------- the method
def test_n_equals_m_returns_the_teacher_unchanged(tmp_path):
    for kind in ("dit", "diffusers-dit"):
        model = FACTORIES[kind]()
        x = _inputs(model)
        out = tinyfusion(copy.deepcopy(model), 1.0, _ctx(tmp_path), keep="2:2")
        assert len(as_backbone(out).blocks) == 4
        assert torch.equal(_out(out, x), _out(model, x))
        assert out.slimdiff_meta["extras"]["tinyfusion"]["searched"] is False


def test_tinyfusion_end_to_end_with_masked_kd_and_save_load(tmp_path):
    model = FACTORIES["dit"]()
    model.slimdiff_meta = {}
    ctx = _ctx(tmp_path, recover_steps=2, kd="masked")
    result = compress(model, "tinyfusion", 0.5, ctx, {"keep": "1:2", "search_steps": 3})
    meta = result.slimdiff_meta
    extras = meta["extras"]["tinyfusion"]
    kept = extras["kept_blocks"]
    assert len(result.blocks) == 2 and result.config.depth == 2
    assert all(g * 2 <= k < g * 2 + 2 for g, k in enumerate(kept))  # one block of each 1:2 group
    assert extras["layer_map"] == {"0": 1, "1": 3} and extras["kd_map"] == "group-end"  # the reference's map
    assert len(extras["probability_history"]["steps"]) == len(extras["probability_history"]["values"]) == 4
    assert meta["measured"]["macs_ratio"] < 0.55
    x = _inputs(result)
    path = save(result, tmp_path / "out")
    loaded = load(path)
    assert torch.equal(_out(loaded, x), _out(result, x))
    assert loaded.slimdiff_meta["method"]["name"] == "tinyfusion"


@pytest.mark.parametrize("space,shape", [("local", "1:2"), ("global", "2:4")])
def test_budget_picks_the_shape(space, shape, tmp_path):
    model = FACTORIES["dit"]()
    model.slimdiff_meta = {}
    result = compress(model, "tinyfusion", 0.6, _ctx(tmp_path), {"search_steps": 1, "search_space": space})
    settings = result.slimdiff_meta["method"]["chain"][0]["settings"]
    assert settings["keep"] == shape and settings["keep_from"] == "budget 0.6" and settings["search_space"] == space
    assert len(result.blocks) == 2
    explicit = compress(FACTORIES["dit"](), "tinyfusion", 1.0, _ctx(tmp_path), {"search_steps": 1, "keep": "2:4"})
    assert explicit.slimdiff_meta["method"]["chain"][0]["settings"]["search_space"] == "global"


def test_depth_pruned_diffusers_dit_exports(tmp_path):
    from diffusers import DiTTransformer2DModel

    model = extract_blocks(FACTORIES["diffusers-dit"](), [0, 2])
    x = _inputs(model)
    path = export_diffusers(model, tmp_path / "hf")
    again = DiTTransformer2DModel.from_pretrained(path).eval()
    assert again.config.num_layers == 2
    assert torch.allclose(_out(again, x), _out(model, x), atol=1e-6)


# --------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_baselines_produce_the_requested_depth(kind, tmp_path):
    expected = {"first-depth": [0, 1], "last-depth": [2, 3], "stride-depth": [1, 3]}
    for name in ("bi-depth", "first-depth", "last-depth", "stride-depth", "random-depth"):
        model = FACTORIES[kind]()
        model.slimdiff_meta = {}
        result = compress(model, name, 1.0, _ctx(tmp_path), {"keep": "1:2"})
        kept = result.slimdiff_meta["extras"][name]["kept_blocks"]
        assert len(as_backbone(result).blocks) == 2 and len(kept) == 2, name
        if name in expected:
            assert kept == expected[name], name


def test_stride_and_random_selection():
    assert select_blocks("stride", 12, 6) == [1, 3, 5, 7, 9, 11]
    assert select_blocks("random", 12, 6, seed=3) == select_blocks("random", 12, 6, seed=3)
    assert len(set(select_blocks("random", 12, 6, seed=3))) == 6


def test_block_influence_drops_an_identity_block(tmp_path):
    model = FACTORIES["dit"]()
    with torch.no_grad():  # zero adaLN: block 2 returns its input (BI = 0)
        model.blocks[2].adaLN_modulation[1].weight.zero_()
        model.blocks[2].adaLN_modulation[1].bias.zero_()
    scores = block_influence(model, _ctx(tmp_path), samples=16)
    assert scores[2] == pytest.approx(0.0, abs=1e-6) and min(s for i, s in enumerate(scores) if i != 2) > 1e-3
    assert 2 not in select_blocks("bi", 4, 3, scores=scores)


# --------------------------------------------------------------------------- shared pieces
def test_depth_gates_are_removable_model_hooks():
    from slimdiff.compression.depth import apply_depth_gates, remove_depth_gates

    model, plain = FACTORIES["dit"](), FACTORIES["dit"]()
    x = _inputs(model)
    with masked_blocks(plain, [1, 0, 1, 0]):
        want = _out(plain, x)
    apply_depth_gates(model, lambda i: torch.tensor(float(i % 2 == 0)))
    assert all(b._diffusers_hook.get_hook("slimdiff_depth_gate") is not None for b in model.blocks)
    with pytest.raises(UsageError, match="already has depth gates"):
        apply_depth_gates(model, lambda i: torch.tensor(1.0))
    assert torch.equal(_out(model, x), want)
    remove_depth_gates(model)
    assert not any(hasattr(b, "_diffusers_hook") or "forward" in vars(b) for b in model.blocks)  # plain blocks again
    assert torch.equal(_out(model, x), _out(FACTORIES["dit"](), x))


def test_lora_merge_keeps_the_adapted_function():
    from peft.tuners.lora import LoraLayer

    from slimdiff.compression.lora import add_lora, linear_layers, merge_lora

    model = FACTORIES["dit"]()
    targets = linear_layers(model, as_backbone(model).block_names)
    assert targets and all(t.startswith("blocks.") for t in targets)
    params = add_lora(model, targets, rank=4, alpha=8)
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    x = _inputs(model)
    adapted = _out(model, x)
    merge_lora(model)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert torch.allclose(_out(model, x), adapted, atol=1e-5)
    assert add_lora(FACTORIES["dit"](), targets, rank=0, alpha=8) == []


def test_depth_specs_hold_the_defaults():
    from slimdiff.methods import get_method
    from slimdiff.methods.depth_baselines import DepthBaselineConfig
    from slimdiff.methods.tinyfusion import TinyFusionConfig

    spec = get_method("tinyfusion")
    assert spec.kind == "depth"
    assert spec.options == ("keep", "search_space", "search_steps", "lora_targets", "delta_w", "kd_map")
    assert spec.make_config() == TinyFusionConfig(None, "local", SearchConfig.steps, "all", False, "group-end")
    assert spec.make_config({"search_steps": 7, "keep": "1:2"}) == TinyFusionConfig("1:2", search_steps=7)
    assert spec.make_config({"delta_w": "true"}).delta_w is True
    helps = {o.name: o.help for o in spec.option_info()}
    for name in ("search_space", "lora_targets", "kd_map"):
        assert "reference default" in helps[name] and ("deviation" in helps[name] or "beyond the paper" in helps[name])
    assert "one data epoch at batch 128" in helps["search_steps"]
    for bad in ({"search_space": "wide"}, {"lora_targets": "mlp"}, {"kd_map": "nearest"}):
        with pytest.raises(UsageError, match=next(iter(bad))):
            spec.make_config(bad)
    assert spec.draw is not None and spec.speed_student is not None
    for name in ("bi-depth", "first-depth", "last-depth", "stride-depth", "random-depth"):
        spec = get_method(name)
        config = spec.make_config()
        assert spec.kind == "depth" and isinstance(config, DepthBaselineConfig) and config.keep is None
        assert config == spec.config() and spec.draw is not None


def test_speed_student_keeps_the_budget_depth():
    from slimdiff.eval.speed import SpeedSettings
    from slimdiff.methods.tinyfusion import speed_student

    settings = SpeedSettings(budget=0.5, steps=2, seed=0, calibration_batch=4)
    student = speed_student(FACTORIES["dit"](), settings)
    entry = student.slimdiff_meta["method"]["chain"][0]
    assert len(student.blocks) == 2 and entry["settings"]["note"] == "first option per group"


def test_draw_depth(tmp_path):
    from slimdiff.compression.depth import draw_depth

    files = draw_depth("first-depth", {"kept_blocks": [0, 1]}, None, tmp_path, {"depth": 4})
    assert [f.name for f in files] == ["first-depth-kept_blocks.png"] and files[0].is_file()
    assert draw_depth("x", {}, None, tmp_path, {}) == []
