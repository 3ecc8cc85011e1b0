"""Learning-to-Cache (Ma et al., NeurIPS 2024) on transformers, as published.

**Units.** Every block's attention and MLP are two branches (reference ``router_models.py``
``DiTBlock.forward`` and ``Router(2 * depth)``, order ``attn_0, mlp_0, attn_1, ...``). A reused
branch returns its output of the previous step *before* the block's adaLN gate; the gate (and
the rest of the block) is recomputed from the current condition. PixArt's cross-attention is
not a branch of the reference and always runs. Run by :mod:`slimdiff.runtime.branch_cache`,
so a reused branch is not called and its MACs are really saved.

**Router.** One free vector of ``2 * depth`` scores per sampling step, ``s = sigmoid(p)``, ``p``
initialised ``randn`` (``Router``) and clamped to [-5, 5] after each step (``train_router.py``).

**Training** (``gaussian_diffusion.router_training_losses``, ``train_router.py``): a data
sample ``x0`` (``ctx.data``; 10% of class labels dropped to the null class, the reference's
``dropout_prob=0.1``) is noised to the timestep of call ``i - 1``; one sampler step from there,
computed in full, fills the branch caches; at call ``i`` the full output is compared with the
router's, where each branch is ``s * fresh + (1 - s) * cached``. Loss = MSE + ``lam`` * sum of
that step's scores; AdamW (weight decay 0), one step index per batch. Each step's scores are
their own parameter, so a step not drawn is not updated (the reference's one ``Router`` per
step). **Length:** the reference trains one ImageNet epoch at global batch 64 (~20k steps) at
lr 1e-3; ours runs ``opt_steps`` (default 500, the length of DiP-GO's reference optimisation, so
the learned planners get comparable optimisation; one step costs four batched forwards) and,
unless ``lr`` is given, lr = 1e-3 x 20000 / ``opt_steps`` (the same total step length in fewer
steps: 0.04 at 500).

**Schedule.** The paper's Algorithm 2 lets every call after the first reuse (the default).
The released code alternates full and router calls (``dynamic_models.py`` ``forward``: the
caches are dropped when ``cur_timestep % 2 == 1``, and ``reset()`` starts ``cur_timestep`` at 19
for every step count, so calls 0, 2, 4, ... run in full and the odd calls are routed; for the
even step counts it supports this is also ``load_ranking``'s even routers); ``alternate=True``
does that.

**Threshold and budget.** At inference a branch runs when ``s > threshold`` (the reference's
STE, ``--thres 0.1`` for DiT). The budget may ask for more: the branches are ranked by
score and the threshold is raised to the smallest value whose plan's MACs are at most the
budget, i.e. ``threshold = max(threshold, budget's threshold)`` (ours; the reference has no
budget). Budget 1.0 with ``threshold=0`` reuses nothing.

**Step skips** (``skip_reused_steps``, *beyond the paper*, off by default): a routed call
that reuses every branch is not made; the model's last output is reused (the conversion
DiP-GO and the block-level baselines offer under the same name, so a comparison gives all of
them the mechanism or none). The budget search counts such calls at 0 MACs.

Learning-to-Cache is published for transformers (DiT, U-ViT); for UNets use ``l2c-block``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimdiff.compression.reuse_plans import draw_plan, with_legacy_block_plans
from slimdiff.diffusion.sampling import Trajectory, schedule_timesteps
from slimdiff.errors import UsageError
from slimdiff.methods.base import Context, record
from slimdiff.methods.spec import MethodSpec, check_options, option
from slimdiff.models.backbone import as_backbone
from slimdiff.runtime.branch_cache import (
    BranchFrame,
    UnitCosts,
    apply_branch_cache,
    branch_cache_disabled,
    branch_frame,
    check_no_plan,
    get_branch_cache,
    remove_branch_cache,
    restore_branch_cache,
    unit_costs,
)
from slimdiff.runtime.reuse import ReusePlan
from slimdiff.utils import progress

REF_STEPS = 20_000
"""The reference's router training length: one ImageNet epoch (1.28M images) at global batch 64."""
REF_LR = 1e-3
LABEL_DROPOUT = 0.1  # router_training_losses(dropout_prob=0.1)
CLAMP = 5.0  # train_router.py: param.clamp_(-5, 5)


