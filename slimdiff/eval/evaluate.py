"""The evaluation protocol of BENCHMARK.md section 1, for one model against a reference.

Samples are balanced over classes (label ``i % K`` for sample ``i``; with ``label_seed`` a
seeded permutation of those labels, so that each bench seed draws its own assignment of the
balanced labels to noises) and drawn in fixed batches whose noise depends only on ``seed`` and
the batch index, so a student and its teacher are compared on exactly the same noise and labels.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from slimdiff.diffusion.sampling import sample
from slimdiff.errors import UsageError
from slimdiff.utils import progress as progress_bar

BATCH = 250


@torch.no_grad()
def generate(model: nn.Module, n: int, *, sampler: str = "ddim", steps: int = 50, cfg: float = 1.0,
             seed: int = 0, progress: bool = False, label_seed: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` samples (and their class labels) with the protocol's labels and per-batch noise seeds.

    ``label_seed``: permute the balanced labels with this seed (``None``: label ``i % K``).

    ``cfg != 1`` on an unconditional model is a :class:`UsageError`, as in ``sample``.
    """
    from slimdiff.models.backbone import as_backbone

    if n < 1:
        raise UsageError(f"number of samples must be >= 1, got {n}")
    bb = as_backbone(model)
    k = bb.num_classes if bb.conditioning == "class" else None
    order = list(range(n))
    if k and label_seed is not None:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(label_seed)).tolist()
    out, labels = [], []
    starts = progress_bar(range(0, n, BATCH), f"sampling {n}", progress)
    for b, start in enumerate(starts):
        m = min(BATCH, n - start)
        cls = [order[start + i] % k for i in range(m)] if k else None
        out.append(sample(model, sampler=sampler, steps=steps, num_samples=m, classes=cls, cfg=cfg, seed=seed + 1000 * b))
        if cls:
            labels.append(torch.tensor(cls))
    return torch.cat(out).cpu(), (torch.cat(labels) if labels else None)


def evaluate(model: nn.Module, reference: nn.Module | None = None, *, samples: int = 1000, sampler: str = "ddim",
             steps: int = 50, cfg: float = 1.0, seed: int = 0, progress: bool = False) -> dict:
    """Generate ``samples`` images with the protocol's labels and noise, then :func:`score` them."""
    x, y = generate(model, samples, sampler=sampler, steps=steps, cfg=cfg, seed=seed, progress=progress)
    return score(model, x, y, reference, sampler=sampler, steps=steps, cfg=cfg, seed=seed, progress=progress)


@functools.cache
def shipped_fd_floor(data: str) -> dict:
    """:func:`~slimdiff.eval.quality.fd_floor` of shipped data set ``data`` with its shipped judge,
    measured once per process (mnist: 5,000 images through the judge; the bench scores many entries)."""
    from slimdiff.eval.judge import shipped_judge
    from slimdiff.eval.quality import fd_floor

    return fd_floor(shipped_judge(data), data=data)


def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, reference: nn.Module | None = None, *,
          sampler: str = "ddim", steps: int = 50, cfg: float = 1.0, seed: int = 0, progress: bool = False,
          reference_samples: torch.Tensor | None = None, macs: tuple[int, int | None] | None = None) -> dict:
    """FD (judge features, vs. the held-out test split of the shipped data set whose images the
    model makes: digits or mnist) and its real-data floor, class
    accuracy, SSIM/PSNR to the reference's samples from the same noise, MACs ratio, params.

    ``x, y`` come from :func:`generate` with the same settings. ``reference_samples`` lets a
    caller that scores many students pass the teacher's samples once; ``macs`` = ``(model's,
    reference's or None)`` sampling MACs lets a caller that scores one model on several seeds
    count them once (they do not depend on the samples).
    """
    from slimdiff.data.datasets import builtin, builtin_for_shape
    from slimdiff.eval.compute import macs_sampling, params
    from slimdiff.eval.judge import shipped_judge
    from slimdiff.eval.quality import class_accuracy, fd, psnr, ssim

    data = builtin_for_shape(tuple(x.shape[1:]))
    if data is None:
        raise UsageError("FD and class accuracy use a shipped judge: digits (1x8x8 images) or mnist (1x32x32); "
                         f"this model makes {tuple(x.shape[1:])}")
    real, judge = builtin(data, "test").tensors[0], shipped_judge(data)
    floor = shipped_fd_floor(data)
    macs, ref_macs = macs if macs is not None else (macs_sampling(model, sampler=sampler, steps=steps, cfg=cfg), None)
    out = {
        "samples": len(x), "sampler": sampler, "steps": steps, "cfg": cfg, "seed": seed, "judge": data,
        "fd": fd(x, real, judge),
        "fd_floor": floor["fd_train_test"],
        "fd_floor_subsample_mean": floor["subsample_mean"],
        "fd_floor_subsample_std": floor["subsample_std"],
        "class_acc": class_accuracy(x, y, judge) if y is not None else None,
        "params": params(model),
        "macs_sampling": macs,
    }
    if reference is not None:
        if reference_samples is None:
            reference_samples, _ = generate(reference, len(x), sampler=sampler, steps=steps, cfg=cfg, seed=seed,
                                            progress=progress)
        if ref_macs is None:
            ref_macs = macs_sampling(reference, sampler=sampler, steps=steps, cfg=cfg)
        out.update(ssim=ssim(x, reference_samples), psnr=psnr(x, reference_samples), macs_ratio=macs / ref_macs,
                   reference_params=params(reference), reference_macs_sampling=ref_macs)
    else:
        out.update(ssim=None, psnr=None, macs_ratio=1.0)
    return out
