"""slimdiff: make trained diffusion models cheaper to run, and measure what you gained and lost."""
from __future__ import annotations

__version__ = "0.1.0"


def load(path_or_name: str, **kwargs):
    """Load a slimdiff model directory, a shipped name (``digits-dit``) or a DiT size name."""
    from slimdiff.models.registry import load_model

    return load_model(path_or_name, **kwargs)


def save(model, path, **kwargs):
    """Save ``model`` as a slimdiff directory (``slimdiff.json`` + ``model.safetensors``)."""
    from slimdiff.io import save as _save

    return _save(model, path, **kwargs)


__all__ = ["load", "save", "__version__"]
