"""DyDiT execution on diffusers ``PixArtTransformer2DModel`` (PixArt-alpha / PixArt-sigma).

Registered with :func:`slimdiff.runtime.routed.register_routed` on import (the routing core
imports this module when it looks an architecture up), so :func:`~slimdiff.runtime.routing.apply_dydit`,
the routers, gates, routes, sliced-weight cache, per-step tables, hooks and the cost model are
the ones of our DiT; where PixArt keeps things is the
:class:`~slimdiff.models.backbones.diffusers.PixArtBackbone`'s answer, and this module only
runs its block on a route.

Where PixArt differs from DiT, and what we do about it:

* **Block.** A ``BasicTransformerBlock`` with ``norm_type="ada_norm_single"``: self-attention
  (``attn1``) -> **cross-attention to the caption** (``attn2``, no norm, ungated) -> feed-forward
  (``ff``: ``GELU(proj)`` -> ``Linear``), each with a residual; the adaLN shift/scale/gate come
  from the model's one shared ``adaln_single`` (``timestep`` argument, ``(B, 6D)``) plus the
  block's ``scale_shift_table``. The routing's block hook runs :func:`masked_forward` /
  :func:`sliced_forward` for a route, the block's own diffusers forward without one.
* **What is routed.** The head router gates ``attn1``'s heads (rows of ``to_q``/``to_k``/
  ``to_v`` and columns of ``to_out[0]``), the channel-group router the ``ff`` hidden channels
  (rows of ``ff.net[0].proj``, columns of ``ff.net[2]``), the token router (on the tokens
  entering the feed-forward, i.e. after cross-attention) skips the feed-forward for a token.
  **Cross-attention always runs** on every token with all heads: it is the only place the
  caption enters, and DyDiT's routers see the timestep, not the text.
* **Router input.** PixArt's timestep embedding ``adaln_single.emb`` (the "embedded
  timestep"). With ``use_additional_conditions`` that embedding also holds resolution and
  aspect-ratio terms; the routers then read its timestep part only
  (``adaln_single.emb.timestep_embedder``), so width stays a function of ``t`` alone and the
  per-step tables stay valid at every resolution.
* **Inference really skips work**, exactly as for DiT: eval decisions are executed with the
  kept heads'/groups' weights sliced once per (block, decision) and cached; the feed-forward
  runs on the gathered kept tokens only (``index_select`` -> FF -> ``index_add``), per sample,
  found by :class:`~slimdiff.runtime.routed.TokenSelect` (sync-free on CUDA). Training uses
  masks on the full-width computation (masks are for training only).
* **Refused** (``UsageError``): at install, q/k norms, GEGLU feed-forwards, chunked
  feed-forward, GLIGEN fusers; at call, a self-attention mask or ``cross_attention_kwargs``
  -- none is used by PixArt, and the routed forwards would not compute them. The caption
  mask (``encoder_attention_mask``) is supported: it only enters cross-attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel
from diffusers.models.activations import GELU
from diffusers.models.attention import BasicTransformerBlock

from slimdiff.errors import UsageError
from slimdiff.runtime.routed import (
    MaskRoute,
    RoutedForwards,
    SlicePlan,
    TokenSelect,
    hard_gate,
    register_routed,
    select_tokens,
)


def _modulation(block: BasicTransformerBlock, timestep: torch.Tensor, batch: int) -> tuple[torch.Tensor, ...]:
    """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each ``(B, 1, D)``: diffusers' arithmetic."""
    return (block.scale_shift_table[None] + timestep.reshape(batch, 6, -1)).chunk(6, dim=1)


def _heads_view(t: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)


