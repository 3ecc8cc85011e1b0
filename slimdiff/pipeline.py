"""Use a compressed model in a loaded diffusers pipeline with one line: :func:`apply`.

A reuse plan (DiP-GO, deepcache-style, l2c-block, fewer-steps; DeepCache and
Learning-to-Cache branch caches) is made for slimdiff's sampling loop: one row per model call
of one sampler and step count, found at run time by the call's timestep. A pipeline's
scheduler has its own spacing (and PNDM repeats its first timestep), so :func:`apply` keys the
plan to the timesteps the pipeline will call the model at, with the rule of
:meth:`~slimdiff.runtime.reuse.ReusePlan.rows_for`.
"""
from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from slimdiff import atomic
from slimdiff.errors import UsageError
from slimdiff.models.diffusers_adapter import for_slot, unwrap
from slimdiff.result import record_of
from slimdiff.runtime.branch_cache import (
    apply_branch_cache,
    get_branch_cache,
    remove_branch_cache,
    unit_costs,
)
from slimdiff.runtime.reuse import (
    ReusePlan,
    apply_block_reuse,
    block_costs,
    get_block_reuse,
    remove_block_reuse,
    scheduler_timesteps,
)
from slimdiff.runtime.routing import DyDiTRouting

__all__ = ["apply", "save_pipeline", "from_pretrained", "COMPONENTS"]

COMPONENTS = ("transformer", "unet")
"""Pipeline components a compressed denoiser can replace, in the order they are looked for."""

# (get, remove, apply, costs) of each runtime whose plan is keyed to timesteps
_RUNTIMES: tuple[tuple[Callable, Callable, Callable, Callable[[nn.Module, ReusePlan], Any]], ...] = (
    (get_block_reuse, remove_block_reuse, apply_block_reuse, lambda m, p: block_costs(m)),
    (get_branch_cache, remove_branch_cache, apply_branch_cache, lambda m, p: unit_costs(m, p.blocks)),
)


def apply(pipe: Any, result: str | os.PathLike | nn.Module, num_inference_steps: int | None = None) -> Any:
    """Install a compressed model (a result directory, or a model ``slimdiff.load`` returned)
    as ``pipe.transformer`` / ``pipe.unet``, on that component's device and dtype, and key its
    reuse plan to ``pipe.scheduler`` run with ``num_inference_steps`` (default: the plan's own
    step count). Returns ``pipe``; then call it as usual, with that ``num_inference_steps``.
    DyDiT's width tables are rebuilt at those timesteps (other step counts are routed on the fly).

    When the pipeline makes as many model calls as the plan has rows, the plan runs row by row
    (exactly the compute it reported). Otherwise each call takes the plan row at the same
    relative position (a step-skipping plan run at the number of steps it computes runs those
    steps: fewer-steps at its ``sampling_steps``), with a warning stating the MACs ratio the
    mapped plan realises against the reported one. A model given as a module is changed in
    place (its plan re-keyed).
    """
    name = _component(pipe)
    if num_inference_steps is not None:
        _check_steps(num_inference_steps)
    model = unwrap(result if isinstance(result, nn.Module) else _load(result))
    installed = _installable(pipe, name, model)
    _check_null_class(pipe, model)
    for get, remove, install, costs in _RUNTIMES:
        plan = get(model)
        if plan is not None:
            plan = plan.origin or plan  # a model applied before: map the plan as made
            steps = plan.steps if num_inference_steps is None else num_inference_steps
            keyed = plan.rekeyed(scheduler_timesteps(pipe.scheduler, steps), type(pipe.scheduler).__name__, steps)
            remove(model)
            install(model, keyed)
            if not plan.rows_for(len(keyed.timesteps))[1]:
                _warn_mapped(model, plan, keyed, costs(model, keyed), _exact_steps(pipe.scheduler, plan))
    routing = getattr(model, "dydit", None)
    if isinstance(routing, DyDiTRouting):
        _key_tables(model, routing, pipe.scheduler, num_inference_steps or routing.table_info.get("steps"))
    _guard_save_pretrained(installed, model)
    old = getattr(pipe, name)
    if old is not None:  # the component's device and dtype (a dtype cast only when they differ: diffusers warns)
        installed.to(old.device)
        if installed.dtype != old.dtype:
            installed.to(old.dtype)
    pipe.register_modules(**{name: installed})
    return pipe


MARKER = "_slimdiff"
"""The ``model_index.json`` key :func:`save_pipeline` writes: the denoiser's component name and step count."""


