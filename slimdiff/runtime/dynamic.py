"""DyDiT execution: timestep-wise dynamic width (TDW) and spatial-wise dynamic tokens (SDT).

Architectures. Everything below (routers, gates, routes, sliced-weight cache, per-step
tables) is shared; what differs per architecture lives in a small :class:`RoutedArch`
adapter registered for the model class (:data:`ROUTED`, :func:`register_routed`, looked up
like the Backbone adapters): which modules are the blocks, where the timestep embedding is
hooked, how a block's heads and MLP channel groups are sliced and counted, and which block
subclass runs the routes (its ``dydit_masked`` / ``dydit_sliced``). :class:`DiTArch` is our
DiT (described below); PixArt's adapter is in :mod:`slimdiff.runtime.dynamic_pixart` (its
self-attention heads and feed-forward are routed, cross-attention always runs). A diffusers
DiT is converted to our DiT by the method rather than given an adapter of its own.

What is installed on a :class:`~slimdiff.models.dit.DiT` by :func:`install`:

* ``model.dydit`` (:class:`DyDiTRouting`): per block a **head router** and an **MLP
  channel-group router** (each one ``nn.Linear`` on the timestep embedding ``t_embedder(t)``,
  never on the class embedding, so width depends on ``t`` only) and a **token router**
  (one ``nn.Linear`` on each token of the residual stream after attention). Head 0 and
  group 0 have no router and are always on, so at least one head and one group run.
  Router weights start at zero and biases at ``+init_bias``: every route starts on, for any
  input scale.
* every block's class becomes :class:`DynamicDiTBlock` (a ``DiTBlock`` subclass: same
  parameters and state-dict keys), whose forward follows the route set for the current call;
* a forward hook on ``model.t_embedder``: it sees the timesteps ``t`` passed to the model and
  their embedding, decides the routes of every block for this call and hands them to the
  blocks. Per-step state therefore needs no sampler hook: plain ``sample()``, ``slimdiff
  info`` and ``macs_sampling`` all run the dynamic model.

Modes (``model.dydit.mode``):

* ``"dynamic"`` -- training: hard straight-through Gumbel-sigmoid decisions (logistic noise,
  temperature ``tau``), applied as **masks** on a full-width computation (masks are for
  training only). Eval: deterministic decisions (``logit > 0``) executed **sliced**: the
  kept heads' rows of ``qkv`` / columns of ``proj`` and the kept groups' rows of ``fc1`` /
  columns of ``fc2`` are sliced once per (block, decision) and cached (LRU, invalidated when
  the weights change), so a sampling step reuses them for every call; the MLP runs on the
  gathered kept tokens only (``index_select`` -> MLP -> ``index_add``), per sample, so a batch
  whose samples keep different tokens is exact. A batch with several distinct timesteps is
  split by timestep (attention is per sample, so this is exact). How the kept rows are found
  is :class:`TokenSelect`'s job: by ``nonzero`` (exact size, one host sync per block), or
  sync-free by a per-(timestep, block) **capacity** learned from earlier calls, with one
  overflow check per model call that recomputes the call on the exact path when the kept
  tokens did not fit (:meth:`DyDiTRouting.set_token_capacity`; on by default on CUDA, where
  a host sync per block leaves the GPU waiting for the host's kernel launches).
* ``"masked"`` -- deterministic decisions, masked full-width execution (recovery training
  and the sliced == masked tests).
* ``"off"`` -- the complete model (every route on, routers not evaluated): the full-model
  stabiliser loss and the reference for the MACs of the unrouted parts.

Per-step tables: :meth:`DyDiTRouting.build_tables` stores the width decisions of every
timestep of a sampler schedule; an eval call at a tabled ``t`` evaluates no width router.
Unknown ``t`` are routed on the fly and memoised (not saved).

Differences from the reference code (alibaba-damo-academy/DyDiT), following the paper:

* the reference DiT multiplies by masks at inference; here removed work is not computed;
* the reference token router is a 2-layer MLP (D -> D/16 -> 1); the paper and our brief use a
  linear router, which we follow;
* reference router weights use PyTorch's default init with biases 15 (width) / 35 (tokens)
  and ``tau = 5``; we zero the weights (all-on for any input scale) and default to a smaller
  bias and ``tau = 1`` so that short CPU trainings can move the routers (see
  :class:`RoutingConfig`);
* the FLOPs ratio counts the whole model (embedders, adaLN, final layer, routers), so the
  budget is end to end; the reference divides block attention+MLP costs only.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimdiff.errors import UsageError
from slimdiff.models.dit import DiT, DiTBlock, gated_residual, modulate
from slimdiff.runtime.reuse import get_block_reuse

MODES = ("dynamic", "masked", "off")


@dataclass
class RoutingConfig:
    """Shape and coefficients of the routers (stored in the saved model's extras)."""

    heads: list[int] = field(default_factory=list)  # heads per block
    groups: list[int] = field(default_factory=list)  # MLP channel groups per block
    tokens: bool = True  # spatial-wise dynamic tokens (SDT) on the MLP
    tau: float = 1.0  # Gumbel-sigmoid temperature in training
    init_bias: float = 4.0  # all-on start: logits = +init_bias (eval: exactly all on)
    cache_size: int = 16  # cached sliced weight sets per block and branch (LRU)


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


def _with_always_on(gates: torch.Tensor) -> torch.Tensor:
    """Prepend the always-on unit 0 to router gates ``(B, n-1)`` -> ``(B, n)``."""
    return torch.cat([torch.ones_like(gates[:, :1]), gates], dim=1)


class BlockRouters(nn.Module):
    """The three routers of one block: heads and groups on ``t_emb``, tokens on the tokens."""

    def __init__(self, dim: int, heads: int, groups: int, tokens: bool, init_bias: float):
        super().__init__()
        self.head = nn.Linear(dim, heads - 1) if heads > 1 else None
        self.group = nn.Linear(dim, groups - 1) if groups > 1 else None
        self.token = nn.Linear(dim, 1) if tokens else None
        for lin in (self.head, self.group, self.token):
            if lin is not None:
                nn.init.zeros_(lin.weight)
                nn.init.constant_(lin.bias, init_bias)

    def width_logits(self, temb: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Head and group logits ``(B, n-1)`` (None where a block has a single unit)."""
        run = lambda lin: lin(temb.to(lin.weight.dtype)).float() if lin is not None else None  # noqa: E731
        return run(self.head), run(self.group)


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

    def run(self, block: nn.Module, *args) -> torch.Tensor:
        return block.dydit_masked(self, *args)


@dataclass
class SlicePlan:
    """Eval-path width decision of one block for one timestep, with its sliced weights."""

    heads: tuple[int, ...]
    groups: tuple[int, ...]
    attn: tuple[torch.Tensor, ...]  # qkv weight, qkv bias, proj weight, proj bias
    mlp: tuple[torch.Tensor, ...]  # fc1 weight, fc1 bias, fc2 weight, fc2 bias


CAPACITY_SLACK = 0.1  # capacity rows = largest kept fraction seen x (1 + slack), rounded up to 8
CAPACITY_MODES = ("auto", "on", "off")


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

    def run(self, block: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
        """``block.dydit_sliced(plan, token, x, *args)`` per timestep group; every tensor argument
        with the batch as its first dimension (``c``, text states, masks) is split with ``x``."""
        if len(self.parts) == 1 and self.parts[0][0] is None:
            out, keep = block.dydit_sliced(self.parts[0][1], self.token, x, *args)
            self._note(keep, x.shape[0], None)
            return out
        out, B = torch.empty_like(x), x.shape[0]
        for idx, plan in self.parts:
            sub = [a.index_select(0, idx) if isinstance(a, torch.Tensor) and a.ndim and a.shape[0] == B else a
                   for a in args]
            o, keep = block.dydit_sliced(plan, self.token, x.index_select(0, idx), *sub)
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


# --------------------------------------------------------------------------- block forwards
def _attention(x: torch.Tensor, qkv_w, qkv_b, heads: int) -> torch.Tensor:
    """Multi-head attention core on ``heads`` heads; returns ``(B, heads, N, hd)``."""
    B, N, _ = x.shape
    qkv = F.linear(x, qkv_w, qkv_b).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])


def masked_forward(block: "DynamicDiTBlock", x: torch.Tensor, c: torch.Tensor, route: MaskRoute) -> torch.Tensor:
    """The DiT block with head, group and token masks (full width is computed: training only)."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.modulation(c)
    attn, mlp = block.attn, block.mlp
    B, N, _ = x.shape
    h = modulate(block.norm1(x), shift_msa, scale_msa)
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]) * route.heads[:, :, None, None].to(x.dtype)
    x = gated_residual(x, gate_msa, attn.proj(out.transpose(1, 2).reshape(B, N, -1)))
    hidden = mlp.act(mlp.fc1(modulate(block.norm2(x), shift_mlp, scale_mlp)))
    G = route.groups.shape[1]
    hidden = (hidden.reshape(B, N, G, -1) * route.groups[:, None, :, None].to(x.dtype)).reshape(B, N, -1)
    m = mlp.fc2(hidden)
    if route.token is not None:
        keep = hard_gate(route.token(x).squeeze(-1).float(), route.tau, route.noise)
        route.kept_tokens = keep.sum(1)
        m = m * keep.unsqueeze(-1).to(x.dtype)
    return gated_residual(x, gate_mlp, m)


