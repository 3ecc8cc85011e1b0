"""Compute accounting: MACs, parameter counts (and their ratio) and wall-time ratios.

Why these choices:

* **MACs come from running the code**, not from a formula per architecture:
  :func:`count_macs` runs one call under ``torch.utils.flop_counter.FlopCounterMode``
  and halves the FLOPs (one multiply-accumulate = 2 FLOPs). Whatever a method skips
  at run time (pruned channels, reused blocks, routed-away tokens, skipped steps) is
  simply not counted, so every method is measured in the same currency. A sampling run
  whose model calls all cost the same is priced from one counted call (the same integer).
* **Attention is counted.** On CPU, ``F.scaled_dot_product_attention`` dispatches to a
  fused kernel that FlopCounterMode does not know, so the ``Q K^T`` and ``A V`` matmuls
  (``2 N^2 D`` MACs per layer and sample) would silently be missing. We count under
  ``sdpa_kernel(SDPBackend.MATH)``, which decomposes attention into counted ``bmm`` ops.
  The MATH backend computes the same values, so a counted run is a real run.
* Only matmul-like ops (linear, conv, bmm, ...) are counted, as is usual for MACs;
  elementwise work (norms, activations, scheduler updates) is not.
* **Speed is a ratio measured in one process** (see ``/work/shared/BENCHMARK.md``):
  :func:`latency_ratio` warms every callable up, then times them round-robin so that
  machine noise hits all of them alike, and reports medians relative to a reference.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from slimdiff.errors import UsageError
from slimdiff.utils import hooked_modules


def count_flops_by_op(fn: Callable[..., Any], *args, **kwargs) -> dict[str, int]:
    """FLOPs of one call ``fn(*args, **kwargs)``, split by aten op (e.g. ``"aten.addmm"``).

    Runs under ``torch.no_grad()`` and the SDPA MATH backend (so attention matmuls show
    up as ``aten.bmm``). Useful to see where the MACs of a model go.
    """
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        fn(*args, **kwargs)
    return {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}


def count_macs(fn: Callable[..., Any], *args, **kwargs) -> int:
    """Multiply-accumulates (= FLOPs / 2) of one call ``fn(*args, **kwargs)``, attention included."""
    return sum(count_flops_by_op(fn, *args, **kwargs).values()) // 2


def params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (shared parameters counted once; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def params_ratio(model: nn.Module, reference: nn.Module) -> float:
    """``params(model) / params(reference)``: the parameter ratio recorded next to the MACs ratio.

    The two differ for width pruning: MACs count per-token matmuls, while adaLN modulation
    (``6 D^2`` parameters per DiT block, a third of them) runs once per sample and costs almost
    no MACs, so pruning only attention/MLP inner widths to MACs 0.5 keeps ~0.7 of a DiT's
    parameters; residual-width pruning brings the two ratios together.
    """
    total = params(reference)
    if total == 0:
        raise UsageError("the reference model has no parameters: no parameter ratio")
    return params(model) / total


def macs_forward(model: nn.Module, batch: int = 1) -> int:
    """MACs of one denoiser forward pass on ``batch`` example inputs (via the Backbone view)."""
    from slimdiff.models.backbone import as_backbone

    if batch < 1:
        raise UsageError(f"batch must be >= 1, got {batch}")
    bb = as_backbone(model)
    x, t, cond = bb.example_inputs(batch)
    return count_macs(bb, x, t, cond)


_STATELESS_CODE = ("torch.", "diffusers.", "slimdiff.models.")
"""Packages whose modules run the same computation on every call of the same shape."""


def fixed_cost_per_call(model: nn.Module) -> bool:
    """Whether every model call of a sampling run costs the same MACs, so one counted call prices the run.

    False for anything that can vary per call: a diffusers ``ModelHook`` anywhere (every
    slimdiff runtime is one: block-reuse plans, branch caches, DyDiT routing, diffusers'
    caches, depth gates), a torch forward hook, or a module whose code is not torch's,
    diffusers' or ``slimdiff.models``' (it may keep state between calls).
    """
    if hooked_modules(model):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or not type(m).__module__.startswith(_STATELESS_CODE)
                   for m in model.modules())


def macs_sampling(
    model: nn.Module, sampler: str = "ddim", steps: int = 50, cfg: float = 1.0, batch: int = 1
) -> int:
    """MACs **per generated image** of one full sampling run.

    The run is the one ``slimdiff.diffusion.sampling.sample(model, sampler=..., steps=...,
    cfg=..., num_samples=batch, seed=0)`` makes. When every model call costs the same
    (:func:`fixed_cost_per_call`), one call is counted (on the run's first input, with the
    ``[cond; uncond]`` batch under guidance) and multiplied by the number of calls: the same
    integer as the whole loop, 50x faster at 50 steps. Otherwise the real loop is counted,
    so anything that skips work during sampling (block reuse plans, per-step routing,
    caches) is reflected; with input-dependent routing, a larger ``batch`` averages over
    more samples. The total is divided by ``batch`` (rounded).
    """
    from slimdiff.diffusion.sampling import prepare, sample

    if batch < 1:
        raise UsageError(f"batch must be >= 1, got {batch}")
    run = dict(sampler=sampler, steps=steps, cfg=cfg, num_samples=batch, seed=0)
    if fixed_cost_per_call(model):
        traj, x = prepare(model, **run)
        flops = sum(count_flops_by_op(traj.predict, traj.model_input(x, 0), traj.timesteps[0], 0).values())
        total = flops * len(traj.timesteps) // 2
    else:
        total = count_macs(sample, model, **run)
    return round(total / batch)


def synchronize() -> None:
    """Wait for queued GPU kernels, so that wall time covers them (CUDA calls return early)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def latency_ratio(
    fns: dict[str, Callable[[], Any]], reference: str, warmup: int = 2, repeats: int = 7
) -> dict:
    """Wall time of each zero-argument callable relative to ``fns[reference]``, in one process.

    Each callable is first called ``warmup`` times; then ``repeats`` rounds call every
    callable once, round-robin (the starting callable rotates each round so none is always
    first), timing each call with ``time.perf_counter`` (after a CUDA synchronisation when
    CUDA is in use). Returns ``{name: {"median_s",
    "ratio", "times_s"}}`` for every name plus ``"settings": {"reference", "warmup",
    "repeats", "order"}``. ``ratio`` = median / reference median (< 1 is faster).
    """
    if not fns:
        raise UsageError("latency_ratio needs at least one callable")
    if reference not in fns:
        raise UsageError(f"reference {reference!r} is not one of the callables {sorted(fns)}")
    if "settings" in fns:
        raise UsageError("'settings' is reserved in latency_ratio's result; rename that callable")
    if warmup < 0 or repeats < 1:
        raise UsageError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    synchronize()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            start = time.perf_counter()
            fns[name]()
            synchronize()
            times[name].append(time.perf_counter() - start)
    ref = statistics.median(times[reference])
    out: dict[str, Any] = {
        name: {"median_s": statistics.median(ts), "ratio": statistics.median(ts) / ref, "times_s": ts}
        for name, ts in times.items()
    }
    out["settings"] = {"reference": reference, "warmup": warmup, "repeats": repeats, "order": "round-robin, rotating"}
    return out


__all__ = ["count_macs", "count_flops_by_op", "params", "params_ratio", "macs_forward", "macs_sampling",
           "fixed_cost_per_call", "latency_ratio", "synchronize"]
