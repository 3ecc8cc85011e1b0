"""Width pruning through torch-pruning's dependency graph, to a MACs budget: the machinery
Diff-Pruning (:mod:`slimdiff.methods.diff_pruning`) and its width baselines
(:mod:`slimdiff.methods.width_baselines`) share, so that only the channel importance differs.

* **Structural pruning**, *local* ranking (the same ratio in every group, as in Diff-Pruning's
  reference), one shot, with importance (:data:`IMPORTANCES`) ``taylor-paper`` (``ddpm_exp``'s,
  :class:`~slimdiff.compression.importance.PaperTaylorImportance`), ``taylor`` (torch-pruning's
  ``TaylorImportance(multivariable=False)``), ``taylor-multivariable`` (the Taylor baseline's), all
  three needing gradients on the model, ``magnitude`` (group L2) or ``random``. Inside GroupNorm
  groups and heads, channels are ranked per group (``group_ranking="separate"``, the fork behind
  the paper's tables, :func:`~slimdiff.compression.importance.prune_separately`) or with
  torch-pruning 1.6's shared slots (``"shared"``, ``ddpm_prune.py``); ``residual=True`` (DiT)
  lets :mod:`slimdiff.compression.residual_width` open the residual width too:

  * UNet2DModel / UNet2DConditionModel: every conv/linear channel group (GroupNorm groups
    and skip connections are handled by the graph); only ``conv_out`` is kept whole.
  * Transformers (our DiT, diffusers DiT, PixArt): attention inner width (q/k/v rows and the
    output projection's columns; self- and cross-attention) and MLP hidden channels. The
    residual width and every embedder stay whole (the residual group is coupled to a
    ``pos_embed`` buffer and adaLN chunks, see environment.md).
  * ``heads="dims"`` (default, torch-pruning's default) narrows every head; ``heads="whole"``
    removes whole heads (at least one head is kept per attention). Narrower heads also
    change SDPA's default softmax scale to ``1/sqrt(new head dim)`` (ours and diffusers'
    processors both use the default), as with torch-pruning's own examples; recovery
    absorbs it. Whole-head removal is exact: it equals zeroing the heads.
  * Afterwards :func:`slimdiff.models.backbone.sync_attention_heads` writes the new head
    counts (``pruner.num_heads``) and Down/Upsample channel counts back onto the modules:
    torch-pruning changes shapes only, and a stale ``heads`` makes diffusers' attention
    silently split the width into the wrong heads.
  * Our DiT's fused ``qkv`` is split with ``unbind`` (timm's form): torch-pruning's graph
    maps q/k/v channels through it, but not through ``qkv[0..2]`` indexing (it would prune q
    of one head with k of another). A test checks q, k and v keep the same positions.

* **Budget, not ratio** -- torch-pruning's ratio meant different things across versions
  (see diff_pruning.md), so the ratio is *searched* (:func:`prune_to_budget`: bisection,
  then, where channel groups make MACs jump past the budget, the two bracketing ratios
  mixed over groups) until the MACs ratio is within 3% of the budget. The search compares
  one-forward MACs (batch 1, attention included); for a static width-pruned model the
  sampling MACs are exactly ``steps x`` (``2 x steps`` with guidance) that, so the ratio is
  the same. The budget reached is then measured end to end with
  :func:`slimdiff.methods.base.sampling_macs` and recorded. With local ranking the pruned
  *shape* depends on the ratio only, so every importance reaches the same MACs at the same
  ratio (an equal-compute comparison).

* **Recovery** -- :func:`slimdiff.methods.base.recover` (``ctx.recover_steps``, ``ctx.kd``),
  identical for every width method (:func:`width_prune` runs search, measurement, recovery
  and recording).

The result is a plain, smaller ``nn.Module`` of the input's class; removed channels are gone
(no masks), and :mod:`slimdiff.io` saves its per-layer widths. What may be cut and where the
heads are is the Backbone's answer (:meth:`~slimdiff.models.backbone.Backbone.width_prunable_layers`,
:meth:`~slimdiff.models.backbone.Backbone.attention_layouts`), not this module's.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from slimdiff.compression.importance import GROUP_RANKINGS, kept_per_group, prune_separately, ratio_keeping
from slimdiff.errors import UsageError
from slimdiff.budget import BUDGET_TOLERANCE, check_budget
from slimdiff.methods.base import Context, record, recover, sampling_macs

__all__ = [
    "HEAD_MODES", "HEADS_HELP", "TOLERANCE", "ALIGN", "ALIGN_MIN_WIDTH", "HEAD_ALIGN", "GroupInfo", "Trial",
    "IMPORTANCES", "GROUP_RANKINGS", "GROUP_RANKING_HELP", "RESIDUAL_HELP", "meta_copy", "record_importance",
    "group_table", "group_roots", "aligned_ratios", "prune_with_ratio", "prune_to_budget", "width_prune", "draw_width",
]

HEAD_MODES = ("dims", "whole")
HEADS_HELP = "attention pruning: dims narrows every head, whole removes whole heads (keeps >= 1 per attention)"
TOLERANCE = BUDGET_TOLERANCE  # relative distance of the reached MACs ratio to the budget
ALIGN = 8  # the budget search keeps widths in multiples of this (see aligned_ratios)
ALIGN_MIN_WIDTH = 256  # narrower layers are not aligned (small models keep fine steps)
HEAD_ALIGN = 8  # kept width per head: fused attention kernels (flash SDPA) need head dims in multiples of 8
MAX_RATIO = 0.9  # the largest torch-pruning ratio tried (keeps >= 10% of every group)
MAX_TRIALS = 24
IMPORTANCES = ("taylor", "taylor-paper", "taylor-multivariable", "magnitude", "random")  # "taylor": torch-pruning's
GROUP_RANKING_HELP = ("how channels inside GroupNorm groups / heads are ranked: separate = each group on its own, "
                      "(C - int(C (1-r))) // G channels per group (ddpm_exp's pruner behind the paper's tables); "
                      "shared = torch-pruning 1.6's mean over groups, the same slots in every group (ddpm_prune.py)")
RESIDUAL_HELP = ("DiT only (a diffusers DiT is converted to slimdiff's DiT): also prune the residual (hidden) width "
                 "(patch embedding, pos_embed, adaLN, every block, final layer), beyond the paper's UNet experiments")


# --------------------------------------------------------------------------- pruner
def _ignored_layers(model: nn.Module) -> list[nn.Module]:
    """Every linear/conv layer whose output channels must stay: all but the Backbone's
    :meth:`~slimdiff.models.backbone.Backbone.width_prunable_layers`."""
    from slimdiff.models.backbone import as_backbone

    prunable = {id(layer) for layer in as_backbone(model).width_prunable_layers()}
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in prunable]


def _importance(kind: str):
    """The torch-pruning importance of ``kind`` (one of :data:`IMPORTANCES`)."""
    import torch_pruning as tp

    from slimdiff.compression.importance import PaperTaylorImportance

    makers = {"taylor": lambda: tp.importance.TaylorImportance(multivariable=False),
              "taylor-paper": PaperTaylorImportance,
              "taylor-multivariable": lambda: tp.importance.TaylorImportance(multivariable=True),
              "magnitude": tp.importance.MagnitudeImportance, "random": tp.importance.RandomImportance}
    if kind not in makers:
        raise UsageError(f"unknown importance {kind!r}; use one of {', '.join(IMPORTANCES)}")
    return makers[kind]()


def _check_ranking(group_ranking: str) -> None:
    if group_ranking not in GROUP_RANKINGS:
        raise UsageError(f"group_ranking must be one of {', '.join(GROUP_RANKINGS)}, got {group_ranking!r}")


def _copy_with_grads(model: nn.Module) -> nn.Module:
    """``deepcopy`` drops ``.grad``; Taylor importance on the copy needs them."""
    clone = copy.deepcopy(model)
    for src, dst in zip(model.parameters(), clone.parameters()):
        dst.grad = None if src.grad is None else src.grad.detach().clone()
    return clone


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the ``meta`` device: shapes only,
    no memory, no arithmetic. The budget search prunes and counts MACs on such copies."""
    import itertools

    memo: dict[int, torch.Tensor] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


