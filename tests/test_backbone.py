"""The Backbone view over the five supported model types, its per-architecture answers, and
sync_attention_heads."""
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


# --------------------------------------------------------------------------- per-architecture questions
TRANSFORMERS = ("dit", "diffusers-dit", "pixart")


def test_embed_timesteps_is_the_t_only_embedding_without_hooks(tiny_model):
    kind, module = tiny_model
    bb = as_backbone(module)
    x, t, cond = bb.example_inputs(3, torch.Generator().manual_seed(1))
    seen = []
    t_only = bb.time_embedding_part or bb.time_embedding
    h = t_only.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        bb(x, t, cond)
        calls = len(seen)  # 2 for a diffusers DiT: block 0's embedder also feeds the output layer
        emb = bb.embed_timesteps(t)
        assert len(seen) == calls  # the class forwards: no hook ran
    h.remove()
    assert emb.shape == (3, bb.time_embedding_dim)
    torch.testing.assert_close(emb, seen[0], rtol=0, atol=0)


def test_pixart_time_embedding_part_is_t_only():
    m = tiny_pixart(use_additional_conditions=True, attention_head_dim=24, cross_attention_dim=48)
    bb = as_backbone(m)
    assert bb.time_embedding_part is m.adaln_single.emb.timestep_embedder
    assert as_backbone(tiny_pixart()).time_embedding_part is None
    test_embed_timesteps_is_the_t_only_embedding_without_hooks(("pixart", m))


# position of the timestep among forward's arguments (without self), and its name
TIMESTEP_ARGUMENT = {"dit": (1, "t"), "diffusers-dit": (1, "timestep"), "pixart": (2, "timestep"),
                     "unet2d": (1, "timestep"), "unet2d-condition": (1, "timestep")}


def test_timestep_argument(tiny_model):
    kind, module = tiny_model
    bb = as_backbone(module)
    assert bb.timestep_argument() == TIMESTEP_ARGUMENT[kind]
    if kind == "dit":  # it is where the model reads the timestep
        x, t, y = bb.example_inputs(2)
        with torch.no_grad():
            assert torch.equal(module(x, t, y), module(x, **{bb.timestep_argument()[1]: t}, y=y))


def test_set_blocks_installs_the_list_and_the_depth(tiny_model):
    kind, module = tiny_model
    bb = as_backbone(module)
    if kind not in TRANSFORMERS:
        with pytest.raises(UsageError, match="not one list"):
            bb.set_blocks(bb.blocks[:1])
        assert not any(bb.can_drop_block(i) for i in range(len(bb.blocks)))
        return
    depth = lambda: module.config.depth if kind == "dit" else module.config.num_layers  # noqa: E731
    blocks = bb.blocks
    assert all(bb.can_drop_block(i) for i in range(len(blocks)))
    original = bb.set_blocks([blocks[1]])
    assert isinstance(original, nn.ModuleList) and list(original) == blocks
    assert bb.blocks == [blocks[1]] and depth() == 1
    with torch.no_grad():
        assert bb(*bb.example_inputs(2)).shape[0] == 2
    assert isinstance(bb.set_blocks(original), nn.ModuleList)
    assert getattr(module, bb.block_names[0].split(".")[0]) is original  # a ModuleList is installed as is
    assert bb.blocks == blocks and depth() == len(blocks)


def test_untied_diffusers_dit_keeps_block_0():
    m = tiny_diffusers_dit()
    with torch.no_grad():
        m.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    bb = as_backbone(m)
    assert not bb.can_drop_block(0) and bb.can_drop_block(1)
    assert "block 0 cannot be removed" in bb.drop_refusal


def test_block_call_conventions(tiny_model):
    kind, module = tiny_model
    bb = as_backbone(module)
    calls = []

    def hook(mod, args, kwargs, output):
        h, out = bb.block_input(args, kwargs), bb.block_output(output)
        calls.append((h, out, output))

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in bb.blocks]
    with torch.no_grad():
        bb(*bb.example_inputs(2))
    for h in handles:
        h.remove()
    assert len(calls) == len(bb.blocks)
    for h, out, output in calls:
        assert isinstance(h, torch.Tensor) and isinstance(out, torch.Tensor) and h.shape[0] == out.shape[0] == 2
        if bb.is_transformer:
            assert out.shape == h.shape
        new = torch.zeros_like(out)
        replaced = bb.with_block_output(output, new)
        assert bb.block_output(replaced) is new and type(replaced) is type(output)


# attention modules of each tiny model (self- and cross-attention, mid block included): (count, fused)
ATTENTIONS = {"dit": (2, True), "diffusers-dit": (2, False), "pixart": (4, False), "unet2d": (4, False),
              "unet2d-condition": (8, False)}


