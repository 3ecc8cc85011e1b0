"""Depth pruning machinery shared by TinyFusion and the depth baselines.

**Group-shape syntax** (``keep``): a comma-separated pattern of ``N:M`` shapes that is
repeated from the first block on and must cover the depth exactly; a group of shape
``N:M`` keeps ``N`` of its ``M`` consecutive blocks. ``"1:2"`` on 12 blocks is six 1:2
groups; ``"2:4,1:2"`` on 12 blocks is ``2:4, 1:2, 2:4, 1:2`` (the pattern covers 6 blocks,
twice); a pattern listing every group (``"2:4,1:2,1:2,2:4"``) is used as is. ``N = M``
keeps a group whole. Each of a group's ``C(M, N)`` keep-patterns
(``itertools.combinations``) is one *option* (:func:`group_options`). Without ``keep`` the
budget picks the depth (:func:`depth_for_budget`) and the shape (:func:`shape_for_depth`:
by default the finest *local* shape, e.g. ``1:2`` for half the blocks, as in the paper).

**Extraction** (:func:`extract_blocks`): the dropped blocks are deleted from the module
list and the config's depth is updated, so the result is a plain, shallower model.

**Gating** (:func:`apply_depth_gates`, :func:`masked_blocks`): diffusers ``ModelHook`` s
(the mechanism of :mod:`slimdiff.runtime.reuse`) make block ``i`` compute
``m_i * block(h) + (1 - m_i) * h``, a dropped block being the identity on the residual
stream while every block is still computed; for searches and tests, never for sampling.

**Ending** (:func:`finish_depth`): cut to the kept blocks, run the shared recovery with a
KD layer map (:func:`layer_map`; by default the reference's group-end map: a group's last
kept student block <- the teacher block at the end of the group), record the kept blocks.
"""
from __future__ import annotations

import itertools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook

from slimdiff.budget import BUDGET_NOTE, BUDGET_TOLERANCE, far_below
from slimdiff.errors import UsageError
from slimdiff.methods.base import Context, record, recover, sampling_macs
from slimdiff.models.backbone import Backbone, as_backbone

__all__ = [
    "MAX_OPTIONS", "Group", "parse_keep", "format_groups", "group_options", "check_depth_prunable",
    "extract_blocks", "DepthGateConfig", "apply_depth_gates", "remove_depth_gates", "masked_blocks",
    "KD_MAPS", "kept_layer_map", "group_end_layer_map", "layer_map", "depth_for_budget", "SEARCH_SPACES",
    "search_space_of", "shape_for_depth", "resolve_depth", "finish_depth", "draw_depth",
]

MAX_OPTIONS = 1024
"""Largest option count per group that :func:`shape_for_depth` picks (the reference's widest
preset, 7:14, has 3432; 6 of 12 blocks in one group has 924)."""

GATE_HOOK = "slimdiff_depth_gate"


# --------------------------------------------------------------------------- group shapes
@dataclass(frozen=True)
class Group:
    """One group of ``m`` consecutive blocks starting at ``start``, of which ``n`` are kept."""

    n: int
    m: int
    start: int

    @property
    def shape(self) -> str:
        return f"{self.n}:{self.m}"


def _parse_shape(text: str) -> tuple[int, int]:
    parts = text.strip().split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"bad group shape {text.strip()!r}: write N:M with integers, e.g. 1:2 or 2:4,1:2") from None
    if m < 1 or n < 1:
        raise UsageError(f"group shape {n}:{m}: N and M must be >= 1 (keep at least one block of every group)")
    if n > m:
        raise UsageError(f"group shape {n}:{m}: N > M keeps more blocks than the group has; use N <= M, e.g. 1:2")
    return n, m


def check_keep_syntax(keep: Any) -> None:
    """The syntax of an N:M ``keep`` pattern, without a model (whether its groups tile the
    depth needs the model: :func:`parse_keep`)."""
    if not isinstance(keep, str) or not keep.strip():
        raise UsageError(f"keep must be a group-shape pattern such as '1:2' or '2:4,1:2', got {keep!r}")
    for shape in keep.split(","):
        _parse_shape(shape)


