"""Exact converters between our DiT (:class:`slimdiff.models.dit.DiT`) and diffusers'
:class:`~diffusers.DiTTransformer2DModel`.

Weight mapping (ours <-> diffusers):

=====================================  ====================================================
``x_embedder.proj``                    ``pos_embed.proj``
``pos_embed`` (buffer)                 ``pos_embed.pos_embed`` (non-persistent buffer)
``t_embedder.mlp.0`` / ``.mlp.2``      ``transformer_blocks[i].norm1.emb.timestep_embedder.linear_1`` / ``linear_2``
``y_embedder.embedding_table``         ``transformer_blocks[i].norm1.emb.class_embedder.embedding_table``
``blocks.i.attn.qkv``                  ``transformer_blocks[i].attn1.to_q|to_k|to_v`` (concat on the out dim)
``blocks.i.attn.proj``                 ``transformer_blocks[i].attn1.to_out.0``
``blocks.i.mlp.fc1`` / ``fc2``         ``transformer_blocks[i].ff.net.0.proj`` / ``ff.net.2``
``blocks.i.adaLN_modulation.1``        ``transformer_blocks[i].norm1.linear``
``final_layer.adaLN_modulation.1``     ``proj_out_1``
``final_layer.linear``                 ``proj_out_2``
=====================================  ====================================================

diffusers keeps one timestep/class embedder *per block* (and the output layer reuses
block 0's). Writing, the single official embedder is copied into every block; reading, block
0's is used and all blocks must hold identical copies (as in every converted official
checkpoint), else :class:`~slimdiff.errors.UsageError` (:func:`untied_embedders` lists the
blocks that differ: a DiT trained in diffusers has its own embedder in every block, which our
DiT, with one shared embedder, cannot hold exactly).

Numerical conventions handled so outputs agree to float32 round-off (tested at 1e-5):

* **Timestep frequencies.** diffusers' ``Timesteps(downscale_freq_shift=1)`` divides the
  exponent by ``half - 1``; the official DiT divides by ``half``. :func:`diffusers_to_dit`
  copies the shift into ``DiTConfig.freq_shift`` (1 for any diffusers model), and
  :func:`dit_to_diffusers` sets ``time_proj.downscale_freq_shift = config.freq_shift`` on every
  block's embedder. That attribute is a *runtime* attribute: diffusers hard-codes 1 in
  ``CombinedTimestepLabelEmbeddings`` and ``save_pretrained`` does not store it, so a
  model converted from an official-convention DiT (``freq_shift=0``) and reloaded with
  ``from_pretrained`` gets diffusers' convention (a small change of the time embedding).
* **LayerNorm eps.** Official DiT uses 1e-6 everywhere. diffusers' ``norm1`` and ``norm_out``
  use 1e-6 too, but ``norm3`` uses ``config.norm_eps`` (default 1e-5), so
  :func:`dit_to_diffusers` builds with ``norm_eps=1e-6``. :func:`diffusers_to_dit` of a model
  with another ``norm_eps`` (the hub's ``facebook/DiT-*`` configs leave the 1e-5 default)
  sets that eps on each block's ``norm2`` instance to stay exact; ``DiTConfig`` has no field
  for it, so a reload through the slimdiff config returns to 1e-6.
* **Activation / positions / output.** Both use tanh-GELU, the same MAE 2-D sin-cos table
  (copied anyway) and the same unpatchify; a learned sigma is ``out_channels = 2 C`` with
  epsilon first in both, so ``out_channels`` is simply carried over.
* **Null class.** diffusers' label table always has ``num_classes + 1`` rows (its class
  dropout is fixed at 0.1). A DiT built with ``class_dropout_prob=0`` has no null row; the
  converted model gets an all-zero one.

Width-pruned models: our DiT blocks may be narrower than the residual width (fewer/narrower
heads, narrower MLP). diffusers' config cannot express that (its residual width *is*
``num_attention_heads * attention_head_dim`` and its MLP is always 4x), so the converted
model is built from the unpruned config and its projections are replaced by narrower
``nn.Linear`` layers with ``attn.heads`` set accordingly -- the same state torch-pruning
leaves a diffusers model in. It runs and converts back exactly, but ``save_pretrained``
output of such a model does not reload with ``from_pretrained``; save it with slimdiff.
All blocks must then share one width (one head count, head width and MLP width, mirroring
diffusers' single ``num_attention_heads``/``attention_head_dim``), else ``UsageError``.
The other direction accepts any per-block widths.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from diffusers import DiTTransformer2DModel

from slimdiff.errors import UsageError
from slimdiff.models.dit import DiT, Mlp
from slimdiff.models.dit import Attention as DiTAttention
from slimdiff.result import record_of, set_record

__all__ = ["dit_to_diffusers", "diffusers_to_dit", "untied_embedders"]


# --------------------------------------------------------------------------- helpers
@torch.no_grad()
def _copy(dst: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Copy ``weight``/``bias`` into a Linear/Conv2d/Embedding, checking shapes."""
    if dst.weight.shape != weight.shape:
        raise UsageError(
            f"cannot convert: shape {tuple(weight.shape)} does not fit {type(dst).__name__} "
            f"{tuple(dst.weight.shape)}; the model's structure is not a DiT the converter understands"
        )
    dst.weight.copy_(weight)
    if bias is not None or getattr(dst, "bias", None) is not None:
        if bias is None or dst.bias is None:
            raise UsageError("cannot convert: a layer has a bias on one side only; DiT layers all use biases")
        dst.bias.copy_(bias)