class RecordedImportance:
    """Group importance computed once and replayed: torch-pruning asks for it per group, keyed
    here by the group's root layer name and pruning function (identical across copies; the
    number of dependencies is not: tracing on the meta device sees attention's inner ops).

    With ``inner`` set, missing scores are computed on the model and recorded into ``table``;
    without it (meta-device copies, which have no values) every score must be recorded.
    """

    def __init__(self, table: dict, names: dict[nn.Module, str], inner=None):
        self.table, self.names, self.inner = table, names, inner

    def __call__(self, group) -> torch.Tensor:
        dep = group[0].dep
        key = (self.names.get(dep.target.module), getattr(dep.handler, "__name__", str(dep.handler)))
        if key not in self.table:
            if self.inner is None:
                raise RuntimeError(f"no recorded importance for group {key}")
            self.table[key] = self.inner(group).detach().float().cpu()
        return self.table[key]


def record_importance(model: nn.Module, importance: str, heads: str = "dims", seed: int = 0, *,
                      residual: bool = False) -> dict:
    """Every group's importance on ``model`` (Taylor needs its gradients), nothing pruned."""
    table: dict = {}
    pruner = _make_pruner(model, 0.5, importance, heads, scores=table, record=True, residual=residual)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # RandomImportance draws from the global generator
        for _ in pruner.step(interactive=True):  # computes every group's importance; we prune nothing
            pass
    return table


