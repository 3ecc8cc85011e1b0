"""Backbone adapters of diffusers' UNets (``UNet2DModel``, ``UNet2DConditionModel``).

Their blocks are the resnet and attention modules in execution order; block reuse works on
the stages (``down_blocks.i``, ``mid_block``, ``up_blocks.i``) and follows the skip
connections (:meth:`UNetBackbone.block_readers`); width pruning may cut every conv/linear
channel group but the output convolution's.
"""
from __future__ import annotations

import torch.nn as nn
from diffusers import UNet2DConditionModel, UNet2DModel

from slimdiff.errors import UsageError
from slimdiff.models.backbone import register_backbone
from slimdiff.models.backbones.diffusers import DiffusersBackbone
from slimdiff.models.conditions import text_inputs

__all__ = ["UNetBackbone", "UNet2DBackbone", "UNet2DConditionBackbone"]


class UNetBackbone(DiffusersBackbone):
    """What both diffusers UNets share: blocks, stages, skip connections, time embedding."""

    is_transformer = False
    reuse_mode = "output"

    @property
    def time_embedding(self) -> nn.Module:
        return self.module.time_embedding

    def _time_projection(self):
        return self.module.time_proj, self.module.time_embedding

    def _named_blocks(self):
        units: list[tuple[str, nn.Module]] = []

        def updown(prefix: str, blk: nn.Module) -> None:
            attns = getattr(blk, "attentions", None) or []
            for j, res in enumerate(blk.resnets):
                units.append((f"{prefix}.resnets.{j}", res))
                if j < len(attns) and attns[j] is not None:
                    units.append((f"{prefix}.attentions.{j}", attns[j]))

        for i, blk in enumerate(self.module.down_blocks):
            updown(f"down_blocks.{i}", blk)
        mid = getattr(self.module, "mid_block", None)
        if mid is not None:
            units.append(("mid_block.resnets.0", mid.resnets[0]))
            attns = getattr(mid, "attentions", None) or [None] * (len(mid.resnets) - 1)
            for j, (attn, res) in enumerate(zip(attns, mid.resnets[1:])):
                if attn is not None:
                    units.append((f"mid_block.attentions.{j}", attn))
                units.append((f"mid_block.resnets.{j + 1}", res))
        for i, blk in enumerate(self.module.up_blocks):
            updown(f"up_blocks.{i}", blk)
        return units

    def width_prunable_layers(self) -> list[nn.Module]:
        """Every conv/linear layer but ``conv_out`` (GroupNorm groups and skip connections are
        handled by torch-pruning's dependency graph)."""
        return [m for m in self.module.modules()
                if isinstance(m, (nn.Linear, nn.Conv2d)) and m is not self.module.conv_out]

    def _stages(self) -> tuple[list[str], list[str], list[str]]:
        """Names of the down stages, the mid block (if any) and the up stages."""
        m = self.module
        downs = [f"down_blocks.{i}" for i in range(len(m.down_blocks))]
        mid = ["mid_block"] if getattr(m, "mid_block", None) is not None else []
        return downs, mid, [f"up_blocks.{i}" for i in range(len(m.up_blocks))]

    def reuse_units(self) -> list[tuple[str, nn.Module]]:
        """The stages ``down_blocks.i``, ``mid_block``, ``up_blocks.i`` (the granularity of DiP-GO's SD code)."""
        downs, mid, ups = self._stages()
        return [(n, self.module.get_submodule(n)) for n in downs + mid + ups]

    def block_readers(self) -> dict[str, list[str]]:
        """Down block ``i`` feeds the next down block (or the mid block) and, through its
        ``len(resnets) + downsamplers`` skip features, the up blocks that pop them from the end
        of the skip stack (``len(resnets)`` each) -- exactly diffusers' UNet forward."""
        m = self.module
        downs, mid, ups = self._stages()
        chain = downs + mid + ups
        readers: dict[str, list[str]] = {n: [chain[i + 1]] for i, n in enumerate(chain[:-1])}
        readers[chain[-1]] = ["output"]
        stack = ["conv_in"]
        for n, blk in zip(downs, m.down_blocks):
            stack += [n] * (len(blk.resnets) + (1 if getattr(blk, "downsamplers", None) else 0))
        for n, blk in zip(ups, m.up_blocks):
            for _ in range(len(blk.resnets)):
                producer = stack.pop()
                if producer != "conv_in" and n not in readers[producer]:
                    readers[producer].append(n)
        return readers


@register_backbone(UNet2DModel)
class UNet2DBackbone(UNetBackbone):
    """diffusers ``UNet2DModel``: unconditional, or class-conditional via ``num_class_embeds``
    (the last embedding row is the null class)."""

    kind = "unet2d"

    def __init__(self, module: nn.Module):
        super().__init__(module)
        ce = module.class_embedding
        if ce is not None and not isinstance(ce, nn.Embedding):
            raise UsageError(
                f"UNet2DModel with class_embed_type={module.config.class_embed_type!r} is not supported; "
                "use num_class_embeds (label embeddings) or no class conditioning"
            )

    @property
    def conditioning(self) -> str | None:  # type: ignore[override]
        return "class" if self.module.class_embedding is not None else None

    @property
    def num_classes(self) -> int | None:
        ce = self.module.class_embedding
        return None if ce is None else ce.num_embeddings - 1

    def _forward(self, x, t, cond):
        return self.module(x, t, class_labels=cond).sample


@register_backbone(UNet2DConditionModel)
class UNet2DConditionBackbone(UNetBackbone):
    """diffusers ``UNet2DConditionModel`` conditioned on text hidden states only."""

    kind = "unet2d-condition"
    conditioning = "text"

    def __init__(self, module: nn.Module):
        super().__init__(module)
        c = module.config
        if c.class_embed_type is not None or c.num_class_embeds is not None or c.addition_embed_type is not None:
            raise UsageError(
                "UNet2DConditionModel with class or added embeddings (class_embed_type, num_class_embeds, "
                "addition_embed_type, e.g. SDXL) is not supported; only text conditioning is"
            )

    def _text_dim(self) -> int:
        c = self.module.config
        if c.encoder_hid_dim is not None:
            return int(c.encoder_hid_dim)
        dim = c.cross_attention_dim
        if isinstance(dim, (tuple, list)):
            if len(set(dim)) != 1:
                raise UsageError(f"per-block cross_attention_dim {dim} is not supported")
            dim = dim[0]
        return int(dim)

    def _forward(self, x, t, cond):
        embeds, mask = text_inputs(cond)
        return self.module(x, t, encoder_hidden_states=embeds, encoder_attention_mask=mask).sample