def test_attention_layouts(tiny_model):
    from diffusers.models.attention_processor import Attention

    from slimdiff.models.dit import Attention as DiTAttention

    kind, module = tiny_model
    bb = as_backbone(module)
    layouts = bb.attention_layouts()
    count, fused = ATTENTIONS[kind]
    assert [a.module for a in layouts] == [m for m in module.modules() if isinstance(m, (Attention, DiTAttention))]
    assert len(layouts) == count
    for a in layouts:
        assert a.fused == fused and len(a.qkv) == (1 if fused else 3)
        assert a.heads == (a.module.num_heads if fused else a.module.heads)
        assert a.head_dim * a.heads * (3 if fused else 1) == a.qkv[0].out_features == a.out.in_features * (3 if fused else 1)
    if bb.is_transformer:
        for i in range(len(bb.blocks)):
            a = bb.attention_layout(i)
            assert a.module is bb.attention(i) and a.heads == bb.heads(i) and a in layouts
    else:
        with pytest.raises(UsageError, match="transformer"):
            bb.attention_layout(0)


def test_width_prunable_layers(tiny_model):
    kind, module = tiny_model
    bb = as_backbone(module)
    prunable = bb.width_prunable_layers()
    ids = {id(m) for m in prunable}
    assert len(ids) == len(prunable)
    if not bb.is_transformer:
        convs = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert prunable == [m for m in convs if m is not module.conv_out]
        with pytest.raises(UsageError, match="transformer"):
            bb.mlp_inputs()
        return
    assert bb.mlp_inputs() == [bb.mlp(i).fc1 for i in range(len(bb.blocks))]
    inside = {id(m) for b in bb.blocks for m in b.modules()}
    expected = [lin for a in bb.attention_layouts() if id(a.module) in inside for lin in a.qkv] + bb.mlp_inputs()
    assert prunable == expected
    names = {id(m): n for n, m in module.named_modules()}
    assert all(names[id(m)].startswith(tuple(n + "." for n in bb.block_names)) for m in prunable)
    for i in range(len(bb.blocks)):  # residual-width outputs stay whole
        assert id(bb.attention_layout(i).out) not in ids and id(bb.mlp(i).fc2) not in ids


def test_head_and_group_macs_match_the_flop_counter(tiny_model):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    kind, module = tiny_model
    if kind not in TRANSFORMERS:
        return
    bb = as_backbone(module)
    n = bb.token_grid[0] * bb.token_grid[1]
    x = torch.randn(2, n, bb.mlp(0).fc1.in_features)

    def macs(fn) -> int:
        counter = FlopCounterMode(display=False)
        with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
            fn()
        return counter.get_total_flops() // 2

    for i in range(len(bb.blocks)):
        attn, mlp = bb.attention_layout(i), bb.mlp(i)
        assert macs(lambda: attn.module(x)) == 2 * attn.heads * attn.head_macs(n)
        assert macs(lambda: mlp.fc2(mlp.fc1(x))) == 2 * n * 4 * mlp.group_token_macs(4)


def test_attention_mlp_names(tiny_model):
    import re

    kind, module = tiny_model
    bb = as_backbone(module)
    if not bb.is_transformer:
        with pytest.raises(UsageError, match="transformer"):
            bb.attention_mlp_names()
        return
    names = bb.attention_mlp_names()
    pattern = {"dit": r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
               "diffusers-dit": r"transformer_blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"}
    pattern["pixart"] = pattern["diffusers-dit"]
    assert sorted(names) == sorted(n for n, _ in module.named_modules() if re.fullmatch(pattern[kind], n))
    assert all(isinstance(module.get_submodule(n), nn.Linear) for n in names)


def test_reuse_units_and_their_readers(tiny_model):
    kind, module = tiny_model
    bb = as_backbone(module)
    units = bb.reuse_units()
    if bb.is_transformer:
        assert bb.reuse_mode == "residual" and bb.block_readers() is None
        assert [n for n, _ in units] == bb.block_names and [m for _, m in units] == bb.blocks
        return
    assert bb.reuse_mode == "output"
    names = [n for n, _ in units]
    assert names == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert all(module.get_submodule(n) is m for n, m in units)
    order = []
    hooks = [m.register_forward_hook(lambda *_, n=n: order.append(n)) for n, m in units]
    with torch.no_grad():
        bb(*bb.example_inputs(1))
    for h in hooks:
        h.remove()
    assert order == names  # execution order
    readers = bb.block_readers()
    assert set(readers) == set(names) and readers[names[-1]] == ["output"]
    for i, n in enumerate(names[:-1]):  # every unit feeds the next, readers come later
        assert readers[n][0] == names[i + 1] and all(names.index(r) > i for r in readers[n])
    assert set(readers["down_blocks.0"]) == {"down_blocks.1", "up_blocks.0", "up_blocks.1"}
