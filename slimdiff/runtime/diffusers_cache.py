"""diffusers' own training-free caches, run by slimdiff's sampling loop.

FirstBlockCache, TaylorSeer, MagCache, Pyramid Attention Broadcast and FasterCache are applied
with diffusers' public ``apply_*(module, config)`` functions (``diffusers/hooks/``, 0.42). Our
DiT targets (``DiTTransformer2DModel``) have no ``CacheMixin``, so no ``enable_cache`` and no
``cache_context``; diffusers' pipelines supply what the hooks need around every denoiser call.
:func:`apply_diffusers_cache` adds one outermost hook on the model that does the same for
:func:`slimdiff.diffusion.sampling.sample`:

* **a fresh state per sampling run** (a pipeline call resets its hooks): a new run is seen
  from :func:`~slimdiff.diffusion.sampling.current_sampler`, whose value is a new object for
  every run of :class:`~slimdiff.diffusion.sampling.Trajectory` (we keep a reference to the
  last one, so identity cannot be reused); outside a run, a timestep above the last one
  starts a new run. :func:`reset_diffusers_cache` resets by hand;
* **the cache context** (``CacheContext("cond", step_index, timestep)``) that
  FirstBlockCache and TaylorSeer's state managers require (``hooks.py`` ``StateManager.context``
  raises "No cache context is set" otherwise). Our guided batch is one call, so one context;
* **the current timestep** for PAB and FasterCache's ``current_timestep_callback`` (the
  host value the loop publishes, :func:`~slimdiff.diffusion.sampling.current_timestep`);
* **FasterCache's batch order**: its CFG-Cache assumes ``[uncond; cond]``
  (``faster_cache.py`` ``_get_cond_input`` keeps the second half) while our loop builds
  ``[cond; uncond]``; the hook swaps the halves of a class-conditional guided batch (second
  half all null labels) around the call, so the unconditional branch is the one approximated.

A cache is described by ``(name, params)``: ``params`` are the diffusers config's own field
names with JSON values (that is what a record stores and :func:`apply_diffusers_cache`
re-applies on load).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.hooks.faster_cache import (
    _FASTER_CACHE_BLOCK_HOOK,
    _FASTER_CACHE_DENOISER_HOOK,
)
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.hooks import CacheContext, HookRegistry, ModelHook, StateManager
from diffusers.hooks.mag_cache import (
    _MAG_CACHE_BLOCK_HOOK,
    _MAG_CACHE_LEADER_BLOCK_HOOK,
)
from diffusers.hooks.pyramid_attention_broadcast import (
    _PYRAMID_ATTENTION_BROADCAST_HOOK,
)
from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

from slimdiff.diffusion.sampling import current_sampler, current_timestep
from slimdiff.errors import UsageError

CACHES = {
    "fbcache": (FirstBlockCacheConfig, apply_first_block_cache, (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK)),
    "taylorseer": (TaylorSeerCacheConfig, apply_taylorseer_cache, (_TAYLORSEER_CACHE_HOOK,)),
    "magcache": (MagCacheConfig, apply_mag_cache, (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK)),
    "pab": (PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast, (_PYRAMID_ATTENTION_BROADCAST_HOOK,)),
    "fastercache": (FasterCacheConfig, apply_faster_cache, (_FASTER_CACHE_DENOISER_HOOK, _FASTER_CACHE_BLOCK_HOOK)),
}
"""Cache name -> (diffusers config class, its ``apply_*`` function, its hook names (what
``CacheMixin.disable_cache`` removes, ``models/cache_utils.py``))."""

_RUN_HOOK = "slimdiff_cache_run"
_FIXED = {  # what our models need, not a choice: images are BCHW; DiT's labels ride in the CFG batch
    "fastercache": {"tensor_format": "BCHW",
                    "_unconditional_conditional_input_kwargs_identifiers": ["hidden_states", "timestep",
                                                                            "class_labels"]},
}


class CacheRunHook(ModelHook):
    """The outermost hook of a cached model: one fresh cache state per sampling run, the cache
    context, the current timestep, FasterCache's batch order (see the module docs)."""

    _is_stateful = False  # resetting the model's hooks must not reset the run tracking itself

    def __init__(self, name: str, params: dict, swap_cfg: bool, null_label: int | None):
        super().__init__()
        self.name, self.params = name, params
        self.swap_cfg, self.null_label = swap_cfg, null_label
        self.managers: list[StateManager] = []
        self.run: Any = None
        self.last_t: float | None = None
        self.step = -1
        self.t = 0.0

    def timestep(self) -> float:
        """The timestep of the call in progress (diffusers' ``current_timestep_callback``)."""
        return self.t

    def reset(self, module: nn.Module) -> None:
        """Reset every cache hook of ``module`` (a new sampling run)."""
        HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks(recurse=True)
        self.step = -1

    def _set_context(self, context: CacheContext | None) -> None:
        for m in self.managers:
            m.set_context(context)

    def new_forward(self, module: nn.Module, *args, **kwargs):
        t = current_timestep()
        if t is None:
            ts = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            t = float(torch.as_tensor(ts).reshape(-1)[0]) if ts is not None else 0.0
        run = current_sampler()
        new_run = (self.run is not run) if run is not None else (self.last_t is None or t > self.last_t)
        if new_run or self.step < 0:
            self.reset(module)
        self.run, self.last_t, self.t = run, t, t
        self.step += 1
        swap = self.swap_cfg and self._is_guided_batch(kwargs.get("class_labels"))
        if swap:
            args = tuple(_swap(a) for a in args)
            kwargs = {k: _swap(v) for k, v in kwargs.items()}
        self._set_context(CacheContext("cond", step_index=self.step, timestep=t))
        try:
            out = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self._set_context(None)
        if swap:
            if isinstance(out, tuple):
                return (_swap(out[0]), *out[1:])
            out.sample = _swap(out.sample)
        return out

    def _is_guided_batch(self, labels: Any) -> bool:
        """``[cond; uncond]`` from our loop: the second half all null labels, the first none."""
        if self.null_label is None or not torch.is_tensor(labels) or labels.ndim != 1 or labels.shape[0] % 2:
            return False
        a, b = labels.chunk(2)
        return bool((b == self.null_label).all() and (a != self.null_label).all())


