"""Depth-pruning baselines that TinyFusion is compared with (BENCHMARK.md, "depth").

Each keeps ``k`` of the ``L`` blocks and then shares TinyFusion's ending
(:func:`slimdiff.compression.depth.finish_depth`): the dropped blocks are removed, and the
same recovery (fine-tune or KD with TinyFusion's layer map) runs for the same steps.
``k`` comes from ``keep`` (an N:M pattern as for TinyFusion; only its total kept count is
used, so a baseline and TinyFusion at ``keep=1:2`` have the same depth) or else from the
budget (:func:`slimdiff.compression.depth.depth_for_budget`).

* ``bi-depth`` -- ShortGPT's Block Influence, ``BI_i = 1 - E[cos(h_in, h_out)]`` over the tokens
  of 128 calibration samples with their labels (text models get the null prompt because
  slimdiff data has no captions); the ``L - k`` blocks with the lowest BI (the ones that change
  the residual stream least) are removed. The default ``bi_variant="reference"`` is TinyFusion's
  ``prune_by_score.py`` (~119-148): the model sees the *clean* latents (no noise added) at
  integer timesteps drawn uniformly from ``[0, 250)`` (its ``torch.randint(0,
  diffusion.num_timesteps)`` with the 250-step respaced diffusion, passed to the model
  directly), and the last block is never removed (``topk(scores[:-1])``).
  ``bi_variant="noised"`` is slimdiff's earlier variant (a deviation): samples noised by the
  forward process at timesteps uniform over all training steps, and every block removable.
* ``oracle-depth`` -- keep given block indices (TinyFusion's ``prune_by_index.py``). Without
  ``keep_blocks`` it keeps the BK-SDM scheme the TinyFusion README calls the Oracle: the first
  half of the blocks is the "encoder" and keeps the first block of every group, the second
  half the "decoder" and keeps the last (28 -> 14: 0, 2, ..., 12, 15, 17, ..., 27).
* ``first-depth`` / ``last-depth`` -- keep blocks ``0..k-1`` / ``L-k..L-1``.
* ``stride-depth`` -- keep one block per stride, centred: ``floor((i + 1/2) L / k)``
  (12 -> 6 keeps 1, 3, ..., 11: the teacher blocks TinyFusion's KD map ``2i + 1`` uses).
* ``random-depth`` -- ``k`` blocks drawn uniformly without replacement (seed ``ctx.seed``).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from slimdiff.compression.depth import (
    check_depth_prunable,
    check_keep_syntax,
    depth_for_budget,
    depth_prunable,
    draw_depth,
    finish_depth,
    parse_keep,
)
from slimdiff.errors import UsageError
from slimdiff.methods.base import Context
from slimdiff.methods.spec import MethodSpec, check_options, option
from slimdiff.models.backbone import TextCondition, as_backbone

__all__ = ["block_influence", "select_blocks", "bk_sdm_blocks", "parse_keep_blocks", "STRATEGIES", "BI_VARIANTS",
           "CALIBRATION_SAMPLES", "REFERENCE_T_END", "DepthBaselineConfig", "BIDepthConfig", "OracleConfig", "SPECS"]

CALIBRATION_SAMPLES = 128
"""Images used for Block Influence (as in the TinyFusion repo's ``prune_by_score.py``)."""

REFERENCE_T_END = 250
"""The reference's BI timesteps are uniform integers in ``[0, REFERENCE_T_END)``: ``prune_by_score.py``
draws ``torch.randint(0, diffusion.num_timesteps)`` from ``create_diffusion("250")`` (its default
``--num-sampling-steps``) and passes them to the model unchanged, i.e. the lowest-noise quarter of
the 1000 training steps, with clean latents as input."""

BI_VARIANTS = ("reference", "noised")


def _calibration_batches(model: nn.Module, ctx: Context, samples: int, batch: int, dataset=None,
                         variant: str = "reference") -> Iterator[tuple[torch.Tensor, torch.Tensor, object]]:
    """Yield ``(x, t, cond)``: the shared calibration samples (the null condition where the data
    has none for the model) with timesteps from one seeded generator. ``variant="reference"``:
    ``x`` is the clean sample, ``t`` uniform in ``[0, REFERENCE_T_END)``; ``"noised"``: ``x`` is
    the sample noised by the forward process at ``t`` uniform over all training steps."""
    from slimdiff.compression.calibration import calibration_batches
    from slimdiff.diffusion.losses import ForwardProcess
    from slimdiff.diffusion.schedulers import diffusion_config_of

    bb = as_backbone(model)
    gen = torch.Generator().manual_seed(ctx.seed)
    process = ForwardProcess(diffusion_config_of(model))
    end = min(REFERENCE_T_END, process.config.num_train_timesteps)
    for x0, cond in calibration_batches(model, ctx, samples, batch, dataset=dataset, generator=gen, missing="null"):
        x0 = x0.to(bb.device, bb.dtype)
        if variant == "reference":
            n = x0.shape[0]
            t = torch.rand(n, generator=gen) * end if process.config.objective == "flow" else \
                torch.randint(0, end, (n,), generator=gen)
            x, t = x0, t.to(bb.device)
        else:
            noisy = process.draw(x0, gen)
            x, t = noisy.x_t, noisy.t
        if isinstance(cond, TextCondition):
            cond = cond.to(bb.device, bb.dtype)
        elif cond is not None:
            cond = cond.to(bb.device)
        yield x, t, cond


def _check_variant(variant: str) -> str:
    if variant not in BI_VARIANTS:
        raise UsageError(f"bi_variant must be one of {', '.join(BI_VARIANTS)} (reference = TinyFusion's "
                         f"prune_by_score.py), got {variant!r}")
    return variant


@torch.no_grad()
def block_influence(model: nn.Module, ctx: Context, samples: int = CALIBRATION_SAMPLES, batch: int = 32,
                    dataset=None, variant: str = "reference") -> list[float]:
    """ShortGPT Block Influence of every block: ``1 - mean cosine(input, output)`` per token,
    on ``variant``'s inputs (see :func:`_calibration_batches`)."""
    _check_variant(variant)
    bb = check_depth_prunable(model, "bi-depth")
    sums = torch.zeros(len(bb.blocks), dtype=torch.float64)
    count = 0

    def hook(i: int):
        def fn(_m, args, kwargs, output):
            h_in, h_out = bb.block_input(args, kwargs), bb.block_output(output)
            sums[i] += torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1).sum().double().cpu()

        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(bb.blocks)]
    was_training = model.training
    model.eval()
    try:
        for x, t, cond in _calibration_batches(model, ctx, samples, batch, dataset, variant):
            bb(x, t, cond)
            count += x.shape[0] * math.prod(bb.token_grid)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return (1 - sums / max(1, count)).tolist()


