"""What every compression method receives, and the chain runner they share.

A method is a :class:`~slimdiff.methods.spec.MethodSpec` (see :mod:`slimdiff.methods.spec`)
whose ``compress(model, budget, ctx, config)`` does the work.
It receives the model (a copy it may change in place), a **budget**
(fraction of *its input's* sampling MACs for ``ctx.sampler``/``ctx.steps``/``ctx.cfg``)
and its ``config`` (the spec's dataclass of options), and returns a model ready to sample with. It
records what it did with :func:`record` (settings, budget reached, runtime data in
``extras``). Methods whose result needs runtime state at load time (a reuse plan, routing
tables) set the spec's ``restore``; ``slimdiff.load`` calls it.

Chains (``tinyfusion+dipgo``; ``,`` is accepted too) run static depth/width first, then dynamic routing, then
step reuse, each at ``budget ** (1/k)`` of its input so that the end-to-end budget is met;
MACs are always measured end to end against the original, and a result more than the budget
tolerance below its budget is warned about there, with the reason each method records
(``budget_note``). Budget 1.0 returns the model unchanged (each method's own contract; an
explicit structure such as TinyFusion's ``keep`` overrides the budget).

Resumable work (recovery fine-tuning, searches, DiP-GO's optimisation) lives under
``ctx.work_dir`` in folders keyed by :func:`fingerprint` of the model it starts from, so a
rerun after a crash continues where it stopped and never resumes another model's work.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch.nn as nn

from slimdiff.budget import BUDGET_NOTE, BUDGET_TOLERANCE, ForwardCost, chain_step_budget, check_budget, far_below, over_budget
from slimdiff.errors import UsageError
from slimdiff.methods import get_method, split_chain
from slimdiff.methods.spec import KIND_ORDER, MethodSpec
from slimdiff.result import ChainEntry, record_of, set_record


@dataclass
class Context:
    """Settings shared by every method in one ``compress`` call."""

    sampler: str = "ddim"
    steps: int = 50
    cfg: float = 1.0
    data: str = "digits"
    seed: int = 0
    recover_steps: int = 0
    kd: str = "none"
    batch_size: int = 64
    lr: float = 2e-4
    work_dir: Path | None = None
    progress: bool = True
    teacher: nn.Module | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        """Every value checked at construction, so a bad one is refused before any model is loaded."""
        from slimdiff.diffusion.schedulers import SAMPLERS
        from slimdiff.train.distill import KD_MODES

        if self.sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        for name in ("steps", "batch_size"):
            _check_int(f"--{name.replace('_', '-')}", getattr(self, name), minimum=1)
        _check_int("--recover-steps", self.recover_steps, minimum=0)
        _check_int("--seed", self.seed, minimum=-2 ** 63)
        if self.kd not in KD_MODES:
            raise UsageError(f"unknown --kd {self.kd!r}; choose one of {', '.join(KD_MODES)}")
        for name, value, low in (("--cfg", self.cfg, 0.0), ("--lr", self.lr, None)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                    value < low if low is not None else value <= 0):
                bound = f">= {low:g}" if low is not None else "> 0"
                raise UsageError(f"{name} must be a finite number {bound}, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    """``value`` is an integer >= ``minimum`` (a bool or a float is not), else a :class:`UsageError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")


def sampling_macs(model: nn.Module, ctx: Context) -> int:
    """MACs per image of one full sampling run under ``ctx``'s sampler, steps and guidance."""
    return ForwardCost(ctx.sampler, ctx.steps, ctx.cfg).macs(model)


def record(model: nn.Module, name: str, settings: dict, measured: dict, extras: Any = None) -> nn.Module:
    """Append this method's entry (settings, measurements, runtime ``extras``) to the model's record."""
    rec = record_of(model)
    rec.result.add(name, settings, measured, extras)
    return set_record(model, rec)


def settings_key(settings: Any) -> str:
    """12 hex digits of sha256 over a dataclass's (or dict's) values: part of a resume key, so
    that a run with other settings never resumes this one's checkpoint."""
    import dataclasses
    import hashlib
    import json

    d = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def fingerprint(model: nn.Module) -> str:
    """sha256 (hex) of a model's tensor names, dtypes, shapes and values: a resume key."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def recover(model: nn.Module, ctx: Context, tag: str, **train_kwargs) -> nn.Module:
    """Recovery fine-tuning (diffusion loss, or KD from ``ctx.teacher``) for ``ctx.recover_steps``.

    Every method and baseline uses this, so equal steps mean equal recovery.
    """
    if ctx.recover_steps <= 0:
        return model
    from slimdiff.compression.calibration import model_dataset
    from slimdiff.train.trainer import TrainConfig, train

    dataset = model_dataset(model, ctx)
    cfg = TrainConfig(steps=ctx.recover_steps, batch_size=ctx.batch_size, lr=ctx.lr, lr_schedule="constant",
                      kd=ctx.kd, seed=ctx.seed, checkpoint_every=max(1, ctx.recover_steps // 4), **train_kwargs)
    work = Path(ctx.work_dir or "runs/compress") / f"recover-{tag}-{fingerprint(model)[:12]}"
    return train(model, dataset, cfg, work, teacher=ctx.teacher if ctx.kd != "none" else None, resume=True,
                 progress=ctx.progress)


def plan_chain(methods: list[str] | str, settings: dict | None = None,
               recover_steps: int = 0) -> list[tuple[MethodSpec, Any]]:
    """The chain's specs in run order (depth, width, dynamic, reuse) with their configs; every
    check that needs no model (names, which methods compose, options, values) happens here,
    before any work.

    A chain is run in that order whatever order it is written in (a depth or width method
    always runs before a dynamic one, which routes the final blocks and widths, and before
    step reuse, whose plan is learnt for the final model). What cannot compose is refused:
    a method named twice, and more than one dynamic or more than one reuse method (each
    replaces the model's forward with its own runtime; a second would overwrite or wrap
    the first's plan, which was learnt for the model without it).
    """
    names = split_chain(methods)
    if not names:
        raise UsageError("no method given; pass --method NAME (see `slimdiff compress --help`)")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"{', '.join(twice)} named more than once in the chain {'+'.join(names)}; "
                         "name each method once")
    specs = sorted((get_method(n) for n in names), key=lambda e: KIND_ORDER.index(e.kind))
    for kind in ("dynamic", "reuse"):
        same = [e.name for e in specs if e.kind == kind]
        if len(same) > 1:
            raise UsageError(f"the chain {'+'.join(names)} has {len(same)} {kind} methods ({', '.join(same)}); "
                             f"chain at most one {kind} method (each installs its own runtime for the whole model)")
    for i, later in enumerate(specs):
        for earlier in specs[:i]:
            if earlier.name in later.cannot_follow:
                raise UsageError(f"{later.name} cannot run after {earlier.name} in a chain: "
                                 f"{later.cannot_follow[earlier.name]}")
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    unknown = set(settings) - {o for e in specs for o in e.options}
    if unknown:
        raise UsageError(f"option(s) {', '.join(sorted(unknown))} do not apply to {', '.join(names)}")
    _check_int("--recover-steps", recover_steps, minimum=0)
    if recover_steps > 0 and all(e.kind == "reuse" for e in specs):
        raise UsageError(f"--recover-steps does not apply to {', '.join(names)}: reuse methods keep the weights "
                         "unchanged; drop --recover-steps or chain a depth/width/dynamic method first")
    return [(e, e.make_config({k: v for k, v in settings.items() if k in e.options})) for e in specs]


def compress(model: nn.Module, methods: list[str] | str, budget: float, ctx: Context | None = None,
             settings: dict | None = None) -> nn.Module:
    """Apply one method or a chain at an end-to-end ``budget``; returns a new model.

    ``settings`` maps option names to values; each method receives the ones it declares
    (unknown options for every method in the chain are an error).
    """
    ctx = ctx or Context()
    budget = check_budget(budget)
    plan = plan_chain(methods, settings, ctx.recover_steps)
    ctx.teacher = ctx.teacher or model
    earlier = len(record_of(model).result.chain)  # entries of an input that is itself a result
    original = sampling_macs(model, ctx)
    result, macs = copy.deepcopy(model), original
    for i, (spec, config) in enumerate(plan):
        step_budget = chain_step_budget(budget, macs / original, len(plan) - i)
        result = spec.compress(result, step_budget, ctx, config)
        macs = sampling_macs(result, ctx)  # what the chain has reached so far (end to end)
    from slimdiff.eval.compute import params, params_ratio

    rec = record_of(result)
    rec.result.measured = {**rec.result.measured, "budget": budget, "macs_sampling": macs,
                           "macs_ratio": macs / original, "original_macs_sampling": original,
                           "params": params(result), "original_params": params(model),
                           "params_ratio": params_ratio(result, model),
                           "sampler": ctx.sampler, "steps": ctx.steps, "cfg": ctx.cfg}
    warn_off_budget(budget, macs / original, rec.result.chain[earlier:])
    return set_record(result, rec)


def warn_off_budget(budget: float, reached: float, entries: Sequence[ChainEntry]) -> None:
    """Warn when the chain's result is over its budget (:func:`slimdiff.budget.over_budget`), or
    far below it (:func:`slimdiff.budget.far_below`) with each method's recorded reason (its
    :data:`~slimdiff.budget.BUDGET_NOTE` setting), so that a result off its budget is seen when
    it is made, not only in a summary."""
    reasons = [f"{e.method}: {e.settings[BUDGET_NOTE]}" for e in entries if e.settings.get(BUDGET_NOTE)]
    if over_budget(budget, reached):
        measured = f"{'+'.join(e.method for e in entries)} measured end to end on the sampling run"
        warnings.warn(f"the result costs {reached:.3f} of the original's sampling MACs, more than "
                      f"{BUDGET_TOLERANCE:.0%} above the budget {budget:g}: the budget is not met "
                      f"({'; '.join([measured, *reasons])})", stacklevel=3)
        return
    if not far_below(budget, reached):
        return
    why = "; ".join(reasons) or f"{'+'.join(e.method for e in entries)} recorded no reason"
    warnings.warn(f"the result costs {reached:.3f} of the original's sampling MACs, more than "
                  f"{BUDGET_TOLERANCE:.0%} below the budget {budget:g} ({why})", stacklevel=3)
