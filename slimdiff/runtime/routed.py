"""What a DyDiT-routed block receives, and what an architecture tells the routing.

The contract between the routing core (:mod:`slimdiff.runtime.routing`: routers, decisions,
tables, hooks) and the per-architecture block forwards (:mod:`slimdiff.runtime.dynamic_dit`,
:mod:`slimdiff.runtime.dynamic_pixart`), kept apart so that both import it and neither
imports the other:

* the **routes** one block call follows: :class:`MaskRoute` (training: masks on a
  full-width computation) and :class:`SliceRoute` (eval: per timestep group a
  :class:`SlicePlan` of kept heads/groups with their sliced weights, and a
  :class:`TokenSelect` that picks the tokens running the MLP);
* the helpers the forwards share (:func:`hard_gate`, :func:`select_tokens`,
  :func:`unit_index`, :func:`slice_groups`);
* the weight slicers (:func:`head_slicer`, :func:`group_slicer`) on the Backbone's
  :class:`~slimdiff.models.backbone.AttentionLayout` / :class:`~slimdiff.models.backbone.MlpLayers`;
* :class:`RoutedForwards`, an architecture's routed block forwards, and their registry
  (:data:`ROUTED`, :func:`register_routed`): a per-architecture module registers its forwards
  on import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from slimdiff.models.backbone import AttentionLayout, MlpLayers

CAPACITY_SLACK = 0.1  # capacity rows = largest kept fraction seen x (1 + slack), rounded up to 8


def hard_gate(logits: torch.Tensor, tau: float, noise: bool) -> torch.Tensor:
    """Straight-through Gumbel-sigmoid: value ``1[logits + noise > 0]``, gradient of ``sigmoid(./tau)``.

    The reference's ``_gumbel_sigmoid`` (DyDiT ``dynamic_model.py`` 18-47): ``noise`` is the
    difference of two Gumbel(0, 1) draws, i.e. logistic, added before dividing by ``tau``; its
    hard value ``sigmoid((logits + noise) / tau) > 0.5`` is the same as ``logits + noise > 0``.
    The value is exactly 0 or 1 (``hard + (soft - soft.detach())``), so all-on masks leave a
    forward bit-identical to the unmasked one.
    """
    if noise:
        u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        logits = logits + torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid(logits / tau)
    hard = (logits > 0).to(soft.dtype)
    return hard + (soft - soft.detach())


# --------------------------------------------------------------------------- routes
@dataclass
class MaskRoute:
    """Training-path route of one block for one call: per-sample masks on full-width compute."""

    heads: torch.Tensor  # (B, H) in {0, 1} with straight-through gradients
    groups: torch.Tensor  # (B, G)
    token: nn.Module | None  # the token router (logits per token)
    tau: float
    noise: bool
    kept_tokens: torch.Tensor | None = None  # (B,) differentiable count, set by the block

    def run(self, arch: type["RoutedForwards"], block: nn.Module, *args) -> torch.Tensor:
        return arch.masked(block, self, *args)


@dataclass
class SlicePlan:
    """Eval-path width decision of one block for one timestep, with its sliced weights."""

    heads: tuple[int, ...]
    groups: tuple[int, ...]
    attn: tuple[torch.Tensor, ...]  # the architecture's attention weights of the kept heads (last: out bias)
    mlp: tuple[torch.Tensor, ...]  # fc1 weight, fc1 bias, fc2 weight, fc2 bias


@dataclass
class TokenSelect:
    """Which tokens of one block call run the MLP (router score > 0), and how they are found.

    Exact path (``frac`` None): the kept rows by ``nonzero``, whose size depends on the data,
    so a GPU must report it to the host: a sync per block. Capacity path: a fixed number of
    rows, those with the highest router scores, sized from ``frac``, the largest kept fraction
    seen at this timestep and block. A gathered row that is not kept gets a 0 factor, so the
    block is exact whenever the kept rows fit; when they do not, ``overflow`` (a device flag,
    no sync) is set and the routing recomputes the model call on the exact path.
    """

    router: nn.Module
    frac: float | None = None
    overflow: torch.Tensor | None = None  # 0-d bool, shared by the blocks of one model call

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(keep, rows, factor)``: the ``(B, N)`` decision, the flat rows to gather (None: all)
        and the 0/1 factor of the gathered rows' MLP output (None: every gathered row is kept)."""
        scores = self.router(x).squeeze(-1)
        keep = scores > 0
        B, N = keep.shape
        if self.frac is None:
            rows = keep.reshape(-1).nonzero().squeeze(1)
            return keep, (None if rows.numel() == B * N else rows), None
        capacity = min(B * N, 8 * max(1, math.ceil(self.frac * (1 + CAPACITY_SLACK) * B * N / 8)))
        self.overflow.logical_or_(keep.sum() > capacity)
        if capacity == B * N:
            return keep, None, keep.unsqueeze(-1)
        top = scores.reshape(-1).topk(capacity, sorted=False)
        return keep, top.indices, (top.values > 0).unsqueeze(-1)

    @staticmethod
    def zero_unkept(m: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
        """The MLP output ``m`` with the rows ``factor`` marks as not kept set to 0 (a ``where``,
        not a product: a not-kept row the exact path never computes may overflow in fp16)."""
        return m if factor is None else torch.where(factor, m, m.new_zeros(()))


def select_tokens(token: TokenSelect | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                       torch.Tensor | None]:
    """:meth:`TokenSelect.__call__`, or every token when the block has no token router."""
    if token is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), None, None
    return token(x)


