"""The Backbone view: one way to see and call every supported denoiser, and the one place
that knows each architecture.

A :class:`Backbone` is a *thin view* over a model: it holds a reference to the module, never
copies weights, and computes everything (blocks, widths, names) live from the module, so it
stays right after a method removes blocks or narrows layers in place. It calls every model
the same way -- ``bb(x, t, cond)`` returns the prediction with exactly ``in_channels``
channels (learned-sigma channels are dropped) -- and answers every per-architecture question
the compression machinery and the runtime ask, so they never look at a model's class:

=====================  ======================================================================
question               Backbone API
=====================  ======================================================================
blocks                 :attr:`~Backbone.blocks`, :attr:`~Backbone.block_names`,
                       :meth:`~Backbone.set_blocks`, :meth:`~Backbone.can_drop_block`,
                       :meth:`~Backbone.block_input` / :meth:`~Backbone.block_output`
timestep embedding     :attr:`~Backbone.time_embedding`, :attr:`~Backbone.time_embedding_part`,
                       :attr:`~Backbone.time_embedding_dim`, :meth:`~Backbone.embed_timesteps`,
                       :meth:`~Backbone.timestep_argument`
heads and MLPs         :meth:`~Backbone.attention_layout` (an :class:`AttentionLayout`: q/k/v
                       and output projections, head count, per-head MACs), :meth:`~Backbone.mlp`
                       (:class:`MlpLayers`), :meth:`~Backbone.heads`, :meth:`~Backbone.mlp_width`,
                       :attr:`~Backbone.token_grid`, :meth:`~Backbone.attention_mlp_names`
width pruning          :meth:`~Backbone.attention_layouts` (every attention of the model),
                       :meth:`~Backbone.mlp_inputs`, :meth:`~Backbone.width_prunable_layers`
block reuse            :attr:`~Backbone.reuse_mode`, :meth:`~Backbone.reuse_units`,
                       :meth:`~Backbone.block_readers`
=====================  ======================================================================

Supported models, one adapter class per type in :mod:`slimdiff.models.backbones`, registered
in :data:`BACKBONES` and found by ``isinstance`` (the most specific registered class in the
module's MRO wins, so subclasses of a supported model work):

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
  Block *reuse* works on coarser units (``down_blocks.i``, ``mid_block``, ``up_blocks.i``).
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

**Adding a backbone** is one subclass of :class:`Backbone` (or of
:class:`~slimdiff.models.backbones.diffusers.DiffusersBackbone` for a diffusers model)
decorated with ``@register_backbone(ModelClass)``; see the class docstring for what it fills
in. DyDiT additionally needs the architecture's routed block forwards
(:class:`slimdiff.runtime.routed.RoutedForwards`), and only if DyDiT should support it.

Re-exported here: the conditions (:class:`TextCondition`, :func:`cat_conditions`,
:func:`text_inputs`, from :mod:`slimdiff.models.conditions`) and :func:`sync_attention_heads`
(from :mod:`slimdiff.models.backbones.sync`), the attribute fix-up after structural pruning.
(About 500 lines: the base class is the one list of questions every adapter answers.)
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn as nn

from slimdiff.errors import UsageError
from slimdiff.models.conditions import TextCondition, cat_conditions, text_inputs

__all__ = [
    "Backbone", "BACKBONES", "TextCondition", "AttentionLayout", "MlpLayers", "as_backbone", "register_backbone",
    "sync_attention_heads", "cat_conditions", "text_inputs",
]


# --------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class AttentionLayout:
    """Where one attention module keeps its heads: the layers width pruning narrows and DyDiT's
    head routing slices (per head: rows of the q/k/v projections, columns of the output one).

    ``qkv`` is ``(qkv,)`` for a fused projection whose rows are ``[q; k; v]``, each
    ``heads x head_dim`` (our DiT, timm's layout), or ``(to_q, to_k, to_v)`` (diffusers).
    """

    module: nn.Module
    qkv: tuple[nn.Linear, ...]
    out: nn.Linear
    heads: int

    @property
    def fused(self) -> bool:
        return len(self.qkv) == 1

    @property
    def head_dim(self) -> int:
        return self.qkv[0].out_features // (self.heads * (3 if self.fused else 1))

    def head_macs(self, tokens: int) -> int:
        """MACs of one head of self-attention on ``tokens`` tokens: its q/k/v rows, ``QK^T``,
        ``AV`` and its columns of the output projection."""
        hd = self.head_dim
        return tokens * hd * (3 * self.qkv[0].in_features + self.out.out_features) + 2 * tokens * tokens * hd


class MlpLayers(NamedTuple):
    """A block's MLP: ``fc2(act(fc1(x)))``; ``fc1.out_features`` is its hidden width."""

    fc1: nn.Linear
    fc2: nn.Linear

    def group_token_macs(self, groups: int) -> int:
        """MACs on one token of one of ``groups`` equal channel groups of the hidden layer
        (its rows of ``fc1`` and columns of ``fc2``)."""
        return (self.fc1.in_features + self.fc2.out_features) * self.fc1.out_features // groups


# --------------------------------------------------------------------------- registry
BACKBONES: dict[type, type["Backbone"]] = {}
"""Model class -> Backbone adapter class (the registry :func:`as_backbone` consults)."""


def register_backbone(model_cls: type) -> Callable[[type["Backbone"]], type["Backbone"]]:
    """Class decorator: register a :class:`Backbone` subclass as the adapter of ``model_cls``."""

    def deco(adapter: type[Backbone]) -> type[Backbone]:
        BACKBONES[model_cls] = adapter
        return adapter

    return deco


NULL_PROMPT = "_slimdiff_null_prompt"
"""Module attribute holding a text model's encoded empty prompt (:meth:`Backbone.null_prompt`): a
runtime cache, private so that saving skips it (it is encoded again from the pipeline)."""


def set_null_prompt(model: nn.Module, prompt: TextCondition | None) -> None:
    """Guide the text model ``model`` with ``prompt`` (the empty prompt encoded by its pipeline's
    text encoder, one row: ``Encoders.encode_prompts([""])``); None: with zero embeddings."""
    if prompt is not None and (not isinstance(prompt, TextCondition) or len(prompt) != 1):
        raise UsageError("the null prompt is one encoded caption: a TextCondition of one row "
                         "(slimdiff.data.encode.load_encoders(folder).encode_prompts(['']))")
    model.__dict__[NULL_PROMPT] = prompt


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
    """Uniform view of a denoiser. Subclasses fill in the model-specific parts:

    * always: ``kind``, ``conditioning`` (``_text_dim()`` for text models), ``_named_blocks()``,
      ``_forward(x, t, cond)``, :attr:`time_embedding` and ``_time_projection()`` (or
      :attr:`time_embedding_dim` and :meth:`embed_timesteps`), ``_attention_layout(module)``
      (which modules are attentions); :attr:`timestep_name` when the forward's timestep
      argument is not ``timestep``;
    * transformers (``is_transformer = True``): :meth:`block_attention`, :meth:`block_mlp`,
      ``_patch_size()``, and ``_blocks_attr`` + ``_set_depth(n)`` for :meth:`set_blocks`;
    * UNet-like models: ``reuse_mode = "output"``, :meth:`reuse_units`, :meth:`block_readers`
      and :meth:`width_prunable_layers`;
    * where the defaults do not fit: :attr:`in_channels` / :attr:`sample_size` (read from a
      diffusers-style ``config``), :attr:`num_classes`, :attr:`time_embedding_part`,
      :meth:`can_drop_block` with :attr:`drop_refusal`, and :meth:`block_input` /
      :meth:`block_output` / :meth:`with_block_output` for blocks called another way.

    The rest (calling, conditions, example inputs, widths, costs, names) is derived here.
    """

    kind: str = ""
    is_transformer: bool = False
    conditioning: str | None = None  # "class", "text" or None
    text_len: int = 8
    """Tokens of example text conditions (and so of the captions MACs are counted at): the
    pipeline's own caption length when the model records one (loaded from a pipeline folder:
    ``slimdiff_meta["pipeline"]["text_len"]``, PixArt-alpha 120, SD 77), else 8."""
    timestep_name: str = "timestep"  # the timestep argument of the module's forward
    reuse_mode: str = "residual"
    """How a reuse unit is reused (:mod:`slimdiff.runtime.reuse`): ``"residual"`` (its
    contribution ``output - input`` is added to the current input) or ``"output"`` (its
    cached output is returned, tuples of skip features included)."""
    drop_refusal: str = "this block cannot be removed"
    """Why :meth:`can_drop_block` refuses a block (the error message of depth pruning)."""
    _blocks_attr: str | None = None  # the module attribute holding the blocks (transformers)

    def __init__(self, module: nn.Module):
        self.module = module
        recorded = ((getattr(module, "slimdiff_meta", None) or {}).get("pipeline") or {}).get("text_len")
        if recorded:
            self.text_len = int(recorded)

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

    # ---- timestep embedding
    @property
    def time_embedding(self) -> nn.Module:
        """The module whose output is the ``(N, D)`` timestep embedding (what a hook sees of every
        model call's timesteps; a diffusers DiT calls it twice per call)."""
        raise NotImplementedError

    @property
    def time_embedding_part(self) -> nn.Module | None:
        """The submodule of :attr:`time_embedding` whose output is the embedding of ``t`` alone,
        when :attr:`time_embedding` also mixes in other conditions (PixArt's resolution and
        aspect ratio); None when its output depends on ``t`` only."""
        return None

    def _time_projection(self) -> tuple[nn.Module, nn.Module]:
        """``(projection, mlp)`` with ``mlp(projection(t))`` the t-only embedding (diffusers'
        ``Timesteps`` + ``TimestepEmbedding``)."""
        raise NotImplementedError

    @property
    def time_embedding_dim(self) -> int:
        """Width ``D`` of the t-only timestep embedding."""
        return int(self._time_projection()[1].linear_2.out_features)

    def embed_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The t-only embedding ``(N, D)`` of timesteps ``t``, computed with the class forwards,
        so hooks on :attr:`time_embedding` (or its part) do not run."""
        proj, mlp = self._time_projection()
        return type(mlp).forward(mlp, proj(t).to(mlp.linear_1.weight.dtype))

    def timestep_argument(self) -> tuple[int, str]:
        """``(position, name)`` of the timestep among the arguments of the module's forward
        (position counted without ``self``): how a hook on the model finds it."""
        params = list(inspect.signature(type(self.module).forward).parameters)[1:]
        if self.timestep_name not in params:
            raise UsageError(f"{type(self.module).__name__}.forward has no {self.timestep_name!r} argument: "
                             "block reuse cannot follow steps")
        return params.index(self.timestep_name), self.timestep_name

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

    def set_blocks(self, blocks: Sequence[nn.Module]) -> nn.ModuleList:
        """Make ``blocks`` the model's blocks (where :attr:`blocks` reads them; an
        ``nn.ModuleList`` is installed as is) and set the config's depth to their number;
        returns the ``nn.ModuleList`` it replaced. ``UsageError`` for UNets (their blocks are
        not one list)."""
        if self._blocks_attr is None:
            raise UsageError(f"the blocks of a {self.kind} model are not one list and cannot be replaced; "
                             "depth pruning removes transformer blocks")
        new = blocks if isinstance(blocks, nn.ModuleList) else nn.ModuleList(blocks)
        old = getattr(self.module, self._blocks_attr)
        setattr(self.module, self._blocks_attr, new)
        self._set_depth(len(new))
        return old

    def _set_depth(self, n: int) -> None:
        raise NotImplementedError

    def can_drop_block(self, i: int) -> bool:
        """Whether block ``i`` can be removed, the rest of the model unchanged (never for UNets;
        see :attr:`drop_refusal` for the reason when not)."""
        return self._blocks_attr is not None

    @staticmethod
    def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
        """The hidden states a block (or reuse unit) is called with, from its call's arguments."""
        return args[0] if args else kwargs["hidden_states"]

    @staticmethod
    def block_output(output: Any) -> torch.Tensor:
        """The hidden states a block returns (diffusers blocks may return a tuple led by them)."""
        return output[0] if isinstance(output, tuple) else output

    @staticmethod
    def with_block_output(output: Any, hidden: torch.Tensor) -> Any:
        """``output`` with its hidden states (:meth:`block_output`) replaced by ``hidden``."""
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    # ---- heads and MLPs
    @classmethod
    def _transformer_only(cls, what: str) -> None:
        if not cls.is_transformer:
            raise UsageError(f"{what} is defined for transformer backbones only; this is a {cls.kind} model")

    @classmethod
    def _attention_layout(cls, module: nn.Module) -> AttentionLayout | None:
        """The :class:`AttentionLayout` of ``module`` if it is an attention of this architecture."""
        return None

    @classmethod
    def block_attention(cls, block: nn.Module) -> AttentionLayout:
        """The self-attention of one of this architecture's blocks (a block module, not an index:
        the runtime asks per block)."""
        raise NotImplementedError

    @classmethod
    def block_mlp(cls, block: nn.Module) -> MlpLayers:
        """The MLP of one of this architecture's blocks."""
        raise NotImplementedError

    def attention_layout(self, i: int) -> AttentionLayout:
        """The self-attention of block ``i``: projections, head count, per-head MACs."""
        self._transformer_only("attention_layout(i)")
        return self.block_attention(self.blocks[i])

    def attention(self, i: int) -> nn.Module:
        """The self-attention module of block ``i``."""
        self._transformer_only("attention(i)")
        return self.attention_layout(i).module

    def mlp(self, i: int) -> MlpLayers:
        """The (fc_in, fc_out) Linear pair of block ``i``'s MLP."""
        self._transformer_only("mlp(i)")
        return self.block_mlp(self.blocks[i])

    def heads(self, i: int) -> int:
        """Number of attention heads of block ``i``."""
        self._transformer_only("heads(i)")
        return self.attention_layout(i).heads

    def mlp_width(self, i: int) -> int:
        """Hidden width of block ``i``'s MLP."""
        return self.mlp(i).fc1.out_features

    @property
    def token_grid(self) -> tuple[int, int]:
        """(h, w) tokens of a transformer at :attr:`sample_size`."""
        self._transformer_only("token_grid")
        g = self.sample_size // self._patch_size()
        return (g, g)

    def _patch_size(self) -> int:
        raise NotImplementedError

    def attention_mlp_names(self) -> list[str]:
        """Qualified names of every block's self-attention projections (q/k/v, output) and MLP
        layers, block by block: the layers DyDiT routes (and LoRA-tunes with ``tune="lora"``)."""
        names = {id(m): n for n, m in self.module.named_modules()}
        out = []
        for i in range(len(self.blocks)):
            attn = self.attention_layout(i)
            out += [names[id(layer)] for layer in (*attn.qkv, attn.out, *self.mlp(i))]
        return out

    # ---- width pruning
    def attention_layouts(self) -> list[AttentionLayout]:
        """Every attention module of the model (self- and cross-attention, inside the blocks or
        not), in ``modules()`` order."""
        layouts = (self._attention_layout(m) for m in self.module.modules())
        return [a for a in layouts if a is not None]

    def mlp_inputs(self) -> list[nn.Linear]:
        """The first layer of every block's MLP, in block order."""
        return [self.mlp(i).fc1 for i in range(len(self.blocks))]

    def width_prunable_layers(self) -> list[nn.Module]:
        """The layers whose output channels width pruning may remove. Transformers: the q/k/v
        projections of every attention inside the blocks and the MLP inputs; the residual width
        and every embedder stay whole (the residual group is coupled to a ``pos_embed`` buffer
        and adaLN chunks)."""
        self._transformer_only("width_prunable_layers()")
        inside = {id(m) for blk in self.blocks for m in blk.modules()}
        qkv = [layer for a in self.attention_layouts() if id(a.module) in inside for layer in a.qkv]
        return qkv + self.mlp_inputs()

    # ---- block reuse
    def reuse_units(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of the units block reuse computes or reuses, in execution order
        (transformers: the blocks)."""
        return self._named_blocks()

    def block_readers(self) -> dict[str, list[str]] | None:
        """For each reuse unit, the units that read its output (``"output"``: the model's
        output); None when every unit only feeds the next (the residual stream of a transformer)."""
        return None

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
            prompt = self.null_prompt()
            if prompt is not None:
                if cond is not None and tuple(cond.shape[1:]) != tuple(prompt.shape[1:]):
                    raise UsageError(f"the captions have shape {tuple(cond.shape[1:])} but the pipeline's empty prompt "
                                     f"encodes to {tuple(prompt.shape[1:])}: encode the captions with the same pipeline "
                                     "(--data prompts:FILE or images:DIR)")
                where = cond if cond is not None else self
                mask = None if prompt.mask is None else prompt.mask.expand(batch, -1).to(where.device)
                return TextCondition(prompt.embeds.expand(batch, -1, -1).to(where.device, where.dtype), mask)
            if cond is not None:
                # zeros: also for a masked TextCondition (every attended caption token is then the
                # same vector, so the mask cannot change the result and is dropped)
                return torch.zeros((batch, *cond.shape[1:]), dtype=cond.dtype, device=cond.device)
            return torch.zeros((batch, self.text_len, self._text_dim()), dtype=self.dtype, device=self.device)
        raise UsageError(f"this {self.kind} model is unconditional: there is no null condition for guidance")

    def null_prompt(self) -> TextCondition | None:
        """The empty prompt as the model's pipeline encodes it (one row), the unconditional input
        diffusers' pipelines guide with: set by :func:`set_null_prompt`, else encoded once with the
        text encoder of the pipeline folder the model was loaded from and kept on the module;
        None (zero embeddings) when there is none (a model without a pipeline text encoder)."""
        if NULL_PROMPT not in self.module.__dict__:
            from slimdiff.data.encode import encode_null_prompt

            set_null_prompt(self.module, encode_null_prompt(self.module))
        return self.module.__dict__[NULL_PROMPT]

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


# The adapters register themselves on import (they subclass Backbone, defined above); this
# order is the registry's, i.e. the order of the "slimdiff supports: ..." message.
from slimdiff.models.backbones.dit import DiTBackbone  # noqa: E402, I001
from slimdiff.models.backbones.diffusers import (  # noqa: E402
    DiffusersBackbone,
    DiffusersDiTBackbone,
    DiffusersTransformerBackbone,
    PixArtBackbone,
)
from slimdiff.models.backbones.unet import UNet2DBackbone, UNet2DConditionBackbone, UNetBackbone  # noqa: E402
from slimdiff.models.backbones.sync import sync_attention_heads  # noqa: E402

__all__ += ["DiTBackbone", "DiffusersBackbone", "DiffusersTransformerBackbone", "DiffusersDiTBackbone",
            "PixArtBackbone", "UNetBackbone", "UNet2DBackbone", "UNet2DConditionBackbone"]
