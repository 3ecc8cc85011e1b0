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
* :class:`RoutedArch`, the per-architecture adapter, and its registry (:data:`ROUTED`,
  :func:`register_routed`): a per-architecture module registers its adapter on import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

CAPACITY_SLACK = 0.1  # capacity rows = largest kept fraction seen x (1 + slack), rounded up to 8


def hard_gate(logits: torch.Tensor, tau: float, noise: bool) -> torch.Tensor:
    """Straight-through Gumbel-sigmoid: value ``1[logits + noise > 0]``, gradient of ``sigmoid(./tau)``.

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
    token: nn.Linear | None
    tau: float
    noise: bool
    kept_tokens: torch.Tensor | None = None  # (B,) differentiable count, set by the block

    def run(self, arch: type["RoutedArch"], block: nn.Module, *args) -> torch.Tensor:
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

    router: nn.Linear
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

    def run(self, arch: type["RoutedArch"], block: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
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


# --------------------------------------------------------------------------- architectures
ROUTED: dict[type, type["RoutedArch"]] = {}
"""Model class -> :class:`RoutedArch` adapter (what the routing consults; like ``BACKBONES``)."""


def register_routed(model_cls: type):
    """Class decorator: register a :class:`RoutedArch` as DyDiT's adapter for ``model_cls``."""

    def deco(arch: type[RoutedArch]) -> type[RoutedArch]:
        ROUTED[model_cls] = arch
        return arch

    return deco


class RoutedArch:
    """Where DyDiT reaches into one architecture. The routers, gates, routes, weight cache,
    per-step tables, hooks and cost model are shared; an adapter says which modules are the
    blocks, where the timestep embedding is, how to slice a block's attention heads and MLP
    channel groups and count their MACs (per-model questions), and how a block runs a route
    (:meth:`route_args`, :meth:`masked`, :meth:`sliced`: the routed forwards). Stateless:
    every method is a classmethod."""

    name = ""
    lora_targets = ""  # regex of the block Linear layers LoRA tuning adapts

    @classmethod
    def blocks(cls, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    @classmethod
    def check(cls, model: nn.Module) -> None:
        """Refuse (``UsageError``) a layout the routed forwards would not compute exactly."""

    @classmethod
    def temb_dim(cls, model: nn.Module) -> int:
        raise NotImplementedError

    @classmethod
    def temb_module(cls, model: nn.Module) -> nn.Module:
        """The module called once per model call with the timesteps as its first argument,
        whose output is (or follows) the routers' timestep embedding."""
        raise NotImplementedError

    @classmethod
    def temb_part(cls, model: nn.Module) -> nn.Module | None:
        """A submodule of :meth:`temb_module` whose output is the t-only embedding the routers
        read, when :meth:`temb_module`'s output also mixes in other conditions (else None)."""
        return None

    @classmethod
    def raw_temb(cls, model: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """The routers' timestep embedding of ``t`` without triggering the hooks."""
        raise NotImplementedError

    @classmethod
    def heads(cls, block: nn.Module) -> int:
        raise NotImplementedError

    @classmethod
    def mlp_width(cls, block: nn.Module) -> int:
        raise NotImplementedError

    @classmethod
    def attn_slicer(cls, block: nn.Module, heads: tuple[int, ...]) -> tuple:
        """``(source weights, make(), last bias)`` of the kept heads' attention weights."""
        raise NotImplementedError

    @classmethod
    def mlp_slicer(cls, block: nn.Module, groups: tuple[int, ...], G: int) -> tuple:
        """``(source weights, make(), last bias)`` of the kept channel groups' MLP weights."""
        raise NotImplementedError

    @classmethod
    def head_macs(cls, block: nn.Module, tokens: int) -> int:
        """MACs of one self-attention head on ``tokens`` tokens (q/k/v rows, QK^T, AV, out columns)."""
        raise NotImplementedError

    @classmethod
    def group_token_macs(cls, block: nn.Module, G: int) -> int:
        """MACs of one MLP channel group on one token (fc1 rows + fc2 columns)."""
        raise NotImplementedError

    @classmethod
    def router_macs(cls, block: nn.Module, tokens: int) -> int:
        """MACs of the token router on ``tokens`` tokens."""
        return tokens * cls.width(block)

    @classmethod
    def width(cls, block: nn.Module) -> int:
        """Residual width ``D`` of a block (the token router's input)."""
        raise NotImplementedError

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
           "slice_groups", "RoutedArch", "ROUTED", "register_routed", "CAPACITY_SLACK"]
