"""Residual-width pruning (slimdiff.compression.residual_width): the hidden size of our DiT shrinks
consistently everywhere (same channels in the patch embedding, position table, every block, adaLN
chunks and final layer), nothing changes at ratio 0, the result saves and reloads, and the
parameter ratio follows the MACs ratio. The pruner is built as width pruning's ``_make_pruner``
builds it, with :func:`pruner_kwargs` merged in."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from conftest import tiny_diffusers_dit, tiny_dit, tiny_unet

from slimdiff import io
from slimdiff.compression.residual_width import hidden_widths, pruner_kwargs
from slimdiff.errors import UsageError
from slimdiff.eval.compute import macs_forward, params_ratio
from slimdiff.models.backbone import as_backbone, sync_attention_heads


def _pruner(m: nn.Module, ratio: float, residual: bool = True):
    """torch-pruning's BasePruner with width pruning's head arguments (``heads="dims"``)."""
    bb = as_backbone(m)
    if residual:
        extra = pruner_kwargs(m)
    else:  # width pruning's default: only q/k/v and MLP inputs may lose outputs
        keep = {id(layer) for layer in bb.width_prunable_layers()}
        extra = {"ignored_layers": [x for x in m.modules() if isinstance(x, (nn.Linear, nn.Conv2d)) and id(x) not in keep]}
    return tp.pruner.BasePruner(
        m, bb.example_inputs(1, torch.Generator().manual_seed(0)), importance=tp.importance.MagnitudeImportance(),
        pruning_ratio=ratio, num_heads={layer: a.heads for a in bb.attention_layouts() for layer in a.qkv},
        in_channel_groups={}, out_channel_groups={}, prune_num_heads=False, prune_head_dims=True,
        head_pruning_ratio=0.0, forward_fn=lambda mod, inp: as_backbone(mod)(*inp), **extra)


def _pruned(ratio: float, residual: bool = True, **kw) -> tuple[nn.Module, nn.Module]:
    original = tiny_dit(**kw)
    m = copy.deepcopy(original)
    pruner = _pruner(m, ratio, residual)
    pruner.step()
    sync_attention_heads(m, pruner.num_heads)
    return original, m


def _rows_of(full: torch.Tensor, part: torch.Tensor) -> list[int]:
    """Indices of ``full``'s rows equal to each row of ``part`` (asserts every row is found)."""
    eq = (part.flatten(1)[:, None] == full.flatten(1)[None]).all(-1)
    assert eq.any(1).all(), "a pruned row is not a row of the original"
    return eq.float().argmax(1).tolist()


def _inputs(bb, seed: int = 1):
    return bb.example_inputs(3, torch.Generator().manual_seed(seed))


def test_ratio_zero_changes_nothing():
    original, m = _pruned(0.0)
    assert hidden_widths(m) == hidden_widths(original) and set(hidden_widths(m).values()) == {32}
    x, t, y = _inputs(as_backbone(m))
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, y), original(x, t, y), rtol=0, atol=0)


def test_hidden_size_shrinks_everywhere_with_the_same_channels():
    original, m = _pruned(0.5)
    assert set(hidden_widths(m).values()) == {16}  # int(32 * (1 - 0.5)) in every D-wide place
    keep = _rows_of(original.x_embedder.proj.weight, m.x_embedder.proj.weight)  # residual channels kept
    cond = _rows_of(original.y_embedder.embedding_table.weight.T, m.y_embedder.embedding_table.weight.T)
    hid = _rows_of(original.t_embedder.mlp[0].weight, m.t_embedder.mlp[0].weight)
    assert len(set(keep)) == len(set(cond)) == len(set(hid)) == 16
    torch.testing.assert_close(m.pos_embed, original.pos_embed[..., keep], rtol=0, atol=0)
    assert "pos_embed" in dict(m.named_buffers()) and "pos_embed" not in dict(m.named_parameters())
    torch.testing.assert_close(m.t_embedder.mlp[2].weight, original.t_embedder.mlp[2].weight[cond][:, hid])

    def chunk_rows(k: int) -> list[int]:
        return [i * 32 + j for i in range(k) for j in keep]

    for blk, ref in zip(list(m.blocks) + [m.final_layer], list(original.blocks) + [original.final_layer]):
        ada, ada0 = blk.adaLN_modulation[-1], ref.adaLN_modulation[-1]
        rows = chunk_rows(ada0.out_features // 32)  # every chunk loses the same residual channels
        torch.testing.assert_close(ada.weight, ada0.weight[rows][:, cond], rtol=0, atol=0)
        torch.testing.assert_close(ada.bias, ada0.bias[rows], rtol=0, atol=0)
    torch.testing.assert_close(m.final_layer.linear.weight, original.final_layer.linear.weight[:, keep], rtol=0, atol=0)
    for blk, ref in zip(m.blocks, original.blocks):
        assert blk.norm1.normalized_shape == blk.norm2.normalized_shape == (16,)
        _rows_of(ref.attn.qkv.weight[:, keep], blk.attn.qkv.weight)  # inputs: the kept residual channels
        _rows_of(ref.mlp.fc1.weight[:, keep], blk.mlp.fc1.weight)
        _rows_of(ref.attn.proj.weight[keep].T, blk.attn.proj.weight.T)  # outputs: the kept residual channels
        _rows_of(ref.mlp.fc2.weight[keep].T, blk.mlp.fc2.weight.T)
        assert blk.attn.qkv.out_features == 48 and blk.mlp.fc1.out_features == 64  # inner widths pruned too
    x, t, y = _inputs(as_backbone(m))
    with torch.no_grad():
        out = m(x, t, y)
    assert out.shape == original(x, t, y).shape and torch.isfinite(out).all()


def test_residual_group_is_rooted_at_an_mlp_output_and_scores_adaln_rows():
    """Not at an adaLN layer (its k*D rows would be ranked as channels) nor at an attention output
    projection (torch-pruning's local scope of the re-rooted attention group has that name)."""
    m = tiny_dit()
    pruner = _pruner(m, 0.5)
    names = {mod: n for n, mod in m.named_modules()}
    groups = list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                           root_module_types=pruner.root_module_types))
    residual = [g for g in groups if any(dep.target.module is m.x_embedder for dep, _ in g)]
    assert len(residual) == 1
    assert names[residual[0][0].dep.target.module] == "blocks.1.mlp.fc2"
    scored = {dep.target.module for dep, _ in residual[0] if dep.handler == tp.prune_linear_out_channels}
    assert {blk.adaLN_modulation[-1] for blk in m.blocks} | {m.final_layer.adaLN_modulation[-1]} <= scored


