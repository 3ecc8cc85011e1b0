"""Residual-width pruning of DiTs: torch-pruning keyword arguments that make the hidden size prunable.

Width pruning (:mod:`slimdiff.compression.width`) narrows attention and MLP inner widths only;
the hidden size ``D`` stays, so at MACs 0.5 a DiT keeps ~0.68 of its parameters and every
element-wise pass (adaLN modulation, norms, residual adds) stays at full width. With
:func:`pruner_kwargs` merged into torch-pruning's ``BasePruner`` call, the hidden size is
pruned too, as torch-pruning's ViT example (``examples/transformers/prune_timm_vit.py``) prunes
a ViT's embedding width: one channel group runs through the patch embedding, the position
table, every block's residual writers (attention output and MLP output projections), every
norm, the adaLN modulation chunks and the final layer's input. A second group is the
conditioning vector ``c = t_emb + y_emb`` (the timestep MLP, the class table and every adaLN
input), also ``D`` wide in the paper's DiT; a third is the timestep MLP's hidden layer. At one
ratio every ``D``-wide dimension of the model shrinks to the same width (different channels
per group). Only the output projection (``final_layer.linear``) keeps its outputs.

Two couplings torch-pruning's graph cannot express on its own (environment.md, "What never
gets pruned"):

* **The position table** is a fixed sin-cos *buffer* added to the patch embedding's output; the
  graph traces autograd, so it never sees it and pruning ``D`` broke the forward. The patch
  embedding module gets a customized pruner (:class:`_PatchEmbedPruner`) that removes the same
  channels from its conv and from the table.
* **adaLN modulation** layers map ``D`` to ``k D`` outputs (``k`` = 6 per block, 2 in the final
  layer) that are ``chunk``-ed into shift/scale/gate vectors. torch-pruning maps indices through
  the chunk correctly (``_SplitIndexMapping``: residual channel ``j`` -> rows ``i D + j`` of
  every chunk ``i``), but when it *starts* a group at such a layer it ranks its ``k D`` rows as
  if they were channels and removes the union of what they map to (measured: the group is
  then refused and nothing is pruned). :class:`_LinearPruner` therefore reports no output
  width for them, so they are never a group's root; they are pruned as members of the residual
  group, their rows counted in its importance like any linear layer's.

Which layer roots the residual group matters too: torch-pruning 1.6.1 names a local ranking
scope after the group's root layer, and an attention group is re-rooted at its output
projection (``_downstream_node_as_root_if_attention``); a residual group rooted at that same
projection shares the scope name and one of the two records silently overwrites the other.
In our DiT the graph reaches the last block's ``mlp.fc2`` first (the gated residual's last
operand), so the residual group is rooted there (a test checks it). diffusers'
``DiTTransformer2DModel`` reaches block 0's ``attn1.to_out.0`` first and loses its residual
group that way (measured), so it is converted to our DiT first (:func:`prunable`).

The pruned model is a plain, smaller module of the same class; :mod:`slimdiff.io` saves it (the
per-layer widths and the position table's shape are recorded as structure).
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from slimdiff.errors import UsageError

__all__ = ["SUPPORTED", "supports", "prunable", "pruner_kwargs", "hidden_widths"]

SUPPORTED = ("dit (slimdiff.models.dit.DiT)",)


def supports(model: nn.Module) -> bool:
    """Whether residual-width pruning takes ``model`` (directly, or converted by :func:`prunable`)."""
    from slimdiff.models.backbone import as_backbone

    bb = as_backbone(model)
    return bb.kind == "diffusers-dit" or hasattr(bb, "residual_width_layout")


def prunable(model: nn.Module) -> nn.Module:
    """``model`` as a model whose residual width can be pruned: a diffusers
    ``DiTTransformer2DModel`` becomes slimdiff's DiT (:func:`~slimdiff.models.convert.diffusers_to_dit`:
    the same outputs, its record kept; diffusers' own graph loses the residual group, see the
    module docs), which ``slimdiff.apply`` installs in a ``DiTPipeline``; any other unsupported
    model is a :class:`UsageError`."""
    from slimdiff.models.backbone import as_backbone

    if as_backbone(model).kind == "diffusers-dit":
        from slimdiff.models.convert import diffusers_to_dit

        model = diffusers_to_dit(model)
    _layout(model)
    return model


def _layout(model: nn.Module):
    """The Backbone's :meth:`residual_width_layout`, or a UsageError naming the supported models."""
    from slimdiff.models.backbone import as_backbone

    try:
        bb = as_backbone(model)
    except UsageError:
        bb = None
    get = getattr(bb, "residual_width_layout", None)
    if get is None:
        kind = bb.kind if bb is not None else type(model).__name__
        raise UsageError(f"residual-width pruning does not support {kind} models; supported: "
                         f"{', '.join(SUPPORTED)} (the width methods convert a diffusers DiT to it: prunable()); "
                         "prune inner widths only (residual off) for other models")
    return get()


