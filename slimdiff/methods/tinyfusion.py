"""TinyFusion: learnable depth pruning with recoverability (Fang et al., 2024), and the
depth-pruning machinery every depth method shares.

**Search space.** The blocks are split into consecutive groups; a group of shape ``N:M``
keeps ``N`` of its ``M`` blocks, and each of its ``C(M, N)`` keep-patterns
(``itertools.combinations``) is one *option* with one learnable logit (fp32, initialised
to the constant 0.02, i.e. uniform).

**Group-shape syntax** (``keep``): a comma-separated pattern of ``N:M`` shapes that is
repeated from the first block on and must cover the depth exactly. ``"1:2"`` on 12 blocks
is six 1:2 groups; ``"2:4,1:2"`` on 12 blocks is ``2:4, 1:2, 2:4, 1:2`` (the pattern covers
6 blocks, twice); a pattern listing every group (``"2:4,1:2,1:2,2:4"``) is used as is.
``N = M`` keeps a group whole. Without ``keep`` the budget picks the depth
(:func:`depth_for_budget`) and the shape (:func:`shape_for_depth`); the shape chosen is
recorded in the settings.

**Search** (paper Sec. 3; reference ``models_with_layer_pruning.py`` / ``prune_by_learning.py``):
for every training example and every group, a hard straight-through Gumbel-softmax picks
one option from ``logits * scaling`` (scaling = 100, the reference's constant MaskLLM
factor, so that small logit steps move the distribution); the temperature is annealed
linearly from 4 to 0.1 over the search. A dropped block is the identity on the residual
stream (``h = m * block(h) + (1 - m) * h``). LoRA adapters (peft; rank 8, alpha 16, on
every ``nn.Linear`` inside the blocks) are trained jointly with the logits on the
diffusion loss, so the options whose sub-networks *recover* best win. Optimiser: AdamW,
lr 1e-4 for LoRA and 10x (1e-3) for the logits, constant lr, gradient clip 1.0, EMA 0.999,
through the shared trainer (``param_groups`` for the two learning rates,
``on_step_begin`` for the temperature schedule and the probability log). The search
still computes every block (masks are for training only).

Deviations from the reference, on purpose: LoRA goes on the blocks' linear layers only (the
issue's default; the reference also adapts the embedders and final layer), and the loss
is slimdiff's diffusion loss (epsilon MSE; the reference adds the VB term for learned
sigma, which slimdiff never trains).

**Decision.** The most probable option per group under the (EMA) logits. The LoRA
deltas are discarded and the shallower model is cut from the *original* weights: the
dropped blocks are removed from the module list (and the config's depth updated), so they
are not computed at all.

**Recovery** is the shared :func:`slimdiff.methods.base.recover` (fine-tuning, or output /
hidden / masked KD from the teacher) with the layer map derived from the kept blocks:
student block ``i`` <- teacher block ``kept[i]`` (the reference hard-codes ``2i + 1``).

Shared with the depth baselines (:mod:`slimdiff.methods.depth_baselines`):
:func:`check_depth_prunable`, :func:`extract_blocks`, :func:`masked_blocks`,
:func:`depth_for_budget`, :func:`shape_for_depth`, :func:`kept_layer_map`,
:func:`finish_depth`.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimdiff.errors import UsageError
from slimdiff.methods.base import BUDGET_TOLERANCE, Context, record, recover, register_method, sampling_macs
from slimdiff.models.backbone import Backbone, as_backbone

__all__ = [
    "Group", "parse_keep", "group_options", "check_depth_prunable", "extract_blocks", "masked_blocks",
    "depth_for_budget", "shape_for_depth", "kept_layer_map", "finish_depth", "training_dataset", "resolve_depth",
    "format_groups", "SearchConfig", "DepthGates",
    "SearchResult", "search", "tinyfusion",
]

MAX_OPTIONS = 1024
"""Largest option count per group that :func:`shape_for_depth` picks (the reference's widest
preset, 7:14, has 3432; 6 of 12 blocks in one group has 924)."""


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


# --------------------------------------------------------------------------- depth machinery
def _blocks_attr(bb: Backbone) -> str:
    return "blocks" if bb.kind == "dit" else "transformer_blocks"


def _embedders_tied(model: nn.Module) -> bool:
    ref = model.transformer_blocks[0].norm1.emb.state_dict()
    return all(
        all(torch.equal(v, b.norm1.emb.state_dict()[k]) for k, v in ref.items()) for b in model.transformer_blocks[1:]
    )


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
    if bb.kind == "diffusers-dit" and kept[0] != 0 and not _embedders_tied(bb.module):
        raise UsageError(
            "this diffusers DiT has differing per-block timestep/class embedders and block 0's also feeds the "
            "output layer, so block 0 cannot be removed; tie the embedders (as in converted official checkpoints) "
            "or convert it with slimdiff.models.convert.diffusers_to_dit"
        )


def _set_blocks(model: nn.Module, bb: Backbone, blocks: list[nn.Module]) -> None:
    setattr(model, _blocks_attr(bb), nn.ModuleList(blocks))
    if bb.kind == "dit":
        model.config = dataclasses.replace(model.config, depth=len(blocks))
    else:
        model.register_to_config(num_layers=len(blocks))


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
    _set_blocks(model, bb, [blocks[i] for i in kept])
    return model


@contextmanager
def _only_blocks(model: nn.Module, kept: Sequence[int]) -> Iterator[nn.Module]:
    """Temporarily run ``model`` with only the blocks ``kept`` (no weights copied)."""
    bb = as_backbone(model)
    blocks, attr = bb.blocks, _blocks_attr(bb)
    old_list = getattr(model, attr)
    _set_blocks(model, bb, [blocks[i] for i in kept])
    try:
        yield model
    finally:
        _set_blocks(model, bb, list(old_list))
        setattr(model, attr, old_list)


def _gate_hook(index: int, mask_of: Callable[[int], torch.Tensor]):
    """Forward hook making block ``index`` compute ``m * block(h) + (1 - m) * h``."""

    def hook(_module, args, kwargs, output):
        h = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        m = mask_of(index).to(out.dtype)
        m = m.reshape(-1, *([1] * (out.ndim - 1))) if m.ndim else m
        mixed = m * out + (1 - m) * h
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

    return hook


def _install_gates(model: nn.Module, mask_of: Callable[[int], torch.Tensor]) -> list:
    blocks = as_backbone(model).blocks
    return [b.register_forward_hook(_gate_hook(i, mask_of), with_kwargs=True) for i, b in enumerate(blocks)]


@contextmanager
def masked_blocks(model: nn.Module, keep_mask: Sequence[float] | torch.Tensor) -> Iterator[nn.Module]:
    """Run ``model`` with block ``i`` bypassed (identity on the residual stream) where
    ``keep_mask[i] == 0``; every block is still computed. ``keep_mask`` is one 0/1 value
    per block, or ``(batch, depth)`` for per-example masks. For tests and search only."""
    mask = torch.as_tensor(keep_mask, dtype=torch.float32)
    depth = len(as_backbone(model).blocks)
    if mask.shape[-1] != depth:
        raise UsageError(f"keep mask has {mask.shape[-1]} entries but the model has {depth} blocks")
    handles = _install_gates(model, lambda i: mask[..., i])
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def kept_layer_map(kept: Sequence[int]) -> dict[int, int]:
    """KD layer map of a depth-pruned student: student block ``i`` -> teacher block ``kept[i]``."""
    return {i: int(k) for i, k in enumerate(kept)}


def depth_for_budget(model: nn.Module, budget: float, ctx: Context) -> tuple[int, dict]:
    """The largest number of blocks whose shallower model fits ``budget`` (a fraction of
    ``model``'s sampling MACs under ``ctx``) up to :data:`BUDGET_TOLERANCE` (3%, as for
    width pruning: 6 of 12 digits-dit blocks cost 0.501 and meet budget 0.5), and the MACs
    facts it was derived from.

    Sampling MACs are affine in the number of blocks (embedders and output layer + one
    cost per block), so two measured points give the line: the full model and the model
    with block 0 only. With blocks of unequal width (a width-pruned input) the per-block
    cost is their average; the reached budget is measured on the result in any case.
    """
    bb = check_depth_prunable(model)
    depth = len(bb.blocks)
    full = sampling_macs(model, ctx)
    with _only_blocks(model, [0]):
        one = sampling_macs(model, ctx)
    per_block = (full - one) / (depth - 1)
    base = one - per_block
    allowed = budget * (1 + BUDGET_TOLERANCE) * full
    k = min(depth, math.floor((allowed - base) / per_block + 1e-9)) if per_block > 0 else depth
    if k < 1:
        raise UsageError(
            f"budget {budget:g} is below what one block costs ({one / full:.3f} of the sampling MACs); "
            "raise the budget or chain a method that cuts other work"
        )
    return k, {"macs_full": full, "macs_per_block": per_block, "macs_other": base}


def shape_for_depth(depth: int, k: int) -> str:
    """A ``keep`` pattern that keeps ``k`` of ``depth`` blocks: the uniform shape with the
    fewest groups, i.e. the widest search space, whose group has at most :data:`MAX_OPTIONS`
    options (6 of 12 -> ``6:12``, 14 of 28 -> ``2:4``); otherwise groups of the smallest size
    ``M`` dividing the depth with at least one kept block each, the ``k`` kept blocks spread
    as evenly as possible (13 of 28 -> ``2:4`` x 6 with one ``1:4``).

    Why the widest: a local shape can exclude the best sub-network. On ``digits-dit`` (12
    blocks) the first six blocks recover far better than any one-of-each-pair choice (bench
    FD 10.1 for first-k against 78 to 84 for TinyFusion's and the stride baseline's ``1:2``
    choices), and a ``6:12`` search learns exactly blocks 0-5. The paper's ablation on
    DiT-XL/2 found ``1:2`` and ``2:4`` close and ``7:14`` harder to optimise; the option limit
    keeps DiT-XL/2 at ``2:4``. Pass ``keep`` for the paper's ``1:2``.
    """
    if not 1 <= k <= depth:
        raise UsageError(f"cannot keep {k} of {depth} blocks; keep between 1 and {depth}")
    if k == depth:
        return "1:1"
    g = math.gcd(depth, k)
    for groups in (d for d in range(1, g + 1) if g % d == 0):
        n, m = k // groups, depth // groups
        if math.comb(m, n) <= MAX_OPTIONS:
            return f"{n}:{m}"
    for m in range(2, depth + 1):
        groups = depth // m
        if depth % m or k < groups:
            continue
        base, extra = divmod(k, groups)
        ns = [base + ((j + 1) * extra // groups - j * extra // groups) for j in range(groups)]
        if max(ns) <= m and all(math.comb(m, x) <= MAX_OPTIONS for x in ns):
            return ",".join(f"{x}:{m}" for x in ns)
    raise UsageError(f"no N:M pattern with <= {MAX_OPTIONS} options per group keeps {k} of {depth} blocks; pass keep")


def training_dataset(model: nn.Module, ctx: Context):
    """The dataset ``ctx.data`` at ``model``'s input size (as the shared recovery loads it)."""
    from slimdiff.data.datasets import get_dataset

    bb = as_backbone(model)
    return get_dataset(ctx.data, size=bb.sample_size, channels=bb.in_channels)


