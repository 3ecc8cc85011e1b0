"""TinyFusion: learnable depth pruning with recoverability (Fang et al., 2024).

**Search space.** The blocks are split into consecutive groups of ``N:M`` shapes (the
group-shape syntax of ``keep`` and the budget's choice of shape are
:mod:`slimdiff.compression.depth`'s); each of a group's ``C(M, N)`` keep-patterns is one
*option* with one learnable logit (fp32, initialised to the constant 0.02, i.e. uniform).
By default the budget picks the finest *local* shape that keeps the most blocks within it
(``1:2`` for 0.5, ``1:4`` for 0.25, ``3:4`` for 0.75; the rule is
:func:`~slimdiff.compression.depth.shape_for_depth`'s), the paper's search space (its
headline TinyDiT-D14 is ``1:2`` over DiT-XL/2's 28 blocks, reference preset ``DiT-XL-1-2``).
``search_space="global"`` (beyond the paper) picks the widest shape instead (one group over
every block where the option count allows, e.g. ``6:12``); an explicit ``keep`` chooses any
shape. The settings record ``keep`` and ``search_space`` (``"global"``: one group over every
block, else ``"local"``).

**Search** (paper Sec. 3; reference ``models_with_layer_pruning.py`` / ``prune_by_learning.py``):
for every training example and every group, a hard straight-through Gumbel-softmax picks
one option from ``logits * scaling`` (scaling = 100, the reference's constant MaskLLM
factor, so that small logit steps move the distribution); the temperature is annealed
linearly from 4 to 0.1 over the search. A dropped block is the identity on the residual
stream (``h = m * block(h) + (1 - m) * h``, the shared depth gates). The weights' ability to
*recover* is co-optimised with the logits on the diffusion loss, so the options whose
sub-networks recover best win: by default LoRA (peft; rank 8, alpha 16) on **every**
``nn.Linear`` of the model, embedders and final layer included (the README's ``--delta-w
--lora``: ``prune_by_learning.py`` ~39-53 wraps every ``nn.Linear``, ~239-242);
``delta_w=True`` trains the full weights instead (``--delta-w`` without ``--lora``);
``lora_targets="blocks"`` (deviation) adapts only the blocks' linear layers. The LoRA
initialisation is drawn from ``ctx.seed`` (not the global RNG), so a search is reproducible
across processes. Optimiser: AdamW, lr 1e-4 for LoRA / weights and 10x (1e-3) for the
logits, constant lr, gradient clip 1.0, EMA 0.999, through the shared trainer
(``param_groups`` for the two learning rates, ``on_step_begin`` for the temperature schedule
and the probability log). The search still computes every block (masks are for training only).
The loss is slimdiff's diffusion loss (epsilon MSE; the reference adds the VB term for
learned sigma, which slimdiff never trains).

**Length.** The reference searches one data epoch of ImageNet at global batch 128 (README;
1.28M images, about 10K steps). Our default is ``search_steps=500`` at the context's batch
(64 by default): 32K examples, 1/20 of the reference's steps and 2.5% of its examples, which
is about 22 epochs of the 1,437 ``digits`` training images. For a large model and dataset,
set ``search_steps`` to ``len(dataset) / batch`` for the reference's one epoch.

**Decision.** The most probable option per group under the (EMA) logits. The LoRA
deltas (or trained weights) are discarded and the shallower model is cut from the
*original* weights: the dropped blocks are removed from the module list (and the config's
depth updated), so they are not computed at all.

**Recovery** is the shared ending of every depth method
(:func:`slimdiff.compression.depth.finish_depth`: fine-tuning, or output / hidden / masked
KD from the teacher). The KD layer map defaults to the reference's (``kd_map="group-end"``,
``train_masked_kd.py`` ~185-193): for each group, the student's last kept block <- the
teacher block at the end of the group (``2i + 1`` for ``1:2``). ``kd_map="kept"`` (deviation)
maps student block ``i`` <- teacher block ``kept[i]``, whose output misses the dropped
blocks' contribution.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimdiff.compression.calibration import model_dataset
from slimdiff.compression.depth import (
    KD_MAPS,
    SEARCH_SPACES,
    DepthGateConfig,
    Group,
    apply_depth_gates,
    check_depth_prunable,
    check_keep_syntax,
    depth_prunable,
    draw_depth,
    finish_depth,
    format_groups,
    group_options,
    remove_depth_gates,
    resolve_depth,
)
from slimdiff.compression.lora import add_lora, linear_layers
from slimdiff.errors import UsageError
from slimdiff.methods.base import Context, fingerprint, settings_key
from slimdiff.methods.spec import MethodSpec, check_options, option
from slimdiff.models.backbone import as_backbone

__all__ = ["SearchConfig", "DepthGates", "SearchResult", "search", "TinyFusionConfig", "speed_student",
           "TINYFUSION", "tinyfusion", "SPECS"]


# --------------------------------------------------------------------------- search
LORA_TARGETS = ("all", "blocks")
"""Where the search's LoRA goes: every ``nn.Linear`` (the reference) or the blocks' only."""


@dataclass
class SearchConfig:
    """Search settings (defaults: the TinyFusion reference code; ``steps`` is scaled in
    length, see the module docs)."""

    steps: int = 500
    lr: float = 1e-4
    gate_lr_mult: float = 10.0
    tau_start: float = 4.0
    tau_end: float = 0.1
    scaling: float = 100.0
    init_logit: float = 0.02
    lora_rank: int = 8  # 0 with delta_w=False: only the logits train (the reference without --delta-w)
    lora_alpha: float = 16.0
    lora_targets: str | tuple[str, ...] = "all"  # "all", "blocks" or nn.Linear module names
    delta_w: bool = False  # train every weight instead of LoRA (the reference's --delta-w alone)
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
        if isinstance(self.lora_targets, str) and self.lora_targets not in LORA_TARGETS:
            raise UsageError(f"unknown lora_targets {self.lora_targets!r}; choose one of {', '.join(LORA_TARGETS)} "
                             "(or pass nn.Linear module names)")

    def tau(self, step: int) -> float:
        """Linear annealing from ``tau_start`` (step 0) to ``tau_end`` (last step)."""
        frac = step / max(1, self.steps - 1)
        return self.tau_start + (self.tau_end - self.tau_start) * min(1.0, frac)


class DepthGates(nn.Module):
    """Learnable N:M layer selection: one fp32 logit per option of each group.

    Installed on a model (:meth:`attach`), it draws one option per group *per example* at
    the start of every forward (when the first block is entered) with a hard
    straight-through Gumbel-softmax over ``logits * scaling`` at temperature ``tau``, and
    gates each block with the sampled mask (the shared depth gates,
    :func:`slimdiff.compression.depth.apply_depth_gates`). Options are buffers (they move
    with the module).
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
        model.tinyfusion_gates = self
        apply_depth_gates(model, DepthGateConfig(mask_of=lambda i: self.mask[:, i], before_forward=self._resample))

    def _resample(self, h: torch.Tensor) -> None:
        self.mask = self.sample(h.shape[0])

    def detach_from(self, model: nn.Module) -> None:
        """Remove the gates from ``model`` (and ``model.tinyfusion_gates``)."""
        remove_depth_gates(model)
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