def parse_keep(spec: str, depth: int) -> list[Group]:
    """Groups covering ``depth`` blocks from a ``keep`` pattern (see the module docs)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"keep must be a group-shape pattern such as '1:2' or '2:4,1:2', got {spec!r}")
    pattern = [_parse_shape(s) for s in spec.split(",")]
    period = sum(m for _, m in pattern)
    if depth % period:
        raise UsageError(
            f"group shape(s) {spec!r} cover {period} blocks per repeat, which does not divide the depth {depth}; "
            f"choose shapes whose M values sum to a divisor of {depth} (e.g. 1:2 for an even depth)"
        )
    groups, start = [], 0
    for n, m in pattern * (depth // period):
        groups.append(Group(n, m, start))
        start += m
    return groups


def format_groups(groups: Sequence[Group]) -> str:
    """The shortest ``keep`` pattern that :func:`parse_keep` turns back into ``groups``."""
    shapes = [(g.n, g.m) for g in groups]
    for p in range(1, len(shapes) + 1):
        if len(shapes) % p == 0 and shapes == shapes[:p] * (len(shapes) // p):
            return ",".join(f"{n}:{m}" for n, m in shapes[:p])
    return ""  # unreachable: p = len(shapes) always matches


def group_options(n: int, m: int) -> torch.Tensor:
    """``(C(m, n), m)`` 0/1 keep-masks of a group, one row per ``itertools.combinations`` option."""
    combos = list(itertools.combinations(range(m), n))
    out = torch.zeros(len(combos), m)
    for i, keep in enumerate(combos):
        out[i, list(keep)] = 1.0
    return out


# --------------------------------------------------------------------------- extraction
def depth_prunable(model: nn.Module) -> bool:
    """Whether depth pruning applies to ``model`` at all (it removes transformer blocks)."""
    return as_backbone(model).is_transformer


def check_depth_prunable(model: nn.Module, what: str = "depth pruning") -> Backbone:
    """The Backbone of ``model`` if its blocks can be removed, else :class:`UsageError`."""
    bb = as_backbone(model)
    if not bb.is_transformer:
        raise UsageError(
            f"{what} removes transformer blocks (DiT, diffusers DiT, PixArt); this is a {bb.kind} model: "
            "use a width method such as diff-pruning"
        )
    if len(bb.blocks) < 2:
        raise UsageError(f"{what} needs at least 2 blocks; this {bb.kind} model has {len(bb.blocks)}")
    return bb


def _check_extractable(bb: Backbone, kept: Sequence[int]) -> None:
    depth = len(bb.blocks)
    if not kept or list(kept) != sorted(set(kept)) or not all(0 <= i < depth for i in kept):
        raise UsageError(f"kept blocks must be a non-empty increasing list of indices in [0, {depth}), got {list(kept)}")
    dropped = sorted(set(range(depth)) - set(kept))
    if any(not bb.can_drop_block(i) for i in dropped):
        raise UsageError(bb.drop_refusal)


def extract_blocks(model: nn.Module, kept: Sequence[int]) -> nn.Module:
    """Keep only the blocks ``kept`` (indices, increasing) of ``model``, in place; return it.

    The other blocks are deleted from the module list and the config's depth
    (``DiTConfig.depth`` / diffusers ``num_layers``) is updated, so the result is a plain,
    shallower model of the same class that saves, loads and exports like any other.
    """
    bb = check_depth_prunable(model, "extracting blocks")
    kept = [int(i) for i in kept]
    _check_extractable(bb, kept)
    blocks = bb.blocks
    bb.set_blocks([blocks[i] for i in kept])
    return model


@contextmanager
def _only_blocks(model: nn.Module, kept: Sequence[int]) -> Iterator[nn.Module]:
    """Temporarily run ``model`` with only the blocks ``kept`` (no weights copied)."""
    bb = as_backbone(model)
    blocks = bb.blocks
    original = bb.set_blocks([blocks[i] for i in kept])
    try:
        yield model
    finally:
        bb.set_blocks(original)


# --------------------------------------------------------------------------- gating
@dataclass(frozen=True)
class DepthGateConfig:
    """How :func:`apply_depth_gates` gates the blocks.

    ``mask_of(i)``: block ``i``'s keep value, a scalar or one value per example ``(batch,)``
    (read after the block has run). ``before_forward(h)``: called with block 0's input before
    it runs, i.e. once per forward of the model (TinyFusion draws its masks there).
    """

    mask_of: Callable[[int], torch.Tensor]
    before_forward: Callable[[torch.Tensor], None] | None = None


class DepthGateHook(ModelHook):
    """Makes block ``index`` compute ``m * block(h) + (1 - m) * h`` with ``m = mask_of(index)``
    (``backbone``: the Backbone class that says how its blocks are called)."""

    def __init__(self, index: int, config: DepthGateConfig, backbone: type[Backbone]):
        super().__init__()
        self.index, self.config, self.backbone = index, config, backbone

    def new_forward(self, module: nn.Module, *args, **kwargs):
        h = self.backbone.block_input(args, kwargs)
        if self.index == 0 and self.config.before_forward is not None:
            self.config.before_forward(h)
        output = self.fn_ref.original_forward(*args, **kwargs)
        out = self.backbone.block_output(output)
        m = self.config.mask_of(self.index).to(out.dtype)
        m = m.reshape(-1, *([1] * (out.ndim - 1))) if m.ndim else m
        return self.backbone.with_block_output(output, m * out + (1 - m) * h)


def _gate_hooks(model: nn.Module) -> list[DepthGateHook]:
    return [m._diffusers_hook.get_hook(GATE_HOOK) for _, m in model.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook(GATE_HOOK) is not None]


def apply_depth_gates(model: nn.Module, config: DepthGateConfig | Callable[[int], torch.Tensor]) -> nn.Module:
    """Gate every block of ``model`` (in place; returns it): ``config`` is a
    :class:`DepthGateConfig` or just its ``mask_of``. Undo with :func:`remove_depth_gates`."""
    if not isinstance(config, DepthGateConfig):
        config = DepthGateConfig(config)
    if _gate_hooks(model):
        raise UsageError("this model already has depth gates: call remove_depth_gates(model) first")
    bb = as_backbone(model)
    for i, block in enumerate(bb.blocks):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(DepthGateHook(i, config, type(bb)), GATE_HOOK)
    _invalidate(model)
    return model


def remove_depth_gates(model: nn.Module) -> nn.Module:
    """Remove the depth gates (a no-op without them); the blocks compute in full again, and
    a block left without any hook is the plain module again (no registry, no patched forward)."""
    for _, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None or registry.get_hook(GATE_HOOK) is None:
            continue
        registry.remove_hook(GATE_HOOK, recurse=False)
        if not registry.hooks:
            del module._diffusers_hook
            forward = module.__dict__.get("forward")  # the bound method the registry put back
            if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
                del module.__dict__["forward"]
    _invalidate(model)
    return model


def _invalidate(model: nn.Module) -> None:
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None:  # a registry above the blocks caches which children have hooks
        registry.invalidate_child_registries_cache()


@contextmanager
def masked_blocks(model: nn.Module, keep_mask: Sequence[float] | torch.Tensor) -> Iterator[nn.Module]:
    """Run ``model`` with block ``i`` bypassed (identity on the residual stream) where
    ``keep_mask[i] == 0``; every block is still computed. ``keep_mask`` is one 0/1 value
    per block, or ``(batch, depth)`` for per-example masks. For tests and search only."""
    mask = torch.as_tensor(keep_mask, dtype=torch.float32)
    depth = len(as_backbone(model).blocks)
    if mask.shape[-1] != depth:
        raise UsageError(f"keep mask has {mask.shape[-1]} entries but the model has {depth} blocks")
    apply_depth_gates(model, lambda i: mask[..., i])
    try:
        yield model
    finally:
        remove_depth_gates(model)


# --------------------------------------------------------------------------- KD layer maps
KD_MAPS = ("group-end", "kept")
"""Student -> teacher block maps for hidden / masked KD (:func:`layer_map`)."""


def kept_layer_map(kept: Sequence[int]) -> dict[int, int]:
    """KD map ``"kept"`` (a deviation): student block ``i`` -> teacher block ``kept[i]``, the
    block it was cut from; that teacher state lacks the dropped blocks that follow it."""
    return {i: int(k) for i, k in enumerate(kept)}


def group_end_layer_map(kept: Sequence[int], groups: Sequence[Group]) -> dict[int, int]:
    """KD map ``"group-end"`` (the reference's): for every group, the student's last kept
    block in it -> the teacher's last block of the group, so the student is pulled toward the
    teacher's state *after* the whole group, dropped blocks included. This is the rule behind
    the reference's hard-coded maps (``train_masked_kd.py`` ~185-193): D14 from 1:2 groups maps
    ``i -> 2i + 1``; D19 from groups of 4 maps student ``[2, 5, 7, 10, 12, 15, 18]`` (the last
    kept block of each group) -> teacher ``[3, 7, ..., 27]``. A group without kept blocks (a
    baseline's choice) has no pair."""
    pos = {int(b): i for i, b in enumerate(kept)}
    out = {}
    for g in groups:
        inside = [pos[b] for b in range(g.start, g.start + g.m) if b in pos]
        if inside:
            out[inside[-1]] = g.start + g.m - 1
    return out


def layer_map(kept: Sequence[int], groups: Sequence[Group], kd_map: str = "group-end") -> dict[int, int]:
    """The KD layer map ``kd_map`` (one of :data:`KD_MAPS`) of a student cut to ``kept``."""
    if kd_map == "group-end":
        return group_end_layer_map(kept, groups)
    if kd_map == "kept":
        return kept_layer_map(kept)
    raise UsageError(f"unknown KD layer map {kd_map!r}; choose one of {', '.join(KD_MAPS)}")


# --------------------------------------------------------------------------- shape for a budget
@dataclass(frozen=True)
class DepthCost:
    """Sampling MACs as a function of the number of kept blocks (a :class:`~slimdiff.budget.CostModel`).

    Sampling MACs are affine in the number of blocks (embedders and output layer + one cost
    per block), so two measured points give the line: the full model and the model with
    block 0 only. With blocks of unequal width (a width-pruned input) the per-block cost is
    their average; the reached budget is measured on the result in any case.
    """

    full: int  # the model as it is
    one: int  # the model with block 0 only
    depth: int

    @property
    def per_block(self) -> float:
        return (self.full - self.one) / (self.depth - 1)

    @property
    def other(self) -> float:
        return self.one - self.per_block

    def macs(self, blocks: int) -> float:
        return self.other + blocks * self.per_block

    @classmethod
    def measure(cls, model: nn.Module, ctx: Context) -> "DepthCost":
        depth = len(check_depth_prunable(model).blocks)
        full = sampling_macs(model, ctx)
        with _only_blocks(model, [0]):
            one = sampling_macs(model, ctx)
        return cls(full, one, depth)


def depth_for_budget(model: nn.Module, budget: float, ctx: Context) -> tuple[int, dict]:
    """The largest number of blocks whose shallower model fits ``budget`` (a fraction of
    ``model``'s sampling MACs under ``ctx``) up to :data:`BUDGET_TOLERANCE` (3%, as for
    width pruning: 6 of 12 digits-dit blocks cost 0.501 and meet budget 0.5), and the MACs
    facts it was derived from (:class:`DepthCost`).
    """
    cost = DepthCost.measure(model, ctx)
    per_block, base, full = cost.per_block, cost.other, cost.full
    allowed = budget * (1 + BUDGET_TOLERANCE) * full
    k = min(cost.depth, math.floor((allowed - base) / per_block + 1e-9)) if per_block > 0 else cost.depth
    if k < 1:
        raise UsageError(
            f"budget {budget:g} is below what one block costs ({cost.one / full:.3f} of the sampling MACs); "
            "raise the budget or chain a method that cuts other work"
        )
    facts = {"macs_full": full, "macs_per_block": per_block, "macs_other": base}
    if k < cost.depth and far_below(budget, cost.macs(k) / full):
        facts[BUDGET_NOTE] = (f"depth pruning keeps whole blocks: {k} of {cost.depth} cost {cost.macs(k) / full:.3f} "
                              f"of its input's sampling MACs, {k + 1} would cost {cost.macs(k + 1) / full:.3f}")
    return k, facts


SEARCH_SPACES = ("local", "global")
"""How a budget picks the shape (:func:`shape_for_depth`): the paper's, or beyond it."""


def search_space_of(groups: Sequence[Group]) -> str:
    """``"global"`` when one group spans every block and drops some (e.g. ``6:12`` on 12
    blocks: any ``N`` of the blocks may be kept), else ``"local"`` (the name reports use)."""
    return "global" if len(groups) == 1 and groups[0].n < groups[0].m else "local"


def _local_shape(depth: int, k: int) -> str | None:
    """The finest local pattern keeping exactly ``k`` of ``depth`` blocks, or ``None``."""
    divisors = [m for m in range(2, depth) if depth % m == 0]  # group sizes of more than one group
    for m in divisors:  # a uniform N:M shape: the paper's kind (1:2, 2:4, 3:4, 1:4)
        if (k * m) % depth == 0 and math.comb(m, k * m // depth) <= MAX_OPTIONS:
            return f"{k * m // depth}:{m}"
    for m in divisors:  # groups of the smallest size with a kept block each, k spread evenly
        groups = depth // m
        if k < groups:
            continue
        base, extra = divmod(k, groups)
        ns = [base + ((j + 1) * extra // groups - j * extra // groups) for j in range(groups)]
        if max(ns) <= m and all(math.comb(m, x) <= MAX_OPTIONS for x in ns):
            return ",".join(f"{x}:{m}" for x in ns)
    return None


def _global_shape(depth: int, k: int) -> str | None:
    """The uniform shape with the fewest groups (the widest search) whose group has at most
    :data:`MAX_OPTIONS` options, or ``None``."""
    g = math.gcd(depth, k)
    for groups in (d for d in range(1, g + 1) if g % d == 0):
        n, m = k // groups, depth // groups
        if math.comb(m, n) <= MAX_OPTIONS:
            return f"{n}:{m}"
    return None


def shape_for_depth(depth: int, k: int, space: str = "local") -> str:
    """A ``keep`` pattern that keeps exactly ``k`` of ``depth`` blocks (``k`` is the largest
    depth that meets the budget, :func:`depth_for_budget`).

    ``space="local"`` (default; the paper's search space, whose headline is ``1:2`` for
    halving the depth): the uniform ``N:M`` shape with the smallest group size ``M`` (``M``
    dividing the depth, more than one group), i.e. the finest: 6 of 12 -> ``1:2``, 3 of 12
    -> ``1:4``, 9 of 12 -> ``3:4``, 14 of 28 -> ``1:2``. When no uniform shape keeps ``k``
    (13 of 28), groups of the smallest size that gives every group a kept block, the ``k``
    kept blocks spread as evenly as possible (``2:4`` x 6 and one ``1:4``). Else (a prime
    depth, or fewer kept blocks than groups of any size: 1 of 12) one group ``k:depth``.

    ``space="global"`` (beyond the paper): the uniform shape with the fewest groups (the
    widest search) with at most :data:`MAX_OPTIONS` options per group (6 of 12 -> ``6:12``;
    14 of 28 -> ``2:4``), else the local rule. A local shape can exclude the best sub-network
    (on ``digits-dit`` the first six blocks recover far better than any 1:2 choice, and a
    ``6:12`` search finds them); the paper's ablation on DiT-XL/2 found ``1:2`` and ``2:4``
    close and ``7:14`` harder to optimise. An explicit ``keep`` chooses any shape.
    """
    if space not in SEARCH_SPACES:
        raise UsageError(f"unknown search space {space!r}; choose one of {', '.join(SEARCH_SPACES)}")
    if not 1 <= k <= depth:
        raise UsageError(f"cannot keep {k} of {depth} blocks; keep between 1 and {depth}")
    if k == depth:
        return "1:1"
    shape = (_global_shape(depth, k) if space == "global" else None) or _local_shape(depth, k)
    if shape is None and math.comb(depth, k) <= MAX_OPTIONS:
        shape = f"{k}:{depth}"
    if shape is None:
        raise UsageError(f"no N:M pattern with <= {MAX_OPTIONS} options per group keeps {k} of {depth} blocks; pass keep")
    return shape


def resolve_depth(model: nn.Module, budget: float, ctx: Context, keep: str | None,
                  space: str = "local") -> tuple[list[Group], dict]:
    """Groups from ``keep``, or from the budget and ``space`` (:func:`shape_for_depth`); and
    the settings to record: the shape (``keep``), where it came from and ``search_space``
    (``"global"`` for one group over every block, else ``"local"``)."""
    depth = len(check_depth_prunable(model).blocks)
    if keep is not None:
        groups = parse_keep(str(keep), depth)
        return groups, {"keep": str(keep), "keep_from": "keep", "search_space": search_space_of(groups),
                        BUDGET_NOTE: f"keep {keep} was given: it sets the depth, not the budget"}
    k, facts = depth_for_budget(model, budget, ctx)
    shape = shape_for_depth(depth, k, space)
    groups = parse_keep(shape, depth)
    return groups, {"keep": shape, "keep_from": f"budget {budget:g}", "search_space": search_space_of(groups), **facts}


# --------------------------------------------------------------------------- ending
def _groups_of(keep: str | None, depth: int, k: int) -> list[Group]:
    """The groups of pattern ``keep``, else of the local shape keeping ``k`` of ``depth``
    blocks, else (no such shape within :data:`MAX_OPTIONS`) one group of every block."""
    if keep is not None:
        return parse_keep(str(keep), depth)
    try:
        return parse_keep(shape_for_depth(depth, k), depth)
    except UsageError:
        return [Group(k, depth, 0)]


def finish_depth(model: nn.Module, kept: Sequence[int], ctx: Context, name: str, settings: dict,
                 extras: dict, cost_s: float = 0.0, groups: Sequence[Group] | None = None,
                 kd_map: str = "group-end") -> nn.Module:
    """Cut ``model`` to the blocks ``kept``, run the shared recovery with the ``kd_map`` layer
    map (:func:`layer_map`) and record the method; the common ending of every depth method.

    ``groups``: the N:M groups ``kept`` was chosen in; by default those of ``settings["keep"]``
    when recorded, else the local shape of ``len(kept)`` blocks, so that the depth baselines
    get the group-end map of TinyFusion at the same shape. The kept block indices go to the
    measurements (so to every chain and bench entry) and to the extras, with the layer map.
    """
    depth = len(as_backbone(model).blocks)
    kept = [int(i) for i in kept]
    if groups is None:
        groups = _groups_of(settings.get("keep"), depth, len(kept))
    teacher = ctx.teacher
    pairs = layer_map(kept, groups, kd_map)
    if ctx.kd in ("hidden", "masked") and teacher is not None and len(as_backbone(teacher).blocks) != depth:
        raise UsageError(
            f"{ctx.kd} KD maps student blocks to the teacher's by index, but the teacher has "
            f"{len(as_backbone(teacher).blocks)} blocks and {name}'s input {depth}; run depth pruning first in the chain"
        )
    extract_blocks(model, kept)
    if ctx.recover_steps > 0:
        # Recovery trains every weight. The trainer freezes its teacher in place, so a model
        # that served as ctx.teacher in an earlier call arrives here frozen.
        model.requires_grad_(True)
    start = time.process_time()
    tag = f"{name}-{'-'.join(map(str, kept))}-{ctx.kd}-{kd_map}-n{ctx.recover_steps}-s{ctx.seed}"  # a resume key
    model = recover(model, ctx, tag, layer_map=pairs)
    measured = {"depth": len(kept), "original_depth": depth, "kept_blocks": kept, "compress_cpu_s": cost_s,
                "recover_cpu_s": time.process_time() - start, "recover_steps": ctx.recover_steps, "kd": ctx.kd}
    extras = {"kept_blocks": kept, "kd_map": kd_map, "layer_map": {str(k): v for k, v in pairs.items()}, **extras}
    return record(model, name, settings, measured, extras)


def draw_depth(name: str, extras: dict, model: nn.Module | None, out: Path, ctx: dict[str, Any]) -> list[Path]:
    """A depth method's report picture: TinyFusion's option probabilities over its search,
    else the kept blocks (``ctx["depth"]``: the original block count, when known)."""
    from slimdiff.eval.report import kept_blocks, option_probabilities

    if extras.get("probability_history"):
        return [option_probabilities(extras["groups"], extras["probability_history"], out / f"{name}-probabilities.png")]
    if "kept_blocks" in extras:
        depth = ctx.get("depth") or max(extras["kept_blocks"]) + 1
        return [kept_blocks(extras["kept_blocks"], depth, out / f"{name}-kept_blocks.png", f"{name}: kept blocks")]
    return []
