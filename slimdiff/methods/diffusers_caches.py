"""diffusers' training-free caches as baselines, at a measured MACs budget.

FirstBlockCache (``fbcache``), TaylorSeer (``taylorseer``), MagCache (``magcache``), Pyramid
Attention Broadcast (``pab``) and FasterCache (``fastercache``), exactly as diffusers ships them
(``diffusers/hooks/``, applied with its public ``apply_*(module, config)``; see
:mod:`slimdiff.runtime.diffusers_cache` for what the sampling loop adds: a fresh state per run,
the cache context, the timestep). Our DiT is converted to ``DiTTransformer2DModel`` first
(:func:`slimdiff.models.convert.dit_to_diffusers`, exact); a diffusers DiT passes through.
diffusers 0.42 registers ``BasicTransformerBlock`` (DiT's block) for the block-level caches and
``Attention`` for the attention-level ones, so all five run on it, although
``DiTTransformer2DModel`` has no ``CacheMixin`` (no ``enable_cache``).

Their compute depends on the input, so it is **measured**: MACs of a sampling run (ctx's
sampler, steps and guidance) of ``calib_samples`` calibration samples (ctx's seed) under
``FlopCounterMode`` (:func:`slimdiff.eval.compute.count_macs`), relative to the same run
uncached. Each cache's main knob is tuned by bisection to the smallest setting whose measured
ratio is at or under the budget (stopping once within :data:`slimdiff.budget.BUDGET_TOLERANCE`
of it); a budget the cache cannot reach is a :class:`UsageError` giving the reachable range.
The other settings are diffusers' defaults except where said:

* ``fbcache``: ``threshold`` (diffusers' default 0.05; tuned);
* ``taylorseer``: ``cache_interval`` (default 5; tuned), ``disable_cache_before_step=3``,
  ``max_order=1``, bf16 factors; the blocks' attention *and* MLP outputs are forecast, as the
  official TaylorSeer-DiT does (``cache_mlp``; false = diffusers' default, attention only:
  its default patterns fullmatch ``...attn`` and so miss DiT's ``attn1``, so we name DiT's
  modules). On digits-dit (DDIM 50) attention alone cannot get below ~0.70 of the MACs;
* ``magcache``: ``threshold`` (default 0.06; tuned), ``max_skip_steps=3``,
  ``retention_ratio=0.2`` (options); these bound its reach (about ``retention + (1 -
  retention) / (K + 1)`` of the MACs); its magnitude ratios are calibrated on the calibration
  run with diffusers' calibration mode (``calibrate=True``), for ctx's sampler and step count;
* ``pab``: ``spatial_attention_block_skip_range`` (tuned; PAB's paper uses 2 for spatial
  attention), ``spatial_attention_timestep_skip_range=(100, 800)`` (options ``timestep_low``,
  ``timestep_high``); DiT has no temporal or cross attention, so PAB only reuses self-attention
  (~0.77 of the MACs at best on digits-dit, DDIM 50);
* ``fastercache``: under guidance (cfg != 1) ``unconditional_batch_skip_range`` (CFG-Cache,
  default 5; tuned) with ``spatial_attention_block_skip_range=2``; without guidance there is
  no unconditional branch, so it runs as diffusers does for a guidance-distilled model
  (``is_guidance_distilled=True``: attention reuse only) and the attention skip range is tuned.

The record holds the tuned value and the calibration MACs ratio (``measured``), and the
diffusers settings (``extras``: ``{"cache", "params"}``) that ``restore`` re-applies on load.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from slimdiff.budget import BUDGET_TOLERANCE
from slimdiff.diffusion.sampling import sample, schedule_timesteps
from slimdiff.errors import UsageError
from slimdiff.methods.base import Context, record
from slimdiff.methods.spec import MethodSpec, check_options, option
from slimdiff.runtime.diffusers_cache import (
    apply_diffusers_cache,
    diffusers_cache_of,
    magcache_ratios,
    remove_diffusers_cache,
)

_BISECT_STEPS = 24  # at most; continuous knobs: geometric bisection between 1e-3 and _MAX_THRESHOLD ...
_PRECISION = 1.05  # ... down to 5% of the knob's value
_MAX_THRESHOLD = 100.0  # FBCache's relative change / MagCache's summed error: far above any real value
_ATTN, _MLP = r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"  # DiT's module names


@dataclass(frozen=True)
class CacheConfig:
    """Options shared by every diffusers cache baseline."""

    calib_samples: int = option(4, "samples of the calibration sampling run the knob is tuned on (MACs measured)",
                                low=1)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class TaylorSeerConfig(CacheConfig):
    """TaylorSeer's options. The official TaylorSeer-DiT forecasts both branch outputs of every
    block before their adaLN gates (ywlq/TaylorSeer ``TaylorSeer-DiT/models.py``
    ``DiTBlock.forward``; diffusers' ``attn1`` and ``ff`` outputs are those same pre-gate
    tensors), so that is the default; diffusers' own default patterns forecast attention only."""

    cache_mlp: bool = option(True, "forecast each block's MLP output too, as TaylorSeer's official DiT code does; "
                                   "false = diffusers' default patterns (attention outputs only), a deviation")
    max_order: int = option(1, "Taylor expansion order (diffusers' default; TaylorSeer-DiT's README recommends 4 "
                               "at interval 4)", low=0)


