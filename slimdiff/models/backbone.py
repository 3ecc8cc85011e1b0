"""The Backbone view: one way to see and call every supported denoiser.

A :class:`Backbone` is a *thin view* over a model: it holds a reference to the module, never
copies weights, and computes everything (blocks, widths, names) live from the module, so it
stays right after a method removes blocks or narrows layers in place. It tells a
compression method what it may cut (blocks, heads, MLP channels, tokens) and where the time
embedding is, and calls every model the same way: ``bb(x, t, cond)`` returns the prediction
with exactly ``in_channels`` channels (learned-sigma channels are dropped).

Supported models, one small adapter class per type, registered in :data:`BACKBONES` and
found by ``isinstance`` (the most specific registered class in the module's MRO wins, so
subclasses of a supported model work):

================  ===================================  =============  ==================
``kind``          model                                ``cond``       ``blocks``
================  ===================================  =============  ==================
``dit``           :class:`slimdiff.models.dit.DiT`     class labels   ``blocks[i]``
``diffusers-dit`` ``DiTTransformer2DModel``            class labels   ``transformer_blocks[i]``
``pixart``        ``PixArtTransformer2DModel``         text embeds    ``transformer_blocks[i]``
``unet2d``        ``UNet2DModel``                      labels / None  resnets + attentions
``unet2d-condition`` ``UNet2DConditionModel``          text embeds    resnets + transformers
================  ===================================  =============  ==================

Conventions worth knowing:

* **UNet blocks** are the individual resnet and attention (or ``Transformer2DModel``)
  modules in execution order through ``down_blocks``, ``mid_block``, ``up_blocks``;
  down/up samplers are not blocks. UNets have no uniform heads/MLP widths, so ``heads``,
  ``mlp_width``, ``attention``, ``mlp`` and ``token_grid`` raise ``UsageError`` for them.
* **Null class.** DiT models keep the classifier-free-guidance null class as label
  ``num_classes`` (the extra row of the label table). A class-conditional ``UNet2DModel``
  has no such row of its own, so slimdiff reads ``num_class_embeds = num_classes + 1`` with
  the last row as the null class: ``num_classes = num_class_embeds - 1``.
* **Text models** get ``cond`` = text-encoder hidden states ``(N, L, D)``, or a
  :class:`TextCondition` (the same plus its ``(N, L)`` attention mask, 1 = attend: padded
  captions, as pre-encoded caption files carry them); the width ``D`` must be the model's
  (PixArt ``caption_channels``, UNet ``cross_attention_dim``), else ``UsageError``. The null
  condition is all zeros (slimdiff ships no text encoder; a pipeline with a real one should
  pass the encoding of the empty prompt instead). ``example_cond`` uses ``L = 8`` tokens.
* **PixArt** with ``use_additional_conditions`` gets resolution ``8 x`` the latent size
  (the VAE factor) and aspect ratio 1; otherwise ``{"resolution": None, "aspect_ratio": None}``.

Also here: :func:`sync_attention_heads`, the attribute fix-up needed after structural
pruning (torch-pruning changes weight shapes but not the ``heads``/``channels`` attributes
that forwards read).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from diffusers import (
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.models.attention_processor import Attention as DiffusersAttention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D

from slimdiff.errors import UsageError
from slimdiff.models.dit import DiT
from slimdiff.models.dit import Attention as DiTAttention

__all__ = ["Backbone", "BACKBONES", "TextCondition", "as_backbone", "register_backbone", "sync_attention_heads"]


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

BACKBONES: dict[type, type["Backbone"]] = {}
"""Model class -> Backbone adapter class (the registry :func:`as_backbone` consults)."""


def register_backbone(model_cls: type) -> Callable[[type["Backbone"]], type["Backbone"]]:
    """Class decorator: register a :class:`Backbone` subclass as the adapter of ``model_cls``."""

    def deco(adapter: type[Backbone]) -> type[Backbone]:
        BACKBONES[model_cls] = adapter
        return adapter

    return deco


def as_backbone(module: Any) -> "Backbone":
    """The :class:`Backbone` view of ``module`` (a Backbone is returned unchanged)."""
    if isinstance(module, Backbone):
        return module
    for cls in type(module).__mro__:
        if cls in BACKBONES:
            return BACKBONES[cls](module)
    names = ", ".join(c.__name__ for c in BACKBONES)
    raise UsageError(f"unsupported model type {type(module).__name__}; slimdiff supports: {names}")


def _square(size: Any, what: str) -> int:
    """An int spatial size from an int or an (H, W) pair with H == W."""
    if isinstance(size, int):
        return size
    if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    raise UsageError(f"{what} sample_size={size!r}: slimdiff needs square inputs with a known size")


# --------------------------------------------------------------------------- base view
class Backbone:
    """Uniform view of a denoiser. Subclasses fill in the model-specific parts."""

    kind: str = ""
    is_transformer: bool = False
    conditioning: str | None = None  # "class", "text" or None
    text_len: int = 8  # tokens in example text conditions

    def __init__(self, module: nn.Module):
        self.module = module

    def __repr__(self) -> str:
        return f"Backbone(kind={self.kind!r}, blocks={len(self.blocks)}, module={type(self.module).__name__})"

    # ---- facts about the model
    @property
    def in_channels(self) -> int:
        return int(self.module.config.in_channels)

    @property
    def sample_size(self) -> int:
        """Spatial size H = W of the model's input."""
        return _square(self.module.config.sample_size, self.kind)

    @property
    def num_classes(self) -> int | None:
        """Number of real classes of a class-conditional model (the null class excluded)."""
        return None

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def time_embedding(self) -> nn.Module:
        """The module whose output is the ``(N, D)`` timestep embedding."""
        raise NotImplementedError

    # ---- blocks
    def _named_blocks(self) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

    @property
    def blocks(self) -> list[nn.Module]:
        """The repeated blocks, in execution order."""
        return [m for _, m in self._named_blocks()]

    @property
    def block_names(self) -> list[str]:
        """Qualified module names of :attr:`blocks` (as in ``module.named_modules()``)."""
        return [n for n, _ in self._named_blocks()]

    def _transformer_only(self, what: str) -> None:
        if not self.is_transformer:
            raise UsageError(f"{what} is defined for transformer backbones only; this is a {self.kind} model")

    def attention(self, i: int) -> nn.Module:
        """The self-attention module of block ``i``."""
        self._transformer_only("attention(i)")
        return self._attention(self.blocks[i])

    def mlp(self, i: int) -> tuple[nn.Linear, nn.Linear]:
        """The (fc_in, fc_out) Linear pair of block ``i``'s MLP."""
        self._transformer_only("mlp(i)")
        return self._mlp(self.blocks[i])

    def heads(self, i: int) -> int:
        """Number of attention heads of block ``i``."""
        self._transformer_only("heads(i)")
        return self._heads(self.attention(i))

    def mlp_width(self, i: int) -> int:
        """Hidden width of block ``i``'s MLP."""
        return self.mlp(i)[0].out_features

    @property
    def token_grid(self) -> tuple[int, int]:
        """(h, w) tokens of a transformer at :attr:`sample_size`."""
        self._transformer_only("token_grid")
        g = self.sample_size // self._patch_size()
        return (g, g)

    def _attention(self, block: nn.Module) -> nn.Module:
        return block.attn1

    def _mlp(self, block: nn.Module) -> tuple[nn.Linear, nn.Linear]:
        return block.ff.net[0].proj, block.ff.net[2]

    def _heads(self, attn: nn.Module) -> int:
        return int(attn.heads)

    def _patch_size(self) -> int:
        return int(self.module.config.patch_size)

    # ---- calling
    def _timesteps(self, t: Any, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0 or t.shape == (1,):
            return t.reshape(1).expand(batch)
        if t.shape != (batch,):
            raise UsageError(f"timesteps of shape {tuple(t.shape)} do not fit a batch of {batch}")
        return t

    def _check_cond(self, cond: Any) -> None:
        if self.conditioning is None and cond is not None:
            raise UsageError(f"this {self.kind} model is unconditional: pass cond=None")
        if self.conditioning is not None and cond is None:
            raise UsageError(
                f"this {self.kind} model is {self.conditioning}-conditional: pass cond "
                "(use bb.null_cond(None, batch) for the unconditional prediction)"
            )

    def __call__(self, x: torch.Tensor, t: Any, cond: Any = None) -> torch.Tensor:
        """Prediction for noisy input ``x`` at timesteps ``t``, with ``in_channels`` channels."""
        self._check_cond(cond)
        if self.conditioning == "text":
            self.check_text_width(cond)
        out = self._forward(x, self._timesteps(t, x.shape[0]), cond)
        return out[:, : self.in_channels]

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        raise NotImplementedError

    # ---- conditions and example inputs
    def null_cond(self, cond: Any, batch: int) -> torch.Tensor:
        """The unconditional input for classifier-free guidance, for ``batch`` samples."""
        if self.conditioning == "class":
            if not self._has_null_class():
                raise UsageError(f"this {self.kind} model has no null class (trained without label dropout): no CFG")
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=self.device)
        if self.conditioning == "text":
            if cond is not None:
                # zeros: also for a masked TextCondition (every attended caption token is then the
                # same vector, so the mask cannot change the result and is dropped)
                return torch.zeros((batch, *cond.shape[1:]), dtype=cond.dtype, device=cond.device)
            return torch.zeros((batch, self.text_len, self._text_dim()), dtype=self.dtype, device=self.device)
        raise UsageError(f"this {self.kind} model is unconditional: there is no null condition for guidance")

    def _has_null_class(self) -> bool:
        return True

    def _text_dim(self) -> int:
        raise NotImplementedError

    def check_text_width(self, cond: Any) -> None:
        """``UsageError`` unless ``cond`` holds ``(N, L, D)`` caption embeddings of the model's width ``D``."""
        embeds, mask = text_inputs(cond)
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
            raise UsageError(f"this {self.kind} model needs caption embeddings of shape (N, L, {self._text_dim()}) as cond, "
                             f"got {type(embeds).__name__} {tuple(getattr(embeds, 'shape', ()))}")
        if embeds.shape[-1] != self._text_dim():
            raise UsageError(f"caption embeddings have width {embeds.shape[-1]} but this {self.kind} model takes "
                             f"{self._text_dim()}: encode the captions with the model's own text encoder")
        if mask is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise UsageError(f"caption attention mask of shape {tuple(mask.shape)} does not fit embeddings "
                             f"{tuple(embeds.shape)}: it must be (N, L)")

    def example_cond(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """A valid random condition for ``batch`` samples (None for unconditional models)."""
        gdev = generator.device if generator is not None else "cpu"
        if self.conditioning == "class":
            y = torch.randint(0, self.num_classes, (batch,), generator=generator, device=gdev)
            return y.to(self.device)
        if self.conditioning == "text":
            e = torch.randn(batch, self.text_len, self._text_dim(), generator=generator, device=gdev)
            return e.to(device=self.device, dtype=self.dtype)
        return None

    def example_inputs(
        self, batch: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Random ``(x, t, cond)`` of the right shapes, with integer timesteps in [0, 1000)."""
        gdev = generator.device if generator is not None else "cpu"
        s = self.sample_size
        x = torch.randn(batch, self.in_channels, s, s, generator=generator, device=gdev)
        t = torch.randint(0, 1000, (batch,), generator=generator, device=gdev)
        cond = self.example_cond(batch, generator)
        return x.to(device=self.device, dtype=self.dtype), t.to(self.device), cond


# --------------------------------------------------------------------------- transformers
@register_backbone(DiT)
class DiTBackbone(Backbone):
    """Our paper-faithful DiT: class-conditional, ``forward(x, t, y)``."""

    kind = "dit"
    is_transformer = True
    conditioning = "class"

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

    def _named_blocks(self):
        return [(f"blocks.{i}", b) for i, b in enumerate(self.module.blocks)]

    def _attention(self, block):
        return block.attn

    def _mlp(self, block):
        return block.mlp.fc1, block.mlp.fc2

    def _heads(self, attn):
        return int(attn.num_heads)

    def _patch_size(self) -> int:
        return int(self.module.patch_size)

    def _forward(self, x, t, cond):
        return self.module(x, t, cond)


@register_backbone(DiTTransformer2DModel)
class DiffusersDiTBackbone(Backbone):
    """diffusers ``DiTTransformer2DModel`` (one timestep/class embedder per block)."""

    kind = "diffusers-dit"
    is_transformer = True
    conditioning = "class"

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

    def _named_blocks(self):
        return [(f"transformer_blocks.{i}", b) for i, b in enumerate(self.module.transformer_blocks)]

    def _forward(self, x, t, cond):
        return self.module(x, timestep=t, class_labels=cond).sample


@register_backbone(PixArtTransformer2DModel)
class PixArtBackbone(Backbone):
    """diffusers ``PixArtTransformer2DModel``: text cross-attention, adaLN-single."""

    kind = "pixart"
    is_transformer = True
    conditioning = "text"

    @property
    def time_embedding(self) -> nn.Module:
        return self.module.adaln_single.emb

    def _text_dim(self) -> int:
        return int(self.module.config.caption_channels or self.module.config.cross_attention_dim)

    def _named_blocks(self):
        return [(f"transformer_blocks.{i}", b) for i, b in enumerate(self.module.transformer_blocks)]

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


# --------------------------------------------------------------------------- UNets
def _unet_units(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Resnet and attention modules of a diffusers UNet in execution order."""
    units: list[tuple[str, nn.Module]] = []

    def updown(prefix: str, blk: nn.Module) -> None:
        attns = getattr(blk, "attentions", None) or []
        for j, res in enumerate(blk.resnets):
            units.append((f"{prefix}.resnets.{j}", res))
            if j < len(attns) and attns[j] is not None:
                units.append((f"{prefix}.attentions.{j}", attns[j]))

    for i, blk in enumerate(module.down_blocks):
        updown(f"down_blocks.{i}", blk)
    mid = getattr(module, "mid_block", None)
    if mid is not None:
        units.append(("mid_block.resnets.0", mid.resnets[0]))
        attns = getattr(mid, "attentions", None) or [None] * (len(mid.resnets) - 1)
        for j, (attn, res) in enumerate(zip(attns, mid.resnets[1:])):
            if attn is not None:
                units.append((f"mid_block.attentions.{j}", attn))
            units.append((f"mid_block.resnets.{j + 1}", res))
    for i, blk in enumerate(module.up_blocks):
        updown(f"up_blocks.{i}", blk)
    return units


class _UNetBackbone(Backbone):
    is_transformer = False

    @property
    def time_embedding(self) -> nn.Module:
        return self.module.time_embedding

    def _named_blocks(self):
        return _unet_units(self.module)


@register_backbone(UNet2DModel)
class UNet2DBackbone(_UNetBackbone):
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
class UNet2DConditionBackbone(_UNetBackbone):
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


# --------------------------------------------------------------------------- pruning fix-up
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