def sliced_forward(block: "DynamicDiTBlock", x: torch.Tensor, c: torch.Tensor, plan: SlicePlan,
                   token: TokenSelect | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The DiT block on the kept heads/groups only, the MLP on the kept tokens only.

    Returns the output and the ``(B, N)`` bool map of tokens that ran the MLP.
    """
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.modulation(c)
    qkv_w, qkv_b, proj_w, proj_b = plan.attn
    B, N, D = x.shape
    out = _attention(modulate(block.norm1(x), shift_msa, scale_msa), qkv_w, qkv_b, len(plan.heads))
    x = gated_residual(x, gate_msa, F.linear(out.transpose(1, 2).reshape(B, N, -1), proj_w, proj_b))
    fc1_w, fc1_b, fc2_w, fc2_b = plan.mlp
    act = block.mlp.act
    keep, rows, factor = select_tokens(token, x)
    if rows is None:
        m = F.linear(act(F.linear(modulate(block.norm2(x), shift_mlp, scale_mlp), fc1_w, fc1_b)), fc2_w, fc2_b)
        return gated_residual(x, gate_mlp, TokenSelect.zero_unkept(m, factor)), keep
    flat = x.reshape(B * N, D)
    sample = torch.div(rows, N, rounding_mode="floor")
    h = torch.addcmul(shift_mlp.index_select(0, sample), block.norm2(flat.index_select(0, rows)),
                      (1 + scale_mlp).index_select(0, sample))
    m = TokenSelect.zero_unkept(F.linear(act(F.linear(h, fc1_w, fc1_b)), fc2_w, fc2_b), factor)
    # x is this block's own fresh tensor: scatter in place (no copy) unless autograd may need it
    scatter = flat.index_add if torch.is_grad_enabled() else flat.index_add_
    return scatter(0, rows, gate_mlp.index_select(0, sample) * m).reshape(B, N, D), keep


class DynamicDiTBlock(DiTBlock):
    """A :class:`DiTBlock` that runs the route :class:`DyDiTRouting` set for the current call
    (the plain block forward when there is none, i.e. routing ``"off"``)."""

    _transient = ("_dydit_route",)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        route = self.__dict__.get("_dydit_route")
        if route is None:
            return super().forward(x, c)
        return route.run(self, x, c)

    def dydit_masked(self, route: MaskRoute, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return masked_forward(self, x, c, route)

    def dydit_sliced(self, plan: SlicePlan, token: TokenSelect | None, x: torch.Tensor,
                     c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sliced_forward(self, x, c, plan, token)

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {k: v for k, v in state.items() if k not in self._transient}


# --------------------------------------------------------------------------- controller
def _weights_key(*tensors: torch.Tensor) -> tuple:
    """Identity + version of tensors: changes whenever the weights are replaced or edited in place."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


class DyDiTRouting(nn.Module):
    """All routers of a DyDiT model plus its runtime state (mode, per-step tables, weight cache).

    ``slimdiff_runtime = True`` tells :mod:`slimdiff.io` that this subtree is rebuilt by the
    method's restorer on load (its weights are still saved and loaded with the model).
    """

    slimdiff_runtime = True
    _transient = ("_routes", "_cache", "_memo", "_temb_capture", "_token_frac", "_frac_key", "_pending", "_exact",
                  "_capacity_ok")

    def __init__(self, blocks: Iterable[nn.Module], dim: int, config: RoutingConfig,
                 arch: type["RoutedArch"] | None = None):
        super().__init__()
        self.config = config
        self.arch = arch or DiTArch
        self.routers = nn.ModuleList(
            BlockRouters(dim, h, g, config.tokens, config.init_bias) for h, g in zip(config.heads, config.groups)
        )
        self._blocks = list(blocks)
        self.mode = "dynamic"
        self.tables: dict[float, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        self.table_info: dict = {}
        self.slice_count = 0
        self.token_capacity = "auto"
        self.recomputed = 0  # model calls recomputed on the exact path (kept tokens over capacity)
        self._init_transient()

    def _init_transient(self) -> None:
        self._routes: list = []
        self._cache: OrderedDict = OrderedDict()
        self._memo: dict = {}
        self._token_frac: dict[tuple[float, int], float] = {}  # (timestep, block) -> largest kept fraction
        self._frac_key: tuple = ()  # the token routers' weights the fractions were seen with
        self._pending: tuple[float, torch.Tensor | None] | None = None
        self._exact = False
        self._capacity_ok = True

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {k: v for k, v in state.items() if k not in self._transient}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._init_transient()

    def set_mode(self, mode: str) -> None:
        """``"dynamic"`` (default), ``"masked"`` or ``"off"`` (see the module docs)."""
        if mode not in MODES:
            raise UsageError(f"unknown DyDiT mode {mode!r}; use one of {', '.join(MODES)}")
        self.mode = mode

    def set_token_capacity(self, mode: str) -> None:
        """How eval calls inside ``sample`` find the tokens that run the MLP (:class:`TokenSelect`).

        ``"on"``: by a capacity learned per (timestep, block) from earlier calls: no host sync
        per block, one overflow check per model call (a call whose kept tokens did not fit is
        recomputed exactly, counted in ``recomputed``). ``"off"``: by ``nonzero`` (a sync per
        block; nothing is padded). ``"auto"`` (default): ``"on"`` on CUDA, ``"off"`` elsewhere,
        where a sync costs nothing and padding would only add work.
        """
        if mode not in CAPACITY_MODES:
            raise UsageError(f"unknown token capacity mode {mode!r}; use one of {', '.join(CAPACITY_MODES)}")
        self.token_capacity = mode

    def capacity_on(self, device: torch.device) -> bool:
        """Whether the token-capacity mode selects the capacity path on ``device``."""
        return self.token_capacity == "on" or (self.token_capacity == "auto" and device.type == "cuda")

    # ---- the hook: decide every block's route for this call
    def capture_temb(self, module: nn.Module, inputs: tuple, temb: torch.Tensor) -> None:
        """Forward hook that keeps a t-only embedding for the next :meth:`on_time_embedding`
        (architectures whose hooked embedder also mixes in other conditions)."""
        self.__dict__["_temb_capture"] = temb

    def before_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the model. A fresh call has no pending check (a call that raised
        never reached :meth:`after_call`). Under a block-reuse plan the capacity path is off:
        recomputing a call would advance the plan's per-step state twice."""
        self._pending = None
        self._capacity_ok = get_block_reuse(module) is None

    def on_time_embedding(self, module: nn.Module, inputs: tuple, temb: torch.Tensor) -> None:
        t = inputs[0]
        captured = self.__dict__.pop("_temb_capture", None)
        temb = temb if captured is None else captured
        if self.mode == "off":
            routes = [None] * len(self._blocks)
        elif self.training or self.mode == "masked":
            routes = self._mask_routes(temb, noise=self.training and self.mode == "dynamic")
        else:
            routes = self._slice_routes(t, temb)
        for block, route in zip(self._blocks, routes):
            block.__dict__["_dydit_route"] = route
        self._routes = routes

    def _mask_routes(self, temb: torch.Tensor, noise: bool) -> list[MaskRoute]:
        routes, tau = [], self.config.tau
        for r, h, g in zip(self.routers, self.config.heads, self.config.groups):
            hl, gl = r.width_logits(temb.float())
            heads = _with_always_on(hard_gate(hl, tau, noise)) if hl is not None else temb.new_ones(len(temb), 1)
            groups = _with_always_on(hard_gate(gl, tau, noise)) if gl is not None else temb.new_ones(len(temb), 1)
            routes.append(MaskRoute(heads, groups, r.token, tau, noise))
        return routes

    def _slice_routes(self, t: torch.Tensor, temb: torch.Tensor) -> list[SliceRoute]:
        from slimdiff.diffusion.sampling import current_timestep

        host_t = current_timestep()  # inside ``sample``: every row is at this step, known on the host
        if host_t is not None:
            parts = [(None, self.decisions(host_t, temb[:1]))]
        else:  # reads t back from the device (a sync on a GPU): direct calls only
            t = t.reshape(-1)
            uniq, inverse = torch.unique(t, return_inverse=True)
            parts = []
            for k, tv in enumerate(uniq.tolist()):
                idx = None if len(uniq) == 1 else (inverse == k).nonzero().squeeze(1)
                first = int((inverse == k).nonzero()[0, 0]) if idx is not None else 0
                parts.append((idx, self.decisions(tv, temb[first:first + 1])))
        fracs, overflow = [None] * len(self.routers), None
        if host_t is not None and self.config.tokens and self._capacity_ok and self.capacity_on(temb.device):
            key = _weights_key(*(p for r in self.routers for p in r.token.parameters()))
            if key != self._frac_key:  # new or edited token routers (training, calibration): learn afresh
                self._token_frac, self._frac_key = {}, key
            known = [self._token_frac.get((host_t, i)) for i in range(len(self.routers))]
            if not self._exact and None not in known:
                fracs, overflow = known, torch.zeros((), dtype=torch.bool, device=temb.device)
            self._pending = (host_t, overflow)
        routes = []
        for i, r in enumerate(self.routers):
            plans = [(idx, self._plan(i, dec[i])) for idx, dec in parts]
            token = TokenSelect(r.token, fracs[i], overflow) if r.token is not None else None
            routes.append(SliceRoute(plans, token))
        return routes

    def after_call(self, module: nn.Module, args: tuple, kwargs: dict, output):
        """Forward hook on the model: learn kept fractions after an exact call; after a capacity
        call, the one host sync (did any block overflow?) and, if so, the exact recomputation."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        host_t, overflow = pending
        if overflow is None:  # exact path (it synced per block already): remember what was kept
            fracs = torch.stack([r.keep_maps.float().mean() for r in self._routes]).tolist()
            for i, f in enumerate(fracs):
                self._token_frac[(host_t, i)] = max(f, self._token_frac.get((host_t, i), 0.0))
            return None
        if not bool(overflow):
            return None
        self.recomputed += 1
        self._exact = True
        try:
            return module(*args, **kwargs)
        finally:
            self._exact = False

    # ---- width decisions (depend on t only)
    @torch.no_grad()
    def decisions(self, t: float, temb: torch.Tensor | None = None) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Kept (heads, groups) of every block at timestep ``t``: from the per-step table, else
        from the routers on ``temb`` (the ``(1, D)`` embedding of ``t``), memoised until the
        router weights change. Tables are fixed data: rebuild them after editing routers."""
        key = float(t)
        if key in self.tables:
            return self.tables[key]
        version = _weights_key(*self.parameters())
        if self._memo.get("version") != version:  # routers changed: forget on-the-fly decisions
            self._memo = {"version": version}
        if key not in self._memo:
            if temb is None:
                raise UsageError(f"no routing table entry for t={key}; pass its time embedding")
            self._memo[key] = [self._decide(r, temb.float()) for r in self.routers]
        return self._memo[key]

    def _decide(self, router: BlockRouters, temb: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
        hl, gl = router.width_logits(temb)
        heads = (0,) + tuple(int(j) + 1 for j in (hl[0] > 0).nonzero().flatten()) if hl is not None else (0,)
        groups = (0,) + tuple(int(j) + 1 for j in (gl[0] > 0).nonzero().flatten()) if gl is not None else (0,)
        return heads, groups

    @torch.no_grad()
    def build_tables(self, model: nn.Module, timesteps: Iterable[float], info: dict | None = None) -> None:
        """Precompute the width decisions at every timestep of a sampling schedule."""
        self.tables = {}
        for tv in timesteps:
            t = torch.tensor([float(tv)], device=next(model.parameters()).device)
            temb = self.arch.raw_temb(model, t)
            self.tables[float(tv)] = [self._decide(r, temb.float()) for r in self.routers]
        self.table_info = dict(info or {})
        self._memo = {}

    # ---- sliced weights, once per (block, decision), cached
    def _plan(self, i: int, decision: tuple[tuple[int, ...], tuple[int, ...]]) -> SlicePlan:
        heads, groups = decision
        block = self._blocks[i]
        return SlicePlan(heads, groups,
                         self._cached((i, "attn", heads), *self.arch.attn_slicer(block, heads)),
                         self._cached((i, "mlp", groups), *self.arch.mlp_slicer(block, groups, self.config.groups[i])))

    def _cached(self, key: tuple, sources: tuple, make, bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        full_key = key + (_weights_key(*(s for s in sources if s is not None)),)
        hit = self._cache.get(full_key)
        if hit is None:
            hit = make()
            self.slice_count += 1
            self._cache[full_key] = hit
            limit = self.config.cache_size * 2 * max(1, len(self.routers))
            while len(self._cache) > limit:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(full_key)
        return (*hit, bias)

    def train(self, mode: bool = True):
        self._cache.clear()
        self._memo.clear()
        return super().train(mode)

    # ---- after a call
    def realised(self) -> dict[str, torch.Tensor]:
        """Per block, per sample kept heads / groups / tokens of the last call, ``(L, B)`` each
        (differentiable in training)."""
        heads, groups, tokens = [], [], []
        for route in self._routes:
            if isinstance(route, MaskRoute):
                heads.append(route.heads.sum(1))
                groups.append(route.groups.sum(1))
                tokens.append(route.kept_tokens)
            else:
                b = len(route.kept_tokens)
                h = torch.zeros(b, device=route.kept_tokens.device)
                g = torch.zeros(b, device=route.kept_tokens.device)
                for idx, plan in route.parts:
                    sel = slice(None) if idx is None else idx
                    h[sel], g[sel] = len(plan.heads), len(plan.groups)
                heads.append(h)
                groups.append(g)
                tokens.append(route.kept_tokens.float())
        stack = lambda xs: torch.stack(xs) if xs and xs[0] is not None else None  # noqa: E731
        return {"heads": stack(heads), "groups": stack(groups), "tokens": stack(tokens)}


def _raw_temb(model: DiT, t: torch.Tensor) -> torch.Tensor:
    """``t_embedder(t)`` without triggering the routing hook."""
    emb = model.t_embedder
    freq = emb.timestep_embedding(t, emb.frequency_embedding_size, freq_shift=emb.freq_shift)
    return emb.mlp(freq.to(emb.mlp[0].weight.dtype))


def _slice_attention(attn: nn.Module, heads: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """qkv rows and proj columns of the kept heads (the original tensors when all are kept)."""
    H = attn.num_heads
    if len(heads) == H:
        return attn.qkv.weight, attn.qkv.bias, attn.proj.weight
    hd = attn.qkv.out_features // (3 * H)
    cols = unit_index(heads, hd, attn.qkv.weight.device)
    rows = torch.cat([p * H * hd + cols for p in range(3)])
    w, b = attn.qkv.weight.detach(), attn.qkv.bias.detach()
    return w.index_select(0, rows), b.index_select(0, rows), attn.proj.weight.detach().index_select(1, cols)


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
"""Model class -> :class:`RoutedArch` adapter (what :func:`install` consults; like ``BACKBONES``)."""


def register_routed(model_cls: type):
    """Class decorator: register a :class:`RoutedArch` as DyDiT's adapter for ``model_cls``."""

    def deco(arch: type[RoutedArch]) -> type[RoutedArch]:
        ROUTED[model_cls] = arch
        return arch

    return deco


class RoutedArch:
    """Where DyDiT reaches into one architecture. The routers, gates, routes, weight cache,
    per-step tables and cost model are shared; an adapter only says which modules are the
    blocks, where the timestep embedding is, how to slice a block's attention heads and MLP
    channel groups, and which block class runs the routes (``dydit_masked`` /
    ``dydit_sliced``). Stateless: every method is a classmethod."""

    name = ""
    block_class: type = nn.Module
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
    def hook(cls, model: nn.Module, routing: "DyDiTRouting") -> None:
        """Register the forward hook(s) that call ``routing.on_time_embedding(module, (t, ...), temb)``."""
        raise NotImplementedError

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


@register_routed(DiT)
class DiTArch(RoutedArch):
    """Our DiT: ``blocks[i].attn.qkv/proj``, ``blocks[i].mlp.fc1/fc2``, hook on ``t_embedder``."""

    name = "dit"
    block_class = DynamicDiTBlock
    lora_targets = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"

    @classmethod
    def blocks(cls, model):
        return list(model.blocks)

    @classmethod
    def temb_dim(cls, model):
        return model.t_embedder.mlp[2].out_features

    @classmethod
    def hook(cls, model, routing):
        model.t_embedder.register_forward_hook(routing.on_time_embedding)

    @classmethod
    def raw_temb(cls, model, t):
        return _raw_temb(model, t)

    @classmethod
    def heads(cls, block):
        return int(block.attn.num_heads)

    @classmethod
    def mlp_width(cls, block):
        return block.mlp.fc1.out_features

    @classmethod
    def attn_slicer(cls, block, heads):
        attn = block.attn
        return (attn.qkv.weight, attn.qkv.bias, attn.proj.weight), lambda: _slice_attention(attn, heads), attn.proj.bias

    @classmethod
    def mlp_slicer(cls, block, groups, G):
        mlp = block.mlp
        return (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight), lambda: slice_groups(mlp.fc1, mlp.fc2, groups, G), mlp.fc2.bias

    @classmethod
    def head_macs(cls, block, tokens):
        d, H = block.attn.qkv.in_features, block.attn.num_heads
        hd = block.attn.qkv.out_features // (3 * H)
        return tokens * hd * (3 * d + d) + 2 * tokens * tokens * hd

    @classmethod
    def group_token_macs(cls, block, G):
        return 2 * block.mlp.fc1.in_features * block.mlp.fc1.out_features // G

    @classmethod
    def width(cls, block):
        return block.mlp.fc1.in_features


def routed_arch(model: nn.Module) -> type[RoutedArch]:
    """The :class:`RoutedArch` of ``model`` (most specific registered class in its MRO), or
    :class:`UsageError`."""
    import slimdiff.runtime.dynamic_pixart  # noqa: F401  (registers PixArt)

    for cls in type(model).__mro__:
        if cls in ROUTED:
            return ROUTED[cls]
    names = ", ".join(c.__name__ for c in ROUTED)
    raise UsageError(f"DyDiT execution supports {names}; got {type(model).__name__}")


# --------------------------------------------------------------------------- install
def routing_of(model: nn.Module) -> DyDiTRouting:
    """The :class:`DyDiTRouting` of a DyDiT model, or :class:`UsageError`."""
    r = getattr(model, "dydit", None)
    if not isinstance(r, DyDiTRouting):
        raise UsageError("this model has no DyDiT routers; compress it with --method dydit first")
    return r


def default_config(model: nn.Module, **overrides) -> RoutingConfig:
    """Routers for every block: one per head, ``num_heads`` MLP channel groups (as the reference)."""
    arch = routed_arch(model)
    blocks = arch.blocks(model)
    heads = [arch.heads(b) for b in blocks]
    groups = []
    for b, h in zip(blocks, heads):
        width = arch.mlp_width(b)
        groups.append(h if width % h == 0 else math.gcd(width, h))
    return RoutingConfig(heads=heads, groups=groups, **overrides)


def install(model: nn.Module, config: RoutingConfig) -> DyDiTRouting:
    """Add DyDiT routers and the dynamic execution to ``model`` in place; returns the routing.

    ``model`` is any architecture with a registered :class:`RoutedArch` (our DiT, diffusers
    PixArt). Idempotent for the same config. The model keeps its class and weights (only
    its blocks' classes become the dynamic subclasses); with the routers all on it computes
    exactly what it computed before.
    """
    arch = routed_arch(model)
    arch.check(model)
    blocks = arch.blocks(model)
    if len(config.heads) != len(blocks) or len(config.groups) != len(blocks):
        raise UsageError(f"routing config is for {len(config.heads)} blocks, the model has {len(blocks)}")
    for b, g in zip(blocks, config.groups):
        if arch.mlp_width(b) % g:
            raise UsageError(f"MLP width {arch.mlp_width(b)} does not split into {g} channel groups")
    existing = getattr(model, "dydit", None)
    if isinstance(existing, DyDiTRouting):
        if asdict(existing.config) == asdict(config):
            return existing
        raise UsageError("the model already has DyDiT routers with another configuration")
    for block in blocks:
        block.__class__ = arch.block_class
    model.dydit = DyDiTRouting(blocks, arch.temb_dim(model), config, arch).to(next(model.parameters()).device)
    model.dydit.train(model.training)
    arch.hook(model, model.dydit)
    model.register_forward_pre_hook(model.dydit.before_call, with_kwargs=True)
    model.register_forward_hook(model.dydit.after_call, with_kwargs=True)
    return model.dydit


__all__ = [
    "RoutingConfig", "DyDiTRouting", "DynamicDiTBlock", "BlockRouters", "TokenSelect", "hard_gate", "install",
    "routing_of", "default_config", "masked_forward", "sliced_forward", "RoutedArch", "DiTArch",
    "ROUTED", "register_routed", "routed_arch",
]