@dataclass(frozen=True)
class MagCacheConfig(CacheConfig):
    """MagCache's options besides the tuned threshold (diffusers' defaults)."""

    max_skip_steps: int = option(3, "most consecutive skipped steps (K in the paper; diffusers' default 3)", low=1)
    retention_ratio: float = option(0.2, "fraction of the first steps never skipped (diffusers' default 0.2)",
                                   low=0, high=1)


@dataclass(frozen=True)
class PABConfig(CacheConfig):
    """PAB's options besides the tuned skip range (diffusers' defaults)."""

    timestep_low: int = option(100, "spatial attention is reused only at timesteps above this (diffusers' default)",
                                low=0)
    timestep_high: int = option(800, "... and below this (diffusers' default)", low=0)

    def __post_init__(self) -> None:
        check_options(self)
        if self.timestep_low >= self.timestep_high:
            raise UsageError(f"timestep_low ({self.timestep_low}) must be below timestep_high ({self.timestep_high})")


def _diffusers_model(model: nn.Module) -> nn.Module:
    """Our DiT converted to ``DiTTransformer2DModel``; a diffusers DiT as it is."""
    from diffusers import DiTTransformer2DModel

    from slimdiff.models.dit import DiT
    from slimdiff.runtime.reuse import get_block_reuse

    if get_block_reuse(model) is not None:
        raise UsageError("the model carries a block-reuse plan: chain at most one reuse method")
    if diffusers_cache_of(model) is not None:
        raise UsageError("the model already carries a diffusers cache: chain at most one reuse method")
    if isinstance(model, DiT):
        from slimdiff.models.convert import dit_to_diffusers

        return dit_to_diffusers(model)
    if isinstance(model, DiTTransformer2DModel):
        return model
    raise UsageError(f"diffusers' caches apply to DiT models here (ours or DiTTransformer2DModel), "
                     f"not {type(model).__name__}")


def _applies(model: nn.Module) -> bool:
    from diffusers import DiTTransformer2DModel

    from slimdiff.models.dit import DiT

    return isinstance(model, (DiT, DiTTransformer2DModel))


