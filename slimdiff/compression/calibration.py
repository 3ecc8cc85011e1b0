"""Calibration data: the training samples a method scores a model on, drawn the same way everywhere.

A calibration batch is ``(x0, cond)``: ``x0`` clean samples of ``ctx.data`` (or of a given
dataset) at the model's input shape, drawn without replacement with a seeded generator, and
the matching condition (labels, caption embeddings, or ``None``). Samples of another shape
than the model's input are a :class:`UsageError` naming the fix (``--data`` of that shape);
they are never replaced by random inputs. What a model gets when the data lacks its
conditioning is the caller's choice (``missing``):

* ``"labels"`` -- class models need valid labels (an error otherwise); text models without
  caption embeddings get the null prompt (Diff-Pruning's importance pass).
* ``"null"`` -- the unconditional input of classifier-free guidance: the null class for
  unlabelled data, the null prompt for text models (Block Influence of the depth baselines).

The null prompt is :meth:`~slimdiff.models.backbone.Backbone.null_cond`, the unconditional input
slimdiff's guidance and its trainer's caption dropout use: the empty prompt as the text encoder
of the model's pipeline folder encodes it, else zero embeddings (a model without one).

:func:`calibration_batches` yields batches of one draw (noise them with the same generator
between batches, as the depth baselines do); :func:`calibration_batch` is the one-batch form.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn as nn

from slimdiff.errors import UsageError
from slimdiff.methods.base import Context

__all__ = ["calibration_batch", "calibration_batches", "model_dataset", "resolve_data", "check_shape", "MISSING"]

MISSING = ("labels", "null")


def resolve_data(spec: str, model: nn.Module) -> str:
    """``--data auto`` (the CLI's and the bench's default): the shipped data set whose images have
    ``model``'s input shape (digits 1x8x8, mnist 1x32x32); any other value is returned as is.
    Without such a data set ``auto`` stays: a method that needs data then fails with a clear
    error (:func:`slimdiff.data.datasets.get_dataset`), one that does not (DiP-GO) runs."""
    from slimdiff.data.datasets import builtin_for_shape
    from slimdiff.models.backbone import as_backbone

    if spec != "auto":
        return spec
    bb = as_backbone(model)
    return builtin_for_shape((bb.in_channels, bb.sample_size, bb.sample_size)) or spec


def model_dataset(model: nn.Module, ctx: Context):
    """The dataset ``ctx.data`` at ``model``'s input size and channels (as the shared recovery loads it)."""
    from slimdiff.data.datasets import get_dataset
    from slimdiff.models.backbone import as_backbone

    bb = as_backbone(model)
    return get_dataset(ctx.data, size=bb.sample_size, channels=bb.in_channels)


def check_shape(x0: torch.Tensor, bb, what: str) -> None:
    """:class:`UsageError` unless ``x0`` is a batch of the backbone ``bb``'s input shape."""
    want = (bb.in_channels, bb.sample_size, bb.sample_size)
    if x0.ndim != 4 or tuple(x0.shape[1:]) != want:
        raise UsageError(f"calibration data {what} has samples of shape {tuple(x0.shape[1:])} but the model takes "
                         f"{want}: pass --data with images/latents of that shape")


def _cond_for(bb, labels: torch.Tensor | None, n: int, missing: str) -> Any:
    """The condition of ``n`` samples with ``labels`` (``None``: the data has none), see the module docstring."""
    if bb.conditioning == "class":
        if labels is not None and labels.min() >= 0 and labels.max() < bb.num_classes:
            return labels.long()
        if missing == "null" and labels is not None:
            return bb.null_cond(None, n)
        raise UsageError(f"the model is class-conditional ({bb.num_classes} classes) but the calibration data "
                         "has no valid labels: use labelled data (class sub-folders or a 'labels' array)")
    if bb.conditioning == "text":
        return bb.null_cond(None, n)
    return None


def _condition(bb, conds: list[Any], missing: str) -> Any:
    """The condition of a batch from its items' second fields (labels or caption embeddings)."""
    from slimdiff.models.backbone import TextCondition

    if isinstance(conds[0], TextCondition):  # latents with caption embeddings
        if bb.conditioning == "text":
            cond = TextCondition.stack(conds)
            bb.check_text_width(cond)
            return cond
        return _cond_for(bb, None, len(conds), missing)
    return _cond_for(bb, torch.stack([torch.as_tensor(c) for c in conds]), len(conds), missing)


def calibration_batches(model: nn.Module, ctx: Context, samples: int, batch: int, *, dataset=None,
                        generator: torch.Generator | None = None,
                        missing: str = "labels") -> Iterator[tuple[torch.Tensor, Any]]:
    """Yield ``(x0, cond)`` batches of at most ``batch`` of ``samples`` samples drawn without replacement.

    ``dataset`` defaults to :func:`model_dataset`; ``generator`` (default seeded with
    ``ctx.seed``) draws the sample order once, up front; the caller may draw from it between
    batches. ``x0`` is float32
    on the CPU; samples of another shape than the model's input are a :class:`UsageError`.
    """
    from slimdiff.data.datasets import BUILTIN, builtin_shape
    from slimdiff.models.backbone import as_backbone

    if missing not in MISSING:
        raise ValueError(f"missing must be one of {MISSING}, got {missing!r}")
    bb = as_backbone(model)
    shape = (bb.in_channels, bb.sample_size, bb.sample_size)
    if dataset is None and ctx.data in BUILTIN and shape != builtin_shape(ctx.data):  # before loading it
        raise UsageError(f"calibration data {ctx.data!r} has samples of shape {builtin_shape(ctx.data)} but the model "
                         f"takes {shape}: "
                         "pass --data with images/latents of that shape (an image folder, or a .npz/.safetensors "
                         "latents file)")
    data = dataset if dataset is not None else model_dataset(model, ctx)
    gen = generator if generator is not None else torch.Generator().manual_seed(ctx.seed)
    idx = torch.randperm(len(data), generator=gen)[:samples]
    for start in range(0, len(idx), batch):
        items = [data[int(i)] for i in idx[start : start + batch]]
        x0 = torch.stack([it[0] for it in items]).float()
        check_shape(x0, bb, repr(ctx.data))
        yield x0, _condition(bb, [it[1] for it in items], missing)


def calibration_batch(model: nn.Module, ctx: Context, size: int | None = None, *, dataset=None,
                      missing: str = "labels") -> tuple[torch.Tensor, Any, str]:
    """The fixed calibration batch ``(x0, cond, source)`` for ``model``: ``size`` samples
    (default ``ctx.batch_size``) of ``ctx.data`` (or ``dataset``) drawn with ``ctx.seed``;
    ``source`` is ``str(ctx.data)``. Data of the wrong shape is a :class:`UsageError`.
    """
    n = int(size or ctx.batch_size)
    if n < 1:
        raise UsageError(f"calibration batch size must be >= 1, got {n}")
    gen = torch.Generator().manual_seed(ctx.seed)
    x0, cond = next(calibration_batches(model, ctx, n, n, dataset=dataset, generator=gen, missing=missing))
    return x0, cond, str(ctx.data)
