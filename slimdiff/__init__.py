"""slimdiff: make trained diffusion models cheaper to run, and measure what you gained and lost."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import os
    from pathlib import Path

    import torch.nn as nn

    from slimdiff.pipeline import apply, from_pretrained, save_pipeline

__version__ = "0.1.0"


def load(path_or_name: str | os.PathLike, **kwargs) -> nn.Module:
    """Load a slimdiff model directory, a shipped name (``digits-dit``) or a DiT size name.

    A compressed model gets its methods' runtime state back (reuse plans, routers): see
    :func:`register_builtin_restorers`.
    """
    from slimdiff.models.registry import load_model

    return load_model(path_or_name, **kwargs)


def save(model: nn.Module, path: str | os.PathLike, **kwargs) -> Path:
    """Save ``model`` as a slimdiff directory (``slimdiff.json`` + ``model.safetensors``)."""
    from slimdiff.io import save as _save

    return _save(model, path, **kwargs)


def __getattr__(name: str) -> Any:
    """Lazy exports: ``slimdiff.apply`` (:func:`slimdiff.pipeline.apply`: a compressed model and its
    reuse plan installed in a loaded diffusers pipeline; ``save_pipeline`` / ``from_pretrained``:
    such a pipeline written to and loaded from one folder) imports diffusers' pipeline machinery only when used."""
    if name in ("apply", "save_pipeline", "from_pretrained"):
        from slimdiff import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'slimdiff' has no attribute {name!r}")


def register_builtin_restorers() -> None:
    """Register the built-in methods, and with them their runtime restorers in :mod:`slimdiff.io`.

    :mod:`slimdiff.io` sits below the methods and never imports them: it calls this (the
    package facade, above every layer) when a saved chain names a method it has no restorer
    for, so loading a plain model never imports the compression layer.
    """
    from slimdiff.methods import registry

    registry()


__all__ = ["load", "save", "apply", "save_pipeline", "from_pretrained", "__version__"]