class _Calibration:
    """The calibration sampling run: ctx's sampler, steps, guidance; ``n`` samples of ctx's seed."""

    def __init__(self, model: nn.Module, ctx: Context, n: int):
        from slimdiff.compression.reuse_plans import teacher_batch

        if not isinstance(n, int) or n < 1:
            raise UsageError(f"calib_samples must be a positive integer, got {n!r}")
        self.model, self.ctx, self.n = model, ctx, n
        self.noise, labels, _ = teacher_batch(model, n, ctx.seed, sampler=ctx.sampler, steps=ctx.steps, cfg=ctx.cfg,
                                              with_target=False)
        self.classes = labels.tolist() if labels is not None else None
        self.full = self.macs()

    def run(self) -> torch.Tensor:
        c = self.ctx
        return sample(self.model, sampler=c.sampler, steps=c.steps, cfg=c.cfg, num_samples=self.n,
                      classes=self.classes, seed=c.seed, noise=self.noise)

    def macs(self) -> int:
        from slimdiff.eval.compute import count_macs

        return count_macs(self.run)

    def ratio(self, name: str, params: dict) -> float:
        """Measured MACs ratio of the run with cache ``name`` at ``params`` (left applied)."""
        from diffusers.utils import logging as diffusers_logging

        remove_diffusers_cache(self.model)
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # FasterCache warns on every apply; once (the final one) is enough
        try:
            apply_diffusers_cache(self.model, name, params)
        finally:
            diffusers_logging.set_verbosity(level)
        return self.macs() / self.full


def tune(measure: Callable[[float], float], budget: float, integer: bool, hi: float, what: str,
         ) -> tuple[float, float]:
    """(value, ratio): the smallest knob value whose measured ratio ``measure(value)`` is at or
    under ``budget`` (bisection, assuming the ratio falls as the knob grows; a continuous knob
    stops once within :data:`BUDGET_TOLERANCE`). ``hi`` is the most aggressive value; a budget
    it cannot reach is a :class:`UsageError` naming the reachable range."""
    r_hi = measure(hi)
    if r_hi > budget:
        raise UsageError(f"{what} reaches MACs ratios {r_hi:.3f} .. 1 here (at {hi:g}); budget {budget:g} is below "
                         f"that: use a budget >= {math.ceil(r_hi * 1000) / 1000:g}")
    lo = 1 if integer else 0.0
    r_lo = measure(lo)
    if r_lo <= budget:
        return lo, r_lo
    best = (hi, r_hi)
    lo = 1 if integer else 1e-3
    for _ in range(_BISECT_STEPS):
        if (hi - lo <= 1) if integer else (hi / lo <= _PRECISION):
            break
        mid = (lo + hi) // 2 if integer else math.sqrt(lo * hi)
        r = measure(mid)
        if r <= budget:
            hi, best = mid, (mid, r)
            if not integer and budget - r <= BUDGET_TOLERANCE:
                break
        else:
            lo = mid
    return best


@dataclass(frozen=True)
class _Cache:
    """How one diffusers cache is tuned: the knob (a diffusers config field), whether it is an
    integer, and its other settings (the config's options, else diffusers' defaults)."""

    name: str
    knob: str
    integer: bool
    fixed: Callable[[Context, int, Any], dict]  # (ctx, model calls per run, the method's config) -> settings


def _fastercache_knob(ctx: Context) -> str:
    return "unconditional_batch_skip_range" if ctx.cfg != 1 else "spatial_attention_block_skip_range"


_CACHES = {
    "fbcache": _Cache("fbcache", "threshold", False, lambda ctx, n, c: {}),
    "taylorseer": _Cache("taylorseer", "cache_interval", True,
                         lambda ctx, n, c: {"disable_cache_before_step": 3, "max_order": c.max_order,
                                            "taylor_factors_dtype": "bfloat16",
                                            # diffusers' default patterns fullmatch "...attn"; DiT's is "attn1"
                                            "cache_identifiers": [_ATTN] + ([_MLP] if c.cache_mlp else [])}),
    "magcache": _Cache("magcache", "threshold", False,
                       lambda ctx, n, c: {"max_skip_steps": c.max_skip_steps, "retention_ratio": c.retention_ratio,
                                          "num_inference_steps": n}),
    "pab": _Cache("pab", "spatial_attention_block_skip_range", True,
                  lambda ctx, n, c: {"spatial_attention_timestep_skip_range": [c.timestep_low, c.timestep_high]}),
    "fastercache": _Cache("fastercache", "", True,
                          lambda ctx, n, c: {"is_guidance_distilled": ctx.cfg == 1,
                                             **({"spatial_attention_block_skip_range": 2} if ctx.cfg != 1 else {})}),
}