def _swap(x: Any) -> Any:
    """The two halves of a batch tensor exchanged (anything else unchanged)."""
    if torch.is_tensor(x) and x.ndim >= 1 and x.shape[0] % 2 == 0 and x.shape[0] > 0:
        a, b = x.chunk(2)
        return torch.cat([b, a])
    return x


def _diffusers_config(name: str, params: dict, hook: CacheRunHook) -> Any:
    """The diffusers config of cache ``name`` from JSON ``params`` (lists -> tuples / tensors)."""
    cls = CACHES[name][0]
    values: dict[str, Any] = {}
    for k, v in {**params, **_FIXED.get(name, {})}.items():
        if k == "mag_ratios" and v is not None:
            v = torch.tensor(v, dtype=torch.float32)
        elif k == "taylor_factors_dtype":
            v = getattr(torch, v)
        elif k.endswith("_range") and isinstance(v, list):
            v = tuple(v)
        values[k] = v
    if "current_timestep_callback" in cls.__dataclass_fields__:
        values["current_timestep_callback"] = hook.timestep
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise UsageError(f"bad {name} settings {params}: {e}") from None


def diffusers_cache_of(model: nn.Module) -> CacheRunHook | None:
    """The run hook of the diffusers cache applied to ``model`` (None when there is none)."""
    reg = getattr(model, "_diffusers_hook", None)
    return reg.get_hook(_RUN_HOOK) if reg is not None else None


def apply_diffusers_cache(model: nn.Module, name: str, params: dict) -> nn.Module:
    """Apply diffusers cache ``name`` (see :data:`CACHES`) with ``params`` to ``model``, plus the
    run hook that makes :func:`~slimdiff.diffusion.sampling.sample` behave like a pipeline call."""
    if name not in CACHES:
        raise UsageError(f"unknown diffusers cache {name!r}; known: {', '.join(CACHES)}")
    if diffusers_cache_of(model) is not None:
        raise UsageError("the model already carries a diffusers cache: apply at most one (remove it first)")
    null = getattr(getattr(model, "config", None), "num_embeds_ada_norm", None)
    hook = CacheRunHook(name, dict(params), swap_cfg=name == "fastercache", null_label=null)
    config = _diffusers_config(name, params, hook)
    CACHES[name][1](model, config)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(hook, _RUN_HOOK)  # registered last: the outermost forward
    hook.managers = [attr for m in model.modules() if hasattr(m, "_diffusers_hook")
                     for h in m._diffusers_hook.hooks.values() for attr in vars(h).values()
                     if isinstance(attr, StateManager)]
    hook.managers = list({id(m): m for m in hook.managers}.values())
    return model


def remove_diffusers_cache(model: nn.Module) -> None:
    """Remove the diffusers cache and its run hook from ``model`` (other hooks stay)."""
    hook = diffusers_cache_of(model)
    if hook is None:
        return
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.remove_hook(_RUN_HOOK, recurse=False)
    for name in CACHES[hook.name][2]:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()


def reset_diffusers_cache(model: nn.Module) -> None:
    """Start the next call of ``model`` from a fresh cache state (a new sampling run)."""
    hook = diffusers_cache_of(model)
    if hook is not None:
        hook.reset(model)


def magcache_ratios(model: nn.Module) -> list[float]:
    """The magnitude ratios MagCache recorded in calibration mode during the last run."""
    hook = diffusers_cache_of(model)
    if hook is None or hook.name != "magcache" or not hook.params.get("calibrate"):
        raise UsageError("magcache_ratios needs a model with MagCache applied in calibration mode")
    hook.managers[0].set_context(CacheContext("cond"))
    try:
        return [float(r) for r in hook.managers[0].get_state().calibration_ratios]
    finally:
        hook.managers[0].set_context(None)


__all__ = [
    "CACHES",
    "CacheRunHook",
    "apply_diffusers_cache",
    "diffusers_cache_of",
    "magcache_ratios",
    "remove_diffusers_cache",
    "reset_diffusers_cache",
]
