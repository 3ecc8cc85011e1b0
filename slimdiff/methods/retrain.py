"""Diff-Pruning's architecture-only baselines: ``reinit`` and ``scratch`` (Fang et al., 2023, Tables 1-2).

Both take the student *architecture* of a static method (``architecture``, default
``diff-pruning``, at the same budget; its options through ``architecture_options``), throw
its weights away and re-initialise every parameter (:func:`reinitialize`). They answer "does
the pruned model owe its quality to the kept weights, or only to its shape?".

* ``reinit`` -- then the same recovery as every method (:func:`slimdiff.methods.base.recover`,
  ``ctx.recover_steps`` / ``ctx.kd``), so it is compared at equal recovery. This is the
  reference's ``--pruner reinit`` (``ddpm_prune.py`` ~125-130, ``ddpm_exp/prune.py`` ~265-270):
  there the channels are chosen with ``RandomImportance`` before the reset; with local (per
  layer) ranking the kept widths do not depend on the importance, and after the reset neither
  do the weights, so Diff-Pruning's own architecture is the same network at the same budget
  (``architecture=random-width`` runs the reference's cheaper choice literally).
* ``scratch`` -- then plain diffusion training from scratch with the *teacher's* recipe and
  step count (the paper's "scratch" rows: 100K and 800K steps on CIFAR-10, the latter the
  teacher's length). No teacher, no recovery settings: the training replaces recovery. It is a
  bench-level baseline and long (the teacher's full training), so it checkpoints atomically
  into ``ctx.work_dir/scratch-...`` and a rerun resumes where an interrupted one stopped
  (:func:`slimdiff.train.trainer.train` with ``resume=True``).

**The teacher's recipe** comes from its record (``slimdiff train`` writes
``other_meta.training``: ``steps``, ``batch_size``, ``lr``, ``ema`` and the command line).
Each setting is taken from, in order: the option (``scratch_steps``, ``scratch_lr``,
``scratch_batch_size``), the record's key, the recorded command's flag (``--warmup``,
``--schedule``, ``--cfg-dropout``), then :class:`~slimdiff.train.trainer.TrainConfig`'s default
(only for warm-up, schedule, EMA and CFG dropout; steps, lr and batch size are an error
naming the option to pass). Where each came from is recorded (``recipe_source``). Other
``scratch_steps`` than the teacher's is a run scaled in length: the warm-up scales with it (the
cosine schedule follows the step count anyway).

**Re-initialisation** is the model's own construction-time init: every module's
``reset_parameters()`` (what the reference calls; for diffusers models that *is* their init),
then the model's own init function where it has one (our DiT's ``initialize_weights``:
xavier linears, zeroed adaLN and output layers). Parameters that belong to no module with
``reset_parameters`` (PixArt's ``scale_shift_table``) get the values a fresh model of the same
config draws (diffusers ``from_config``); buffers (fixed sin-cos positions) are not weights
and stay. All draws use a generator seeded with ``ctx.seed``.
"""
from __future__ import annotations

import dataclasses
import shlex
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from slimdiff.errors import UsageError
from slimdiff.methods.base import Context, fingerprint, record, recover, settings_key
from slimdiff.methods.spec import MethodSpec, check_options, option
from slimdiff.result import record_of, set_record

__all__ = ["reinitialize", "init_steps", "student_architecture", "teacher_recipe", "ReinitConfig", "ScratchConfig",
           "REINIT", "SCRATCH", "SPECS"]

SELF = ("reinit", "scratch")


# --------------------------------------------------------------------------- re-initialisation
def _bare_parameters(model: nn.Module) -> list[str]:
    """Names of parameters whose module has no ``reset_parameters`` (so nothing else re-draws them)."""
    return [f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules()
            if not callable(getattr(m, "reset_parameters", None)) for pn, _ in m.named_parameters(recurse=False)]