def _work_dir(ctx: Context, tag: str) -> Path:
    return Path(ctx.work_dir or "runs/compress") / tag


def finish_depth(model: nn.Module, kept: Sequence[int], ctx: Context, name: str, settings: dict,
                 extras: dict, cost_s: float = 0.0) -> nn.Module:
    """Cut ``model`` to the blocks ``kept``, run the shared recovery with the kept-block
    layer map, and record the method; the common ending of every depth method."""
    depth = len(as_backbone(model).blocks)
    teacher = ctx.teacher
    layer_map = kept_layer_map(kept)
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
    tag = f"{name}-{'-'.join(map(str, kept))}-{ctx.kd}-n{ctx.recover_steps}-s{ctx.seed}"  # a resume key
    model = recover(model, ctx, tag, layer_map=layer_map)
    kept = list(map(int, kept))
    measured = {"depth": len(kept), "original_depth": depth, "kept_blocks": kept, "compress_cpu_s": cost_s,
                "recover_cpu_s": time.process_time() - start, "recover_steps": ctx.recover_steps, "kd": ctx.kd}
    extras = {"kept_blocks": kept, "layer_map": {str(k): v for k, v in layer_map.items()}, **extras}
    return record(model, name, settings, measured, extras)


def resolve_depth(model: nn.Module, budget: float, ctx: Context, keep: str | None) -> tuple[list[Group], dict]:
    """Groups from ``keep``, or from the budget (then the chosen shape is reported)."""
    depth = len(check_depth_prunable(model).blocks)
    if keep is not None:
        return parse_keep(str(keep), depth), {"keep": str(keep), "keep_from": "keep"}
    k, facts = depth_for_budget(model, budget, ctx)
    shape = shape_for_depth(depth, k)
    return parse_keep(shape, depth), {"keep": shape, "keep_from": f"budget {budget:g}", **facts}