def _make_pruner(m: nn.Module, ratio: float, importance: str, heads: str, overrides: dict[str, float] | None = None,
                 scores: dict | None = None, record: bool = False, residual: bool = False):
    """torch-pruning's ``BasePruner`` over ``m`` with slimdiff's groups, heads and ignored layers.

    ``overrides`` maps group-root layer names (see :func:`group_roots`) to their own ratio.
    ``scores`` replays importance from :func:`record_importance` (``record``: fill it instead).
    ``residual`` (DiT) merges in :func:`slimdiff.compression.residual_width.pruner_kwargs`
    (its ``ignored_layers`` replace the default ones), so the residual width is pruned too.
    """
    import torch_pruning as tp

    from slimdiff.models.backbone import as_backbone

    if heads not in HEAD_MODES:
        raise UsageError(f"heads must be one of {', '.join(HEAD_MODES)}, got {heads!r}")
    modules = dict(m.named_modules())
    per_layer = {modules[n]: r for n, r in (overrides or {}).items()}
    bb = as_backbone(m)
    attn = bb.attention_layouts()
    num_heads = {layer: a.heads for a in attn for layer in a.qkv}
    whole = heads == "whole"

    def head_ratio(a) -> float:  # keep >= 1 head per attention
        r = next((per_layer[layer] for layer in a.qkv if layer in per_layer), ratio)
        return min(r, (a.heads - 1) / a.heads - 1e-6)

    example = bb.example_inputs(1, torch.Generator().manual_seed(0))
    imp = _importance(importance)
    if scores is not None:
        imp = RecordedImportance(scores, {mod: n for n, mod in m.named_modules()}, imp if record else None)
    kwargs = dict(
        ignored_layers=_ignored_layers(m), num_heads=num_heads,
        in_channel_groups={}, out_channel_groups={},  # fresh dicts: torch-pruning mutates its defaults
        prune_num_heads=whole, prune_head_dims=not whole, head_pruning_ratio=ratio if whole else 0.0,
        head_pruning_ratio_dict={a.module: head_ratio(a) for a in attn if a.heads > 1} if whole else None,
        forward_fn=lambda mod, inp: as_backbone(mod)(*inp),
    )
    if residual:
        from slimdiff.compression.residual_width import pruner_kwargs

        kwargs.update(pruner_kwargs(m))
    return tp.pruner.BasePruner(m, example, importance=imp, pruning_ratio=ratio, pruning_ratio_dict=per_layer or None,
                                **kwargs)


