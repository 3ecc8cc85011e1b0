"""DiP-GO (Zhu et al., NeurIPS 2024): a few-step-optimised pruner over a (step x block) reuse plan.

The result is the **unchanged model plus a reuse plan** (:mod:`slimdiff.runtime.reuse`),
saved in the model record's ``extras["dipgo"]`` and re-applied by ``slimdiff.load``.

1. **SuperNet.** Every block at every step > 0 gets a "backup connection" to its own
   cached contribution from the previous step; a gate mixes fresh and cached values
   (``g * fresh + (1 - g) * cache``, the cache holding the mixed value, not detached, so
   gradients flow through the whole trajectory). Each step runs under
   ``torch.utils.checkpoint``: block activations are recomputed in backward, only the
   step's inputs (x, the previous prediction and the block caches) are kept. On UNets the
   gates are made *effective* first, as the runtime's cascade does: a block whose readers
   are all reused is not computed, ``eff_b = g_b * (1 - prod_readers (1 - eff_r))``.
2. **Pruner.** One learnable query per (step, block); one self-attention + FFN encoder
   layer over all queries (``nn.TransformerEncoderLayer``; its output *is* used -- the
   reference code discards it, the paper does not); a separate 3-layer MLP head per
   query giving [reuse, keep] logits, last layer zero with bias [0, 1], so all gates start
   at "keep"; hard straight-through gates (forward one-hot argmax, backward softmax).
3. **Losses.** Consistency between the SuperNet's final samples and the original model's
   from the same noise: ``1 - SSIM`` (default, as the paper's ablation and the reference
   code) or L1 / L2, on the samples the sampler returns (pixels for pixel models; latents
   for latent models, as slimdiff ships no VAE). Plus ``alpha`` x the MACs-weighted
   sparsity ``mean_t sum_b g_keep(t, b) * macs_b / macs_forward``; as in the reference's
   "sparsity early stop", the sparsity term is dropped while the hard gates already meet
   the budget. ``alpha`` defaults to :data:`ALPHA` (0.1), not the reference's 1 (see there).
   On digits-dit (8x8 images, so a 3-pixel SSIM window) L1 reached a higher SSIM than the
   SSIM loss in three of four settings but collapsed in the fourth (DDIM 25, budget 0.25):
   no loss won everywhere, so the paper's SSIM stays the default (README diagnostics).
4. **Post-processing** to the exact budget from the learned ``p_reuse``. Default: the
   paper's search -- rank (step > 0, block) by ``p_reuse`` and bisect on the threshold
   (the count of top entries reused) for the cheapest threshold that meets the budget, so
   the plan's MACs are within one block's MACs (UNets: one block plus the producers it
   frees) below the budget. ``postprocess="sweep"`` is the reference code's greedy sweep
   (blocks in reverse order, falling threshold from 0.95 in steps of 0.05). Both live in
   :mod:`slimdiff.compression.reuse_plans`, shared with the step-reuse baselines.
5. **A step that reuses every block reuses the model's output** (``skip_reused_steps``,
   default on): the model is not called at that step. The reference reuses each block's
   *output* (the hidden state after it), so when every block reuses, the output layers see
   the previous step's last hidden state and return about the previous output. Our runtime
   reuses a transformer block's *residual contribution*, as the issue asks and as L2C does,
   which at such a step adds stale contributions to the fresh input embedding instead. With
   DDIM, a reused output leaves the predicted x0 unchanged, so the step becomes an exact step
   skip (what the fewer-steps baseline does). The post-processing counts those steps' MACs
   as 0 when it meets the budget. The SuperNet does not model the conversion: it applies to
   the final plan only. Measured on digits-dit at DDIM 25, budget 0.25, on one learned plan:
   FD 13.1 without, 10.0 with (``bench/dipgo/skip_reused_steps.json``).
6. **Step gates** (``step_gates=True``, off by default; *beyond the paper*). One more gate
   per step (a column after the blocks: the pruner has ``steps x (blocks + 1)`` queries)
   mixes the step's fresh prediction with the previous step's, and the block caches with
   the ones going in (``g = 0`` is exactly the runtime's skipped step). The sparsity term
   then weighs a step by ``g * (fixed + kept blocks' MACs)``, and the post-processing ranks
   whole steps with the blocks. This puts every fewer-steps plan (with DDIM, a skipped step
   is an exact step skip) inside the SuperNet's search space: block gates mix block
   contributions only, so they cannot express a step's output reuse (``skip_reused_steps``
   converts such steps after the search). Measured on digits-dit it did not beat the
   default (see the README's diagnostics), so it is off by default.

Resume: with ``ctx.work_dir`` set (``slimdiff compress`` sets it), the optimisation
checkpoints pruner, optimiser, lr schedule, RNG state and history atomically
(:mod:`slimdiff.train.checkpoint`) into ``<work_dir>/dipgo-<model fingerprint>``; a rerun
after a crash continues from there and ends bit-identical to an uninterrupted run, and a
checkpoint written with other settings is refused.

Deviations, for CPU budgets: Adam (lr 0.05, cosine with warm-up, grad-clip 1) instead of
SGD lr 0.2 for 500 steps; a default of :data:`OPT_STEPS` (150) optimisation steps of 8
trajectories each; a 64-wide pruner instead of 512; with Adam, sparsity weight
:data:`ALPHA` = 0.1 instead of 1.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from slimdiff.compression.reuse_plans import (
    OPT_STEPS,
    check_opt_steps,
    check_postprocess,
    draw_plan,
    finish,
    prepare,
    restore_plan,
    split_plan,
    table_cost,
    teacher_batch,
    threshold_plan,
)
from slimdiff.errors import UsageError
from slimdiff.methods.base import Context
from slimdiff.methods.spec import MethodSpec, option
from slimdiff.models.backbone import as_backbone
from slimdiff.runtime.reuse import (
    BlockCosts,
    ReusePlan,
    SoftFrame,
    apply_block_reuse,
    effective_compute,
    get_block_reuse,
    remove_block_reuse,
    reuse_blocks,
    soft_reuse,
)
from slimdiff.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from slimdiff.utils import progress

LOSSES = ("ssim", "l1", "l2")
ALPHA = 0.1
"""Default sparsity weight. The reference's 1 (with SGD) overshoots under our Adam: on digits-dit
at DDIM 25 and budget 0.5 the hard gates fell to 0.29 of the MACs before the early stop could act,
so the post-processing ranked saturated probabilities. With 0.1 they settle at the budget, and
SSIM to the teacher (the method's objective) and FD improve at both budgets and both step counts:
DDIM 50 SSIM 0.9974 -> 0.9975 and 0.9845 -> 0.9917, FD 5.78 -> 5.45 and 7.64 -> 6.26 (budgets
0.5, 0.25; bench/digits); DDIM 25 FD 5.87 -> 5.72 and 9.96 -> 7.71 (bench/digits_ddim25). Chosen
on the same teacher and protocol that scores it."""


# --------------------------------------------------------------------------- pruner
class DiPGOPruner(nn.Module):
    """Queries -> SA+FFN encoder -> per-query MLP heads -> [reuse, keep] logits (S, N, 2);
    ``blocks`` counts gate columns (the model's blocks, plus one with step gates)."""

    def __init__(self, steps: int, blocks: int, dim: int = 64, heads: int = 4, hidden: int = 32):
        super().__init__()
        self.steps, self.blocks = steps, blocks
        q = steps * blocks
        self.queries = nn.Embedding(q, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=max(4, dim // 4), dropout=0.1,
                                                  batch_first=True)
        self.w1 = nn.Parameter(torch.randn(q, dim, hidden) / math.sqrt(dim))
        self.b1 = nn.Parameter(torch.zeros(q, hidden))
        self.w2 = nn.Parameter(torch.randn(q, hidden, hidden) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(q, hidden))
        self.w3 = nn.Parameter(torch.zeros(q, hidden, 2))
        self.b3 = nn.Parameter(torch.tensor([0.0, 1.0]).repeat(q, 1))

    def forward(self) -> torch.Tensor:
        h = self.encoder(self.queries.weight.unsqueeze(0))[0]
        h = F.relu(torch.einsum("qd,qdh->qh", h, self.w1) + self.b1)
        h = F.relu(torch.einsum("qd,qdh->qh", h, self.w2) + self.b2)
        return (torch.einsum("qd,qdh->qh", h, self.w3) + self.b3).view(self.steps, self.blocks, 2)


def ste_keep(logits: torch.Tensor) -> torch.Tensor:
    """Hard keep gates (S, N) with softmax gradients; step 0 always keeps."""
    soft = logits.softmax(-1)
    hard = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
    keep = (hard - soft.detach() + soft)[..., 1]
    return torch.cat([torch.ones_like(keep[:1]), keep[1:]])


def reuse_probability(pruner: DiPGOPruner) -> torch.Tensor:
    """Learned p_reuse (S, N), deterministic (eval mode)."""
    was = pruner.training
    pruner.eval()
    with torch.no_grad():
        p = pruner().softmax(-1)[..., 0]
    pruner.train(was)
    return p


# --------------------------------------------------------------------------- SuperNet
MEMORY_MODES = ("flat", "steps")
FLAT_SAMPLERS = ("ddim",)  # stateless, deterministic steps: safe to recompute inside a checkpoint


def supernet_sample(model: nn.Module, keep: torch.Tensor | None, noise: torch.Tensor, labels: torch.Tensor | None,
                    *, sampler: str, steps: int, cfg: float = 1.0, seed: int = 0, use_checkpoint: bool = True,
                    memory: str = "flat") -> torch.Tensor:
    """One sampling trajectory through the SuperNet: ``slimdiff.sample``'s loop
    (:class:`~slimdiff.diffusion.sampling.Trajectory`) with a gated model function.

    ``keep`` (S, N) gates mix fresh and cached block contributions (None = all fresh);
    the model must carry a reuse plan for ``sampler`` x ``steps`` (any plan: in SuperNet
    mode every block computes). Differentiable w.r.t. ``keep``.

    Memory (with gradients and ``use_checkpoint``): a step's inputs are ``x``, the previous
    prediction and one cache per block, so checkpointing every step still keeps ``steps x (blocks + 2)`` activation
    tensors alive until the backward pass -- memory grows linearly with the step count.
    ``memory="flat"`` (default) checkpoints recursively instead: the trajectory is halved
    into nested checkpoints down to single steps (each one :meth:`Trajectory.step`), so only
    ``O(log2 steps)`` step states and one step's activations are alive at a time; the price is
    recomputing each step's forward about ``log2 steps`` times. Step 0 (no gate) runs without
    autograd, and UNet caches (nested tuples of skip features) travel through the checkpoints
    as flat tensor lists. It needs steps that can be re-run exactly (DDIM; other samplers keep
    state in the scheduler or draw noise): otherwise ``"steps"``, per-step checkpoints in the
    plain loop, is used.
    """
    if memory not in MEMORY_MODES:
        raise UsageError(f"unknown memory mode {memory!r}; use one of {', '.join(MEMORY_MODES)}")
    from slimdiff.diffusion.sampling import Trajectory

    traj = Trajectory(model, sampler=sampler, steps=steps, n=noise.shape[0], cond=labels, cfg=cfg, seed=seed)
    x = traj.start(noise)
    names = reuse_blocks(model)[0]
    n_blocks = len(names)
    consumers = as_backbone(model).block_readers()
    step_gated = keep is not None and keep.shape[-1] == n_blocks + 1
    if keep is not None and keep.shape[-1] not in (n_blocks, n_blocks + 1):
        raise UsageError(f"keep gates have {keep.shape[-1]} columns; the model has {n_blocks} blocks "
                         f"(give {n_blocks}, or {n_blocks + 1} with a step gate)")
    # what one step hands the next: the block caches and the prediction (the step gates mix with it)
    carry: dict[str, Any] = {"caches": [None] * n_blocks, "prev": None}

    def step_fn(inp, t, k, *cs):
        with soft_reuse(model, SoftFrame(k, list(cs))) as frame:
            pred = traj.guided(inp, t)
        return (pred, *frame.caches_out)

    def predict(inp: torch.Tensor, t: torch.Tensor, i: int, k: torch.Tensor | None = None,
                run=step_fn) -> torch.Tensor:
        """The model function of a SuperNet step with gates ``k`` (None: every block fresh),
        from and into ``carry``."""
        cs, prev = carry["caches"], carry["prev"]
        pred, *out = run(inp, t, None if k is None else effective_compute(k[:n_blocks], names, consumers), *cs)
        if step_gated and k is not None:
            pred, out = _gate_step(k[n_blocks], pred, prev, out, cs)
        carry.update(caches=out, prev=pred)
        return pred

    gates = keep if keep is not None and keep.requires_grad else None
    if use_checkpoint and torch.is_grad_enabled() and memory == "flat" and sampler in FLAT_SAMPLERS and gates is not None:
        with torch.no_grad():  # step 0 has no gate (every block computes): nothing to differentiate there
            x = traj.step(x, 0, predict)
        if len(traj.timesteps) == 1:
            return x
        leaves, spec = _flatten(carry["caches"])  # reentrant checkpoints take tensors: UNet caches are nested tuples

        def segment(lo: int, hi: int, gates: torch.Tensor, x_in: torch.Tensor, prev_in: torch.Tensor,
                    *leaves_in: torch.Tensor):
            """Steps ``lo .. hi - 1`` from ``(x_in, prediction, caches)``; halves are nested checkpoints."""
            if hi - lo == 1:
                carry.update(caches=_unflatten(list(leaves_in), spec), prev=prev_in)
                x_out = traj.step(x_in, lo, partial(predict, k=gates[lo]))
                return (x_out, carry["prev"], *_flatten(carry["caches"])[0])
            mid = (lo + hi) // 2
            # Reentrant checkpoints: the forward of a checkpointed half runs without autograd, so
            # the checkpoints nested in it keep nothing until the backward pass recomputes them
            # (non-reentrant ones would each hold their inputs: O(steps) again). The gates go in
            # as an argument: reentrant checkpoints pass gradients to arguments only.
            state = checkpoint(segment, lo, mid, gates, x_in, prev_in, *leaves_in, use_reentrant=True)
            return checkpoint(segment, mid, hi, gates, *state, use_reentrant=True)

        return segment(1, len(traj.timesteps), gates, x, carry["prev"], *leaves)[0]

    # the plain loop (one non-reentrant checkpoint per step when differentiating)
    run = partial(checkpoint, step_fn, use_reentrant=False) if use_checkpoint and torch.is_grad_enabled() else step_fn
    return traj.run(x, lambda inp, t, i: predict(inp, t, i, None if (keep is None or i == 0) else keep[i], run))


def _gate_step(g: torch.Tensor, pred: torch.Tensor, prev: torch.Tensor, caches: list, caches_in: list):
    """Step gate ``g``: mix the fresh prediction and block caches with the previous step's
    (``g = 0`` is the runtime's skipped step: the last output again, caches untouched)."""
    def mix(fresh, old):
        return g * fresh + (1 - g) * old

    leaves, spec = _flatten(caches)
    return mix(pred, prev), _unflatten([mix(a, b) for a, b in zip(leaves, _flatten(caches_in)[0])], spec)


def _flatten(tree: Any) -> tuple[list[torch.Tensor], Any]:
    """The tensors of nested lists / tuples / None, and the structure to rebuild them."""
    if isinstance(tree, torch.Tensor):
        return [tree], "T"
    if tree is None:
        return [], None
    parts = [_flatten(t) for t in tree]
    return [leaf for leaves, _ in parts for leaf in leaves], (type(tree), tuple(spec for _, spec in parts))


def _unflatten(leaves: list[torch.Tensor], spec: Any) -> Any:
    """Inverse of :func:`_flatten` (consumes ``leaves`` from the front)."""
    if spec == "T":
        return leaves.pop(0)
    if spec is None:
        return None
    kind, children = spec
    return kind(_unflatten(leaves, c) for c in children)


def consistency_loss(x: torch.Tensor, target: torch.Tensor, kind: str = "ssim") -> torch.Tensor:
    """1 - SSIM (window fitted to small images), L1 or L2 between samples and the teacher's."""
    if kind == "l1":
        return F.l1_loss(x, target)
    if kind == "l2":
        return F.mse_loss(x, target)
    from pytorch_msssim import ssim

    lo = target.min().detach()
    rng = float((target.max() - lo).clamp_min(1e-6))
    win = min(11, max(3, (min(target.shape[-2:]) // 2) | 1))
    return 1 - ssim(x - lo, target - lo, data_range=rng, size_average=True, win_size=win)


def sparsity_loss(keep: torch.Tensor, costs: BlockCosts) -> torch.Tensor:
    """Mean over steps > 0 of the step's MACs share ``sum_b keep(t, b) * macs_b / macs_forward``;
    with a step-gate column, ``g(t) * (macs_fixed / macs_forward + that sum)``."""
    n = len(costs.blocks)
    w = torch.tensor(costs.blocks, dtype=keep.dtype) / costs.forward
    per = (keep[1:, :n] * w).sum(-1)
    if keep.shape[-1] == n + 1:
        per = keep[1:, n] * (per + costs.fixed / costs.forward)
    return per.mean()


# --------------------------------------------------------------------------- optimisation
def dipgo_loss(model: nn.Module, pruner: DiPGOPruner, costs: BlockCosts, noise: torch.Tensor,
               labels: torch.Tensor | None, target: torch.Tensor, *, sampler: str, steps: int, cfg: float,
               budget: float, loss: str = "ssim", alpha: float = ALPHA, seed: int = 0,
               memory: str = "flat") -> tuple[torch.Tensor, dict]:
    """Total DiP-GO loss for one batch, and its parts."""
    keep = ste_keep(pruner())
    x = supernet_sample(model, keep, noise, labels, sampler=sampler, steps=steps, cfg=cfg, seed=seed, memory=memory)
    cons = consistency_loss(x, target, loss)
    sparse = sparsity_loss(keep, costs)
    frac = table_cost(costs, keep.detach() > 0.5) / table_cost(costs, torch.ones(keep.shape, dtype=torch.bool))
    total = cons + alpha * sparse if frac > budget else cons
    return total, {"consistency": float(cons.detach()), "sparsity": float(sparse.detach()), "macs_fraction": frac}


def optimise(model: nn.Module, costs: BlockCosts, budget: float, ctx: Context, *, opt_steps: int, loss: str,
             batch: int = 8, lr: float = 0.05, alpha: float = ALPHA, dim: int = 64, step_gates: bool = False,
             checkpoint_every: int | None = None) -> tuple[DiPGOPruner, list[dict]]:
    """Few-step gradient optimisation of a fresh pruner (the model must carry a reuse plan);
    ``step_gates`` adds one gate column per step (see the module docs).

    With ``ctx.work_dir`` it checkpoints every ``checkpoint_every`` steps (default: about
    20 checkpoints per run) and resumes from the last one (see the module docs).
    """
    n_calls = len(get_block_reuse(model).timesteps)
    run = None
    if ctx.work_dir is not None:
        from slimdiff.methods.base import fingerprint

        run = Path(ctx.work_dir) / f"dipgo-{fingerprint(model)[:12]}"
    key = {"budget": budget, "sampler": ctx.sampler, "steps": ctx.steps, "cfg": ctx.cfg, "seed": ctx.seed,
           "opt_steps": opt_steps, "loss": loss, "batch": batch, "lr": lr, "alpha": alpha, "dim": dim,
           "step_gates": step_gates}
    torch.manual_seed(ctx.seed)
    pruner = DiPGOPruner(n_calls, len(costs.blocks) + step_gates, dim=dim).train()
    opt = torch.optim.Adam(pruner.parameters(), lr=lr)
    warm = max(1, min(10, opt_steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / max(1, opt_steps))))
    for p in model.parameters():
        p.requires_grad_(False)
    history: list[dict] = []
    start = _resume(run, key, pruner, opt, sched, history) if run is not None else 0
    every = checkpoint_every or max(1, opt_steps // 20)
    it = progress(range(start, opt_steps), f"DiP-GO x{opt_steps}", ctx.progress)
    for s in it:
        noise, labels, target = teacher_batch(model, batch, ctx.seed + 7919 * (s + 1), sampler=ctx.sampler,
                                              steps=ctx.steps, cfg=ctx.cfg)
        total, parts = dipgo_loss(model, pruner, costs, noise, labels, target, sampler=ctx.sampler, steps=ctx.steps,
                                  cfg=ctx.cfg, budget=budget, loss=loss, alpha=alpha, seed=ctx.seed + 7919 * (s + 1))
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(pruner.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append({"step": s, "loss": float(total.detach()), **parts})
        if run is not None and ((s + 1) % every == 0 or s + 1 == opt_steps):
            save_checkpoint(run, step=s + 1, model=pruner.state_dict(), optimizer=opt.state_dict(),
                            lr_scheduler=sched.state_dict(), rng={"torch": torch.get_rng_state()},
                            info={"config": key, "history": history})
    return pruner, history


def _resume(run: Path, key: dict, pruner: DiPGOPruner, opt: torch.optim.Optimizer, sched, history: list) -> int:
    """Load the optimisation state from ``run``'s checkpoint, if any; return the step to start at."""
    from slimdiff.train.trainer import _check_same_run

    path = find_checkpoint(run)
    if path is None:
        return 0
    state = load_checkpoint(path)
    _check_same_run(state["info"].get("config"), key, path)
    pruner.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["lr_scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    history[:] = state["info"]["history"]
    return state["step"]


def _check_options(opt_steps: Any, loss: Any) -> tuple[int, str]:
    """The optimisation steps and the (lower-case) loss, checked; None is the default."""
    loss = "ssim" if loss is None else str(loss).lower()
    if loss not in LOSSES:
        raise UsageError(f"unknown --loss {loss!r}; choose one of {', '.join(LOSSES)}")
    return check_opt_steps(opt_steps), loss


# --------------------------------------------------------------------------- method
@dataclass(frozen=True)
class DiPGOConfig:
    """DiP-GO's options; the defaults are the recipe (see the module docs for the deviations)."""

    opt_steps: int = option(OPT_STEPS, "pruner optimisation steps (the reference runs 500)")
    loss: str = option("ssim", "consistency loss: ssim | l1 | l2")
    postprocess: str = option("search", "post-processing to the budget: search (paper) | sweep (reference code)")
    batch: int = option(8, "teacher trajectories per optimisation step")
    alpha: float = option(ALPHA, "sparsity loss weight")
    skip_reused_steps: bool = option(True, "steps that reuse every block skip the model call (reuse its output)")
    step_gates: bool = option(False, "also learn whole-step reuse (beyond the paper)")


def compress(model: nn.Module, budget: float, ctx: Context, config: DiPGOConfig) -> nn.Module:
    """Learn a reuse plan for ``ctx.sampler`` x ``ctx.steps`` meeting ``budget``; returns the
    unchanged model with the plan applied and recorded. ``step_gates``: also learn which
    whole steps reuse the model output (beyond the paper; see the module docs)."""
    opt_steps, loss = _check_options(config.opt_steps, config.loss)
    postprocess, batch, alpha = config.postprocess, config.batch, config.alpha
    skip_reused_steps, step_gates = config.skip_reused_steps, config.step_gates
    if step_gates not in (True, False):  # 1 / 0 from ``--option step_gates=1``
        raise UsageError(f"step_gates must be true or false (1 or 0), got {step_gates!r}")
    step_gates = bool(step_gates)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha >= 0):
        raise UsageError(f"alpha (the sparsity loss weight) must be a finite number >= 0, got {alpha!r}")
    check_postprocess(postprocess, step_gates)
    costs = prepare(model, budget, ctx, step_gates or skip_reused_steps)
    start = time.process_time()
    apply_block_reuse(model, ReusePlan.full(ctx.sampler, ctx.steps, model))
    try:
        pruner, history = optimise(model, costs, budget, ctx, opt_steps=opt_steps, loss=loss, batch=batch, alpha=alpha,
                                   step_gates=step_gates)
    finally:
        remove_block_reuse(model)
    table = threshold_plan(reuse_probability(pruner), costs, budget, postprocess, skip_reused_steps)
    compute, step_compute = split_plan(table, len(costs.blocks), skip_reused_steps)
    measured = {"search_cpu_s": time.process_time() - start, "history": history[-5:],
                "final_loss": history[-1]["loss"] if history else None}
    return finish(model, "dipgo", compute, ctx, costs,
                  {"opt_steps": opt_steps, "loss": loss, "postprocess": postprocess, "batch": batch, "alpha": alpha,
                   "skip_reused_steps": skip_reused_steps, "step_gates": step_gates},
                  measured, step_compute=step_compute)


def speed_student(model: nn.Module, settings: Any) -> nn.Module:
    """The speed bench's student (``settings``: a :class:`slimdiff.eval.speed.SpeedSettings`):
    DiP-GO's post-processing of seeded random reuse scores and its ``finish`` (the runtime's
    cost does not depend on how the plan was learned)."""
    ctx = settings.context()
    costs = prepare(model, settings.budget, ctx)
    n_calls = len(ReusePlan.full(ctx.sampler, ctx.steps, model).timesteps)
    scores = torch.rand(n_calls, len(costs.blocks), generator=torch.Generator().manual_seed(settings.seed))
    compute = threshold_plan(scores, costs, settings.budget)
    return finish(model, "dipgo", compute, ctx, costs, {"scores": "seeded random", "budget": settings.budget}, {})


DIPGO = MethodSpec("dipgo", "reuse", "DiP-GO: few-step gradient-optimised (step x block) reuse plan", compress,
                   DiPGOConfig, restore=restore_plan, draw=draw_plan, speed_student=speed_student)
dipgo = DIPGO
"""``dipgo(model, budget, ctx, **options)``: the method as a plain call."""
SPECS = (DIPGO,)