def _fresh_values(model: nn.Module, names: list[str]) -> None:
    """Copy ``names`` from a freshly constructed model of ``model``'s config (diffusers models)."""
    if not callable(getattr(type(model), "from_config", None)) or not hasattr(model, "config"):
        raise UsageError(f"cannot re-initialise {', '.join(names)} of {type(model).__name__}: no module "
                         "reset_parameters() covers them and the model has no config to build a fresh copy from; "
                         "give the model an initialize_weights() method")
    fresh = dict(type(model).from_config(model.config).named_parameters())
    params = dict(model.named_parameters())
    for name in names:
        if name not in fresh or fresh[name].shape != params[name].shape:
            raise UsageError(f"cannot re-initialise {name}: a fresh {type(model).__name__} of this config has "
                             f"{tuple(fresh[name].shape) if name in fresh else 'no such parameter'}, the pruned model "
                             f"{tuple(params[name].shape)}; use an architecture that keeps this parameter's shape")
        params[name].copy_(fresh[name])


def init_steps(model: nn.Module) -> list[str]:
    """What :func:`reinitialize` does to ``model``, in order (recorded with the result)."""
    bare = _bare_parameters(model)
    own = callable(getattr(model, "initialize_weights", None))
    return ["reset_parameters", *([f"from_config: {', '.join(bare)}"] if bare else []),
            *(["initialize_weights"] if own else [])]


@torch.no_grad()
def reinitialize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every parameter of ``model`` (in place; returns it) with its construction-time
    init, from ``seed`` (the global RNG is left as it was): see the module docstring."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for m in model.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
        bare = _bare_parameters(model)
        if bare:
            _fresh_values(model, bare)
        init = getattr(model, "initialize_weights", None)
        if callable(init):
            init()
    return model


# --------------------------------------------------------------------------- the architecture
def _options(text: str | None) -> dict[str, Any]:
    """``"heads=whole;threshold=0.1"`` -> ``{"heads": "whole", "threshold": 0.1}`` (values as
    int, float or text, as ``compress --option`` reads them)."""
    out: dict[str, Any] = {}
    for item in (text or "").split(";"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"architecture_options must look like NAME=VALUE;NAME=VALUE (e.g. heads=whole), "
                             f"got {item!r}")
        for cast in (int, float, str):
            try:
                out[key.strip()] = cast(value.strip())
                break
            except ValueError:
                continue
    return out


def _architecture_spec(name: str) -> MethodSpec:
    from slimdiff.methods import get_method

    spec = get_method(name)
    if spec.name in SELF or spec.kind not in ("depth", "width"):
        raise UsageError(f"architecture must be a static (depth or width) method such as diff-pruning, tinyfusion or "
                         f"random-width, whose student is a plain smaller model; {spec.name!r} is a {spec.kind} "
                         f"{'baseline' if spec.name in SELF else 'method'}")
    return spec


def student_architecture(model: nn.Module, budget: float, ctx: Context, architecture: str,
                         options: str | None = None) -> tuple[nn.Module, dict, dict, dict]:
    """``architecture``'s student of ``model`` at ``budget``, without recovery (the method runs
    with ``recover_steps=0``). Returns the student with the method's record entry taken off,
    and that entry's settings, measurements and extras."""
    spec = _architecture_spec(architecture)
    config = spec.make_config(_options(options))
    student = spec.compress(model, budget, dataclasses.replace(ctx, recover_steps=0), config)
    rec = record_of(student)
    entry = rec.result.chain[-1]
    extras = rec.result.extras.pop(spec.name, None) or {}
    rec.result.chain = rec.result.chain[:-1]
    rec.result.method = "+".join(e.method for e in rec.result.chain) or None
    set_record(student, rec)
    return student, entry.settings, entry.measured, extras