@dataclass(frozen=True)
class GroupInfo:
    """One prunable channel group: its root layer, channels per channel group (per head or
    GroupNorm group), the number of channel groups, and whether it is an attention group."""

    root: str
    size: int
    channel_groups: int
    attention: bool


def group_table(model: nn.Module, heads: str = "dims", *, residual: bool = False) -> list[GroupInfo]:
    """Every prunable group of ``model`` in dependency-graph order (see :func:`group_roots`)."""
    pruner = _make_pruner(model, 0.5, "magnitude", heads, residual=residual)
    names = {m: n for n, m in model.named_modules()}
    table = []
    groups = pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types)
    for group in groups:
        root = group[0].dep.target.module
        is_attn, _ = pruner._is_atten_group(group)
        if is_attn:
            group = pruner._downstream_node_as_root_if_attention(group)
            if group is None:
                continue
        n_groups = pruner._get_channel_groups(group)
        size = pruner.DG.get_out_channels(group[0].dep.target.module) // n_groups
        if size > 1 or (is_attn and heads == "whole"):
            table.append(GroupInfo(names[root], int(size), int(n_groups), bool(is_attn)))
    return table


def group_roots(model: nn.Module, heads: str = "dims",
                table: list[GroupInfo] | None = None) -> tuple[list[str], float]:
    """Prunable groups and the ratio range: ``(root layer names in dependency-graph order, max ratio)``.

    The max ratio (at most 0.9) still keeps >= 1 channel in every channel group: torch-pruning
    keeps ``int(g * (1 - ratio))`` of a group of ``g`` channels (per GroupNorm group / head;
    separate ranking keeps at least as many, :func:`~slimdiff.compression.importance.kept_per_group`);
    past ``1 - 1/g`` it would empty the group and then skip pruning it altogether, so MACs
    would jump *up*. Whole-head mode clamps heads per attention instead. No groups: ``([], 0.0)``.
    """
    table = group_table(model, heads) if table is None else table
    if not table:
        return [], 0.0
    sizes = [g.size for g in table if not (g.attention and heads == "whole")]
    return [g.root for g in table], min([MAX_RATIO] + [(1 - 1 / g) * (1 - 1e-6) for g in sizes])


def aligned_ratios(table: list[GroupInfo], ratio: float, overrides: dict[str, float] | None = None, *,
                   heads: str = "dims", align: int = ALIGN, group_ranking: str = "separate") -> dict[str, float]:
    """Per-group ratios whose kept widths are multiples of ``align`` (where a layer is at least
    :data:`ALIGN_MIN_WIDTH` wide); the kept count is rounded to the nearest such width.

    Why: matrix-multiply kernels slow down on odd widths. Measured on this CPU (2048 tokens,
    input 384): an output width of 558 costs 30% more per MAC than 560, so an unaligned pruned
    DiT-S/2 realised only 0.88 of its theoretical speedup. A group of ``c`` channel groups
    (heads, GroupNorm groups) of ``g`` channels keeps ``k`` per channel group, so ``c k`` is
    aligned when ``k`` is a multiple of ``align / gcd(align, c)``. Attention heads narrowed in
    ``dims`` mode also keep a multiple of :data:`HEAD_ALIGN` per head: measured on an H200
    (DiT-XL/2, batch 32, bf16), heads of width 36 fell off the flash-attention kernel and the
    pruned model realised 0.56 of its theoretical speedup. Whole-head attention groups are
    left as they are (their head width does not change). ``group_ranking`` picks the count
    rule the ratios are set for (torch-pruning's, or the fork's :func:`kept_per_group`).
    """
    overrides = overrides or {}
    out: dict[str, float] = {}
    for g in table:
        r = overrides.get(g.root, ratio)
        if align <= 1 or g.size * g.channel_groups < ALIGN_MIN_WIDTH or (g.attention and heads == "whole"):
            if g.root in overrides:
                out[g.root] = r
            continue
        step = align // math.gcd(align, g.channel_groups)
        if g.attention:
            step = math.lcm(step, HEAD_ALIGN)
        separate = group_ranking == "separate"
        kept = kept_per_group(g.size, g.channel_groups, r) if separate else int(g.size * (1 - r))
        kept = max(step, min(g.size, round(kept / step) * step))
        out[g.root] = ratio_keeping(g.size, g.channel_groups, kept) if separate else max(0.0, 1 - (kept + 0.5) / g.size)
    return out