# --------------------------------------------------------------------------- search
@dataclass
class SearchConfig:
    """Search settings (defaults: the TinyFusion reference code)."""

    steps: int = 500
    lr: float = 1e-4
    gate_lr_mult: float = 10.0
    tau_start: float = 4.0
    tau_end: float = 0.1
    scaling: float = 100.0
    init_logit: float = 0.02
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] | None = None  # None: every nn.Linear inside the blocks
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    log_points: int = 200  # probabilities are recorded at about this many steps

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UsageError(f"search_steps must be >= 1, got {self.steps}")
        if self.tau_start <= 0 or self.tau_end <= 0:
            raise UsageError("Gumbel-softmax temperatures must be > 0")
        if self.lora_rank < 0:
            raise UsageError(f"LoRA rank must be >= 0 (0 = no LoRA), got {self.lora_rank}")

    def tau(self, step: int) -> float:
        """Linear annealing from ``tau_start`` (step 0) to ``tau_end`` (last step)."""
        frac = step / max(1, self.steps - 1)
        return self.tau_start + (self.tau_end - self.tau_start) * min(1.0, frac)


class DepthGates(nn.Module):
    """Learnable N:M layer selection: one fp32 logit per option of each group.

    Installed on a model (:meth:`attach`), it draws one option per group *per example* at
    the start of every forward (a pre-hook on the first block) with a hard
    straight-through Gumbel-softmax over ``logits * scaling`` at temperature ``tau``, and
    gates each block with the sampled mask. Options are buffers (they move with the module).
    """

    def __init__(self, groups: Sequence[Group], scaling: float = 100.0, init_logit: float = 0.02):
        super().__init__()
        self.groups = list(groups)
        self.scaling, self.tau = float(scaling), 1.0
        self.logits = nn.ParameterList(
            [nn.Parameter(torch.full((math.comb(g.m, g.n),), float(init_logit))) for g in self.groups]
        )
        for j, g in enumerate(self.groups):
            self.register_buffer(f"options_{j}", group_options(g.n, g.m), persistent=False)
        self.mask: torch.Tensor | None = None
        self._handles: list = []

    def options(self, j: int) -> torch.Tensor:
        return getattr(self, f"options_{j}")

    def probabilities(self) -> list[list[float]]:
        """Per group, each option's sampling probability ``softmax(scaling * logits)``
        (the Gumbel-max trick: the hard sample's law does not depend on ``tau``)."""
        return [torch.softmax(self.scaling * lg.detach().float(), 0).tolist() for lg in self.logits]

    def sample(self, batch: int) -> torch.Tensor:
        """``(batch, depth)`` straight-through 0/1 keep-masks, one option per group and example."""
        cols = []
        for j, lg in enumerate(self.logits):
            onehot = F.gumbel_softmax(lg.float().expand(batch, -1) * self.scaling, tau=self.tau, hard=True)
            cols.append(onehot @ self.options(j))
        return torch.cat(cols, dim=1)

    def decide(self) -> list[int]:
        """Kept block indices of the most probable option of every group."""
        kept = []
        for j, (g, lg) in enumerate(zip(self.groups, self.logits)):
            row = self.options(j)[int(torch.argmax(lg.detach()))]
            kept += [g.start + int(i) for i in torch.nonzero(row).flatten()]
        return kept

    def attach(self, model: nn.Module) -> None:
        """Register as ``model.tinyfusion_gates`` (so the trainer trains and checkpoints the
        logits) and gate ``model``'s blocks."""
        blocks = as_backbone(model).blocks
        model.tinyfusion_gates = self

        def resample(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.mask = self.sample(h.shape[0])

        self._handles = [blocks[0].register_forward_pre_hook(resample, with_kwargs=True)]
        self._handles += _install_gates(model, lambda i: self.mask[:, i])

    def detach_from(self, model: nn.Module) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if getattr(model, "tinyfusion_gates", None) is self:
            del model.tinyfusion_gates


@dataclass
class SearchResult:
    """What a search found: kept blocks, final (EMA) probabilities and their history."""

    kept: list[int]
    probabilities: list[list[float]]
    history_steps: list[int]
    history: list[list[list[float]]]  # [record][group][option]
    cpu_s: float


def _lora_targets(model: nn.Module, config: SearchConfig) -> list[str]:
    if config.lora_targets is not None:
        return list(config.lora_targets)
    prefixes = tuple(n + "." for n in as_backbone(model).block_names)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefixes)]