@dataclass(frozen=True)
class ReinitConfig:
    """``reinit``'s options: whose architecture."""

    architecture: str = option("diff-pruning", "static method whose student architecture is re-initialised (a depth "
                                               "or width method: diff-pruning, random-width, tinyfusion, ...)")
    architecture_options: str | None = option(None, "that method's options, NAME=VALUE;NAME=VALUE (e.g. heads=whole)")

    def __post_init__(self) -> None:
        check_options(self)


def _retrained(name: str, model: nn.Module, budget: float, ctx: Context, config: ReinitConfig,
               train: Callable[[nn.Module, dict], tuple[nn.Module, dict, dict]]) -> nn.Module:
    """The common body: architecture, re-init, ``train(student, arch_extras) -> (student, settings,
    measured)``, record as ``name`` (the architecture's extras kept for its picture)."""
    start = time.process_time()
    student, arch_settings, arch_measured, arch_extras = student_architecture(
        model, budget, ctx, config.architecture, config.architecture_options)
    how = init_steps(student)
    reinitialize(student, ctx.seed)
    arch_s = time.process_time() - start
    student.requires_grad_(True)  # a model that served as a teacher earlier arrives frozen
    student, settings, measured = train(student, arch_extras)
    settings = {"architecture": config.architecture, "architecture_settings": arch_settings, "init": how,
                "seed": ctx.seed, **settings}
    measured = {**arch_measured, "architecture_cpu_s": arch_s, **measured}
    return record(student, name, settings, measured, {"architecture": config.architecture, **arch_extras})


def _reinit(model: nn.Module, budget: float, ctx: Context, config: ReinitConfig) -> nn.Module:
    """``reinit``: the architecture, re-initialised, then the shared recovery."""

    def train(student: nn.Module, extras: dict):
        start = time.process_time()
        kwargs = {"layer_map": extras["layer_map"]} if extras.get("layer_map") else {}  # depth students' KD map
        student = recover(student, ctx, f"reinit-{config.architecture}", **kwargs)
        return student, {}, {"recover_steps": ctx.recover_steps, "kd": ctx.kd,
                             "recover_cpu_s": time.process_time() - start}

    return _retrained("reinit", model, budget, ctx, config, train)


# --------------------------------------------------------------------------- scratch
@dataclass(frozen=True)
class ScratchConfig(ReinitConfig):
    """``scratch``'s options: whose architecture, and the training (default: the teacher's recipe)."""

    scratch_steps: int | None = option(None, "training steps (default: the teacher's recorded step count; another "
                                             "count scales the run in length, warm-up included)", low=1)
    scratch_lr: float | None = option(None, "learning rate (default: the teacher's recorded lr)", low=0, low_open=True)
    scratch_batch_size: int | None = option(None, "batch size (default: the teacher's recorded batch size)", low=1)
    scratch_checkpoint_every: int | None = option(None, "checkpoint interval in steps (default: the trainer's, at "
                                                        "most the step count)", low=1)


# recipe setting -> (TrainConfig field, record key, command flag, option or None)
_RECIPE = (
    ("steps", "steps", "--steps", "scratch_steps"),
    ("batch_size", "batch_size", "--batch-size", "scratch_batch_size"),
    ("lr", "lr", "--lr", "scratch_lr"),
    ("warmup_steps", "warmup", "--warmup", None),
    ("lr_schedule", "schedule", "--schedule", None),
    ("ema_decay", "ema", "--ema", None),
    ("cfg_dropout", "cfg_dropout", "--cfg-dropout", None),
)


def _flag(command: str, flag: str) -> str | None:
    """The value of ``flag`` in a recorded command line (``--flag V`` or ``--flag=V``), or ``None``."""
    try:
        words = shlex.split(command or "")
    except ValueError:  # unbalanced quotes: read no flags from it
        return None
    for i, w in enumerate(words):
        if w == flag and i + 1 < len(words):
            return words[i + 1]
        if w.startswith(flag + "="):
            return w.split("=", 1)[1]
    return None