def prune_with_ratio(model: nn.Module, ratio: float, importance: str = "taylor-paper", *, heads: str = "dims",
                     seed: int = 0, overrides: dict[str, float] | None = None, inplace: bool = False,
                     align: int = 1, table: list[GroupInfo] | None = None, scores: dict | None = None,
                     group_ranking: str = "separate", residual: bool = False) -> tuple[nn.Module, list]:
    """Prune a copy of ``model`` (or ``model`` itself with ``inplace``) at torch-pruning ratio
    ``ratio`` (``overrides``: per-group ratios by root layer name) with local ranking; return it
    and torch-pruning's history ``[(layer name, is_output_channels, removed indices), ...]``.

    ``align > 1`` rounds kept widths to multiples of ``align`` (:func:`aligned_ratios`; pass
    ``table`` = :func:`group_table` to avoid rebuilding it). The ``taylor*`` importances need
    gradients on ``model`` (Diff-Pruning's :func:`~slimdiff.methods.diff_pruning.accumulate_gradients`)
    unless ``scores`` (from :func:`record_importance`) are replayed; then the copy carries no
    gradients. Head counts and sampler channels are synced afterwards (:func:`sync_attention_heads`).
    ``group_ranking``: :data:`GROUP_RANKING_HELP`; ``residual``: see :func:`_make_pruner`.
    """
    from slimdiff.models.backbone import sync_attention_heads

    _check_ranking(group_ranking)
    copy_of = copy.deepcopy if scores is not None else _copy_with_grads
    if ratio <= 0 and not overrides:
        return (model if inplace else copy_of(model)), []
    if align > 1:
        table = group_table(model, heads, residual=residual) if table is None else table
        overrides = aligned_ratios(table, ratio, overrides, heads=heads, align=align, group_ranking=group_ranking)
    m = model if inplace else copy_of(model)
    needs_grads = importance.startswith("taylor")
    if scores is None and needs_grads and any(p.grad is None for p in m.parameters() if p.requires_grad):
        raise UsageError("Taylor importance needs gradients: run accumulate_gradients(model, ...) first")
    pruner = _make_pruner(m, ratio, importance, heads, overrides, scores, residual=residual)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # RandomImportance draws from the global generator
        if group_ranking == "separate":
            prune_separately(pruner, whole_heads=heads == "whole")
        else:
            pruner.step()
    sync_attention_heads(m, pruner.num_heads)
    m.zero_grad(set_to_none=True)
    return m, [tuple(h) for h in pruner.pruning_history()]


# --------------------------------------------------------------------------- budget search
@dataclass
class Trial:
    """One pruned candidate of the budget search."""

    ratio: float
    macs_ratio: float  # one-forward MACs, pruned / original
    model: nn.Module = field(repr=False)
    history: list = field(default_factory=list, repr=False)
    overrides: dict[str, float] = field(default_factory=dict, repr=False)


