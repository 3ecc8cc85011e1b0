"""The Backbone view over the five supported model types, and sync_attention_heads."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import TINY_MODELS, tiny_dit, tiny_diffusers_dit, tiny_pixart, tiny_unet, tiny_unet_cond

from slimdiff.errors import UsageError
from slimdiff.models.backbone import BACKBONES, Backbone, as_backbone, sync_attention_heads
from slimdiff.models.convert import dit_to_diffusers

# kind -> (in_channels, sample_size, num_classes, conditioning, n_blocks, heads, mlp_width, token_grid)
EXPECTED = {
    "dit": (4, 8, 10, "class", 2, 2, 128, (4, 4)),
    "diffusers-dit": (4, 8, 10, "class", 2, 2, 128, (4, 4)),
    "pixart": (4, 8, None, "text", 2, 2, 128, (4, 4)),
    "unet2d": (3, 16, None, None, 12, None, None, None),
    "unet2d-condition": (4, 8, None, "text", 12, None, None, None),
}


def test_every_kind_has_a_tiny_model():
    assert set(TINY_MODELS) == set(EXPECTED)
    assert {a.kind for a in BACKBONES.values()} == set(EXPECTED)


def test_facts(tiny_model):
    kind, module = tiny_model
    bb = as_backbone(module)
    c, s, k, cond, n, heads, mlp, grid = EXPECTED[kind]
    assert bb.kind == kind and bb.module is module
    assert (bb.in_channels, bb.sample_size, bb.num_classes, bb.conditioning) == (c, s, k, cond)
    assert bb.is_transformer == (heads is not None)
    assert len(bb.blocks) == len(bb.block_names) == n
    for name, blk in zip(bb.block_names, bb.blocks):
        assert module.get_submodule(name) is blk
    if bb.is_transformer:
        assert bb.token_grid == grid
        for i in range(n):
            assert bb.heads(i) == heads and bb.mlp_width(i) == mlp
            fc_in, fc_out = bb.mlp(i)
            assert isinstance(fc_in, nn.Linear) and fc_in.out_features == fc_out.in_features == mlp
            assert any(sub is bb.attention(i) for sub in bb.blocks[i].modules())
    else:
        for call in (lambda: bb.heads(0), lambda: bb.mlp_width(0), lambda: bb.attention(0), lambda: bb.mlp(0),
                     lambda: bb.token_grid):
            with pytest.raises(UsageError, match="transformer"):
                call()


def test_unet_blocks_follow_execution_order():
    bb = as_backbone(tiny_unet())
    order = []
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: order.append(n)) for n, b in zip(bb.block_names, bb.blocks)]
    with torch.no_grad():
        bb(*bb.example_inputs(1))
    for h in hooks:
        h.remove()
    assert order == bb.block_names
    assert bb.block_names[:3] == ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "down_blocks.1.attentions.0"]
    assert "mid_block.attentions.0" in bb.block_names


def test_forward_shapes_and_timestep_broadcast(tiny_model):
    kind, module = tiny_model
    bb = as_backbone(module)
    g = torch.Generator().manual_seed(0)
    x, t, cond = bb.example_inputs(3, generator=g)
    assert x.shape == (3, bb.in_channels, bb.sample_size, bb.sample_size) and t.shape == (3,)
    with torch.no_grad():
        ref = bb(x, torch.full((3,), 321), cond)
        assert ref.shape == x.shape and torch.isfinite(ref).all() and ref.abs().mean() > 1e-2
        for tt in (321, torch.tensor(321), torch.tensor([321])):
            torch.testing.assert_close(bb(x, tt, cond), ref)
        assert not torch.allclose(bb(x, t, cond), ref)  # the timestep matters
    with pytest.raises(UsageError, match="batch"):
        bb(x, torch.tensor([1, 2]), cond)


def test_learned_sigma_channels_are_dropped():
    m = tiny_dit(learn_sigma=True)
    bb = as_backbone(m)
    x, t, y = bb.example_inputs(2)
    with torch.no_grad():
        full = m(x, t, y)
        assert full.shape[1] == 8
        assert torch.equal(bb(x, t, y), full[:, :4])


def test_example_inputs_are_reproducible(tiny_model):
    _, module = tiny_model
    bb = as_backbone(module)
    a = bb.example_inputs(2, torch.Generator().manual_seed(5))
    b = bb.example_inputs(2, torch.Generator().manual_seed(5))
    for u, v in zip(a, b):
        assert (u is None and v is None) or torch.equal(u, v)
    if bb.conditioning == "class":
        assert a[2].dtype == torch.long and 0 <= int(a[2].min()) and int(a[2].max()) < bb.num_classes
    elif bb.conditioning == "text":
        assert a[2].ndim == 3 and a[2].shape[0] == 2
    else:
        assert a[2] is None


def test_null_cond(tiny_model):
    kind, module = tiny_model
    bb = as_backbone(module)
    x, t, cond = bb.example_inputs(2)
    if bb.conditioning is None:
        with pytest.raises(UsageError, match="unconditional"):
            bb.null_cond(cond, 2)
        with pytest.raises(UsageError, match="unconditional"):
            bb(x, t, torch.zeros(2, dtype=torch.long))
        return
    null = bb.null_cond(cond, 2)
    if bb.conditioning == "class":
        assert null.tolist() == [bb.num_classes] * 2
    else:
        assert null.shape == cond.shape and torch.count_nonzero(null) == 0
        assert bb.null_cond(None, 3).shape == (3, *cond.shape[1:])
    with torch.no_grad():
        uncond = bb(x, t, null)
        assert uncond.shape == x.shape and not torch.allclose(uncond, bb(x, t, cond))
    with pytest.raises(UsageError, match="conditional"):
        bb(x, t)


def test_class_conditional_unet():
    m = tiny_unet(num_class_embeds=11)  # 10 classes + the null class
    bb = as_backbone(m)
    assert bb.conditioning == "class" and bb.num_classes == 10
    x, t, y = bb.example_inputs(2)
    null = bb.null_cond(y, 2)
    assert null.tolist() == [10, 10]
    with torch.no_grad():
        assert not torch.allclose(bb(x, t, y), bb(x, t, null))


def test_dit_without_null_class_refuses_cfg():
    bb = as_backbone(tiny_dit(class_dropout_prob=0.0))
    with pytest.raises(UsageError, match="null class"):
        bb.null_cond(None, 2)


def test_time_embedding_feeds_the_model(tiny_model):
    kind, module = tiny_model
    bb = as_backbone(module)
    seen = []
    h = bb.time_embedding.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        bb(*bb.example_inputs(2))
    h.remove()
    assert seen and seen[0].ndim == 2 and seen[0].shape[0] == 2


def test_view_is_thin_and_idempotent():
    m = tiny_dit()
    bb = as_backbone(m)
    assert as_backbone(bb) is bb and isinstance(bb, Backbone)
    assert not isinstance(bb, nn.Module)  # holds no weights of its own
    x, t, y = bb.example_inputs(2)
    with torch.no_grad():
        before = bb(x, t, y)
    del m.blocks[1]  # depth pruning in place shows through the view
    assert len(bb.blocks) == 1 and bb.blocks[0] is m.blocks[0] and bb.block_names == ["blocks.0"]
    with torch.no_grad():
        after = bb(x, t, y)
        assert torch.equal(after, m(x, t, y)[:, :4]) and not torch.allclose(after, before)


def test_ours_and_diffusers_agree_through_the_view():
    m = tiny_dit()
    a, b = as_backbone(m), as_backbone(dit_to_diffusers(m))
    x, t, y = a.example_inputs(3, torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(b(x, t, y), a(x, t, y), atol=1e-5, rtol=0)
        torch.testing.assert_close(b(x, t, b.null_cond(y, 3)), a(x, t, a.null_cond(y, 3)), atol=1e-5, rtol=0)


def test_unsupported_modules_are_refused():
    with pytest.raises(UsageError) as e:
        as_backbone(nn.Linear(2, 2))
    msg = str(e.value)
    assert "Linear" in msg
    for name in ("DiT", "DiTTransformer2DModel", "PixArtTransformer2DModel", "UNet2DModel", "UNet2DConditionModel"):
        assert name in msg
    with pytest.raises(UsageError, match="not supported"):
        as_backbone(tiny_unet_cond(addition_embed_type="text", encoder_hid_dim=None))


def test_pixart_additional_conditions():
    # The size embedder needs width % 3 == 0; cross-attention reads the projected captions (width D).
    m = tiny_pixart(use_additional_conditions=True, attention_head_dim=24, cross_attention_dim=48)
    bb = as_backbone(m)
    with torch.no_grad():
        assert bb(*bb.example_inputs(2)).shape == (2, 4, 8, 8)


# --------------------------------------------------------------------------- sync_attention_heads
def _drop_second_head(q, k, v, out, head_dim):
    """Keep the first head of two: slice q/k/v rows and the output columns."""
    with torch.no_grad():
        for lin in (q, k, v):
            lin.weight = nn.Parameter(lin.weight[:head_dim].clone())
            lin.bias = nn.Parameter(lin.bias[:head_dim].clone())
            lin.out_features = head_dim
        out.weight = nn.Parameter(out.weight[:, :head_dim].clone())
        out.in_features = head_dim


def test_sync_heads_after_whole_head_pruning_diffusers():
    model = tiny_diffusers_dit()
    bb = as_backbone(model)
    x, t, y = bb.example_inputs(2)
    # Reference: the unpruned model with head 1's contribution removed from to_out.
    ref_model = tiny_diffusers_dit()
    with torch.no_grad():
        for blk in ref_model.transformer_blocks:
            blk.attn1.to_out[0].weight[:, 16:] = 0
        ref = as_backbone(ref_model)(x, t, y)
        for blk in model.transformer_blocks:
            a = blk.attn1
            _drop_second_head(a.to_q, a.to_k, a.to_v, a.to_out[0], 16)
        stale = bb(x, t, y)  # runs, but splits 16 channels into 2 heads of 8: wrong
        assert (stale - ref).abs().max() > 1e-3
        pruned_heads = {blk.attn1.to_q: 1 for blk in model.transformer_blocks}  # keyed like pruner.num_heads
        changed = sync_attention_heads(model, pruned_heads)
        assert changed == [f"transformer_blocks.{i}.attn1" for i in range(2)]
        assert [bb.heads(i) for i in range(2)] == [1, 1]
        assert model.transformer_blocks[0].attn1.scale == 16**-0.5
        torch.testing.assert_close(bb(x, t, y), ref, atol=1e-5, rtol=0)


def test_sync_heads_after_whole_head_pruning_ours():
    model, ref_model = tiny_dit(), tiny_dit()
    bb = as_backbone(model)
    x, t, y = bb.example_inputs(2)
    with torch.no_grad():
        for blk in ref_model.blocks:
            blk.attn.proj.weight[:, 16:] = 0
        ref = ref_model(x, t, y)
        for blk in model.blocks:
            keep = torch.cat([torch.arange(0, 16), torch.arange(32, 48), torch.arange(64, 80)])  # q, k, v of head 0
            blk.attn.qkv.weight = nn.Parameter(blk.attn.qkv.weight[keep].clone())
            blk.attn.qkv.bias = nn.Parameter(blk.attn.qkv.bias[keep].clone())
            blk.attn.qkv.out_features = 48
            blk.attn.proj.weight = nn.Parameter(blk.attn.proj.weight[:, :16].clone())
            blk.attn.proj.in_features = 16
        assert (model(x, t, y) - ref).abs().max() > 1e-3  # stale num_heads=2: heads of 8, wrong
    # 48 = 3 x 2 x 8 still splits, so nothing can tell the state is stale: the head counts
    # must be given (keys: a qualified name or the qkv Linear, as torch-pruning reports it).
    assert sync_attention_heads(model) == []
    assert sync_attention_heads(model, {"blocks.0.attn": 1, model.blocks[1].attn.qkv: 1}) == [
        "blocks.0.attn", "blocks.1.attn"]
    assert [bb.heads(i) for i in range(2)] == [1, 1]
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), ref, atol=1e-5, rtol=0)


def test_sync_fixes_torch_pruned_unet():
    tp = pytest.importorskip("torch_pruning")
    from diffusers.models.attention_processor import Attention

    m = tiny_unet()
    bb = as_backbone(m)
    x, t, _ = bb.example_inputs(2)
    heads = {lin: a.heads for a in m.modules() if isinstance(a, Attention) for lin in (a.to_q, a.to_k, a.to_v)}
    pruner = tp.pruner.BasePruner(m, {"sample": x, "timestep": t}, importance=tp.importance.MagnitudeImportance(),
                                  pruning_ratio=0.5, ignored_layers=[m.conv_out], num_heads=heads)
    pruner.step()
    with torch.no_grad():
        with pytest.raises(AssertionError):  # Downsample2D/Upsample2D check their stale `channels`
            bb(x, t)
        changed = sync_attention_heads(m, pruner.num_heads)
        assert "down_blocks.0.downsamplers.0" in changed and "up_blocks.0.upsamplers.0" in changed
        ds = m.down_blocks[0].downsamplers[0]
        assert ds.channels == ds.conv.in_channels == 8
        out = bb(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert sync_attention_heads(m, pruner.num_heads) == []  # idempotent


def test_sync_rejects_indivisible_widths():
    m = tiny_diffusers_dit()
    a = m.transformer_blocks[0].attn1
    for lin in (a.to_q, a.to_k, a.to_v):
        lin.weight = nn.Parameter(lin.weight[:15].clone())
        lin.bias = nn.Parameter(lin.bias[:15].clone())
        lin.out_features = 15
    with pytest.raises(UsageError, match="transformer_blocks.0.attn1"):
        sync_attention_heads(m)
