"""The Backbone adapter of our paper-faithful :class:`~slimdiff.models.dit.DiT`."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn as nn

from slimdiff.models.backbone import AttentionLayout, Backbone, MlpLayers, register_backbone
from slimdiff.models.dit import DiT
from slimdiff.models.dit import Attention as DiTAttention

__all__ = ["DiTBackbone", "ResidualWidthLayout"]


class ResidualWidthLayout(NamedTuple):
    """Where a DiT's hidden size ``D`` lives, for residual-width pruning
    (:mod:`slimdiff.compression.residual_width`).

    ``layers``: linear/conv layers whose *outputs* are ``D`` wide (residual writers, embedders);
    ``chunked``: adaLN modulation layers whose outputs are ``chunks[i]`` chunks of ``D`` each;
    ``patch_embed``: the patch embedding (a ``proj`` conv; its outputs are ``D`` wide);
    ``position``: ``(owner module, buffer name)`` of the fixed position table added to the
    patch embedding's output (last dimension ``D``).
    """

    layers: list[nn.Module]
    chunked: list[nn.Linear]
    chunks: list[int]
    patch_embed: nn.Module
    position: tuple[nn.Module, str]


@register_backbone(DiT)
class DiTBackbone(Backbone):
    """Our DiT: class-conditional, ``forward(x, t, y)``; blocks ``blocks[i]`` with a fused
    ``attn.qkv`` / ``attn.proj`` self-attention and an ``mlp.fc1`` / ``mlp.fc2`` MLP; one
    timestep embedder ``t_embedder``."""

    kind = "dit"
    is_transformer = True
    conditioning = "class"
    timestep_name = "t"
    _blocks_attr = "blocks"

    @property
    def in_channels(self) -> int:
        return int(self.module.in_channels)

    @property
    def sample_size(self) -> int:
        m = self.module
        return m.x_embedder.grid_size * m.patch_size

    @property
    def num_classes(self) -> int:
        return int(self.module.y_embedder.num_classes)

    def _has_null_class(self) -> bool:
        return self.module.y_embedder.embedding_table.num_embeddings > self.num_classes

    @property
    def time_embedding(self) -> nn.Module:
        return self.module.t_embedder

    @property
    def time_embedding_dim(self) -> int:
        return self.module.t_embedder.mlp[2].out_features

    def embed_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.module.t_embedder
        freq = emb.timestep_embedding(t, emb.frequency_embedding_size, freq_shift=emb.freq_shift)
        return emb.mlp(freq.to(emb.mlp[0].weight.dtype))

    def _named_blocks(self):
        return [(f"blocks.{i}", b) for i, b in enumerate(self.module.blocks)]

    def _set_depth(self, n: int) -> None:
        self.module.config = dataclasses.replace(self.module.config, depth=n)

    @classmethod
    def _attention_layout(cls, module):
        if isinstance(module, DiTAttention):
            return AttentionLayout(module, (module.qkv,), module.proj, int(module.num_heads))
        return None

    @classmethod
    def block_attention(cls, block):
        return cls._attention_layout(block.attn)

    @classmethod
    def block_mlp(cls, block):
        return MlpLayers(block.mlp.fc1, block.mlp.fc2)

    def residual_width_layout(self) -> ResidualWidthLayout:
        """The hidden size's layers: every block's ``attn.proj`` and ``mlp.fc2`` (residual
        writers), the timestep MLP (``t_embedder.mlp.0`` and ``.2``: the conditioning width is
        ``D`` too), the 6-chunk adaLN layer of every block and the 2-chunk one of the final
        layer, the patch embedding ``x_embedder`` and the ``pos_embed`` buffer."""
        m = self.module
        writers = [layer for blk in m.blocks for layer in (blk.attn.proj, blk.mlp.fc2)]
        ada = [blk.adaLN_modulation[-1] for blk in m.blocks] + [m.final_layer.adaLN_modulation[-1]]
        return ResidualWidthLayout(
            layers=writers + [m.t_embedder.mlp[0], m.t_embedder.mlp[2]], chunked=ada,
            chunks=[6] * len(m.blocks) + [2], patch_embed=m.x_embedder, position=(m, "pos_embed"),
        )

    def _patch_size(self) -> int:
        return int(self.module.patch_size)

    def _forward(self, x, t, cond):
        return self.module(x, t, cond)
