"""DyDiT execution on our :class:`~slimdiff.models.dit.DiT` (a diffusers DiT is converted to it
exactly by the method rather than given an adapter of its own).

Registered with :func:`slimdiff.runtime.routed.register_routed` on import (the routing core
imports this module when it looks an architecture up). What is routed: per block the
attention heads (rows of ``attn.qkv`` per head, columns of ``attn.proj``), the MLP channel
groups (rows of ``mlp.fc1``, columns of ``mlp.fc2``) and, per token, the MLP (the token
router reads the residual stream after attention). The routers read ``t_embedder(t)``, never
the class embedding, so width depends on ``t`` only. Where those layers are is the
:class:`~slimdiff.models.backbones.dit.DiTBackbone`'s answer; this module holds the routed
block forwards only.

Eval runs only the kept heads/groups (weights sliced once per (block, decision) by the core's
cache) and the MLP on the gathered kept tokens (``index_select`` -> MLP -> ``index_add``), per
sample; training multiplies masks into a full-width computation that follows
:class:`~slimdiff.models.dit.DiTBlock` op by op, so all-on masks are bit-exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from slimdiff.models.dit import DiT, DiTBlock, gated_residual, modulate
from slimdiff.runtime.routed import (
    MaskRoute,
    RoutedForwards,
    SlicePlan,
    TokenSelect,
    hard_gate,
    register_routed,
    select_tokens,
)


def _attention(x: torch.Tensor, qkv_w, qkv_b, heads: int) -> torch.Tensor:
    """Multi-head attention core on ``heads`` heads; returns ``(B, heads, N, hd)``."""
    B, N, _ = x.shape
    qkv = F.linear(x, qkv_w, qkv_b).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])


def masked_forward(block: DiTBlock, x: torch.Tensor, c: torch.Tensor, route: MaskRoute) -> torch.Tensor:
    """The DiT block with head, group and token masks (full width is computed: training only)."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.modulation(c)
    attn, mlp = block.attn, block.mlp
    B, N, _ = x.shape
    h = modulate(block.norm1(x), shift_msa, scale_msa)
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]) * route.heads[:, :, None, None].to(x.dtype)
    x = gated_residual(x, gate_msa, attn.proj(out.transpose(1, 2).reshape(B, N, -1)))
    hidden = mlp.act(mlp.fc1(modulate(block.norm2(x), shift_mlp, scale_mlp)))
    G = route.groups.shape[1]
    hidden = (hidden.reshape(B, N, G, -1) * route.groups[:, None, :, None].to(x.dtype)).reshape(B, N, -1)
    m = mlp.fc2(hidden)
    if route.token is not None:
        keep = hard_gate(route.token(x).squeeze(-1).float(), route.tau, route.noise)
        route.kept_tokens = keep.sum(1)
        m = m * keep.unsqueeze(-1).to(x.dtype)
    return gated_residual(x, gate_mlp, m)


def sliced_forward(block: DiTBlock, x: torch.Tensor, c: torch.Tensor, plan: SlicePlan,
                   token: TokenSelect | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The DiT block on the kept heads/groups only, the MLP on the kept tokens only.

    Returns the output and the ``(B, N)`` bool map of tokens that ran the MLP.
    """
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.modulation(c)
    qkv_w, qkv_b, proj_w, proj_b = plan.attn
    B, N, D = x.shape
    out = _attention(modulate(block.norm1(x), shift_msa, scale_msa), qkv_w, qkv_b, len(plan.heads))
    x = gated_residual(x, gate_msa, F.linear(out.transpose(1, 2).reshape(B, N, -1), proj_w, proj_b))
    fc1_w, fc1_b, fc2_w, fc2_b = plan.mlp
    act = block.mlp.act
    keep, rows, factor = select_tokens(token, x)
    if rows is None:
        m = F.linear(act(F.linear(modulate(block.norm2(x), shift_mlp, scale_mlp), fc1_w, fc1_b)), fc2_w, fc2_b)
        return gated_residual(x, gate_mlp, TokenSelect.zero_unkept(m, factor)), keep
    flat = x.reshape(B * N, D)
    sample = torch.div(rows, N, rounding_mode="floor")
    h = torch.addcmul(shift_mlp.index_select(0, sample), block.norm2(flat.index_select(0, rows)),
                      (1 + scale_mlp).index_select(0, sample))
    m = TokenSelect.zero_unkept(F.linear(act(F.linear(h, fc1_w, fc1_b)), fc2_w, fc2_b), factor)
    # x is this block's own fresh tensor: scatter in place (no copy) unless autograd may need it
    scatter = flat.index_add if torch.is_grad_enabled() else flat.index_add_
    return scatter(0, rows, gate_mlp.index_select(0, sample) * m).reshape(B, N, D), keep


@register_routed(DiT)
class DiTForwards(RoutedForwards):
    """Our DiT's routed blocks: ``forward(x, c)`` with ``c`` the adaLN condition."""

    @classmethod
    def route_args(cls, block, x, c):
        return x, c

    @classmethod
    def masked(cls, block, route, x, c):
        return masked_forward(block, x, c, route)

    @classmethod
    def sliced(cls, block, plan, token, x, c):
        return sliced_forward(block, x, c, plan, token)


__all__ = ["DiTForwards", "masked_forward", "sliced_forward"]
