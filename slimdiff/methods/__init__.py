"""The compression methods and baselines, registered explicitly.

Each method module defines one or more :class:`~slimdiff.methods.spec.MethodSpec`; the
lines in :func:`_builtin` register them. A method of your own is one file with a spec
and one call: ``slimdiff.methods.register(MY_SPEC)`` (see ``docs/ARCHITECTURE.md``).
Method modules are imported on first use, so loading a model never imports them.
"""
from __future__ import annotations

import difflib

from slimdiff import io
from slimdiff.errors import UsageError
from slimdiff.methods.spec import KIND_ORDER, MethodSpec, NoOptions, option

_REGISTRY: dict[str, MethodSpec] = {}
_BUILTIN_LOADED = False


def register(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Make ``spec`` available to ``compress``, the CLI and the bench under ``spec.name``."""
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"register() takes a MethodSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec and not replace:
        raise ValueError(f"a method named {spec.name!r} is already registered (pass replace=True to override it)")
    _REGISTRY[spec.name] = spec
    io.register_restorer(spec.name, spec.restore)  # loading a saved result re-applies its runtime
    return spec


def unregister(name: str) -> None:
    """Remove a method registered with :func:`register` (tests, plugins)."""
    _REGISTRY.pop(name, None)
    io.unregister_method(name)


def _builtin() -> None:
    """Register the built-in methods and baselines (once; imported on first use, so that loading
    a model never imports them)."""
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    from slimdiff.methods import (deepcache, depth_baselines, diff_pruning, diffusers_caches, dipgo, dydit,
                                  learning_to_cache, retrain, reuse_baselines, tinyfusion, width_baselines)

    for spec in (*diff_pruning.SPECS, *width_baselines.SPECS, *tinyfusion.SPECS, *depth_baselines.SPECS,
                 *dydit.SPECS, *dipgo.SPECS, *reuse_baselines.SPECS, *retrain.SPECS, *diffusers_caches.SPECS,
                 *deepcache.SPECS, *learning_to_cache.SPECS):
        register(spec)


def registry() -> dict[str, MethodSpec]:
    """Every registered method by name (the built-in ones and yours)."""
    _builtin()
    return dict(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """The spec registered as ``name``; a :class:`UsageError` with suggestions otherwise."""
    methods = registry()
    if name not in methods:
        close = difflib.get_close_matches(name, methods, n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise UsageError(f"unknown method {name!r}{hint}; available: {', '.join(sorted(methods))}")
    return methods[name]


def split_chain(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """Method names of a chain: ``tinyfusion+dipgo`` (the canonical spelling) or ``tinyfusion,dipgo``."""
    parts = text if isinstance(text, (list, tuple)) else text.replace(",", "+").split("+")
    return [p.strip() for p in parts if p.strip()]


__all__ = ["MethodSpec", "NoOptions", "option", "KIND_ORDER", "register", "unregister", "registry", "get_method",
           "split_chain"]