def prune_to_budget(model: nn.Module, budget: float, importance: str = "taylor-paper", *, heads: str = "dims",
                    seed: int = 0, tolerance: float = TOLERANCE, align: int = ALIGN, group_ranking: str = "separate",
                    residual: bool = False) -> tuple[Trial, list[tuple[float, float, int]]]:
    """Search torch-pruning's ratio until the forward-MACs ratio is within ``tolerance``
    (relative) of ``budget``. Returns the chosen :class:`Trial` and every trial as
    ``(ratio, macs_ratio, groups at the higher ratio)``.

    1. Bisection of one uniform ratio (the reference's local pruning).
    2. Channel groups make MACs a step function of the ratio (DDPM-CIFAR10: GroupNorm(32) on
       128 channels moves in steps of 32 channels, so 0.56 -> 0.34 of the MACs in one step).
       If the uniform ratio cannot land within tolerance, the bracketing ratios ``r_lo < r_hi``
       are mixed: the first ``k`` groups in dependency-graph order get ``r_hi``, the rest
       ``r_lo``, with ``k`` bisected. The order is structural, so random, magnitude and
       Taylor importance still get the same shapes at the same budget.
    3. Every trial keeps widths in multiples of ``align`` (:func:`aligned_ratios`; 1 = off).

    Importance is computed once (:func:`record_importance`) and the trials prune meta-device
    copies (:func:`meta_copy`): a trial costs no memory and no arithmetic, so the search does
    not grow with the model's size (DiT-XL/2 included). Only the chosen trial is pruned for real.

    Raises :class:`UsageError` when nothing is prunable or the budget is out of reach.
    """
    from slimdiff.eval.compute import macs_forward
    from slimdiff.models.backbone import as_backbone

    budget = check_budget(budget)  # a public entry point of its own
    try:  # trials prune shape-only copies: no memory and no arithmetic, whatever the model size
        shapes = meta_copy(model)
        base, table = macs_forward(shapes), group_table(shapes, heads, residual=residual)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
        warnings.warn(f"budget search on real copies (a layer does not run on the meta device: {e})", stacklevel=2)
        shapes, base, table = model, macs_forward(model), group_table(model, heads, residual=residual)
    roots, top = group_roots(shapes, heads, table)
    scores = record_importance(model, importance, heads, seed, residual=residual) if roots else {}
    same = dict(heads=heads, seed=seed, align=align, table=table, scores=scores, group_ranking=group_ranking,
                residual=residual)
    tried: list[tuple[float, float, int]] = []

    def trial(r: float, overrides: dict[str, float] | None = None) -> Trial:
        pruned, history = prune_with_ratio(shapes, r, importance, overrides=overrides, **same)
        t = Trial(r, macs_forward(pruned) / base, pruned, history, dict(overrides or {}))
        tried.append((r, t.macs_ratio, len(t.overrides)))
        return t

    def err(t: Trial) -> float:
        return abs(t.macs_ratio / budget - 1)

    best = trial(top) if roots else None
    if best is None or best.macs_ratio >= 1 - 1e-9:
        raise UsageError(f"this {as_backbone(model).kind} model has nothing width pruning can remove (no prunable "
                         "attention, MLP or conv channels); use a depth or step-reuse method instead")
    if best.macs_ratio > budget * (1 + tolerance):
        raise UsageError(f"budget {budget:g} is below what width pruning reaches on this model "
                         f"({best.macs_ratio:.3f} of the MACs at ratio {top:.3f}); use a larger budget or chain a "
                         "depth/step method (e.g. --method tinyfusion,diff-pruning)")
    lo, hi = 0.0, top
    for _ in range(MAX_TRIALS):
        if err(best) <= tolerance or hi - lo < 1e-3:
            break
        cur = trial((lo + hi) / 2)
        best = min(best, cur, key=err)
        lo, hi = (cur.ratio, hi) if cur.macs_ratio > budget else (lo, cur.ratio)
    k_lo, k_hi = 0, len(roots)  # mixed ratios: roots[:k] at hi, the rest at lo
    while err(best) > tolerance and k_hi - k_lo > 1:
        k = (k_lo + k_hi) // 2
        cur = trial(lo, {name: hi for name in roots[:k]})
        best = min(best, cur, key=err)
        k_lo, k_hi = (k, k_hi) if cur.macs_ratio > budget else (k_lo, k)
    if err(best) > tolerance:
        raise UsageError(f"width pruning cannot meet budget {budget:g} within {tolerance:.0%} on this model (closest: "
                         f"{best.macs_ratio:.3f} at ratio {best.ratio:.4f}; channel groups are too coarse); "
                         "try a nearby budget")
    if shapes is not model:  # the chosen trial, now on real weights (same scores, so the same channels)
        best.model, best.history = prune_with_ratio(model, best.ratio, importance, overrides=best.overrides or None,
                                                    **same)
        reached = macs_forward(best.model) / macs_forward(model)
        if abs(reached - best.macs_ratio) > 1e-9:
            raise RuntimeError(f"pruned model reaches {reached:.6f} of the MACs, its shape-only trial {best.macs_ratio:.6f}")
    return best, tried