def test_pruned_model_saves_and_reloads(tmp_path):
    _, m = _pruned(0.5)
    path = io.save(m, tmp_path / "residual")
    back = io.load(path)
    assert hidden_widths(back) == hidden_widths(m)
    assert {n: p.shape for n, p in back.state_dict().items()} == {n: p.shape for n, p in m.state_dict().items()}
    x, t, y = _inputs(as_backbone(m), seed=2)
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, y), m(x, t, y), rtol=0, atol=0)


def test_pruned_model_converts_to_diffusers_exactly():
    from slimdiff.models.convert import dit_to_diffusers

    _, m = _pruned(0.5)
    d = dit_to_diffusers(m)
    x, t, y = _inputs(as_backbone(m), seed=3)
    with torch.no_grad():
        torch.testing.assert_close(as_backbone(d)(x, t, y), as_backbone(m)(x, t, y), rtol=1e-5, atol=1e-5)


def test_parameter_ratio_follows_the_macs_ratio():
    """adaLN (a third of a DiT block's parameters, almost no MACs) keeps its full width unless the
    residual width is pruned: then the two ratios nearly agree."""
    gaps = {}
    for residual in (False, True):
        original, m = _pruned(0.5, residual, hidden_size=64, num_heads=4)
        gaps[residual] = params_ratio(m, original) - macs_forward(m) / macs_forward(original)
    assert gaps[False] > 0.15 and abs(gaps[True]) < gaps[False] / 5  # measured: 0.19 vs 0.01


@pytest.mark.parametrize("make", [tiny_diffusers_dit, tiny_unet])
def test_other_models_are_refused(make):
    with pytest.raises(UsageError, match="residual-width pruning does not support .*supported: dit"):
        pruner_kwargs(make())


@pytest.mark.parametrize("method", ["magnitude-width", "diff-pruning"])
def test_a_diffusers_dit_is_converted_and_its_residual_width_pruned(tmp_path, method):
    """diffusers' DiT loses its residual group in torch-pruning's graph: the width methods convert
    it to our DiT (same outputs) first; the result installs in a DiTPipeline."""
    from diffusers import DDIMScheduler, DiTPipeline

    import slimdiff
    from slimdiff.methods.base import Context, compress
    from slimdiff.models.dit import DiT

    teacher = tiny_diffusers_dit(num_embeds_ada_norm=1000, num_layers=2)
    data = tmp_path / "latents.npz"
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(data, latents=rng.standard_normal((8, 4, 8, 8)).astype(np.float32), labels=rng.integers(0, 1000, 8))
    ctx = Context(steps=2, batch_size=4, progress=False, data=str(data), work_dir=tmp_path / "work")
    out = compress(copy.deepcopy(teacher), method, 0.6, ctx, {"residual_width": True, "stride": 500}
                   if method == "diff-pruning" else {"residual_width": True})
    assert isinstance(out, DiT) and out.slimdiff_meta["method"]["chain"][0]["settings"]["residual"] is True
    hidden = set(hidden_widths(out).values())
    assert len(hidden) == 1 and hidden.pop() < teacher.config.num_attention_heads * teacher.config.attention_head_dim
    pipe = DiTPipeline(transformer=teacher, vae=None, scheduler=DDIMScheduler())
    slimdiff.apply(pipe, out)
    assert pipe.transformer.dit is out