def _compress(name: str) -> Callable[..., nn.Module]:
    cache = _CACHES[name]

    def compress(model: nn.Module, budget: float, ctx: Context, config: CacheConfig) -> nn.Module:
        model = _diffusers_model(model)
        calib = _Calibration(model, ctx, config.calib_samples)
        n_calls = len(schedule_timesteps(ctx.sampler, ctx.steps, model))
        params: dict[str, Any] = cache.fixed(ctx, n_calls, config)
        if name == "magcache":
            # diffusers' calibration mode: nothing skipped, one magnitude ratio logged per call; one
            # call more than the run has, so that mag_cache.py's end-of-run reset (_advance_step)
            # leaves the ratios for us to read (the run hook resets the state at the next run)
            apply_diffusers_cache(model, name, {**params, "calibrate": True, "num_inference_steps": n_calls + 1})
            with torch.no_grad():
                calib.run()
            params["mag_ratios"] = magcache_ratios(model)
            remove_diffusers_cache(model)
        knob = cache.knob or _fastercache_knob(ctx)
        value, ratio = tune(lambda v: calib.ratio(name, {**params, knob: v}), budget, cache.integer,
                            n_calls if cache.integer else _MAX_THRESHOLD, f"{name} ({knob})")
        params[knob] = int(value) if cache.integer else float(value)
        remove_diffusers_cache(model)
        apply_diffusers_cache(model, name, params)
        measured = {knob: params[knob], "calibration_macs_ratio": ratio, "calibration_samples": calib.n}
        settings = {"sampler": ctx.sampler, "steps": ctx.steps, "cfg": ctx.cfg, **dataclasses.asdict(config),
                    knob: params[knob]}
        return record(model, name, settings, measured, {"cache": name, "params": params})

    compress.__doc__ = f"diffusers' {name} tuned to ``budget`` by measured MACs (see the module docs)."
    return compress


def restore_cache(model: nn.Module, extras: dict | None) -> None:
    """Re-apply a recorded diffusers cache (the restorer of every cache baseline)."""
    if not extras or "cache" not in extras:
        raise UsageError("the model's metadata names a diffusers cache but holds no settings; compress it again")
    apply_diffusers_cache(model, extras["cache"], extras["params"])


def _spec(name: str, help: str, config: type = CacheConfig) -> MethodSpec:
    return MethodSpec(name, "reuse", help, _compress(name), config, restore=restore_cache, applies=_applies,
                      cannot_follow={"dydit": "diffusers' caches run on DiTTransformer2DModel, and converting DyDiT's "
                                              "routed DiT to it would drop the routers; chain dydit with dipgo, "
                                              "deepcache-style, l2c-block or fewer-steps"})


FBCACHE = _spec("fbcache", "diffusers FirstBlockCache, threshold tuned to the measured MACs budget")
TAYLORSEER = _spec("taylorseer", "diffusers TaylorSeer cache, cache interval tuned to the measured MACs budget",
                   TaylorSeerConfig)
MAGCACHE = _spec("magcache", "diffusers MagCache (ratios calibrated), threshold tuned to the measured MACs budget",
                 MagCacheConfig)
PAB = _spec("pab", "diffusers Pyramid Attention Broadcast, skip range tuned to the measured MACs budget", PABConfig)
FASTERCACHE = _spec("fastercache", "diffusers FasterCache, skip range tuned to the measured MACs budget")
SPECS = (FBCACHE, TAYLORSEER, MAGCACHE, PAB, FASTERCACHE)

__all__ = ["FASTERCACHE", "FBCACHE", "MAGCACHE", "PAB", "SPECS", "TAYLORSEER", "CacheConfig", "MagCacheConfig",
           "PABConfig", "TaylorSeerConfig", "restore_cache", "tune"]