@dataclass
class SliceRoute:
    """Eval-path route of one block: sample groups (by timestep) and their plans."""

    parts: list[tuple[torch.Tensor | None, SlicePlan]]  # (sample indices or None = all, plan)
    token: TokenSelect | None
    kept_tokens: torch.Tensor | None = None  # (B,) realised kept-token counts
    keep_maps: torch.Tensor | None = None  # (B, N) bool: which tokens ran the MLP

    def run(self, arch: type["RoutedForwards"], block: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
        """``arch.sliced(block, plan, token, x, *args)`` per timestep group; every tensor argument
        with the batch as its first dimension (``c``, text states, masks) is split with ``x``."""
        if len(self.parts) == 1 and self.parts[0][0] is None:
            out, keep = arch.sliced(block, self.parts[0][1], self.token, x, *args)
            self._note(keep, x.shape[0], None)
            return out
        out, B = torch.empty_like(x), x.shape[0]
        for idx, plan in self.parts:
            sub = [a.index_select(0, idx) if isinstance(a, torch.Tensor) and a.ndim and a.shape[0] == B else a
                   for a in args]
            o, keep = arch.sliced(block, plan, self.token, x.index_select(0, idx), *sub)
            out.index_copy_(0, idx, o)
            self._note(keep, B, idx)
        return out

    def _note(self, keep: torch.Tensor, batch: int, idx: torch.Tensor | None) -> None:
        if self.kept_tokens is None:
            self.kept_tokens = torch.zeros(batch, dtype=torch.long, device=keep.device)
            self.keep_maps = torch.zeros(batch, keep.shape[1], dtype=torch.bool, device=keep.device)
        if idx is None:
            self.kept_tokens, self.keep_maps = keep.sum(1), keep
        else:
            self.kept_tokens[idx] = keep.sum(1)
            self.keep_maps[idx] = keep


# --------------------------------------------------------------------------- weight slicing
def unit_index(units: tuple[int, ...], size: int, device) -> torch.Tensor:
    """Channel indices of the kept ``units`` (heads or channel groups) of ``size`` channels each."""
    per = torch.arange(size, device=device)
    return torch.cat([u * size + per for u in units])


def slice_groups(fc1: nn.Linear, fc2: nn.Linear, groups: tuple[int, ...], G: int) -> tuple[torch.Tensor | None, ...]:
    """fc1 rows (and bias) and fc2 columns of the kept channel groups (the originals when all are kept)."""
    if len(groups) == G:
        return fc1.weight, fc1.bias, fc2.weight
    idx = unit_index(groups, fc1.out_features // G, fc1.weight.device)
    return (fc1.weight.detach().index_select(0, idx), None if fc1.bias is None else fc1.bias.detach().index_select(0, idx),
            fc2.weight.detach().index_select(1, idx))


def head_slicer(attn: AttentionLayout, heads: tuple[int, ...]) -> tuple:
    """``(source weights, make(), last bias)`` of the kept ``heads``' attention weights: ``make()``
    gives the rows of every q/k/v projection (a fused one: the kept heads' rows of q, of k and
    of v) with their biases, then the output projection's columns (the originals when all
    heads are kept); the output bias is passed through."""
    sources = (*(t for lin in attn.qkv for t in (lin.weight, lin.bias)), attn.out.weight)

    def make() -> tuple[torch.Tensor | None, ...]:
        if len(heads) == attn.heads:
            return sources
        cols = unit_index(heads, attn.head_dim, attn.out.weight.device)
        rows = torch.cat([p * attn.heads * attn.head_dim + cols for p in range(3)]) if attn.fused else cols
        sliced = []
        for lin in attn.qkv:
            sliced.append(lin.weight.detach().index_select(0, rows))
            sliced.append(None if lin.bias is None else lin.bias.detach().index_select(0, rows))
        return (*sliced, attn.out.weight.detach().index_select(1, cols))

    return sources, make, attn.out.bias


def group_slicer(mlp: MlpLayers, groups: tuple[int, ...], G: int) -> tuple:
    """``(source weights, make(), last bias)`` of the kept channel ``groups`` (of ``G``) of an MLP."""
    fc1, fc2 = mlp
    return (fc1.weight, fc1.bias, fc2.weight), lambda: slice_groups(fc1, fc2, groups, G), fc2.bias


# --------------------------------------------------------------------------- architectures
ROUTED: dict[type, type["RoutedForwards"]] = {}
"""Model class -> :class:`RoutedForwards` (what the routing consults; like ``BACKBONES``)."""


def register_routed(model_cls: type):
    """Class decorator: register a :class:`RoutedForwards` as DyDiT's block forwards for ``model_cls``."""

    def deco(forwards: type[RoutedForwards]) -> type[RoutedForwards]:
        ROUTED[model_cls] = forwards
        return forwards

    return deco


class RoutedForwards:
    """How DyDiT runs one architecture's block on a route: the routed forwards. The routers,
    gates, routes, weight cache, per-step tables, hooks and cost model are shared, and every
    per-model question (the blocks, the timestep embedding, the attention and MLP layouts, the
    per-unit MACs) is the :class:`~slimdiff.models.backbone.Backbone`'s; what is left is the
    forward of a block under a route (:meth:`route_args`, :meth:`masked`, :meth:`sliced`) and
    what it refuses (:meth:`check`). The architecture's ``Backbone.time_embedding`` must take
    the timesteps as its first argument (the routing reads them there). Stateless: every
    method is a classmethod."""

    @classmethod
    def check(cls, model: nn.Module) -> None:
        """Refuse (``UsageError``) a layout the routed forwards would not compute exactly."""

    @classmethod
    def route_args(cls, block: nn.Module, *args, **kwargs) -> tuple:
        """The block call's arguments as the routed forwards take them, ``(x, *rest)``;
        ``UsageError`` for arguments the routed forwards would not compute."""
        raise NotImplementedError

    @classmethod
    def masked(cls, block: nn.Module, route: MaskRoute, x: torch.Tensor, *rest) -> torch.Tensor:
        """The block with ``route``'s head, group and token masks (full width: training)."""
        raise NotImplementedError

    @classmethod
    def sliced(cls, block: nn.Module, plan: SlicePlan, token: TokenSelect | None, x: torch.Tensor,
               *rest) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on ``plan``'s kept heads/groups, the MLP on the tokens ``token`` keeps;
        returns the output and the ``(B, N)`` bool map of tokens that ran the MLP."""
        raise NotImplementedError


__all__ = ["hard_gate", "MaskRoute", "SlicePlan", "TokenSelect", "select_tokens", "SliceRoute", "unit_index",
           "slice_groups", "head_slicer", "group_slicer", "RoutedForwards", "ROUTED", "register_routed",
           "CAPACITY_SLACK"]
