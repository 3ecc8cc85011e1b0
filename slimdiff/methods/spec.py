"""``MethodSpec``: everything slimdiff knows about one compression method, in one object.

A method is a :class:`MethodSpec` registered in :mod:`slimdiff.methods` (one line per
method in ``_builtin``; your own with :func:`slimdiff.methods.register`). Its ``config`` is a
dataclass whose fields are the method's options and whose defaults are the method's recipe
(the paper's, scaled only in length where the docstring says so). The CLI (``compress
--option k=v`` and the per-method flags), the bench and the speed bench read the options,
their types, defaults and help from those fields; nothing else lists them.

``compress(model, budget, ctx, config) -> nn.Module`` does the work (it receives a copy it may
change in place and records what it did with :func:`slimdiff.methods.base.record`);
``restore(model, extras)`` re-applies runtime state on load (a reuse plan, routing tables);
``draw(name, extras, model, out, ctx) -> [files]`` draws the method's own picture for reports;
``speed_student(model, settings) -> nn.Module`` builds the untrained student the speed bench
times (``None``: the method is not in the speed bench); ``applies(model) -> bool`` says whether
the method applies to a model at all (``None``: to every model), so the speed bench skips what
does not apply and still fails loudly on a real error; ``cannot_follow`` names the methods it
cannot run after in a chain, with the reason (``plan_chain`` refuses such chains up front).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from slimdiff.errors import UsageError

KIND_ORDER = ("depth", "width", "dynamic", "reuse")


@dataclass(frozen=True)
class NoOptions:
    """The config of a method without options."""


def option(default: Any, help: str, *, choices: tuple | None = None, low: float | None = None,
           high: float | None = None, low_open: bool = False, high_open: bool = False, **kwargs) -> Any:
    """A config field with its CLI help and its allowed values, which :func:`check_options`
    enforces before any model is loaded: ``threshold: float = option(0.05, "relative-loss
    threshold", low=0, high=1)``; ``choices`` lists the allowed values (the first is the
    paper's), ``low``/``high`` bound a number (``low_open``/``high_open``: strictly)."""
    metadata = {"help": help, "choices": choices, "low": low, "high": high, "low_open": low_open,
                "high_open": high_open}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def _bounds(meta: Any) -> str:
    """``">= 0 and < 1"`` from an :func:`option`'s metadata ("" when unbounded)."""
    low, high = meta.get("low"), meta.get("high")
    parts = [f"{'>' if meta.get('low_open') else '>='} {low:g}" if low is not None else "",
             f"{'<' if meta.get('high_open') else '<='} {high:g}" if high is not None else ""]
    return " and ".join(p for p in parts if p)


def _allowed(meta: Any) -> str:
    """The allowed values an :func:`option` declares, as ``slimdiff methods`` shows them."""
    choices = meta.get("choices")
    return " | ".join(map(str, choices)) if choices is not None else _bounds(meta)


def check_options(config: Any) -> None:
    """Check every field of a method config against its type and its :func:`option` bounds;
    a bad value is a one-line :class:`UsageError` naming the option. Configs call this from
    ``__post_init__``, so a config that exists is valid, whoever built it."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None and f.default is None:
            continue
        tp = hints.get(f.name, Any)
        args = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
        kind = args[0] if len(args) == 1 else None
        if kind is bool and not isinstance(value, bool):
            raise UsageError(f"{f.name} must be true or false (1 or 0), got {value!r}")
        if kind in (int, float):
            integral = kind is int
            if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)) or (
                    not integral and not math.isfinite(value)):
                raise UsageError(f"{f.name} must be {'an integer' if integral else 'a finite number'}, got {value!r}")
            low, high, low_open, high_open = (meta.get(k) for k in ("low", "high", "low_open", "high_open"))
            if (low is not None and (value < low or (low_open and value == low))) or (
                    high is not None and (value > high or (high_open and value == high))):
                raise UsageError(f"{f.name} must be {_bounds(meta)}, got {value!r}")
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            raise UsageError(f"unknown {f.name} {value!r}; choose one of {', '.join(map(str, choices))}")


@dataclass(frozen=True)
class OptionInfo:
    """One option as the CLI shows it."""

    name: str
    type: str
    default: Any
    help: str
    allowed: str = ""  # the declared choices or bounds, e.g. "search | greedy" or ">= 0 and <= 1"


@dataclass(frozen=True)
class MethodSpec:
    """One compression method (or baseline): see the module docstring."""

    name: str
    kind: str
    help: str
    compress: Callable[..., nn.Module]
    config: type = NoOptions
    restore: Callable[[nn.Module, Any], None] | None = None
    draw: Callable[..., list[Path]] | None = None
    speed_student: Callable[..., nn.Module] | None = None
    applies: Callable[[nn.Module], bool] | None = None
    cannot_follow: dict[str, str] = field(default_factory=dict)  # method name -> why this one cannot run after it

    def __post_init__(self) -> None:
        if self.kind not in KIND_ORDER:
            raise ValueError(f"{self.name}: kind must be one of {KIND_ORDER}, got {self.kind!r}")
        if not dataclasses.is_dataclass(self.config):
            raise TypeError(f"{self.name}: config must be a dataclass type, got {self.config!r}")

    @property
    def options(self) -> tuple[str, ...]:
        """The option names (the config's fields)."""
        return tuple(f.name for f in dataclasses.fields(self.config))

    def option_info(self) -> list[OptionInfo]:
        hints = typing.get_type_hints(self.config)
        out = []
        for f in dataclasses.fields(self.config):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out.append(OptionInfo(f.name, _type_name(hints.get(f.name, Any)), default, f.metadata.get("help", ""),
                                  _allowed(f.metadata)))
        return out

    def make_config(self, settings: dict | None = None) -> Any:
        """The config with ``settings`` (option name -> value; ``None`` = the default) applied.

        Values from the command line arrive as int / float / text and are converted to the
        field's type (``1``/``0``/``true``/``false`` for booleans); a value that does not
        convert is a :class:`UsageError` naming the option.
        """
        settings = {k: v for k, v in (settings or {}).items() if v is not None}
        unknown = set(settings) - set(self.options)
        if unknown:
            raise UsageError(f"option(s) {', '.join(sorted(unknown))} do not apply to {self.name}; "
                             f"its options: {', '.join(self.options) or 'none'}")
        hints = typing.get_type_hints(self.config)
        values = {k: _convert(v, hints.get(k, Any), f"{self.name} option {k}") for k, v in settings.items()}
        config = self.config(**values)
        check_options(config)  # also for configs (e.g. registered by users) that do not check themselves
        return config

    def __call__(self, model: nn.Module, budget: float, ctx: Any = None, *, config: Any = None,
                 **options) -> nn.Module:
        """Run the method on ``model`` (in place) at ``budget``: ``config`` or its defaults, with
        ``options`` applied on top (``spec(model, 0.5, ctx, threshold=0.1)``)."""
        from slimdiff.budget import check_budget
        from slimdiff.methods.base import Context

        budget = check_budget(budget)  # the entry point checks; ``compress`` receives a checked float
        if config is None:
            config = self.make_config(options)
        elif options:
            config = dataclasses.replace(config, **{k: v for k, v in options.items() if v is not None})
        check_options(config)
        return self.compress(model, budget, ctx or Context(), config)


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if _is_union(tp) and len(args) == 1:
        return _type_name(args[0])
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _convert(value: Any, tp: Any, what: str) -> Any:
    """``value`` as type ``tp`` (bool / int / float / str, optionally ``| None``); anything else
    (unions of several types, tuples, ``Any``) is passed through for the method to check."""
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            return value
        tp = args[0]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        raise UsageError(f"{what} must be true or false (1 or 0), got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{what} must be an integer, got {value!r}")
        return value
    if tp is float:  # an int stays an int (it is recorded as given)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{what} must be a number, got {value!r}")
        return value
    if tp is str:
        return str(value)
    return value