@dataclass(frozen=True)
class L2CConfig:
    """L2C's options (defaults: the reference's DiT-XL/2 NFE-50 recipe, scaled in length)."""

    lam: float = option(1e-6, "lambda: weight of the sum of router scores in the loss (reference README: 1e-6 "
                               "for DiT-XL/2 at NFE 50, 5e-6 at NFE 20)", low=0)
    threshold: float = option(0.1, "theta: a branch is computed when its router score > theta (reference DiT: "
                                   "0.1); raised as far as the budget needs", low=0, high=1, high_open=True)
    opt_steps: int = option(500, "router optimisation steps (the reference: ~20k, one ImageNet epoch at batch 64; "
                                 "scaled in length to DiP-GO's 500, see lr)", low=0)
    batch: int = option(64, "data samples per optimisation step (the reference's global batch 64)", low=1)
    lr: float = option(0.0, "AdamW learning rate; 0 = 1e-3 x 20000 / opt_steps (the reference's lr 1e-3 over its "
                            "~20k steps: the same total step length)", low=0)
    alternate: bool = option(False, "the released code's schedule: full and router calls alternate "
                                    "(dynamic_models.py); the default is the paper's Algorithm 2 (any call after "
                                    "the first may reuse)")
    skip_reused_steps: bool = option(False, "beyond the paper: a routed call that reuses every branch skips the "
                                            "model call (reuses its output), as DiP-GO's option of the same name")

    def __post_init__(self) -> None:
        check_options(self)


# --------------------------------------------------------------------------- units
def branch_units(model: nn.Module) -> list[str]:
    """Qualified names of every block's attention and MLP module, ``attn_0, mlp_0, attn_1, ...``."""
    bb = as_backbone(model)
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for blk in bb.blocks:
        out.append(names[id(bb.block_attention(blk).module)])
        fc1, fc2 = bb.block_mlp(blk)[:2]
        out.append(_called_ancestor(model, names[id(fc1)], names[id(fc2)]))
    return out


def _called_ancestor(model: nn.Module, a: str, b: str) -> str:
    """The nearest common ancestor of modules ``a`` and ``b`` that is called (not a container)."""
    pa, pb = a.split("."), b.split(".")
    k = 0
    while k < min(len(pa), len(pb)) and pa[k] == pb[k]:
        k += 1
    while k > 0 and isinstance(model.get_submodule(".".join(pa[:k])), (nn.ModuleList, nn.ModuleDict)):
        k -= 1
    return ".".join(pa[:k])


def router_calls(calls: int, alternate: bool) -> list[bool]:
    """Which calls a router decides (the others compute everything): every call after the
    first (paper), or the odd calls (the released code, see the module docs)."""
    return [i > 0 and (not alternate or i % 2 == 1) for i in range(calls)]


# --------------------------------------------------------------------------- training
def _batches(model: nn.Module, ctx: Context, batch: int) -> Iterator[tuple[torch.Tensor, Any]]:
    """``(x0, cond)`` batches of ``ctx.data``, epoch after epoch (each epoch a new seeded order)."""
    from slimdiff.compression.calibration import calibration_batches, model_dataset

    data = model_dataset(model, ctx)
    epoch = 0
    while True:
        gen = torch.Generator().manual_seed(ctx.seed + epoch)
        yield from calibration_batches(model, ctx, len(data), batch, dataset=data, generator=gen)
        epoch += 1


def _drop_labels(bb, cond: Any, gen: torch.Generator) -> Any:
    """Class labels with 10% replaced by the null class (the reference trains with label
    dropout); other conditions, and models without a null class, unchanged."""
    if bb.conditioning != "class":
        return cond
    try:
        null = bb.null_cond(None, cond.shape[0]).to(cond)
    except UsageError:  # no null class: the model cannot be guided, nothing to learn for it
        return cond
    return torch.where(torch.rand(cond.shape[0], generator=gen) < LABEL_DROPOUT, null, cond)