def select_blocks(strategy: str, depth: int, k: int, seed: int = 0, scores: list[float] | None = None, *,
                  keep_last: bool = False) -> list[int]:
    """Indices (increasing) of the ``k`` blocks a baseline keeps. ``keep_last`` (``bi`` only):
    the last block is always kept and the ``depth - k`` removed blocks are the lowest-scoring
    of the others (TinyFusion's ``prune_by_score.py`` ranks ``scores[:-1]``)."""
    if not 1 <= k <= depth:
        raise UsageError(f"cannot keep {k} of {depth} blocks; keep between 1 and {depth}")
    if strategy == "first":
        return list(range(k))
    if strategy == "last":
        return list(range(depth - k, depth))
    if strategy == "stride":
        return [math.floor((i + 0.5) * depth / k) for i in range(k)]
    if strategy == "random":
        return sorted(torch.randperm(depth, generator=torch.Generator().manual_seed(seed))[:k].tolist())
    if strategy == "bi":
        if scores is None or len(scores) != depth:
            raise UsageError("the bi strategy needs one Block Influence score per block")
        candidates = range(depth - 1) if keep_last else range(depth)
        order = sorted(candidates, key=lambda i: (scores[i], -i))  # least influential first
        removed = set(order[: depth - k])
        return [i for i in range(depth) if i not in removed]
    raise UsageError(f"unknown depth strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


STRATEGIES = ("bi", "first", "last", "stride", "random")


def bk_sdm_blocks(depth: int, k: int) -> list[int]:
    """The BK-SDM "Oracle" of TinyFusion's README: blocks in groups of ``m = depth / k``; each
    group of the first half keeps its first block, each group of the second half its last."""
    m = depth // k if 1 <= k <= depth and depth % k == 0 else 0
    if not m or (depth // 2) % m:
        raise UsageError(
            f"the BK-SDM oracle keeps one block per group of equal size in each half, which does not fit "
            f"{k} of {depth} blocks; pass keep_blocks (e.g. --option keep_blocks=0,2,4) or choose a budget "
            f"whose depth divides {depth} into groups that tile each half")
    return [g * m if g * m < depth // 2 else g * m + m - 1 for g in range(k)]


def parse_keep_blocks(text: str, depth: int | None = None) -> list[int]:
    """Block indices from ``"0,2,4"`` (or the reference's ``"[0, 2, 4]"``), checked: integers,
    increasing, no repeats, in ``[0, depth)`` (without ``depth``: the syntax only, >= 0)."""
    raw = str(text).strip().removeprefix("[").removesuffix("]")
    try:
        kept = [int(v) for v in raw.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"keep_blocks must be block indices separated by commas, e.g. 0,2,4; got {text!r}") from None
    if not kept:
        raise UsageError(f"keep_blocks names no block; list the indices to keep, e.g. 0,2,4 (got {text!r})")
    bad = [i for i in kept if i < 0 or (depth is not None and i >= depth)]
    if bad:
        where = f"this model has {depth} blocks, indices 0..{depth - 1}" if depth is not None else "indices start at 0"
        raise UsageError(f"keep_blocks {bad} out of range: {where}")
    repeated = sorted({i for i in kept if kept.count(i) > 1})
    if repeated:
        raise UsageError(f"keep_blocks lists block(s) {repeated} more than once; name each kept block once")
    if kept != sorted(kept):
        raise UsageError(f"keep_blocks must be increasing (blocks keep their order in the model); "
                         f"write {','.join(map(str, sorted(kept)))}")
    return kept


def _target_depth(model: nn.Module, budget: float, ctx: Context, keep: str | None) -> tuple[int, dict]:
    depth = len(check_depth_prunable(model).blocks)
    if keep is not None:
        return sum(g.n for g in parse_keep(str(keep), depth)), {"keep": str(keep), "keep_from": "keep"}
    k, facts = depth_for_budget(model, budget, ctx)
    return k, {"keep_from": f"budget {budget:g}", **facts}


@dataclass(frozen=True)
class DepthBaselineConfig:
    """The depth baselines' option."""

    keep: str | None = option(None, "N:M group shape(s) giving the depth, e.g. 1:2 (default: from the budget)")

    def __post_init__(self) -> None:
        check_options(self)
        if self.keep is not None:
            check_keep_syntax(self.keep)  # whether its groups tile the depth needs the model


@dataclass(frozen=True)
class BIDepthConfig(DepthBaselineConfig):
    """``bi-depth``'s options: the depth, and which Block Influence scoring."""

    bi_variant: str = option("reference", "Block Influence inputs: reference = TinyFusion's prune_by_score.py (clean "
                                          "latents, t uniform in [0, 250), last block never removed); noised = "
                                          "deviation (noised samples at t over all training steps, last block "
                                          "removable)", choices=BI_VARIANTS)


def _compress(strategy: str, model: nn.Module, budget: float, ctx: Context, config: DepthBaselineConfig) -> nn.Module:
    """Depth baseline ``strategy``: keep the ``k`` blocks it selects, then the shared recovery."""
    name = f"{strategy}-depth"
    start = time.process_time()
    depth = len(check_depth_prunable(model, name).blocks)
    k, settings = _target_depth(model, budget, ctx, config.keep)
    extras: dict = {}
    scores, keep_last = None, False
    if strategy == "bi":
        variant = config.bi_variant
        scores, keep_last = block_influence(model, ctx, variant=variant), variant == "reference"
        settings.update(bi_variant=variant, keep_last=keep_last)
        extras["block_influence"] = scores
    kept = select_blocks(strategy, depth, k, ctx.seed, scores, keep_last=keep_last)
    return finish_depth(model, kept, ctx, name, {**settings, "depth": k}, extras, cost_s=time.process_time() - start)


@dataclass(frozen=True)
class OracleConfig:
    """``oracle-depth``'s option: the kept blocks."""

    keep_blocks: str | None = option(None, "indices of the blocks to keep, e.g. 0,2,4 (overrides the budget, as "
                                           "prune_by_index.py's --kept-indices); default: the BK-SDM oracle at the "
                                           "budget's depth")

    def __post_init__(self) -> None:
        if self.keep_blocks is not None:
            parse_keep_blocks(self.keep_blocks)  # whether they fit the depth needs the model


def _oracle(model: nn.Module, budget: float, ctx: Context, config: OracleConfig) -> nn.Module:
    """Keep ``config.keep_blocks`` (or the BK-SDM oracle at the budget's depth), then the shared recovery.

    Explicit indices are a structure, so, like TinyFusion's ``keep``, they override the budget
    (the reached MACs are measured and recorded as for every method)."""
    start = time.process_time()
    depth = len(check_depth_prunable(model, "oracle-depth").blocks)
    if config.keep_blocks is not None:
        kept = parse_keep_blocks(config.keep_blocks, depth)
        settings = {"keep_blocks": ",".join(map(str, kept)), "keep_from": "keep_blocks"}
    else:
        k, facts = depth_for_budget(model, budget, ctx)
        kept = bk_sdm_blocks(depth, k)
        settings = {"keep_blocks": ",".join(map(str, kept)), "keep_from": f"budget {budget:g} (BK-SDM oracle)",
                    **facts}
    return finish_depth(model, kept, ctx, "oracle-depth", {**settings, "depth": len(kept)}, {},
                        cost_s=time.process_time() - start)


_HELP = {
    "bi": "ShortGPT Block Influence depth pruning (drop blocks with the most similar input/output)",
    "first": "keep the first k blocks",
    "last": "keep the last k blocks",
    "stride": "keep k blocks at a uniform stride",
    "random": "keep k random blocks (seeded)",
}
SPECS = (
    *(MethodSpec(f"{s}-depth", "depth", f"[baseline] {_HELP[s]}", functools.partial(_compress, s),
                 BIDepthConfig if s == "bi" else DepthBaselineConfig, draw=draw_depth, applies=depth_prunable)
      for s in STRATEGIES),
    MethodSpec("oracle-depth", "depth", "[baseline] keep given block indices (TinyFusion's Oracle / prune_by_index; "
               "default: the BK-SDM oracle)", _oracle, OracleConfig, draw=draw_depth, applies=depth_prunable),
)