def teacher_recipe(training: dict | None, config: ScratchConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """The :class:`TrainConfig` settings of the teacher's training (``training``: its record's
    ``training`` dict, or ``None``) with ``config``'s overrides, and where each came from."""
    from slimdiff.train.trainer import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    training = training or {}
    values, sources = {}, {}
    for field, key, flag, opt in _RECIPE:
        kind = type(defaults[field])
        given = getattr(config, opt) if opt else None
        from_command = _flag(training.get("command", ""), flag)
        if given is not None:
            values[field], sources[field] = given, "option"
        elif training.get(key) is not None:
            values[field], sources[field] = kind(training[key]), "record"
        elif from_command is not None:
            values[field], sources[field] = kind(from_command), "command"
        elif opt is None:
            values[field], sources[field] = defaults[field], "default"
        else:
            raise UsageError(f"scratch trains with the teacher's recipe, but the teacher records no {key} (it was not "
                             f"trained with `slimdiff train`); pass --option {opt}=VALUE")
    teacher_steps = training.get("steps")
    if sources["steps"] == "option" and teacher_steps and values["steps"] != teacher_steps:
        # a run scaled in length keeps the schedule's shape: warm-up scales with the steps
        values["warmup_steps"] = round(values["warmup_steps"] * values["steps"] / teacher_steps)
        sources["warmup_steps"] += f" x {values['steps']}/{teacher_steps}"
    return values, sources


def _scratch(model: nn.Module, budget: float, ctx: Context, config: ScratchConfig) -> nn.Module:
    """``scratch``: the architecture, re-initialised, trained from scratch with the teacher's recipe."""
    from slimdiff.compression.calibration import model_dataset
    from slimdiff.train.trainer import TrainConfig
    from slimdiff.train.trainer import train as train_loop

    teacher_record = record_of(ctx.teacher if ctx.teacher is not None else model)
    training = teacher_record.provenance.get("training")
    recipe, sources = teacher_recipe(training, config)  # checked before any work
    if training and training.get("data") not in (None, ctx.data):
        warnings.warn(f"scratch trains on {ctx.data!r}, the teacher was trained on {training['data']!r}", stacklevel=2)
    every = config.scratch_checkpoint_every or min(TrainConfig.checkpoint_every, recipe["steps"])

    def train(student: nn.Module, _extras: dict):
        start = time.process_time()
        cfg = TrainConfig(**recipe, seed=ctx.seed, checkpoint_every=every)
        work = Path(ctx.work_dir or "runs/compress") / (f"scratch-{config.architecture}-n{cfg.steps}-s{ctx.seed}-"
                                                        f"{settings_key(recipe)}-{fingerprint(student)[:12]}")
        student = train_loop(student, model_dataset(student, ctx), cfg, work, resume=True, progress=ctx.progress)
        return student, {"recipe": recipe, "recipe_source": sources}, {
            "train_steps": cfg.steps, "train_cpu_s": time.process_time() - start,
            "teacher_steps": (training or {}).get("steps"), "recover_steps": 0, "kd": "none"}

    return _retrained("scratch", model, budget, ctx, config, train)


def _draw(name: str, extras: dict, model: nn.Module | None, out: Path, ctx: dict) -> list[Path]:
    """The architecture method's picture of the kept structure."""
    from slimdiff.methods import get_method

    spec = get_method(extras.get("architecture", "diff-pruning"))
    return spec.draw(name, extras, model, out, ctx) if spec.draw else []


REINIT = MethodSpec("reinit", "width", "[baseline] Diff-Pruning's reinit: a method's pruned architecture, randomly "
                    "re-initialised, then the same recovery", _reinit, ReinitConfig, draw=_draw)
SCRATCH = MethodSpec("scratch", "width", "[baseline, bench-level; long: trains for the teacher's step count] "
                     "Diff-Pruning's scratch: a method's pruned architecture trained from scratch with the teacher's "
                     "recipe (resumable)", _scratch, ScratchConfig, draw=_draw)
SPECS = (REINIT, SCRATCH)