def _pruners():
    """The two customized pruning functions (classes built lazily: torch-pruning is imported on use)."""
    import torch_pruning as tp
    from torch_pruning.pruner import function

    class LinearPruner(function.LinearPruner):
        """torch-pruning's linear pruner, except that ``not_roots`` report no output width, so no
        group starts at them. Its prune functions *are* torch-pruning's
        (``prune_linear_out_channels``/``_in_channels``): importance classes dispatch on them.
        Registered for ``nn.Linear``, it makes linear nodes "customized" in the graph, which only
        turns off torch-pruning's flatten->linear index mapping (a DiT has no such flatten)."""

        def __init__(self, not_roots: Sequence[nn.Module]):
            super().__init__()
            self.not_roots = {id(m) for m in not_roots}
            self.prune_out_channels = function.prune_linear_out_channels
            self.prune_in_channels = function.prune_linear_in_channels

        def get_out_channels(self, layer: nn.Linear) -> int | None:
            return None if id(layer) in self.not_roots else layer.out_features

    class PatchEmbedPruner(function.BasePruningFunc):
        """A patch embedding (conv ``proj``, optional ``norm``) and the position table added to its
        output (``tables[id(patch)] = (owner, buffer name)``): same channels removed from both."""

        def __init__(self, tables: dict[int, tuple[nn.Module, str]]):
            super().__init__()
            self.tables = tables

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            keep = sorted(set(range(layer.proj.out_channels)) - {int(i) for i in idxs})
            tp.prune_conv_out_channels(layer.proj, idxs)
            if isinstance(getattr(layer, "norm", None), nn.LayerNorm):
                tp.prune_layernorm_out_channels(layer.norm, idxs)
            owner, name = self.tables[id(layer)]
            table = getattr(owner, name)
            setattr(owner, name, table[..., keep].contiguous())  # stays a (persistent) buffer
            return layer

        def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            tp.prune_conv_in_channels(layer.proj, idxs)
            return layer

        def get_out_channels(self, layer: nn.Module) -> int:
            return layer.proj.out_channels

        def get_in_channels(self, layer: nn.Module) -> int:
            return layer.proj.in_channels

    return LinearPruner, PatchEmbedPruner


def pruner_kwargs(model: nn.Module) -> dict:
    """Keyword arguments for ``torch_pruning.pruner.BasePruner`` that make ``model``'s hidden size
    prunable (module docstring), to be merged into width pruning's call:

    * ``ignored_layers``: every linear/conv layer whose outputs must stay, replacing width
      pruning's default list: all but the Backbone's ``width_prunable_layers()`` (q/k/v, MLP
      inputs) and the ``residual_width_layout()`` layers (residual writers, embedders, adaLN);
    * ``customized_pruners``: the patch embedding + position table, and linear layers with the
      adaLN modulation layers excluded as group roots.

    Local ranking prunes every group at the same ratio, so all ``D``-wide dimensions keep the
    same width. Raises :class:`UsageError` for models other than :data:`SUPPORTED`.
    """
    from slimdiff.models.backbone import as_backbone

    layout = _layout(model)
    keep_prunable = {id(m) for m in as_backbone(model).width_prunable_layers()}
    keep_prunable |= {id(m) for m in layout.layers} | {id(m) for m in layout.chunked}
    keep_prunable |= {id(m) for m in layout.patch_embed.modules()}
    ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in keep_prunable]
    linear, patch = _pruners()
    return {
        "ignored_layers": ignored,
        "customized_pruners": {
            nn.Linear: linear(layout.chunked),
            type(layout.patch_embed): patch({id(layout.patch_embed): layout.position}),
        },
    }


def hidden_widths(model: nn.Module) -> dict[str, int]:
    """Every ``D``-wide dimension of ``model`` by name (``pos_embed``, the patch embedding's
    outputs, each residual writer's outputs, each adaLN chunk): equal everywhere in an unpruned
    or consistently residual-pruned DiT. Used to check a pruned model."""
    layout = _layout(model)
    owner, name = layout.position
    names = {id(m): n for n, m in model.named_modules()}
    widths = {f"{names[id(owner)] or '<model>'}.{name}": int(getattr(owner, name).shape[-1]),
              names[id(layout.patch_embed)]: int(layout.patch_embed.proj.out_channels)}
    for m in layout.layers:
        widths[names[id(m)]] = int(m.weight.shape[0])
    for m, k in zip(layout.chunked, layout.chunks):
        if m.out_features % k:
            raise ValueError(f"{names[id(m)]}: {m.out_features} outputs do not split into {k} chunks")
        widths[names[id(m)]] = m.out_features // k
    return widths
