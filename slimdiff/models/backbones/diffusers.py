"""Backbone adapters of diffusers' transformers (``DiTTransformer2DModel``,
``PixArtTransformer2DModel``) and their common base :class:`DiffusersBackbone` (shared with
the UNets of :mod:`.unet`): diffusers ``Attention`` modules, ``Timesteps`` +
``TimestepEmbedding`` time embeddings."""
from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from diffusers.models.attention_processor import Attention as DiffusersAttention

from slimdiff.models.backbone import AttentionLayout, Backbone, MlpLayers, register_backbone
from slimdiff.models.conditions import text_inputs
from slimdiff.models.convert import untied_embedders, untied_message

__all__ = ["DiffusersBackbone", "DiffusersTransformerBackbone", "DiffusersDiTBackbone", "PixArtBackbone"]


class DiffusersBackbone(Backbone):
    """A diffusers model: its attentions are diffusers ``Attention`` (``to_q``/``to_k``/``to_v``,
    ``to_out[0]``, ``heads``); subclasses say where the time projection is."""

    @classmethod
    def _attention_layout(cls, module):
        if isinstance(module, DiffusersAttention):
            return AttentionLayout(module, (module.to_q, module.to_k, module.to_v), module.to_out[0], int(module.heads))
        return None


class DiffusersTransformerBackbone(DiffusersBackbone):
    """diffusers transformers: ``transformer_blocks[i]`` of ``BasicTransformerBlock`` (``attn1``
    self-attention, ``ff`` feed-forward), depth ``num_layers`` in the config."""

    is_transformer = True
    _blocks_attr = "transformer_blocks"

    def _named_blocks(self):
        return [(f"transformer_blocks.{i}", b) for i, b in enumerate(self.module.transformer_blocks)]

    def _set_depth(self, n: int) -> None:
        self.module.register_to_config(num_layers=n)

    @classmethod
    def block_attention(cls, block):
        return cls._attention_layout(block.attn1)

    @classmethod
    def block_mlp(cls, block):
        return MlpLayers(block.ff.net[0].proj, block.ff.net[2])

    def _patch_size(self) -> int:
        return int(self.module.config.patch_size)


@register_backbone(DiTTransformer2DModel)
class DiffusersDiTBackbone(DiffusersTransformerBackbone):
    """diffusers ``DiTTransformer2DModel`` (one timestep/class embedder per block)."""

    kind = "diffusers-dit"
    conditioning = "class"

    @property
    def drop_refusal(self) -> str:
        untied = untied_embedders(self.module)
        if not untied:
            return Backbone.drop_refusal
        return untied_message(untied, "block 0 cannot be removed: the output layer reads block 0's embedder, which no "
                                      "other block holds (diffusers' DiT has no place to keep it without the block)")

    @property
    def num_classes(self) -> int:
        return int(self.module.transformer_blocks[0].norm1.emb.class_embedder.num_classes)

    def _has_null_class(self) -> bool:
        table = self.module.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        return table.num_embeddings > self.num_classes

    @property
    def time_embedding(self) -> nn.Module:
        # Each block has its own copy; block 0's also feeds the output layer.
        return self.module.transformer_blocks[0].norm1.emb.timestep_embedder

    def _time_projection(self):
        emb = self.module.transformer_blocks[0].norm1.emb
        return emb.time_proj, emb.timestep_embedder

    def can_drop_block(self, i: int) -> bool:
        """Block 0 only when every block's timestep/class embedder equals block 0's (the
        output layer reads block 0's)."""
        return i != 0 or not untied_embedders(self.module)

    def _forward(self, x, t, cond):
        return self.module(x, timestep=t, class_labels=cond).sample


@register_backbone(PixArtTransformer2DModel)
class PixArtBackbone(DiffusersTransformerBackbone):
    """diffusers ``PixArtTransformer2DModel``: text cross-attention (``attn2``), adaLN-single."""

    kind = "pixart"
    conditioning = "text"

    @property
    def time_embedding(self) -> nn.Module:
        return self.module.adaln_single.emb

    @property
    def time_embedding_part(self) -> nn.Module | None:
        emb = self.module.adaln_single.emb
        return emb.timestep_embedder if emb.use_additional_conditions else None

    def _time_projection(self):
        emb = self.module.adaln_single.emb
        return emb.time_proj, emb.timestep_embedder

    def _text_dim(self) -> int:
        return int(self.module.config.caption_channels or self.module.config.cross_attention_dim)

    def _added_cond_kwargs(self, x: torch.Tensor) -> dict:
        if not self.module.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        n, _, h, w = x.shape
        res = torch.tensor([h * 8, w * 8], dtype=x.dtype, device=x.device).repeat(n, 1)
        ar = torch.tensor([h / w], dtype=x.dtype, device=x.device).repeat(n, 1)
        return {"resolution": res, "aspect_ratio": ar}

    def _forward(self, x, t, cond):
        embeds, mask = text_inputs(cond)
        return self.module(
            x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t,
            added_cond_kwargs=self._added_cond_kwargs(x),
        ).sample