def save_pipeline(pipe: Any, path: str | os.PathLike) -> Path:
    """Write ``pipe`` (a pipeline :func:`apply` installed a result in) to the new folder ``path``,
    for :func:`from_pretrained`; returns its path.

    Every other component is written by diffusers' ``save_pretrained``; the denoiser is written
    by ``slimdiff.save`` in its component's subfolder, with the step count :func:`apply` keyed
    its plan or width tables to in ``model_index.json`` (key ``"_slimdiff"``). Its entry there is
    ``[null, null]``, so plain ``DiffusionPipeline.from_pretrained`` refuses the folder
    ("expected ... transformer") rather than load it without the compressed denoiser. The
    folder is written next to ``path`` and renamed into place.
    """
    name = _component(pipe)
    model = getattr(pipe, name)
    if model is None:
        raise UsageError(f"{type(pipe).__name__}.{name} is None: install a result with slimdiff.apply(pipe, result) first")
    target = Path(path).expanduser().absolute()
    if target.exists():
        raise UsageError(f"{target} exists; choose a new folder for the pipeline")
    from slimdiff import save
    from slimdiff.io import architecture_name

    architecture_name(unwrap(model))  # a denoiser slimdiff cannot save is refused before anything is written

    def write(tmp: Path) -> None:
        import logging

        logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
        quiet = _DropWarning(f"self.{name}=None")  # it warns that the (absent) denoiser "cannot be saved"
        pipe.register_modules(**{name: None})
        logger.addFilter(quiet)
        try:
            pipe.save_pretrained(str(tmp), safe_serialization=True)
        finally:
            pipe.register_modules(**{name: model})
            logger.removeFilter(quiet)
        save(unwrap(model), tmp / name)
        index = json.loads((tmp / "model_index.json").read_text())
        index[MARKER] = {"component": name, "num_inference_steps": _keyed_steps(unwrap(model))}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    try:
        return atomic.write_dir(target, write, replace=False)
    except OSError as e:
        raise UsageError(f"cannot write the pipeline to {target}: {e.strerror or e}") from None


def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> Any:
    """Load a pipeline folder :func:`save_pipeline` wrote: diffusers' ``DiffusionPipeline.from_pretrained``
    (``kwargs`` go to it: ``torch_dtype``, ...) with the denoiser from ``slimdiff.load``, applied
    (:func:`apply`) at the step count it was saved with. Returns the pipeline."""
    folder = Path(path).expanduser()
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise UsageError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {index_path}: {e}") from None
    marker = index.get(MARKER) if isinstance(index, dict) else None
    if not isinstance(marker, dict) or marker.get("component") not in COMPONENTS:
        raise UsageError(f"{folder} was not written by slimdiff.save_pipeline: load it with "
                         "diffusers.DiffusionPipeline.from_pretrained, then slimdiff.apply(pipe, result)")
    from diffusers import DiffusionPipeline, ModelMixin

    name, steps = marker["component"], marker.get("num_inference_steps")
    model = _load(folder / name)
    absent = {k: None for k, v in index.items() if v == [None, None] and k != name}  # saved as None (no text encoder, ...)
    kwargs.pop("use_safetensors", None)
    pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True,  # never a pickle
                                             **{**absent, **kwargs, name: for_slot(model, ModelMixin)})
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, dict):  # diffusers' per-component form
        dtype = dtype.get(name, dtype.get("default"))
    placed = next((m for k, m in pipe.components.items() if k != name and isinstance(m, nn.Module)), None)
    param = next(placed.parameters(), None) if placed is not None else None
    if param is not None:  # where diffusers put the other components (device_map, ...)
        getattr(pipe, name).to(param.device)
    if dtype is not None:
        getattr(pipe, name).to(dtype)
    return apply(pipe, model, num_inference_steps=steps)


def _guard_save_pretrained(installed: nn.Module, model: nn.Module) -> None:
    """Make ``save_pretrained`` of an installed diffusers model refuse when diffusers could not give
    it back (``pipe.save_pretrained`` would drop a plan silently or write widths its config does
    not hold): an instance attribute, which ``pipe.save_pretrained`` finds first."""
    from slimdiff.io import diffusers_refusal

    installed.__dict__.pop("save_pretrained", None)
    if installed is not model:  # our DiT's wrapper refuses by itself
        return
    reason = diffusers_refusal(model)
    if reason is not None:
        installed.__dict__["save_pretrained"] = RefuseSavePretrained(reason)