def _trainable(model: nn.Module, config: SearchConfig, seed: int) -> list[nn.Parameter]:
    """Make ``model``'s recoverability parameters trainable and return them: every weight
    (``delta_w``), else LoRA adapters on ``config.lora_targets`` initialised from ``seed``."""
    if config.delta_w:  # prune_by_learning.py ~239-246: --delta-w without --lora trains every non-gate weight
        model.requires_grad_(True)
        return list(model.parameters())
    targets = config.lora_targets
    if targets == "all":
        targets = linear_layers(model)
    elif targets == "blocks":
        targets = linear_layers(model, as_backbone(model).block_names)
    return add_lora(model, targets, config.lora_rank, config.lora_alpha, seed=seed)


def _work_dir(ctx: Context, tag: str) -> Path:
    return Path(ctx.work_dir or "runs/compress") / tag


def search(model: nn.Module, groups: Sequence[Group], ctx: Context, config: SearchConfig | None = None,
           dataset=None) -> SearchResult:
    """Learn which blocks to keep (``model`` is not changed; the search runs on a copy).

    Trains :class:`DepthGates` logits jointly with LoRA adapters (or every weight) through
    :func:`slimdiff.train.trainer.train` for ``config.steps`` steps on ``ctx.data`` (or
    ``dataset``) with batch ``ctx.batch_size``, then decides by the argmax of the EMA logits.
    Checkpoints go to ``ctx.work_dir/search-tinyfusion-<shape>-n<steps>-s<seed>-<model fingerprint>``
    and an interrupted search resumes there bit-identically: the trainer restores the logits,
    LoRA, optimiser, EMA, data order and the RNG the Gumbel noise is drawn from (the global
    torch RNG of the search's device), and the probability history travels in the
    checkpoint's ``log``, so it holds every point of an uninterrupted search.
    """
    from slimdiff.train.trainer import TrainConfig, train

    config = config or SearchConfig()
    start = time.process_time()
    work = copy.deepcopy(model)
    weights = _trainable(work, config, ctx.seed)
    gates = DepthGates(groups, config.scaling, config.init_logit).to(as_backbone(work).device)
    gates.attach(work)
    every = max(1, config.steps // config.log_points)
    log: dict[str, list] = {"probability_steps": [], "probabilities": []}  # restored by train() on resume

    def on_step_begin(step: int) -> None:
        gates.tau = config.tau(step)
        if step % every == 0:
            log["probability_steps"].append(step)
            log["probabilities"].append(gates.probabilities())

    groups_ = [{"params": list(gates.logits), "lr": config.lr * config.gate_lr_mult}]
    if weights:
        groups_.insert(0, {"params": weights, "lr": config.lr})
    tcfg = TrainConfig(steps=config.steps, batch_size=ctx.batch_size, lr=config.lr, lr_schedule="constant",
                       ema_decay=config.ema_decay, grad_clip=config.grad_clip, seed=ctx.seed,
                       checkpoint_every=max(1, config.steps // 4), log_every=max(1, min(50, config.steps)))
    shapes = format_groups(groups).replace(":", "of").replace(",", "_")
    out = _work_dir(ctx, f"search-tinyfusion-{shapes}-n{config.steps}-s{ctx.seed}-{settings_key(config)}-"
                         f"{fingerprint(model)[:12]}")
    train(work, dataset if dataset is not None else model_dataset(model, ctx), tcfg, out, resume=True,
          progress=ctx.progress, param_groups=groups_, on_step_begin=on_step_begin, log=log)
    final = gates.probabilities()  # EMA logits: train() copies the EMA weights back
    kept = gates.decide()
    gates.detach_from(work)
    return SearchResult(kept, final, log["probability_steps"] + [config.steps], log["probabilities"] + [final],
                        time.process_time() - start)


# --------------------------------------------------------------------------- the method
@dataclass(frozen=True)
class TinyFusionConfig:
    """TinyFusion's options (the search's other settings: :class:`SearchConfig`). Defaults are
    the reference's (``prune_by_learning.py`` / ``train_masked_kd.py``); options marked
    "deviation" or "beyond the paper" are off by default."""

    keep: str | None = option(None, "N:M group shape(s), e.g. 1:2 or 2:4,1:2 or the global 6:12 "
                                    "(default: chosen from the budget by search_space)")
    search_space: str = option("local", "how the budget picks the shape: 'local' = the finest N:M groups "
                                        "(reference default: 1:2 for 0.5, 1:4 for 0.25); 'global' = beyond the "
                                        "paper: the widest shape, e.g. 6:12 on 12 blocks", choices=SEARCH_SPACES)
    search_steps: int = option(SearchConfig.steps, "search steps at the context batch (default 500 x 64: scaled "
                                                   "length; the reference searches one data epoch at batch 128, "
                                                   "about 10K steps on ImageNet)", low=1)
    lora_targets: str = option("all", "LoRA r8/alpha16 targets: 'all' = every nn.Linear incl. embedders and final "
                                      "layer (reference default); 'blocks' = deviation: the blocks' linears only",
                              choices=LORA_TARGETS)
    delta_w: bool = option(False, "train every weight instead of LoRA during the search: the reference's "
                                  "--delta-w without --lora, a reference option (off = the README's LoRA recipe)")
    kd_map: str = option("group-end", "hidden/masked-KD layer map: 'group-end' = a group's last kept student "
                                      "block <- the teacher block ending the group (reference default, "
                                      "train_masked_kd.py); 'kept' = deviation: student i <- teacher kept[i]",
                        choices=KD_MAPS)

    def __post_init__(self) -> None:
        check_options(self)
        if self.keep is not None:
            check_keep_syntax(self.keep)  # whether its groups tile the depth needs the model


def compress(model: nn.Module, budget: float, ctx: Context, config: TinyFusionConfig) -> nn.Module:
    """Depth-prune ``model`` with TinyFusion; ``config.keep`` (an N:M pattern) overrides the budget."""
    if not check_depth_prunable(model, "tinyfusion").can_drop_block(0):  # before the search, not after it
        raise UsageError(as_backbone(model).drop_refusal)
    groups, chosen = resolve_depth(model, budget, ctx, config.keep, config.search_space)
    search_config = SearchConfig(steps=int(config.search_steps), lora_targets=config.lora_targets,
                                 delta_w=bool(config.delta_w))
    settings = {**chosen, "search_steps": search_config.steps, "groups": [g.shape for g in groups],
                "lora_targets": config.lora_targets, "delta_w": search_config.delta_w, "kd_map": config.kd_map}
    finish = {"groups": groups, "kd_map": config.kd_map}
    if all(g.n == g.m for g in groups):  # one option per group: nothing to search
        kept = list(range(len(as_backbone(model).blocks)))
        return finish_depth(model, kept, ctx, "tinyfusion", settings, {"searched": False}, **finish)
    result = search(model, groups, ctx, search_config)
    extras = {
        "searched": True,
        "search": dataclasses.asdict(search_config),
        "groups": [{"shape": g.shape, "start": g.start,
                    "options": [[g.start + int(i) for i in torch.nonzero(r).flatten()] for r in group_options(g.n, g.m)]}
                   for g in groups],
        "probabilities": result.probabilities,
        "probability_history": {"steps": result.history_steps, "values": result.history},
    }
    return finish_depth(model, result.kept, ctx, "tinyfusion", settings, extras, cost_s=result.cpu_s, **finish)


def speed_student(model: nn.Module, settings: Any) -> nn.Module:
    """The speed bench's student (``settings``: a :class:`slimdiff.eval.speed.SpeedSettings`):
    the budget's depth and shape, the first option of every group, no search (the runtime
    cost does not depend on which blocks are kept)."""
    ctx = settings.context()
    groups, chosen = resolve_depth(model, settings.budget, ctx, None)
    kept = [g.start + int(i) for g in groups for i in torch.nonzero(group_options(g.n, g.m)[0]).flatten()]
    return finish_depth(model, kept, ctx, "tinyfusion", {**chosen, "searched": False, "note": "first option per group"},
                        {"searched": False}, groups=groups)


TINYFUSION = MethodSpec("tinyfusion", "depth",
                        "TinyFusion: learnable N:M depth pruning (Gumbel-softmax + LoRA recoverability)",
                        compress, TinyFusionConfig, draw=draw_depth, speed_student=speed_student,
                        applies=depth_prunable)
tinyfusion = TINYFUSION
"""``tinyfusion(model, budget, ctx, keep=..., search_steps=..., ...)``: the method as a plain call."""
SPECS = (TINYFUSION,)