# --------------------------------------------------------------------------- width methods
def _layer_widths(before: nn.Module, after: nn.Module) -> dict[str, list[int]]:
    """``{layer: [original out channels, kept]}`` for every linear/conv whose output shrank."""
    old = {n: m for n, m in before.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    out = {}
    for name, m in after.named_modules():
        if name in old and isinstance(m, (nn.Linear, nn.Conv2d)):
            a, b = old[name].weight.shape[0], m.weight.shape[0]
            if a != b:
                out[name] = [int(a), int(b)]
    return out


def width_prune(model: nn.Module, budget: float, ctx: Context, name: str, importance: str, *,
                heads: str, settings: dict, group_ranking: str = "separate", residual: bool = False,
                prepare: Callable[[nn.Module], tuple[dict, dict]] | None = None) -> nn.Module:
    """Width-prune ``model`` to ``budget`` with ``importance`` and record it as method ``name``:
    search, measure, recover, record (the body of every width method).

    ``settings`` are the method's own (``heads``, ``importance``, ``ranking``, ``group_ranking``,
    ``residual`` and ``align`` are added); ``prepare(model) -> (settings, extras)`` runs first
    (Diff-Pruning's gradient pass).
    Budget 1 returns ``model`` unchanged (recorded as an identity).
    """
    if heads not in HEAD_MODES:
        raise UsageError(f"heads must be one of {', '.join(HEAD_MODES)}, got {heads!r}")
    _check_ranking(group_ranking)
    settings = {**settings, "heads": heads, "importance": importance, "ranking": "local",
                "group_ranking": group_ranking, "residual": residual, "align": ALIGN}
    if budget >= 1.0:
        return record(model, name, settings, {"budget": 1.0, "macs_ratio": 1.0, "pruning_ratio": 0.0},
                      {"identity": True})
    if residual:  # a diffusers DiT becomes our DiT, whose residual group torch-pruning keeps
        from slimdiff.compression.residual_width import prunable

        model = prunable(model)
    more, extras = prepare(model) if prepare else ({}, {})
    settings.update(more)
    original = sampling_macs(model, ctx)
    chosen, tried = prune_to_budget(model, budget, importance, heads=heads, seed=ctx.seed, group_ranking=group_ranking,
                                    residual=residual)
    model.zero_grad(set_to_none=True)
    result = chosen.model
    reached = sampling_macs(result, ctx) / original
    extras.update(widths=_layer_widths(model, result), groups_at_hi=sorted(chosen.overrides),
                  search=[[round(r, 6), round(q, 6), k] for r, q, k in tried])
    result = recover(result, ctx, tag=name)
    measured = {"budget": budget, "macs_ratio": reached, "pruning_ratio": chosen.ratio,
                "pruning_ratio_hi": max(chosen.overrides.values(), default=None),
                "groups_at_hi": len(chosen.overrides),
                "macs_forward_ratio": chosen.macs_ratio, "search_trials": len(tried)}
    return record(result, name, settings, measured, extras)


def draw_width(name: str, extras: dict, model: nn.Module | None, out: Path, ctx: dict) -> list[Path]:
    """A width method's pictures (its ``MethodSpec.draw``): kept channels per layer, and
    Diff-Pruning's timestep losses (``ctx`` holds the entry's recorded settings: threshold, stride)."""
    from slimdiff.eval.report import kept_channels, timestep_losses

    files = []
    if extras.get("widths"):
        files.append(kept_channels(extras["widths"], out / f"{name}-kept_channels.png", f"{name}: kept channels per layer"))
    if extras.get("timesteps"):
        trace = extras["timesteps"]
        files.append(timestep_losses({name: trace}, ctx.get("threshold", 0.0), out / f"{name}-timestep_losses.png",
                                     stride=ctx.get("stride", 1)))
    return files
