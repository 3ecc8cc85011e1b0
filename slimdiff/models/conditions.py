"""The conditions a :class:`~slimdiff.models.backbone.Backbone` is called with: class labels
(plain tensors), caption embeddings, or caption embeddings with their padding mask
(:class:`TextCondition`). Re-exported by :mod:`slimdiff.models.backbone`."""
from __future__ import annotations

from typing import Any

import torch

from slimdiff.errors import UsageError

__all__ = ["TextCondition", "cat_conditions", "text_inputs"]


class TextCondition:
    """Caption embeddings ``embeds`` ``(N, L, D)`` with an optional attention ``mask`` ``(N, L)``
    (1/True = attend, 0 = padding): the condition of a text model when padding must be masked.

    Text adapters pass ``mask`` on as diffusers' ``encoder_attention_mask``. It quacks like the
    embeddings tensor where slimdiff needs it (``len``, ``shape``, ``dtype``, ``device``, ``to``)
    so code that only forwards a condition to the Backbone needs no change.
    """

    __slots__ = ("embeds", "mask")

    def __init__(self, embeds: torch.Tensor, mask: torch.Tensor | None = None):
        self.embeds, self.mask = embeds, mask

    def __len__(self) -> int:
        return len(self.embeds)

    def __repr__(self) -> str:
        return f"TextCondition(embeds={tuple(self.embeds.shape)}, mask={None if self.mask is None else tuple(self.mask.shape)})"

    shape = property(lambda self: self.embeds.shape)
    dtype = property(lambda self: self.embeds.dtype)
    device = property(lambda self: self.embeds.device)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "TextCondition":
        """Embeddings to ``device``/``dtype``; the mask to ``device`` only."""
        mask = None if self.mask is None else self.mask.to(device)
        return TextCondition(self.embeds.to(device=device, dtype=dtype), mask)

    @staticmethod
    def stack(items: list["TextCondition"]) -> "TextCondition":
        """One batch from per-sample conditions ``(L, D)`` / ``(L,)``."""
        masks = [it.mask for it in items]
        if any(m is None for m in masks) and not all(m is None for m in masks):
            raise UsageError("caption embeddings mix samples with and without an attention mask")
        return TextCondition(torch.stack([it.embeds for it in items]), None if masks[0] is None else torch.stack(masks))


def cat_conditions(conds: list[Any]) -> Any:
    """One batch from batches of conditions (labels, embeddings or :class:`TextCondition`);
    a part without a mask attends every token (e.g. the null captions of guidance)."""
    if not any(isinstance(c, TextCondition) for c in conds):
        return torch.cat(conds)
    masks = [c.mask for c in conds if isinstance(c, TextCondition) and c.mask is not None]
    embeds = torch.cat([c.embeds if isinstance(c, TextCondition) else c for c in conds])
    if not masks:
        return TextCondition(embeds)
    full = [c.mask if isinstance(c, TextCondition) and c.mask is not None
            else torch.ones(c.shape[:2], dtype=masks[0].dtype, device=masks[0].device) for c in conds]
    return TextCondition(embeds, torch.cat(full))


def text_inputs(cond: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(encoder_hidden_states, encoder_attention_mask or None)`` of a text condition."""
    if isinstance(cond, TextCondition):
        return cond.embeds, cond.mask
    return cond, None
