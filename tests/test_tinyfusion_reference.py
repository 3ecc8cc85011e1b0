"""TinyFusion's reference defaults and their named deviations (issue 20): LoRA on every
linear layer vs. the blocks' only, the full-weight search, the KD layer maps through the
whole method, kept blocks in every depth record, and a search that is reproducible whatever
the global RNG did before it."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_dit

from slimdiff.compression.depth import parse_keep
from slimdiff.compression.lora import add_lora, linear_layers
from slimdiff.methods.base import Context, compress
from slimdiff.methods.tinyfusion import SearchConfig, _trainable, search


def _model(depth: int = 4):
    return tiny_dit(0, depth=depth, in_channels=1)


def _ctx(tmp_path: Path, **kw) -> Context:
    return Context(**{"steps": 4, "batch_size": 8, "work_dir": tmp_path, "progress": False, **kw})


def _adapted(model) -> set[str]:
    """Names of the modules that received a LoRA adapter."""
    return {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}


def test_lora_goes_on_every_linear_by_default():
    """The reference wraps every nn.Linear (prune_by_learning.py ~39-53): embedders and the
    final layer too; the patch embedding is a convolution and stays as it is."""
    model = _model()
    params = _trainable(model, SearchConfig(), seed=0)
    adapted = _adapted(model)
    assert {"t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear", "final_layer.adaLN_modulation.1",
            "blocks.3.mlp.fc2", "blocks.0.adaLN_modulation.1"} <= adapted
    assert adapted == set(linear_layers(_model())) and "x_embedder.proj" not in adapted
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    lora_a = dict(model.named_parameters())["t_embedder.mlp.0.lora_A.default.weight"]
    assert lora_a.shape[0] == 8  # rank 8 (alpha 16)


def test_lora_on_blocks_only_is_the_deviation():
    model = _model()
    _trainable(model, SearchConfig(lora_targets="blocks"), seed=0)
    adapted = _adapted(model)
    assert adapted and all(n.startswith("blocks.") for n in adapted)
    assert adapted == set(linear_layers(_model(), ["blocks"]))


def test_delta_w_trains_every_weight_and_leaves_the_input_alone(tmp_path):
    """--delta-w without --lora: all weights train (lr 1e-4, logits 10x), no adapters; the
    decision is cut from the original weights."""
    model = _model()
    params = _trainable(copy.deepcopy(model), SearchConfig(delta_w=True), seed=0)
    assert len(params) == len(list(model.parameters()))
    before = copy.deepcopy(model.state_dict())
    result = search(model, parse_keep("1:2", 4), _ctx(tmp_path), SearchConfig(steps=2, delta_w=True))
    assert len(result.kept) == 2 and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    out = compress(_model(), "tinyfusion", 0.5, _ctx(tmp_path / "m"), {"search_steps": 2, "delta_w": True})
    entry = out.slimdiff_meta["method"]["chain"][0]
    assert entry["settings"]["delta_w"] is True and out.slimdiff_meta["extras"]["tinyfusion"]["search"]["delta_w"]


def test_seeded_lora_init_ignores_the_global_rng():
    """peft draws lora_A from the global RNG; add_lora(seed=...) draws it from the seed and
    leaves the global RNG as it was."""
    models = [_model() for _ in range(3)]

    def lora_a(model, seed):
        add_lora(model, linear_layers(model), 4, 8, seed=seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = lora_a(models[0], 0)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    b, c = lora_a(models[1], 0), lora_a(models[2], 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_search_is_reproducible_whatever_the_global_rng(tmp_path):
    """Two searches with one seed in one process (separate work dirs, so neither resumes the
    other) give the same kept blocks and probability histories although the global RNG was
    moved in between."""
    model = _model()
    config = SearchConfig(steps=4, log_points=4)
    groups = parse_keep("1:2", 4)
    torch.manual_seed(123)
    first = search(model, groups, _ctx(tmp_path / "a", seed=5), config)
    torch.rand(1000)
    torch.manual_seed(456)
    second = search(model, groups, _ctx(tmp_path / "b", seed=5), config)
    assert first.kept == second.kept
    assert first.history_steps == second.history_steps and first.history == second.history
    assert first.probabilities == second.probabilities
    assert first.history[-1] != first.history[0]  # the logits did move: the comparison is not vacuous


@pytest.mark.parametrize("kd_map", ["group-end", "kept"])
def test_kd_layer_map_reaches_recovery(kd_map, tmp_path, monkeypatch):
    """Masked KD distils with the map the option names: the reference's group end by default."""
    from slimdiff.compression import depth

    seen = {}
    real = depth.recover

    def spy(model, ctx, tag, **kw):
        seen.update(kw["layer_map"])
        return real(model, ctx, tag, **kw)

    monkeypatch.setattr(depth, "recover", spy)
    teacher = _model()
    ctx = _ctx(tmp_path, recover_steps=1, kd="masked", teacher=teacher)
    out = compress(_model(), "tinyfusion", 0.5, ctx, {"keep": "1:2", "search_steps": 2, "kd_map": kd_map})
    extras = out.slimdiff_meta["extras"]["tinyfusion"]
    kept = extras["kept_blocks"]
    want = {0: 1, 1: 3} if kd_map == "group-end" else {0: kept[0], 1: kept[1]}
    assert seen == want and extras["layer_map"] == {str(k): v for k, v in want.items()}
    assert extras["kd_map"] == kd_map == out.slimdiff_meta["method"]["chain"][0]["settings"]["kd_map"]


@pytest.mark.parametrize("name", ["tinyfusion", "bi-depth", "oracle-depth", "first-depth", "stride-depth",
                                  "random-depth"])
def test_every_depth_result_records_its_kept_blocks(name, tmp_path):
    """Kept block indices are in the chain entry's measurements (which every bench entry
    carries) and in the extras; the baselines get the group-end map of the same local shape."""
    model = _model()
    out = compress(model, name, 0.5, _ctx(tmp_path), {"search_steps": 1} if name == "tinyfusion" else {})
    meta = out.slimdiff_meta
    entry = meta["method"]["chain"][0]
    kept = entry["measured"]["kept_blocks"]
    assert len(kept) == len(out.blocks) == 2 and kept == meta["extras"][name]["kept_blocks"]
    assert meta["extras"][name]["kd_map"] == "group-end"
    groups = parse_keep("1:2", 4)  # the budget's local shape for 2 of 4 blocks
    from slimdiff.compression.depth import group_end_layer_map

    assert meta["extras"][name]["layer_map"] == {str(k): v for k, v in group_end_layer_map(kept, groups).items()}
