"""DyDiT routing: timestep-wise dynamic width (TDW) and spatial-wise dynamic tokens (SDT).

The routing core: routers, decisions, per-step tables, the sliced-weight cache and the
diffusers ``ModelHook`` s that run a model routed, behind :func:`apply_dydit` (and
:func:`remove_dydit`, :func:`routing_of`), as :mod:`slimdiff.runtime.reuse` applies its plans.
Per architecture, the blocks, the timestep embedding, the attention and MLP layouts (what is
sliced) and their MACs are the :class:`~slimdiff.models.backbone.Backbone`'s answers; the routed
block forwards are a :class:`~slimdiff.runtime.routed.RoutedForwards` registered by its own
module: :mod:`slimdiff.runtime.dynamic_dit` (our DiT; a diffusers DiT is converted to it by the
method) and :mod:`slimdiff.runtime.dynamic_pixart` (PixArt: self-attention heads and
feed-forward routed, cross-attention always runs); :func:`routed_forwards` imports them.
(Over 500 lines: the hooks are thin callers of the controller's per-call state, kept beside it.)

:func:`apply_dydit` adds, keeping the model's class, modules and their classes:

* ``model.dydit`` (:class:`DyDiTRouting`): per block a **head router** and an **MLP
  channel-group router** (one ``nn.Linear`` each on the timestep embedding, never on the class
  or text embedding, so width depends on ``t`` only) and a **token router** on each token of
  the residual stream entering the MLP (the reference's ``TokenSelect``, a two-layer MLP
  ``D -> D/16 -> ReLU -> 1``; ``token_router="linear"``: one ``nn.Linear``). Head 0 and group 0
  have no router and are always on. Initialisation (:class:`RoutingConfig`) follows the
  reference: Xavier-uniform weights, output biases 15 (width) / 35 (tokens), so every route
  starts on.
* ``ModelHook`` s named :data:`HOOK`: on the timestep embedder (it sees the model's timesteps
  and their embedding, and decides every block's route for the call), on every block (its
  forward becomes the routed forward of the call's route; its own without one, i.e. routing
  ``"off"``) and on the model (the token-capacity check, below). So plain ``sample()``,
  ``slimdiff info`` and ``macs_sampling`` all run the dynamic model. A deep copy routes with
  its own routers (:class:`_RoutingHook`).

Modes (``model.dydit.mode``):

* ``"dynamic"`` -- training: hard straight-through Gumbel-sigmoid decisions (logistic noise,
  temperature ``tau``), applied as **masks** on a full-width computation (masks are for
  training only). Eval: deterministic decisions (``logit > 0``) executed **sliced**: the
  kept heads' rows of the q/k/v projections / columns of the output projection and the kept
  groups' rows of ``fc1`` / columns of ``fc2`` are sliced once per (block, decision) and
  cached (LRU, invalidated when the weights change), so a sampling step reuses them for every
  call; the MLP runs on the gathered kept tokens only (``index_select`` -> MLP ->
  ``index_add``), per sample, so a batch whose samples keep different tokens is exact. A
  batch with several distinct timesteps is split by timestep (attention is per sample, so
  this is exact). How the kept rows are found is :class:`~slimdiff.runtime.routed.TokenSelect`'s
  job: by ``nonzero`` (exact size, one host sync per block), or sync-free by a per-(timestep,
  block) **capacity** learned from earlier calls, with one overflow check per model call that
  recomputes the call on the exact path when the kept tokens did not fit
  (:meth:`DyDiTRouting.set_token_capacity`; on by default on CUDA, where a host sync per block
  leaves the GPU waiting for the host's kernel launches).
* ``"masked"`` -- deterministic decisions, masked full-width execution (recovery training
  and the sliced == masked tests).
* ``"off"`` -- the complete model (every route on, routers not evaluated): the full-model
  stabiliser loss and the reference for the MACs of the unrouted parts.

Per-step tables: :meth:`DyDiTRouting.build_tables` stores the width decisions of every
timestep of a sampler schedule; an eval call at a tabled ``t`` evaluates no width router.
Unknown ``t`` are routed on the fly and memoised (not saved).

Gates follow the reference (``dynamic_model.py`` 18-47): in training, logistic noise (the
difference of two Gumbels) is added to the logits, the value is hard at 0.5 after
``sigmoid(./tau)`` and the gradient is the soft one's (straight-through), ``tau = 5``; in eval,
``sigmoid(logit) > 0.5`` without noise.

Differences from the reference code (alibaba-damo-academy/DyDiT):

* the reference DiT multiplies by masks at inference; here removed work is not computed;
* the FLOPs ratio counts the whole model (embedders, adaLN, final layer, routers), so the
  budget is end to end; the reference divides block attention+MLP costs only;
* options beyond the reference (:class:`RoutingConfig`; off by default): a linear token
  router (``token_router="linear"``), zero-initialised router output weights
  (``router_init="zeros"``: all on for any input scale), and any other ``tau`` and initial
  biases (this project's earlier defaults were ``tau = 1``, bias 4, linear, zeros: what models
  saved before the reference defaults load as, :meth:`RoutingConfig.from_saved`).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook

from slimdiff.errors import UsageError
from slimdiff.models.backbone import Backbone, as_backbone
from slimdiff.runtime.reuse import get_block_reuse
from slimdiff.runtime.routed import (
    ROUTED,
    MaskRoute,
    RoutedForwards,
    SlicePlan,
    SliceRoute,
    TokenSelect,
    group_slicer,
    hard_gate,
    head_slicer,
)

MODES = ("dynamic", "masked", "off")
CAPACITY_MODES = ("auto", "on", "off")
HOOK = "slimdiff_dydit"
"""The name of every DyDiT hook (one per hooked module: the model, its timestep embedder, each block)."""


TOKEN_ROUTERS = ("mlp", "linear")
ROUTER_INITS = ("xavier", "zeros")
LEGACY = {"token_router": "linear", "router_init": "zeros"}
"""What a config saved before these fields existed was built with (its ``init_bias`` also set the token router's)."""


@dataclass
class RoutingConfig:
    """Shape and coefficients of the routers (stored in the saved model's extras).

    Defaults are the reference's: ``tau`` (``dynamic_model.py`` ``Router``/``TokenSelect``,
    ``tau=5``, never changed), biases 15 / 35 (``models.py`` 417-419), the token router a
    ``D -> D/16 -> ReLU -> 1`` MLP (``dynamic_model.py`` 63-66), every router ``nn.Linear``
    Xavier-uniform with zero bias before those biases (``models.py`` ``_basic_init``).
    """

    heads: list[int] = field(default_factory=list)  # heads per block
    groups: list[int] = field(default_factory=list)  # MLP channel groups per block
    tokens: bool = True  # spatial-wise dynamic tokens (SDT) on the MLP
    tau: float = 5.0  # Gumbel-sigmoid temperature in training
    init_bias: float = 15.0  # head/group routers' bias: all-on start (logit ~ +15)
    token_init_bias: float = 35.0  # token router's output bias
    token_router: str = "mlp"  # "mlp" (reference) | "linear" (deviation)
    router_init: str = "xavier"  # "xavier" (reference) | "zeros": the logit layer's weights start at 0 (deviation)
    cache_size: int = 16  # cached sliced weight sets per block and branch (LRU)

    def __post_init__(self) -> None:
        if self.token_router not in TOKEN_ROUTERS:
            raise UsageError(f"unknown token router {self.token_router!r}; use one of {', '.join(TOKEN_ROUTERS)}")
        if self.router_init not in ROUTER_INITS:
            raise UsageError(f"unknown router init {self.router_init!r}; use one of {', '.join(ROUTER_INITS)}")
        if not self.tau > 0:
            raise UsageError(f"the gate temperature tau must be > 0, got {self.tau}")

    @classmethod
    def from_saved(cls, saved: dict) -> RoutingConfig:
        """The config a saved model was built with; one saved before the token-router type was
        recorded had linear token routers (:data:`LEGACY`) and one bias for all routers."""
        if "token_router" in saved:
            return cls(**saved)
        return cls(**{**LEGACY, "token_init_bias": saved.get("init_bias", 4.0), **saved})


def _with_always_on(gates: torch.Tensor) -> torch.Tensor:
    """Prepend the always-on unit 0 to router gates ``(B, n-1)`` -> ``(B, n)``."""
    return torch.cat([torch.ones_like(gates[:, :1]), gates], dim=1)


def token_router(dim: int, kind: str) -> nn.Module:
    """The per-token router: the reference's MLP ``D -> max(1, D/16) -> ReLU -> 1`` or one Linear."""
    if kind == "linear":
        return nn.Linear(dim, 1)
    hidden = max(1, dim // 16)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class BlockRouters(nn.Module):
    """The three routers of one block: heads and groups on ``t_emb``, tokens on the tokens."""

    def __init__(self, dim: int, heads: int, groups: int, config: RoutingConfig):
        super().__init__()
        self.head = nn.Linear(dim, heads - 1) if heads > 1 else None
        self.group = nn.Linear(dim, groups - 1) if groups > 1 else None
        self.token = token_router(dim, config.token_router) if config.tokens else None
        for m in self.modules():
            if isinstance(m, nn.Linear):  # reference models.py _basic_init
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for out, bias in ((self.head, config.init_bias), (self.group, config.init_bias),
                          (self.token_out, config.token_init_bias)):
            if out is not None:
                nn.init.constant_(out.bias, bias)
                if config.router_init == "zeros":
                    nn.init.zeros_(out.weight)

    @property
    def token_out(self) -> nn.Linear | None:
        """The token router's logit layer (its bias is the offset calibration shifts)."""
        return self.token[-1] if isinstance(self.token, nn.Sequential) else self.token

    def outputs(self) -> list[nn.Linear]:
        """The logit layers of this block's routers (head, group, token; those that exist)."""
        return [m for m in (self.head, self.group, self.token_out) if m is not None]

    def token_macs(self) -> int:
        """MACs of the token router on one token (0 without one)."""
        if self.token is None:
            return 0
        return sum(m.in_features * m.out_features for m in self.token.modules() if isinstance(m, nn.Linear))

    def width_logits(self, temb: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Head and group logits ``(B, n-1)`` (None where a block has a single unit)."""
        run = lambda lin: lin(temb.to(lin.weight.dtype)).float() if lin is not None else None  # noqa: E731
        return run(self.head), run(self.group)


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

    def __init__(self, blocks: Iterable[nn.Module], dim: int, config: RoutingConfig, forwards: type[RoutedForwards],
                 backbone: type[Backbone]):
        super().__init__()
        self.config = config
        self.forwards = forwards  # the architecture's routed block forwards
        self.backbone = backbone  # its Backbone class: per block, the attention and MLP layouts
        self.routers = nn.ModuleList(
            BlockRouters(dim, h, g, config) for h, g in zip(config.heads, config.groups)
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

    # ---- the hooks: decide every block's route for this call
    def capture_temb(self, temb: torch.Tensor) -> None:
        """Keep a t-only embedding for the next :meth:`on_time_embedding` (architectures whose
        hooked embedder also mixes in other conditions)."""
        self.__dict__["_temb_capture"] = temb

    def before_call(self, model: nn.Module) -> None:
        """Before a model call. A fresh call has no pending check (a call that raised never
        reached :meth:`after_call`). Under a block-reuse plan the capacity path is off:
        recomputing a call would advance the plan's per-step state twice."""
        self._pending = None
        self._capacity_ok = get_block_reuse(model) is None

    def on_time_embedding(self, t: torch.Tensor, temb: torch.Tensor) -> None:
        """After the timestep embedder: decide the route of every block for this call."""
        captured = self.__dict__.pop("_temb_capture", None)
        temb = temb if captured is None else captured
        if self.mode == "off":
            routes = [None] * len(self._blocks)
        elif self.training or self.mode == "masked":
            routes = self._mask_routes(temb, noise=self.training and self.mode == "dynamic")
        else:
            routes = self._slice_routes(t, temb)
        self._routes = routes

    def route(self, index: int) -> MaskRoute | SliceRoute | None:
        """The route block ``index`` follows in the current call (None: its own forward)."""
        return self._routes[index] if self._routes else None

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

    def after_call(self, model: nn.Module, args: tuple, kwargs: dict):
        """After a model call: learn kept fractions after an exact call; after a capacity call,
        the one host sync (did any block overflow?) and, if so, the exact recomputation (the
        output that replaces the call's; None: keep it)."""
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
            return model(*args, **kwargs)
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
        bb, device = as_backbone(model), next(model.parameters()).device
        for tv in timesteps:
            temb = bb.embed_timesteps(torch.tensor([float(tv)], device=device))
            self.tables[float(tv)] = [self._decide(r, temb.float()) for r in self.routers]
        self.table_info = dict(info or {})
        self._memo = {}

    # ---- sliced weights, once per (block, decision), cached
    def _plan(self, i: int, decision: tuple[tuple[int, ...], tuple[int, ...]]) -> SlicePlan:
        heads, groups = decision
        block, G = self._blocks[i], self.config.groups[i]
        return SlicePlan(heads, groups,
                         self._cached((i, "attn", heads), *head_slicer(self.backbone.block_attention(block), heads)),
                         self._cached((i, "mlp", groups), *group_slicer(self.backbone.block_mlp(block), groups, G)))

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




# --------------------------------------------------------------------------- hooks
class _RoutingHook(ModelHook):
    """Base of DyDiT's hooks. A deep copy of a hooked module still calls the original's hook
    chain (diffusers binds the hooked forward to its module in a closure that copying does not
    follow; so the copy also keeps the original alive), but hands it the copy: ``pre_forward``
    passes that module on and ``new_forward`` runs *its* hook of the same name (the copy's own,
    holding the copy's routing), never the module the chain was bound to."""

    def __init__(self, routing: DyDiTRouting):
        super().__init__()
        self.routing = routing

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        return (module, *args), kwargs

    def new_forward(self, bound: nn.Module, module: nn.Module, *args, **kwargs):
        return module._diffusers_hook.get_hook(HOOK).run(module, *args, **kwargs)

    def run(self, module: nn.Module, *args, **kwargs):
        raise NotImplementedError


class _CallHook(_RoutingHook):
    """Around each model call: :meth:`DyDiTRouting.before_call` / :meth:`~DyDiTRouting.after_call`."""

    def run(self, module, *args, **kwargs):
        self.routing.before_call(module)
        out = self.fn_ref.original_forward(*args, **kwargs)
        again = self.routing.after_call(module, args, kwargs)
        return out if again is None else again


class _TimeEmbeddingHook(_RoutingHook):
    """On the timestep embedder: its output decides every block's route for the call."""

    def run(self, module, *args, **kwargs):
        temb = self.fn_ref.original_forward(*args, **kwargs)
        self.routing.on_time_embedding(args[0], temb)
        return temb


class _TimePartHook(_RoutingHook):
    """On the t-only part of an embedder that mixes in other conditions: kept for the routers."""

    def run(self, module, *args, **kwargs):
        temb = self.fn_ref.original_forward(*args, **kwargs)
        self.routing.capture_temb(temb)
        return temb


class _BlockHook(_RoutingHook):
    """On block ``index``: the architecture's routed forward for the call's route, else the block's own."""

    def __init__(self, routing: DyDiTRouting, index: int):
        super().__init__(routing)
        self.index = index

    def run(self, module, *args, **kwargs):
        route = self.routing.route(self.index)
        if route is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        forwards = self.routing.forwards
        return route.run(forwards, module, *forwards.route_args(module, *args, **kwargs))


# --------------------------------------------------------------------------- public API
def routed_forwards(model: nn.Module) -> type[RoutedForwards]:
    """The :class:`RoutedForwards` of ``model`` (most specific registered class in its MRO), or
    :class:`UsageError`."""
    from slimdiff.runtime import dynamic_dit, dynamic_pixart  # noqa: F401  (register their forwards)

    for cls in type(model).__mro__:
        if cls in ROUTED:
            return ROUTED[cls]
    names = ", ".join(c.__name__ for c in ROUTED)
    raise UsageError(f"DyDiT execution supports {names}; got {type(model).__name__}")


def routing_of(model: nn.Module) -> DyDiTRouting:
    """The :class:`DyDiTRouting` of a DyDiT model, or :class:`UsageError`."""
    r = getattr(model, "dydit", None)
    if not isinstance(r, DyDiTRouting):
        raise UsageError("this model has no DyDiT routers; compress it with --method dydit first")
    return r


def default_config(model: nn.Module, **overrides) -> RoutingConfig:
    """Routers for every block: one per head, ``num_heads`` MLP channel groups (as the reference)."""
    routed_forwards(model)  # refuse architectures DyDiT cannot route
    bb = as_backbone(model)
    heads = [bb.heads(i) for i in range(len(bb.blocks))]
    groups = []
    for i, h in enumerate(heads):
        width = bb.mlp_width(i)
        groups.append(h if width % h == 0 else math.gcd(width, h))
    return RoutingConfig(heads=heads, groups=groups, **overrides)


def apply_dydit(model: nn.Module, config: RoutingConfig) -> DyDiTRouting:
    """Add DyDiT routers (``model.dydit``) and their hooks to ``model`` in place; returns the routing.

    ``model`` is any architecture with registered :class:`RoutedForwards` (our DiT, diffusers
    PixArt). Idempotent for the same config. The model keeps its class, modules and weights;
    with the routers all on it computes exactly what it computed before.
    """
    forwards = routed_forwards(model)
    forwards.check(model)
    bb = as_backbone(model)
    blocks = bb.blocks
    if len(config.heads) != len(blocks) or len(config.groups) != len(blocks):
        raise UsageError(f"routing config is for {len(config.heads)} blocks, the model has {len(blocks)}")
    for i, g in enumerate(config.groups):
        if bb.mlp_width(i) % g:
            raise UsageError(f"MLP width {bb.mlp_width(i)} does not split into {g} channel groups")
    existing = getattr(model, "dydit", None)
    if isinstance(existing, DyDiTRouting):
        if asdict(existing.config) == asdict(config):
            return existing
        raise UsageError("the model already has DyDiT routers with another configuration")
    routing = DyDiTRouting(blocks, bb.time_embedding_dim, config, forwards, type(bb)).to(next(model.parameters()).device)
    model.dydit = routing
    routing.train(model.training)
    registry = HookRegistry.check_if_exists_or_initialize
    part = bb.time_embedding_part
    if part is not None:
        registry(part).register_hook(_TimePartHook(routing), HOOK)
    registry(bb.time_embedding).register_hook(_TimeEmbeddingHook(routing), HOOK)
    for i, block in enumerate(blocks):
        registry(block).register_hook(_BlockHook(routing, i), HOOK)
    registry(model).register_hook(_CallHook(routing), HOOK)
    registry(model).invalidate_child_registries_cache()
    return routing


def remove_dydit(model: nn.Module) -> nn.Module:
    """Remove DyDiT's routers and hooks (a no-op without them); the model is the unrouted one again.

    A block-reuse plan applied on top must be removed first (its hooks wrap DyDiT's).
    """
    if hasattr(model, "dydit") and get_block_reuse(model) is not None:
        raise UsageError("this model has a block-reuse plan on top of its DyDiT routing: "
                         "call remove_block_reuse(model) first")
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(HOOK, recurse=True)
        registry.invalidate_child_registries_cache()
    if isinstance(getattr(model, "dydit", None), DyDiTRouting):
        del model.dydit
    return model


__all__ = ["RoutingConfig", "DyDiTRouting", "BlockRouters", "token_router", "TOKEN_ROUTERS", "ROUTER_INITS", "LEGACY", "MODES", "CAPACITY_MODES", "HOOK", "apply_dydit",
           "remove_dydit", "routing_of", "default_config", "routed_forwards"]