def _block_widths_dit(block) -> tuple[int, int, int]:
    """(heads, head_dim, mlp_hidden) of one of our DiT blocks."""
    heads = block.attn.num_heads
    inner = block.attn.qkv.out_features // 3
    if block.attn.qkv.out_features % 3 or inner % heads:
        raise UsageError(
            f"attention width {block.attn.qkv.out_features} does not split into q/k/v x {heads} heads; "
            "run slimdiff.models.backbone.sync_attention_heads after pruning"
        )
    return heads, inner // heads, block.mlp.fc1.out_features


def _block_widths_diffusers(block) -> tuple[int, int, int]:
    """(heads, head_dim, mlp_hidden) of one diffusers DiT block."""
    attn = block.attn1
    inner = attn.to_q.out_features
    if attn.to_k.out_features != inner or attn.to_v.out_features != inner:
        raise UsageError("cannot convert: to_q, to_k and to_v have different widths; our DiT needs them equal")
    if inner % attn.heads:
        raise UsageError(
            f"attention width {inner} is not divisible by attn.heads={attn.heads}; "
            "run slimdiff.models.backbone.sync_attention_heads after pruning"
        )
    return attn.heads, inner // attn.heads, block.ff.net[0].proj.out_features


def _carry_over(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give ``dst`` the device, dtype, train/eval mode and slimdiff metadata of ``src``."""
    p = next(src.parameters())
    if p.device != torch.device("cpu"):
        dst = dst.to(device=p.device)
    if p.dtype != torch.float32:  # built in float32; only cast when needed (diffusers warns on .to)
        dst = dst.to(dtype=p.dtype)
    dst.train(src.training)
    if hasattr(src, "slimdiff_meta"):  # the record travels with the weights
        set_record(dst, copy.deepcopy(record_of(src)))
    return dst


# --------------------------------------------------------------------------- ours -> diffusers
@torch.no_grad()
def dit_to_diffusers(model: DiT) -> DiTTransformer2DModel:
    """Convert our :class:`DiT` to an equivalent diffusers ``DiTTransformer2DModel``.

    Call it as ``out = converted(x, timestep=t, class_labels=y).sample``; the output equals
    ``model(x, t, y)``. Depth-pruned models convert to fewer layers; width-pruned models
    convert when all blocks share one width (see the module docs for the caveat).
    """
    if not isinstance(model, DiT):
        raise UsageError(f"dit_to_diffusers expects a slimdiff DiT, got {type(model).__name__}")
    cfg = model.config
    hidden = model.x_embedder.proj.out_channels
    if hidden % cfg.num_heads:
        raise UsageError(f"hidden size {hidden} is not divisible by num_heads={cfg.num_heads}")
    if len(model.blocks) == 0:
        raise UsageError("cannot convert a DiT with no blocks")
    widths = {_block_widths_dit(b) for b in model.blocks}
    if len(widths) != 1:
        raise UsageError(
            f"blocks have different widths {sorted(widths)} (heads, head_dim, mlp); diffusers' "
            "DiTTransformer2DModel has one width for all blocks: keep the model in slimdiff's DiT"
        )
    heads, head_dim, mlp_hidden = widths.pop()

    out = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=hidden // cfg.num_heads,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        num_layers=len(model.blocks),
        dropout=0.0,
        norm_num_groups=1,
        attention_bias=True,
        sample_size=model.x_embedder.grid_size * model.patch_size,
        patch_size=model.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=cfg.num_classes,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    # Narrow the diffusers blocks when ours are width-pruned (or use mlp_ratio != 4).
    if heads * head_dim != hidden or mlp_hidden != 4 * hidden:
        from slimdiff.models.backbone import sync_attention_heads

        for blk in out.transformer_blocks:
            a = blk.attn1
            a.to_q, a.to_k, a.to_v = (nn.Linear(hidden, heads * head_dim) for _ in range(3))
            a.to_out[0] = nn.Linear(heads * head_dim, hidden)
            blk.ff.net[0].proj = nn.Linear(hidden, mlp_hidden)
            blk.ff.net[2] = nn.Linear(mlp_hidden, hidden)
        sync_attention_heads(out, {blk.attn1: heads for blk in out.transformer_blocks})

    _copy(out.pos_embed.proj, model.x_embedder.proj.weight, model.x_embedder.proj.bias)
    out.pos_embed.pos_embed.copy_(model.pos_embed)

    table = model.y_embedder.embedding_table.weight
    for i, (src, dst) in enumerate(zip(model.blocks, out.transformer_blocks)):
        emb = dst.norm1.emb
        emb.time_proj.downscale_freq_shift = cfg.freq_shift
        _copy(emb.timestep_embedder.linear_1, model.t_embedder.mlp[0].weight, model.t_embedder.mlp[0].bias)
        _copy(emb.timestep_embedder.linear_2, model.t_embedder.mlp[2].weight, model.t_embedder.mlp[2].bias)
        dst_table = emb.class_embedder.embedding_table.weight
        if table.shape[0] == dst_table.shape[0] - 1:  # trained without a null class
            dst_table.zero_()
            dst_table[: table.shape[0]].copy_(table)
        else:
            _copy(emb.class_embedder.embedding_table, table)
        q, k, v = src.attn.qkv.weight.chunk(3, dim=0)
        qb, kb, vb = src.attn.qkv.bias.chunk(3, dim=0)
        _copy(dst.attn1.to_q, q, qb)
        _copy(dst.attn1.to_k, k, kb)
        _copy(dst.attn1.to_v, v, vb)
        _copy(dst.attn1.to_out[0], src.attn.proj.weight, src.attn.proj.bias)
        _copy(dst.ff.net[0].proj, src.mlp.fc1.weight, src.mlp.fc1.bias)
        _copy(dst.ff.net[2], src.mlp.fc2.weight, src.mlp.fc2.bias)
        _copy(dst.norm1.linear, src.adaLN_modulation[1].weight, src.adaLN_modulation[1].bias)
        dst.norm3.eps = src.norm2.eps
        dst.norm1.norm.eps = src.norm1.eps

    fl = model.final_layer
    _copy(out.proj_out_1, fl.adaLN_modulation[1].weight, fl.adaLN_modulation[1].bias)
    _copy(out.proj_out_2, fl.linear.weight, fl.linear.bias)
    out.norm_out.eps = fl.norm_final.eps
    return _carry_over(model, out)


# --------------------------------------------------------------------------- diffusers -> ours
def untied_embedders(model: DiTTransformer2DModel) -> list[int]:
    """The blocks whose timestep/class embedder differs from block 0's (weights or frequency
    shift): none in a DiT converted from an official checkpoint (identical copies), every
    block in one trained in diffusers (each block trains its own)."""
    ref = model.transformer_blocks[0].norm1.emb
    ref_sd = ref.state_dict()

    def same(emb: nn.Module) -> bool:
        sd = emb.state_dict()
        return emb.time_proj.downscale_freq_shift == ref.time_proj.downscale_freq_shift and sd.keys() == ref_sd.keys() \
            and all(sd[k].shape == ref_sd[k].shape and torch.equal(sd[k], ref_sd[k]) for k in sd)

    return [i for i, blk in enumerate(model.transformer_blocks) if i and not same(blk.norm1.emb)]


def untied_message(untied: list[int], consequence: str) -> str:
    """Why per-block embedders stop ``consequence`` and what the user can do (one line)."""
    more = f" (and {len(untied) - 1} more blocks)" if len(untied) > 1 else ""
    return (f"transformer_blocks[{untied[0]}]{more} of this diffusers DiT has its own timestep/class embedder, not a "
            f"copy of block 0's (a DiT trained in diffusers; converted official checkpoints hold copies), so {consequence}; "
            "compress it with a method that keeps the diffusers model and all its embedders: diff-pruning, a depth "
            "method that keeps block 0 (oracle-depth --keep-blocks 0,..., first-depth), dipgo, deepcache-style or fewer-steps")


@torch.no_grad()
def diffusers_to_dit(model: DiTTransformer2DModel) -> DiT:
    """Convert a diffusers ``DiTTransformer2DModel`` to our :class:`DiT`.

    The result's ``forward(x, t, y)`` equals ``model(x, timestep=t, class_labels=y).sample``.
    Blocks narrowed by structural pruning (torch-pruning) become narrower DiT blocks; each
    block keeps its own width.
    """
    if not isinstance(model, DiTTransformer2DModel):
        raise UsageError(f"diffusers_to_dit expects a diffusers DiTTransformer2DModel, got {type(model).__name__}")
    c = model.config
    if c.norm_type != "ada_norm_zero" or c.norm_elementwise_affine:
        raise UsageError("only DiT models with norm_type='ada_norm_zero' and no norm affine parameters convert")
    if c.activation_fn != "gelu-approximate":
        raise UsageError(f"activation_fn={c.activation_fn!r} has no DiT equivalent (needs 'gelu-approximate')")
    if len(model.transformer_blocks) == 0:
        raise UsageError("cannot convert a DiT with no blocks")
    untied = untied_embedders(model)
    if untied:
        raise UsageError(untied_message(untied, "it cannot become slimdiff's DiT (one embedder shared by all blocks, "
                                                "what DyDiT routes) without changing its outputs"))
    emb0 = model.transformer_blocks[0].norm1.emb
    tp = emb0.time_proj
    if tp.num_channels != 256 or not tp.flip_sin_to_cos or tp.scale != 1:
        raise UsageError("the timestep projection differs from DiT's (256 channels, cos first, scale 1)")
    if tp.downscale_freq_shift not in (0, 1):
        raise UsageError(f"downscale_freq_shift={tp.downscale_freq_shift} has no DiT equivalent (0 or 1)")

    hidden = model.pos_embed.proj.out_channels
    in_ch, out_ch = c.in_channels, model.out_channels
    if out_ch not in (in_ch, 2 * in_ch):
        raise UsageError(f"out_channels={out_ch} must be in_channels ({in_ch}) or 2x (learned sigma)")
    dropout = emb0.class_embedder.dropout_prob
    ours = DiT(
        input_size=c.sample_size,
        patch_size=c.patch_size,
        in_channels=in_ch,
        hidden_size=hidden,
        depth=len(model.transformer_blocks),
        num_heads=c.num_attention_heads,
        mlp_ratio=4.0,
        class_dropout_prob=dropout,
        num_classes=emb0.class_embedder.num_classes,
        learn_sigma=out_ch == 2 * in_ch,
        freq_shift=int(tp.downscale_freq_shift),
    )

    _copy(ours.x_embedder.proj, model.pos_embed.proj.weight, model.pos_embed.proj.bias)
    ours.pos_embed.copy_(model.pos_embed.pos_embed)
    _copy(ours.t_embedder.mlp[0], emb0.timestep_embedder.linear_1.weight, emb0.timestep_embedder.linear_1.bias)
    _copy(ours.t_embedder.mlp[2], emb0.timestep_embedder.linear_2.weight, emb0.timestep_embedder.linear_2.bias)
    _copy(ours.y_embedder.embedding_table, emb0.class_embedder.embedding_table.weight)

    for src, dst in zip(model.transformer_blocks, ours.blocks):
        heads, head_dim, mlp_hidden = _block_widths_diffusers(src)
        if heads * head_dim != dst.attn.qkv.out_features // 3 or heads != dst.attn.num_heads:
            dst.attn = DiTAttention(hidden, heads, head_dim)
        if mlp_hidden != dst.mlp.fc1.out_features:
            dst.mlp = Mlp(hidden, mlp_hidden)
        a = src.attn1
        _copy(
            dst.attn.qkv,
            torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight]),
            torch.cat([a.to_q.bias, a.to_k.bias, a.to_v.bias]),
        )
        _copy(dst.attn.proj, a.to_out[0].weight, a.to_out[0].bias)
        _copy(dst.mlp.fc1, src.ff.net[0].proj.weight, src.ff.net[0].proj.bias)
        _copy(dst.mlp.fc2, src.ff.net[2].weight, src.ff.net[2].bias)
        _copy(dst.adaLN_modulation[1], src.norm1.linear.weight, src.norm1.linear.bias)
        dst.norm1.eps = src.norm1.norm.eps
        dst.norm2.eps = src.norm3.eps  # config.norm_eps: a runtime attribute on our side

    fl = ours.final_layer
    _copy(fl.adaLN_modulation[1], model.proj_out_1.weight, model.proj_out_1.bias)
    _copy(fl.linear, model.proj_out_2.weight, model.proj_out_2.bias)
    fl.norm_final.eps = model.norm_out.eps
    return _carry_over(model, ours)