def masked_forward(block: BasicTransformerBlock, route: MaskRoute, x: torch.Tensor, ehs: torch.Tensor | None,
                   emask: torch.Tensor | None, timestep: torch.Tensor) -> torch.Tensor:
    """The PixArt block with head, channel-group and token masks (full width computed: training only).

    Calls the block's own Linear modules (so LoRA-wrapped layers train) and follows diffusers'
    ``BasicTransformerBlock`` + ``AttnProcessor2_0`` op by op, so all-on masks are bit-exact.
    """
    B = x.shape[0]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(block, timestep, B)
    attn = block.attn1
    h = block.norm1(x) * (1 + scale_msa) + shift_msa
    H = attn.heads
    q, k, v = (_heads_view(lin(h), B, H) for lin in (attn.to_q, attn.to_k, attn.to_v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    out = out * route.heads[:, :, None, None].to(out.dtype)
    out = out.transpose(1, 2).reshape(B, -1, out.shape[1] * out.shape[-1]).to(q.dtype)
    x = gate_msa * attn.to_out[1](attn.to_out[0](out)) + x
    if block.attn2 is not None:
        x = block.attn2(x, encoder_hidden_states=ehs, attention_mask=emask) + x
    net = block.ff.net
    hidden = net[0](block.norm2(x) * (1 + scale_mlp) + shift_mlp)
    G = route.groups.shape[1]
    N = x.shape[1]
    hidden = (hidden.reshape(B, N, G, -1) * route.groups[:, None, :, None].to(hidden.dtype)).reshape(B, N, -1)
    for layer in net[1:]:
        hidden = layer(hidden)
    if route.token is not None:
        keep = hard_gate(route.token(x).squeeze(-1).float(), route.tau, route.noise)
        route.kept_tokens = keep.sum(1)
        hidden = hidden * keep.unsqueeze(-1).to(hidden.dtype)
    return gate_mlp * hidden + x


def sliced_forward(block: BasicTransformerBlock, plan: SlicePlan, token: TokenSelect | None, x: torch.Tensor,
                   ehs: torch.Tensor | None, emask: torch.Tensor | None,
                   timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The PixArt block on the kept heads/groups only, the feed-forward on the kept tokens only.

    Returns the output and the ``(B, N)`` bool map of tokens that ran the feed-forward.
    """
    B, N, D = x.shape
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(block, timestep, B)
    qw, qb, kw, kb, vw, vb, ow, ob = plan.attn
    attn, heads = block.attn1, len(plan.heads)
    h = block.norm1(x) * (1 + scale_msa) + shift_msa
    q, k, v = (_heads_view(F.linear(h, w, b), B, heads) for w, b in ((qw, qb), (kw, kb), (vw, vb)))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(B, -1, out.shape[1] * out.shape[-1]).to(q.dtype)
    x = gate_msa * attn.to_out[1](F.linear(out, ow, ob)) + x
    if block.attn2 is not None:
        x = block.attn2(x, encoder_hidden_states=ehs, attention_mask=emask) + x
    w1, b1, w2, b2 = plan.mlp
    net = block.ff.net

    def ff(inp: torch.Tensor) -> torch.Tensor:
        out = F.linear(net[1](net[0].gelu(F.linear(inp, w1, b1))), w2, b2)
        for layer in net[3:]:
            out = layer(out)
        return out

    keep, rows, factor = select_tokens(token, x)
    if rows is None:
        m = ff(block.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return gate_mlp * TokenSelect.zero_unkept(m, factor) + x, keep
    flat = x.reshape(B * N, D)
    sample = torch.div(rows, N, rounding_mode="floor")
    h = block.norm2(flat.index_select(0, rows)) * (1 + scale_mlp[:, 0].index_select(0, sample)) \
        + shift_mlp[:, 0].index_select(0, sample)
    m = TokenSelect.zero_unkept(ff(h), factor)
    # x is this block's own fresh tensor: scatter in place (no copy) unless autograd may need it
    scatter = flat.index_add if torch.is_grad_enabled() else flat.index_add_
    return scatter(0, rows, gate_mlp[:, 0].index_select(0, sample) * m).reshape(B, N, D), keep


@register_routed(PixArtTransformer2DModel)
class PixArtForwards(RoutedForwards):
    """diffusers PixArt's routed ``BasicTransformerBlock`` (``attn1`` heads, ``ff`` groups)."""

    @classmethod
    def check(cls, model):
        for i, b in enumerate(model.transformer_blocks):
            a = b.attn1
            problems = [name for name, bad in (
                ("norm_type != ada_norm_single", getattr(b, "norm_type", None) != "ada_norm_single"),
                ("only_cross_attention", b.only_cross_attention), ("positional embeddings", b.pos_embed is not None),
                ("chunked feed-forward", b._chunk_size is not None), ("GLIGEN fuser", hasattr(b, "fuser")),
                ("feed-forward activation other than GELU", not isinstance(b.ff.net[0], GELU)),
                ("q/k norms or group/spatial norm", any(getattr(a, n, None) is not None
                                                        for n in ("norm_q", "norm_k", "group_norm", "spatial_norm"))),
                ("residual connection / output rescale in attn1", a.residual_connection or a.rescale_output_factor != 1.0),
                ("unequal q/k/v widths", len({a.to_q.out_features, a.to_k.out_features, a.to_v.out_features}) != 1),
            ) if bad]
            if problems:
                raise UsageError(f"DyDiT cannot route PixArt block {i}: {', '.join(problems)}")

    @classmethod
    def route_args(cls, block, hidden_states, attention_mask=None, encoder_hidden_states=None,
                   encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
                   added_cond_kwargs=None):
        """``BasicTransformerBlock.forward``'s arguments -> ``(x, ehs, emask, timestep)``."""
        if attention_mask is not None or cross_attention_kwargs:
            raise UsageError("DyDiT routing on PixArt supports neither a self-attention mask nor cross_attention_kwargs; "
                             "pass the caption mask as encoder_attention_mask")
        return hidden_states, encoder_hidden_states, encoder_attention_mask, timestep

    @classmethod
    def masked(cls, block, route, x, ehs, emask, timestep):
        return masked_forward(block, route, x, ehs, emask, timestep)

    @classmethod
    def sliced(cls, block, plan, token, x, ehs, emask, timestep):
        return sliced_forward(block, plan, token, x, ehs, emask, timestep)


__all__ = ["PixArtForwards", "masked_forward", "sliced_forward"]