def _add_lora(model: nn.Module, config: SearchConfig) -> list[nn.Parameter]:
    """Freeze ``model`` and inject peft LoRA adapters; returns the adapter parameters."""
    model.requires_grad_(False)
    if config.lora_rank == 0:
        return []
    from peft import LoraConfig, inject_adapter_in_model

    targets = _lora_targets(model, config)
    if not targets:
        raise UsageError("no LoRA target modules found; pass lora_targets naming nn.Linear modules of the blocks")
    inject_adapter_in_model(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=targets), model)
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def search(model: nn.Module, groups: Sequence[Group], ctx: Context, config: SearchConfig | None = None,
           dataset=None) -> SearchResult:
    """Learn which blocks to keep (``model`` is not changed; the search runs on a copy).

    Trains :class:`DepthGates` logits jointly with LoRA adapters through
    :func:`slimdiff.train.trainer.train` for ``config.steps`` steps on ``ctx.data`` (or
    ``dataset``) with batch ``ctx.batch_size``, then decides by the argmax of the EMA logits.
    Checkpoints go to ``ctx.work_dir/search-tinyfusion-<shape>-n<steps>-s<seed>-<model fingerprint>``
    and an interrupted search resumes there (its probability history then starts at the resumed step).
    """
    from slimdiff.train.trainer import TrainConfig, train

    config = config or SearchConfig()
    start = time.process_time()
    work = copy.deepcopy(model)
    lora = _add_lora(work, config)
    gates = DepthGates(groups, config.scaling, config.init_logit).to(as_backbone(work).device)
    gates.attach(work)
    every = max(1, config.steps // config.log_points)
    steps_log: list[int] = []
    history: list[list[list[float]]] = []

    def on_step_begin(step: int) -> None:
        gates.tau = config.tau(step)
        if step % every == 0:
            steps_log.append(step)
            history.append(gates.probabilities())

    groups_ = [{"params": list(gates.logits), "lr": config.lr * config.gate_lr_mult}]
    if lora:
        groups_.insert(0, {"params": lora, "lr": config.lr})
    tcfg = TrainConfig(steps=config.steps, batch_size=ctx.batch_size, lr=config.lr, lr_schedule="constant",
                       ema_decay=config.ema_decay, grad_clip=config.grad_clip, seed=ctx.seed,
                       checkpoint_every=max(1, config.steps // 4), log_every=max(1, min(50, config.steps)))
    shapes = format_groups(groups).replace(":", "of").replace(",", "_")
    from slimdiff.methods.base import fingerprint, settings_key

    out = _work_dir(ctx, f"search-tinyfusion-{shapes}-n{config.steps}-s{ctx.seed}-{settings_key(config)}-"
                         f"{fingerprint(model)[:12]}")
    train(work, dataset if dataset is not None else training_dataset(model, ctx), tcfg, out, resume=True,
          progress=ctx.progress, param_groups=groups_, on_step_begin=on_step_begin)
    steps_log.append(config.steps)
    history.append(gates.probabilities())  # EMA logits: train() copies the EMA weights back
    kept = gates.decide()
    gates.detach_from(work)
    return SearchResult(kept, gates.probabilities(), steps_log, history, time.process_time() - start)


# --------------------------------------------------------------------------- the method
@register_method(
    "tinyfusion", kind="depth",
    help="TinyFusion: learnable N:M depth pruning (Gumbel-softmax + LoRA recoverability)",
    options=("keep", "search_steps"),
)
def tinyfusion(model: nn.Module, budget: float, ctx: Context, keep: str | None = None,
               search_steps: int | None = None) -> nn.Module:
    """Depth-prune ``model`` with TinyFusion; ``keep`` (an N:M pattern) overrides the budget."""
    check_depth_prunable(model, "tinyfusion")
    groups, chosen = resolve_depth(model, budget, ctx, keep)
    config = SearchConfig(steps=int(search_steps) if search_steps is not None else SearchConfig.steps)
    settings = {**chosen, "search_steps": config.steps, "groups": [g.shape for g in groups]}
    if all(g.n == g.m for g in groups):  # one option per group: nothing to search
        kept = list(range(len(as_backbone(model).blocks)))
        return finish_depth(model, kept, ctx, "tinyfusion", settings, {"searched": False})
    result = search(model, groups, ctx, config)
    extras = {
        "searched": True,
        "search": {k: v for k, v in dataclasses.asdict(config).items() if k != "lora_targets"},
        "groups": [{"shape": g.shape, "start": g.start,
                    "options": [[g.start + int(i) for i in torch.nonzero(r).flatten()] for r in group_options(g.n, g.m)]}
                   for g in groups],
        "probabilities": result.probabilities,
        "probability_history": {"steps": result.history_steps, "values": result.history},
    }
    return finish_depth(model, result.kept, ctx, "tinyfusion", settings, extras, cost_s=result.cpu_s)
