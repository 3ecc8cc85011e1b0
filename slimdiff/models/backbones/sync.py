"""Attribute fix-up after structural pruning: :func:`sync_attention_heads` (re-exported by
:mod:`slimdiff.models.backbone`).

torch-pruning changes weight shapes but not the attributes forwards read (attention head
counts, diffusers' derived attention widths, Down/Upsample channel counts).
"""
from __future__ import annotations

from typing import Mapping

import torch.nn as nn
from diffusers.models.attention_processor import Attention as DiffusersAttention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D

from slimdiff.errors import UsageError
from slimdiff.models.dit import Attention as DiTAttention

__all__ = ["sync_attention_heads"]


def _lookup(heads: Mapping, name: str, *keys: nn.Module) -> int | None:
    for k in keys:
        if k in heads:
            return int(heads[k])
    return int(heads[name]) if name in heads else None


def sync_attention_heads(module: nn.Module, heads: Mapping[nn.Module | str, int] | None = None) -> list[str]:
    """Make attribute state consistent with the weight shapes after structural pruning.

    torch-pruning changes weight shapes but not the attributes forwards read:

    * ``heads`` maps attention modules to their new head counts. A key may be a diffusers
      ``Attention`` or its ``to_q``/``to_k``/``to_v`` Linear (torch-pruning's
      ``pruner.num_heads`` is keyed that way), our DiT's ``Attention`` or its ``qkv`` Linear,
      or a qualified module name. Listed modules get ``heads`` (ours: ``num_heads``) set,
      diffusers' derived attributes (``inner_dim``, ``scale``, ...) updated. Every attention
      is then checked: a width not divisible by its head count raises ``UsageError``.
    * ``Downsample2D``/``Upsample2D`` get ``channels``/``out_channels`` from their conv
      (their forward asserts ``x.shape[1] == channels``). Conv-less (pooling/interpolation)
      samplers are left alone.

    Returns the qualified names of the modules it changed.
    """
    heads = heads or {}
    changed: list[str] = []
    for name, m in module.named_modules():
        if isinstance(m, DiffusersAttention):
            n = _lookup(heads, name, m, m.to_q, m.to_k, m.to_v)
            inner = m.to_q.out_features
            if n is not None and n != m.heads:
                m.heads = n
                m.sliceable_head_dim = n
                changed.append(name)
            if inner % m.heads or m.to_k.out_features % m.heads:
                raise UsageError(
                    f"{name}: attention width {inner} is not divisible by {m.heads} heads; "
                    "pass the pruned head counts (e.g. pruner.num_heads) to sync_attention_heads"
                )
            if m.inner_dim != inner:
                m.inner_dim, m.inner_kv_dim = inner, m.to_k.out_features
                changed.append(name)
            m.query_dim = m.to_q.in_features
            m.out_dim = m.to_out[0].out_features
            if m.scale_qk:
                m.scale = (inner // m.heads) ** -0.5
        elif isinstance(m, DiTAttention):
            n = _lookup(heads, name, m, m.qkv)
            if n is not None and n != m.num_heads:
                m.num_heads = n
                changed.append(name)
            if m.qkv.out_features % (3 * m.num_heads):
                raise UsageError(
                    f"{name}: qkv width {m.qkv.out_features} does not split into q/k/v x {m.num_heads} heads; "
                    "pass the pruned head counts to sync_attention_heads"
                )
        elif isinstance(m, (Downsample2D, Upsample2D)):
            conv = getattr(m, "conv", None) or getattr(m, "Conv2d_0", None)
            if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
                if (m.channels, m.out_channels) != (conv.in_channels, conv.out_channels):
                    m.channels, m.out_channels = conv.in_channels, conv.out_channels
                    changed.append(name)
    return list(dict.fromkeys(changed))