def l2c_train(model: nn.Module, ctx: Context, config: L2CConfig, routed: list[bool]) -> tuple[torch.Tensor, list[float]]:
    """Train the per-call routers on ``model`` (which carries an all-compute branch-cache plan);
    returns the scores ``sigmoid(p)`` (calls x units) and the losses."""
    bb = as_backbone(model)
    plan = get_branch_cache(model)
    if plan is None:
        raise UsageError("l2c_train needs the model's branches hooked: apply_branch_cache(model, all-compute plan)")
    n_units = len(plan.blocks)
    gen = torch.Generator().manual_seed(ctx.seed)
    logits = nn.ParameterList([nn.Parameter(torch.randn(n_units, generator=gen)) for _ in routed])
    lr = config.lr or REF_LR * REF_STEPS / max(1, config.opt_steps)
    opt = torch.optim.AdamW(logits.parameters(), lr=lr, weight_decay=0.0)
    traj = Trajectory(model, sampler=ctx.sampler, steps=ctx.steps, n=1, cfg=1.0, seed=ctx.seed)
    alphas = getattr(traj.scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise UsageError(f"l2c needs a scheduler with alphas_cumprod to noise data; {ctx.sampler} has none")
    ts, steps = traj.timesteps, [i for i, r in enumerate(routed) if r]
    data, losses = _batches(model, ctx, config.batch), []
    for _ in progress(range(config.opt_steps), f"L2C x{config.opt_steps}", ctx.progress):
        i = steps[int(torch.randint(len(steps), (1,), generator=gen))]
        x0, cond = next(data)
        x0, cond = x0.to(bb.device, bb.dtype), _drop_labels(bb, cond, gen)
        cond = cond.to(bb.device) if isinstance(cond, torch.Tensor) else cond
        sch = copy.deepcopy(traj.scheduler)  # one step from a fresh state (the reference: one DDIM step)
        scale = getattr(sch, "scale_model_input", lambda x, t: x)
        with torch.no_grad():
            a = alphas[int(ts[i - 1])].to(x0)
            noise = torch.randn(x0.shape, generator=gen).to(x0)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            with branch_frame(model, BranchFrame()) as fresh:
                pred = bb(scale(x_t, ts[i - 1]), ts[i - 1], cond)
            inp = scale(sch.step(pred.float(), ts[i - 1], x_t.float()).prev_sample.to(x0), ts[i])
            with branch_cache_disabled(model):
                full = bb(inp, ts[i], cond).float()
        gates = torch.sigmoid(logits[i])
        with branch_frame(model, BranchFrame(gates.to(x0), fresh.fresh)):
            out = bb(inp, ts[i], cond).float()
        loss = F.mse_loss(out, full) + config.lam * gates.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            logits[i].clamp_(-CLAMP, CLAMP)
        losses.append(float(loss.detach()))
    return torch.stack([torch.sigmoid(p.detach()) for p in logits]), losses


# --------------------------------------------------------------------------- threshold
def budget_threshold(scores: torch.Tensor, routed: list[bool], costs: UnitCosts, budget: float,
                     skip_reused_steps: bool = False) -> float:
    """The smallest threshold whose plan (reuse where ``score <= threshold`` on routed calls)
    costs at most ``budget`` of the all-compute MACs; ``-inf`` when nothing needs reusing."""
    full = costs.total * scores.shape[0]
    target = budget * full
    if full <= target:
        return float("-inf")

    def cost(threshold: float) -> float:
        return costs.macs(*l2c_plan(scores, routed, threshold, skip_reused_steps))

    cand = torch.sort(scores[torch.tensor(routed)].flatten()).values.tolist()
    if not cand or cost(cand[-1]) > target:
        low = (cost(cand[-1]) if cand else full) / full
        raise UsageError(f"budget {budget:g} is below what Learning-to-Cache reaches ({low:.4f} of the sampling MACs: "
                         "the first call and the non-branch layers always run): use a larger budget or more steps")
    lo, hi = 0, len(cand) - 1  # cost is non-increasing in the threshold
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if cost(cand[mid]) <= target else (mid + 1, hi)
    return cand[lo]


def l2c_plan(scores: torch.Tensor, routed: list[bool], threshold: float,
             skip_reused_steps: bool = False) -> tuple[torch.Tensor, list[bool]]:
    """``(compute, step_compute)``: see :func:`l2c_table`; with ``skip_reused_steps`` a routed
    call reusing every branch is skipped (the model's last output is reused)."""
    table = l2c_table(scores, routed, threshold)
    steps = [True] + [bool(row.any()) or not skip_reused_steps for row in table[1:]]
    return table, steps


def l2c_table(scores: torch.Tensor, routed: list[bool], threshold: float) -> torch.Tensor:
    """Compute table: a routed call runs a branch when its score > ``threshold``; others run all."""
    table = scores > threshold
    table[~torch.tensor(routed)] = True
    return table


# --------------------------------------------------------------------------- method
def _check(model: nn.Module, config: L2CConfig) -> None:
    if not as_backbone(model).is_transformer:
        raise UsageError("Learning-to-Cache is published for transformers (its router picks attention/MLP "
                         "branches); on a UNet use --method l2c-block (the block-level variant) or deepcache")
    check_no_plan(model)


def _l2c(model: nn.Module, budget: float, ctx: Context, config: L2CConfig) -> nn.Module:
    """Train the routers, pick the threshold for ``budget``, install the plan."""
    _check(model, config)
    start = time.process_time()
    names = branch_units(model)
    calls = len(schedule_timesteps(ctx.sampler, ctx.steps, model))
    routed = router_calls(calls, config.alternate)
    costs = unit_costs(model, names)
    budget_threshold(torch.zeros(calls, len(names)), routed, costs, budget, config.skip_reused_steps)  # reachable?
    timesteps = schedule_timesteps(ctx.sampler, ctx.steps, model)
    apply_branch_cache(model, ReusePlan(torch.ones(calls, len(names), dtype=torch.bool), ctx.sampler, ctx.steps,
                                        timesteps, names))
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        scores, losses = l2c_train(model, ctx, config, routed)
    finally:
        remove_branch_cache(model)
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    skip = config.skip_reused_steps
    threshold = max(config.threshold, budget_threshold(scores, routed, costs, budget, skip))
    table, steps = l2c_plan(scores, routed, threshold, skip)
    plan = ReusePlan(table, ctx.sampler, ctx.steps, timesteps, names, steps)
    apply_branch_cache(model, plan)
    reused = ~table[torch.tensor(routed)]
    measured = {"plan_macs_ratio": costs.macs(table, steps) / (costs.total * calls), "threshold_used": threshold,
                "skipped_calls": steps.count(False),
                "reused_fraction": float(reused.float().mean()) if reused.numel() else 0.0,
                "reused_attention": int(reused[:, 0::2].sum()), "reused_mlp": int(reused[:, 1::2].sum()),
                "losses": losses[-5:], "search_cpu_s": time.process_time() - start}
    settings = {"sampler": ctx.sampler, "steps": ctx.steps, "lam": config.lam, "threshold": config.threshold,
                "opt_steps": config.opt_steps, "batch": config.batch,
                "lr": config.lr or REF_LR * REF_STEPS / max(1, config.opt_steps), "alternate": config.alternate,
                "skip_reused_steps": skip}
    return record(model, "l2c", settings, measured, {**plan.to_dict(), "scores": scores.tolist()})


def applies(model: nn.Module) -> bool:
    """Learning-to-Cache is defined for transformers."""
    return as_backbone(model).is_transformer


L2C = MethodSpec("l2c", "reuse", "Learning-to-Cache (NeurIPS 2024): a learned per-step router reusing each block's "
                 "attention and MLP branches", _l2c, L2CConfig, restore=with_legacy_block_plans(restore_branch_cache), draw=draw_plan, applies=applies,
                 cannot_follow={"dydit": "DyDiT's routed blocks compute attention and MLP inside their own forward, so "
                                         "there are no branch modules to cache; chain dydit with a block-level reuse "
                                         "method (dipgo, deepcache-style, l2c-block, fewer-steps)"})
SPECS = (L2C,)
l2c = L2C

__all__ = ["l2c", "L2CConfig", "branch_units", "router_calls", "l2c_train", "budget_threshold", "l2c_table", "l2c_plan", "SPECS"]