class _DropWarning:
    """A logging filter that drops the records starting with ``prefix``."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record: Any) -> bool:
        return not record.getMessage().startswith(self.prefix)


class RefuseSavePretrained:
    """An installed model's ``save_pretrained`` that refuses with ``reason`` and names
    :func:`save_pipeline` (a module-level class, so the model still pickles)."""

    def __init__(self, reason: str):
        self.reason = reason.split(";")[0]  # the problem, without the advice that follows it

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise UsageError(f"{self.reason}; save the pipeline with slimdiff.save_pipeline(pipe, path) and load it with "
                         "slimdiff.from_pretrained(path)")


def _component(pipe: Any) -> str:
    name = next((c for c in COMPONENTS if c in getattr(pipe, "components", {})), None)
    if name is None:
        raise UsageError(f"{type(pipe).__name__} has no {' or '.join(COMPONENTS)} component to replace; "
                         "apply a slimdiff result to a pipeline with a diffusers denoiser")
    return name


def _keyed_steps(model: nn.Module) -> int | None:
    """The step count :func:`apply` keyed ``model``'s plan or width tables to (None: none keyed)."""
    for get, *_ in _RUNTIMES:
        plan = get(model)
        if plan is not None and plan.origin is not None:
            return plan.steps
    routing = getattr(model, "dydit", None)
    return routing.table_info.get("steps") if isinstance(routing, DyDiTRouting) else None


def _key_tables(model: nn.Module, routing: DyDiTRouting, scheduler: Any, steps: int | None) -> None:
    """Rebuild DyDiT's width tables at ``scheduler``'s timesteps for ``steps`` (none known: routed on the fly)."""
    if steps is None:
        routing.tables, routing.table_info = {}, {}
    else:
        routing.build_tables(model, scheduler_timesteps(scheduler, steps),
                             {"sampler": type(scheduler).__name__, "steps": steps})


def _load(path: str | os.PathLike) -> nn.Module:
    from slimdiff import load

    return load(path)


def _check_steps(steps: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"num_inference_steps must be a positive integer, got {steps!r}")


def _installable(pipe: Any, name: str, model: nn.Module) -> nn.Module:
    """``model`` as the class ``pipe`` declares for ``name`` (else that of its current ``name``)
    accepts (:func:`~slimdiff.models.diffusers_adapter.for_slot`), or UsageError."""
    declared = inspect.signature(type(pipe).__init__).parameters.get(name)
    expected = declared.annotation if declared is not None and isinstance(declared.annotation, type) \
        else type(getattr(pipe, name))
    installed = for_slot(model, expected)
    if installed is None:
        raise UsageError(
            f"{type(pipe).__name__}.{name} takes a {expected.__name__}, not a {type(model).__module__}."
            f"{type(model).__name__}: compress the pipeline's own {name} (slimdiff compress --model <pipeline "
            f"folder>), or convert the model to a {expected.__name__} before compressing it")
    return installed


def _check_null_class(pipe: Any, model: nn.Module) -> None:
    """Warn when ``DiTPipeline``'s guidance would index a null class the model lacks: the pipeline
    hard-codes label 1000 (ImageNet's null row) for the unconditional half."""
    from slimdiff.models.backbone import as_backbone

    if type(pipe).__name__ != "DiTPipeline":
        return
    classes = as_backbone(model).num_classes
    if classes != 1000:
        warnings.warn(f"DiTPipeline's classifier-free guidance uses label 1000 as the null class, but this model has "
                      f"{classes} classes (its null label is {classes}): call the pipeline with guidance_scale=1, or "
                      f"sample guided with slimdiff sample --cfg", stacklevel=3)


def _exact_steps(scheduler: Any, plan: ReusePlan) -> int | None:
    """The step count nearest the plan's at which ``scheduler`` runs the plan as made (as many
    calls as it has rows, or as it computes), if any up to twice its rows."""
    for steps in sorted(range(1, 2 * len(plan.timesteps) + 1), key=lambda n: (abs(n - plan.steps), n)):
        if plan.rows_for(len(scheduler_timesteps(scheduler, steps)))[1]:
            return steps
    return None


def _warn_mapped(model: nn.Module, plan: ReusePlan, keyed: ReusePlan, costs: Any, exact: int | None) -> None:
    """Warn that ``keyed`` runs ``plan`` on another call count, with the MACs ratio it realises,
    and the step count ``exact`` that would run the plan as made."""
    def ratio(p: ReusePlan) -> float:
        return costs.macs(p.compute, p.step_compute) / costs.macs(torch.ones(p.shape, dtype=torch.bool))

    made = ratio(plan)
    reported = record_of(model).result.measured.get("macs_ratio", made)
    warnings.warn(
        f"the reuse plan has {len(plan.timesteps)} model calls ({plan.sampler} x{plan.steps}), the pipeline makes "
        f"{len(keyed.timesteps)} ({keyed.sampler} x{keyed.steps}): each call takes the plan row at the same relative "
        f"position; realised MACs ratio {reported * ratio(keyed) / made:.3f} vs the reported {reported:.3f} "
        + (f"(num_inference_steps={exact} runs the plan as made)" if exact is not None else
           f"(no step count of {keyed.sampler} runs it as made: compress with --steps {len(keyed.timesteps)}, one "
           "plan row per model call)"),
        stacklevel=3)
