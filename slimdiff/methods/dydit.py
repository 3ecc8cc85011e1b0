"""DyDiT (Zhao et al., ICLR 2025): timestep-wise dynamic width + spatial-wise dynamic tokens.

``slimdiff compress --method dydit --budget 0.5 [--train-steps N] [--tune full|lora]``. The
defaults are the reference recipe (alibaba-damo-academy/DyDiT ``train.py``, ``train0.5.sh``)
scaled in length:

1. install the routers (:func:`slimdiff.runtime.routing.apply_dydit`): per block a head router
   and an MLP channel-group router (one Linear each) on the timestep embedding, a token router
   (the reference's MLP ``D -> D/16 -> ReLU -> 1``) on the tokens after attention; Xavier
   weights and biases 15 / 35, so every route starts on (``models.py`` 417-419);
2. train every weight and the routers together (``slimdiff.train.trainer.train``): diffusion
   loss of the dynamic model (hard straight-through Gumbel-sigmoid decisions, ``tau = 5``) +
   diffusion loss of the complete model (all routes on) + FLOPs loss
   ``2 (mean_batch(ratio) - target)^2``; timesteps stratified over four bins of ``[0, T)``
   (:func:`stratified_timesteps`); the target held at 1, then falling linearly to the budget
   (:func:`target_schedule`);
3. per-step tables of the width decisions for ``ctx.sampler``/``ctx.steps``, and the realised
   MACs ratio of a sampling run on noise and labels that nothing before saw
   (:func:`realised_macs`, recorded as ``measured["realised_ratio_heldout"]``).

**Length scaling.** The reference trains 200K steps at batch 256 (λ=0.5: 30K with the complete
model's loss, then 170K without it) with one lr (1e-4) for weights and routers. We train
``train_steps`` (default 200) with the shared ``ctx.lr`` for weights; the FLOPs target's hold
(100 steps) and warm-up (1000 steps, ``train.py`` default ``--warmup_step`` that ``train0.5.sh``
keeps) are the same *fractions* of the run (``hold_frac``, ``warmup_frac``); the routers' lr is
scaled so that Adam can move them as far as the reference's (1e-4 x 200K = 20 logit units:
``router_lr`` = min(1, 20 / ``train_steps``) unless given), since the biases must travel from 15
toward 0.
The complete-model loss stays on for the whole (short) run.

**Beyond the paper** (named options, off by default): ``calibrate`` (one bisected shift of every
router's bias so that a routed sampling run meets the budget: short trainings miss it) and
``frozen_router_recovery`` (``--recover-steps`` as a fine-tuning with routers frozen and
deterministic masked routing; without it recovery steps are more of step 2, as the paper trains
weights and routers together); ``t_sampling="uniform"``; the gates and router of this project's
earlier versions (``gate_tau=1``, ``width_init_bias=4``, ``token_init_bias=4``,
``token_router="linear"``, ``router_init="zeros"``). Other differences from the reference
code: removed work is really not computed at inference, and the FLOPs ratio is end to end
(:class:`DyDiTCost`, see :mod:`slimdiff.runtime.routing`); the reference's second stage without
the complete-model loss is not run.

Backbones: our DiT; a diffusers ``DiTTransformer2DModel`` is converted to our DiT exactly
(:func:`slimdiff.models.convert.diffusers_to_dit`) and the result is a DiT; a diffusers
``PixArtTransformer2DModel`` is routed in place (:mod:`slimdiff.runtime.dynamic_pixart`: heads of
the self-attention, channel groups of the feed-forward, tokens skipping the feed-forward;
cross-attention always runs) and stays a PixArt. UNets raise :class:`UsageError` (no heads,
MLP groups or tokens to route).

PixArt is text-conditional: router training needs caption embeddings in the ``--data`` latents
file (``encoder_hidden_states``, see :func:`slimdiff.data.datasets.latents`). Its cost model is
measured with the Backbone's example caption length (8 tokens, what ``sample``/``macs_sampling``
use when no caption is given); the FLOPs loss during training uses a cost model at the data's
caption length, since cross-attention (fixed cost) grows with it.

Options (``--option k=v``; ``--train-steps`` / ``--tune`` are the CLI's own flags for the first
two) are the fields of :class:`DyDiTConfig`; the spec is :data:`DYDIT` (``dydit(model, budget,
ctx, **options)``). (Over 500 lines: the recipe, its options and the measurements users get are
one unit.)
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from slimdiff.budget import BUDGET_NOTE
from slimdiff.errors import UsageError
from slimdiff.compression.calibration import model_dataset
from slimdiff.compression.lora import add_lora, merge_lora
from slimdiff.methods.base import Context, record, recover
from slimdiff.methods.spec import MethodSpec, check_options, option
from slimdiff.runtime.routing import (
    ROUTER_INITS,
    TOKEN_ROUTERS,
    DyDiTRouting,
    RoutingConfig,
    apply_dydit,
    default_config,
    routing_of,
)

TUNE_MODES = ("full", "lora")
T_SAMPLING = ("stratified", "uniform")
T_BINS = 4  # reference train.py 237-250: bins [0, 250), [250, 500), [500, 750), [750, 1000)
ROUTER_TRAVEL = 1e-4 * 200_000  # reference lr x steps: how far Adam may move a router parameter
MAX_AUTO_ROUTER_LR = 1.0  # runs shorter than 20 steps get this, not ROUTER_TRAVEL / steps
MAX_SHIFT = 2.0**14  # the calibration's largest bias shift (logits of trained routers can exceed 64)
HELDOUT_SEED = 1_000_003  # offset of the held-out run's seed from ctx.seed (calibration uses ctx.seed)


@dataclass(frozen=True)
class DyDiTConfig:
    """Every coefficient of a DyDiT run: defaults are the reference's, scaled in length (module docs)."""

    train_steps: int = option(200, "router training steps (reference: 200K at batch 256)", low=0)
    tune: str = option("full", "what trains with the routers: full (every weight, reference) | lora (LoRA adapters, "
                               "merged after; beyond the paper)", choices=TUNE_MODES)
    router_lr: float | None = option(None, "learning rate of the routers (default: min(1, 20 / train_steps): the "
                                           "distance the reference's lr 1e-4 moves them in 200K steps, in ours)",
                                 low=0, low_open=True)
    flops_weight: float = option(2.0, "weight w of the FLOPs loss w (ratio - target)^2 (reference: 2.0)", low=0)
    complete_model_loss: bool = option(True, "add the complete (unrouted) model's diffusion loss (reference "
                                             "train.py; its second stage drops it)")
    t_sampling: str = option("stratified", "training timesteps: stratified (reference train.py --t_sample: sample "
                                           "i of a batch draws t in bin i mod 4 of [0, T)) | uniform (deviation)",
                             choices=T_SAMPLING)
    hold_frac: float = option(0.0005, "fraction of the steps the FLOPs target is held at 1 (reference: 100 of 200K)", low=0, high=1)
    warmup_frac: float = option(0.005, "fraction of the steps over which the FLOPs target falls linearly from 1 to "
                                       "the budget, counted from step 0 (reference: 1000 of 200K, train0.5.sh)",
                               low=0, high=1)
    token_router: str = option("mlp", "token router: mlp (reference, D -> D/16 -> ReLU -> 1) | linear (deviation: "
                                      "one Linear, this project's earlier router)", choices=TOKEN_ROUTERS)
    gate_tau: float = option(5.0, "Gumbel-sigmoid temperature of the training gates (reference 5; 1 = deviation, "
                                  "this project's earlier value)", low=0, low_open=True)
    width_init_bias: float = option(15.0, "initial bias of the head/group routers (reference 15; 4 = deviation)")
    token_init_bias: float = option(35.0, "initial bias of the token routers (reference 35; 4 = deviation)")
    router_init: str = option("xavier", "router weights: xavier (reference) | zeros (deviation: the logit layers "
                                        "start at 0, all on for any input scale)", choices=ROUTER_INITS)
    lora_rank: int = option(8, "LoRA rank (tune=lora)", low=1)
    calibrate: bool = option(False, "beyond the paper: after training, shift every router bias by one scalar "
                                    "(bisection) so a routed sampling run meets the budget")
    calibrate_samples: int = option(8, "images per calibration sampling run (calibrate)", low=1)
    calibrate_iters: int = option(12, "bisection steps of the calibration (calibrate)", low=1)
    frozen_router_recovery: bool = option(False, "beyond the paper: --recover-steps fine-tune the weights with the "
                                                 "routers frozen (deterministic masked routing), then calibrate again; "
                                                 "off: recovery steps are more joint training, as the paper")
    heldout_samples: int = option(8, "images of the held-out sampling run (fresh noise and labels) whose realised "
                                     "MACs ratio is recorded; 0: none", low=0)

    def __post_init__(self) -> None:
        check_options(self)

    def routing(self, model: nn.Module) -> RoutingConfig:
        """The routers these options build on ``model``."""
        return default_config(model, tau=self.gate_tau, init_bias=self.width_init_bias,
                              token_init_bias=self.token_init_bias, token_router=self.token_router,
                              router_init=self.router_init)

    def lr_of_routers(self, steps: int) -> float:
        """``router_lr``, or the reference's router travel spread over ``steps`` (at most 1: a
        larger Adam step throws the Xavier-initialised weights far past any useful logit)."""
        return self.router_lr if self.router_lr is not None else min(MAX_AUTO_ROUTER_LR, ROUTER_TRAVEL / max(1, steps))


# --------------------------------------------------------------------------- compute model
@dataclass
class DyDiTCost:
    """MACs per sample of one forward as a function of the routing decisions.

    ``fixed`` is everything the routers do not touch (embedders, adaLN, final layer), measured
    by running the complete model under FlopCounterMode; per block ``head`` = MACs of one
    head (qkv, ``QK^T``, ``AV``, proj), ``group_token`` = MACs of one MLP channel group on one
    token, ``router`` = token-router MACs (all tokens). ``full`` = the original model.
    """

    fixed: int
    head: list[int]
    group_token: list[int]
    router: list[int]
    heads: list[int]
    groups: list[int]
    tokens: int

    @property
    def full(self) -> int:
        return self.fixed + sum(h * a + g * self.tokens * m for h, a, g, m in
                                zip(self.heads, self.head, self.groups, self.group_token))

    def macs(self, realised: dict[str, torch.Tensor]) -> torch.Tensor:
        """MACs per sample ``(B,)`` for realised decisions (``(L, B)`` heads, groups, tokens)."""
        h, g = realised["heads"], realised["groups"]
        n = realised["tokens"] if realised["tokens"] is not None else torch.full_like(h, float(self.tokens))
        dev = h.device
        head = torch.tensor(self.head, dtype=torch.float64, device=dev)[:, None]
        gt = torch.tensor(self.group_token, dtype=torch.float64, device=dev)[:, None]
        router = torch.tensor(self.router, dtype=torch.float64, device=dev)[:, None]
        return self.fixed + (h.double() * head + g.double() * n.double() * gt + router).sum(0)

    def ratio(self, realised: dict[str, torch.Tensor]) -> torch.Tensor:
        """Compute ratio to the original model, per sample (differentiable in training)."""
        return self.macs(realised) / self.full


def cost_model(model: nn.Module, text_len: int | None = None) -> DyDiTCost:
    """The :class:`DyDiTCost` of a DyDiT model (runs one counted complete-model forward).

    Text-conditional models (PixArt) are counted with captions of ``text_len`` tokens (default:
    the Backbone's example length, which ``sample`` uses when no caption is given).
    """
    from slimdiff.eval.compute import count_macs
    from slimdiff.models.backbone import as_backbone

    routing = routing_of(model)
    bb = as_backbone(model)
    if text_len is not None:
        bb.text_len = int(text_len)
    n = bb.token_grid[0] * bb.token_grid[1]
    head, gt, router = [], [], []
    for i, g in enumerate(routing.config.groups):
        head.append(bb.attention_layout(i).head_macs(n))
        gt.append(bb.mlp(i).group_token_macs(g))
        router.append(n * routing.routers[i].token_macs())
    mode = routing.mode
    routing.set_mode("off")
    try:
        total = count_macs(bb, *bb.example_inputs(1, torch.Generator().manual_seed(0)))
    finally:
        routing.set_mode(mode)
    fixed = total - sum(h * a + g * n * m for h, a, g, m in zip(routing.config.heads, head, routing.config.groups, gt))
    if fixed < 0:
        raise RuntimeError(f"DyDiT cost model does not fit the counted MACs ({total}); the block layout changed")
    return DyDiTCost(fixed, head, gt, router, list(routing.config.heads), list(routing.config.groups), n)


# --------------------------------------------------------------------------- backbones
ROUTABLE = ("dit", "diffusers-dit", "pixart")  # backbone kinds DyDiT routes


def routable(model: nn.Module) -> bool:
    """Whether DyDiT applies to ``model`` (a transformer it has routed forwards for)."""
    from slimdiff.models.backbone import as_backbone

    return as_backbone(model).kind in ROUTABLE


def as_routable(model: nn.Module) -> nn.Module:
    """A model DyDiT can route: our DiT as is, a diffusers DiT converted exactly to our DiT, a
    PixArt as is; a UNet (or anything else) is a clear :class:`UsageError`."""
    from slimdiff.models.backbone import as_backbone

    kind = as_backbone(model).kind
    if not routable(model):
        raise UsageError(f"DyDiT routes attention heads, MLP channels and tokens of a transformer; a {kind} UNet "
                         "has none: use diff-pruning or dipgo for UNets")
    if kind == "diffusers-dit":
        from slimdiff.models.convert import diffusers_to_dit

        return diffusers_to_dit(model)
    return model


# --------------------------------------------------------------------------- training
def target_schedule(budget: float, steps: int, cfg: DyDiTConfig) -> Callable[[int], float]:
    """FLOPs target at a step, as the reference (``train.py`` 261-267) at our length: 1 for the
    first ``round(hold_frac * steps)`` steps; else ``1 - (1 - budget) * min(1, step / warm)``
    with ``warm = max(1, round(warmup_frac * steps))``, the warm-up counted from step 0."""
    hold, warm = round(cfg.hold_frac * steps), max(1, round(cfg.warmup_frac * steps))

    def target(step: int) -> float:
        if step < hold:
            return 1.0
        return 1.0 - (1.0 - budget) * min(1.0, step / warm)

    return target


def stratified_timesteps(n: int, generator: torch.Generator | None = None, *, num_timesteps: int,
                         continuous: bool = False) -> torch.Tensor:
    """Timesteps of one batch, stratified as the reference (``train.py`` 237-250, ``--t_sample``):
    sample ``i`` draws uniformly from bin ``i mod 4`` of ``[0, T)`` (four equal bins), so every
    batch covers the whole schedule. ``continuous``: real ``t`` in the bin (flow matching)."""
    k = torch.arange(n) % T_BINS
    if continuous:
        return (k + torch.rand(n, generator=generator)) * (num_timesteps / T_BINS)
    edges = torch.tensor([num_timesteps * j // T_BINS for j in range(T_BINS + 1)])
    width = (edges[1:] - edges[:-1])[k]
    return edges[k] + (torch.rand(n, generator=generator) * width).long().clamp_(max=width - 1)


def _add_lora(model: nn.Module, rank: int, seed: int) -> None:
    """LoRA (peft) on every block's attention/MLP Linears (DiT: qkv/proj/fc1/fc2; PixArt: attn1
    to_q/to_k/to_v/to_out.0 and ff); freezes all else but the routers. Seeded: a rerun (or a
    resumed run) starts from the same adapters."""
    from slimdiff.models.backbone import as_backbone

    add_lora(model, as_backbone(model).attention_mlp_names(), rank, 2 * rank, seed=seed)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("dydit."))


def train_routers(model: nn.Module, budget: float, ctx: Context, cfg: DyDiTConfig, cost: DyDiTCost,
                  steps: int | None = None) -> nn.Module:
    """Train the dynamic model toward ``budget`` with the shared trainer for ``steps`` (default
    ``cfg.train_steps``; see the module docs)."""
    from slimdiff.data.datasets import text_shape
    from slimdiff.diffusion.losses import diffusion_loss
    from slimdiff.diffusion.schedulers import diffusion_config_of
    from slimdiff.methods.base import fingerprint, settings_key
    from slimdiff.models.backbone import as_backbone
    from slimdiff.train.trainer import TrainConfig, check_conditioning, train

    steps = cfg.train_steps if steps is None else steps
    routing = routing_of(model)
    bb = as_backbone(model)
    dataset = model_dataset(model, ctx)
    check_conditioning(bb, dataset)  # before any work: text models need caption embeddings of the right width
    shape = text_shape(dataset) if bb.conditioning == "text" else None
    if shape is not None and shape[0] != bb.text_len:  # cross-attention cost follows the caption length
        cost = cost_model(model, text_len=shape[0])
    if cfg.tune == "lora":
        _add_lora(model, cfg.lora_rank, ctx.seed)
    routers = [p for p in routing.parameters() if p.requires_grad]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("dydit.")]
    groups = ([{"params": routers, "lr": cfg.lr_of_routers(steps)}]
              + ([{"params": others, "lr": ctx.lr}] if others else []))
    target = target_schedule(budget, steps, cfg)
    state = {"target": 1.0}

    def on_step_begin(step: int) -> None:
        state["target"] = target(step)

    def extra_loss(step, batch, cond, pred) -> torch.Tensor:
        ratio = cost.ratio(routing.realised()).mean()
        loss = cfg.flops_weight * (ratio - state["target"]) ** 2
        if cfg.complete_model_loss:
            routing.set_mode("off")
            try:
                loss = loss + diffusion_loss(bb(batch.x_t, batch.t, cond), batch)
            finally:
                routing.set_mode("dynamic")
        return loss.float()

    diffusion = diffusion_config_of(model)
    timesteps = (partial(stratified_timesteps, num_timesteps=diffusion.num_train_timesteps,
                         continuous=diffusion.objective == "flow") if cfg.t_sampling == "stratified" else None)
    tc = TrainConfig(steps=steps, batch_size=ctx.batch_size, lr=ctx.lr, lr_schedule="constant",
                     seed=ctx.seed, checkpoint_every=max(1, steps // 4), log_every=max(1, min(50, steps)))
    # a resume key: a rerun resumes only the same model, budget and settings
    work = (ctx.work_dir or Path("runs/compress")) / (f"dydit-train-{cfg.tune}-b{budget:g}-n{steps}"
                                                       f"-s{ctx.seed}-{settings_key(cfg)}-{fingerprint(model)[:12]}")
    model = train(model, dataset, tc, work, resume=True, progress=ctx.progress, param_groups=groups,
                  extra_loss=extra_loss, on_step_begin=on_step_begin, sample_timesteps=timesteps)
    if cfg.tune == "lora":
        merge_lora(model)
    return model.eval()


# --------------------------------------------------------------------------- calibration and tables
def build_tables(model: nn.Module, sampler: str, steps: int) -> None:
    """Per-step width tables for one sampler schedule (saved with the model)."""
    from slimdiff.diffusion.sampling import schedule_timesteps

    routing_of(model).build_tables(model, schedule_timesteps(sampler, steps, model),
                                   {"sampler": sampler, "steps": steps})


@torch.no_grad()
def routed_ratio(model: nn.Module, cost: DyDiTCost, sampler: str, steps: int, cfg: float, samples: int, seed: int = 0) -> float:
    """Mean compute ratio of a real routed sampling run (``samples`` images, eval mode)."""
    from slimdiff.diffusion.sampling import sample

    routing = routing_of(model)
    build_tables(model, sampler, steps)
    ratios: list[float] = []
    sample(model, sampler=sampler, steps=steps, num_samples=samples, cfg=cfg, seed=seed,
           callback=lambda i, t, x: ratios.append(float(cost.ratio(routing.realised()).mean())))
    return sum(ratios) / len(ratios)


@torch.no_grad()
def shift_routers(routing: DyDiTRouting, delta: float) -> None:
    """Subtract ``delta`` from every router's logit bias (positive: fewer heads, groups and tokens)."""
    for r in routing.routers:
        for lin in r.outputs():
            lin.bias.sub_(delta)


def calibrate(model: nn.Module, budget: float, cost: DyDiTCost, ctx: Context, cfg: DyDiTConfig) -> dict:
    """Beyond the paper: shift all router biases by one scalar (bisection; the bracket doubles
    from 64 while even its end is over budget) so the routed sampling run costs at most
    ``budget`` of the original, as close to it as the decisions allow."""
    routing = routing_of(model)
    model.eval()

    def ratio_at(delta: float) -> float:
        shift_routers(routing, delta)
        try:
            return routed_ratio(model, cost, ctx.sampler, ctx.steps, ctx.cfg, cfg.calibrate_samples, ctx.seed)
        finally:
            shift_routers(routing, -delta)

    before = ratio_at(0.0)
    lo, hi = (0.0, 64.0) if before > budget else (-64.0, 0.0)
    while before > budget and hi < MAX_SHIFT and ratio_at(hi) > budget:  # large logits: widen the bracket
        lo, hi = hi, 2 * hi
    best = 0.0 if before <= budget else hi
    for _ in range(cfg.calibrate_iters):
        mid = (lo + hi) / 2
        if ratio_at(mid) <= budget:
            best, hi = mid, mid
        else:
            lo = mid
    shift_routers(routing, best)
    return {"shift": best, "ratio_before": before, "ratio_after": ratio_at(0.0)}


@torch.no_grad()
def realised_macs(model: nn.Module, *, sampler: str = "ddim", steps: int = 50, cfg: float = 1.0, samples: int = 8,
                  seed: int = 0, classes: Sequence[int] | None = None, cond: Any = None,
                  noise: torch.Tensor | None = None) -> float:
    """MACs of one routed sampling run over those of the same run unrouted (routing ``"off"``).

    Both runs are counted by ``torch.utils.flop_counter`` (:func:`slimdiff.eval.compute.count_macs`
    of :func:`slimdiff.diffusion.sampling.sample`, as ``macs_sampling``) with the given noise
    (``seed`` or ``noise``), labels (``classes``) or captions (``cond``), so this is the compute
    users get on those samples, whatever the routers decide for them. The width decisions of the
    schedule's timesteps are looked up first (per-step tables, else decided and memoised), so
    neither run counts the width routers: per-step data, as in any sampling run with tables.
    """
    from slimdiff.diffusion.sampling import sample, schedule_timesteps
    from slimdiff.eval.compute import count_macs
    from slimdiff.models.backbone import as_backbone

    routing = routing_of(model)
    bb, device = as_backbone(model), next(model.parameters()).device
    for tv in schedule_timesteps(sampler, steps, model):
        routing.decisions(float(tv), bb.embed_timesteps(torch.tensor([float(tv)], device=device)))
    kwargs = dict(sampler=sampler, steps=steps, cfg=cfg, seed=seed, noise=noise, classes=classes, cond=cond,
                  num_samples=None if cond is not None else samples)
    routed = count_macs(sample, model, **kwargs)
    mode = routing.mode
    routing.set_mode("off")
    try:
        full = count_macs(sample, model, **kwargs)
    finally:
        routing.set_mode(mode)
    return routed / full


def heldout_ratio(model: nn.Module, ctx: Context, samples: int) -> dict:
    """:func:`realised_macs` under ``ctx``'s sampler, steps and guidance on ``samples`` images whose
    noise (seed ``ctx.seed + HELDOUT_SEED``) and class labels (drawn from that seed) neither
    training nor calibration saw; text models use the Backbone's example captions."""
    from slimdiff.models.backbone import as_backbone

    seed = ctx.seed + HELDOUT_SEED
    bb = as_backbone(model)
    classes = None
    if bb.conditioning == "class":
        classes = torch.randint(bb.num_classes, (samples,), generator=torch.Generator().manual_seed(seed)).tolist()
    ratio = realised_macs(model, sampler=ctx.sampler, steps=ctx.steps, cfg=ctx.cfg, samples=samples, seed=seed,
                          classes=classes)
    return {"realised_ratio_heldout": ratio, "heldout": {"seed": seed, "samples": samples, "classes": classes}}


# --------------------------------------------------------------------------- method
def routing_extras(routing: DyDiTRouting) -> dict:
    """JSON data a saved DyDiT model needs: router config and per-step width tables."""
    entries = [{"t": t, "heads": [list(h) for h, _ in dec], "groups": [list(g) for _, g in dec]}
               for t, dec in sorted(routing.tables.items(), reverse=True)]
    return {"config": asdict(routing.config), "tables": {**routing.table_info, "entries": entries}}


def restore(model: nn.Module, extras: dict | None) -> None:
    """Re-install routers and per-step tables on a freshly built DiT or PixArt (before its weights
    load); a model saved before the token-router type was recorded gets its linear routers."""
    if not extras or "config" not in extras:
        raise UsageError("this saved DyDiT model lacks its routing config in slimdiff.json; re-save it")
    routing = apply_dydit(model, RoutingConfig.from_saved(extras["config"]))
    tables = extras.get("tables") or {}
    routing.tables = {float(e["t"]): [(tuple(h), tuple(g)) for h, g in zip(e["heads"], e["groups"])]
                      for e in tables.get("entries", [])}
    routing.table_info = {k: v for k, v in tables.items() if k != "entries"}


def _frozen_router_recovery(model: nn.Module, budget: float, cost: DyDiTCost, ctx: Context, cfg: DyDiTConfig,
                            calib: dict) -> tuple[nn.Module, dict]:
    """Beyond the paper: recovery with the routers frozen and deterministic masked routing; then
    the calibration again (recovery moved the tokens the token routers read)."""
    routing = routing_of(model)
    routing.requires_grad_(False)
    routing.set_mode("masked")
    model = recover(model, ctx, "dydit")
    routing.set_mode("dynamic")
    routing.requires_grad_(True)
    if cfg.calibrate:
        calib = {**calibrate(model, budget, cost, ctx, cfg), "before_recovery": calib}
    return model, calib


def compress(model: nn.Module, budget: float, ctx: Context, cfg: DyDiTConfig) -> nn.Module:
    """Compress ``model`` to ``budget`` of its sampling MACs with DyDiT (see the module docs)."""
    if budget >= 1.0:  # identity: routers would only add their own MACs (and training would move weights)
        as_routable(model)  # still refuse backbones DyDiT cannot route
        return model
    start = time.process_time()
    model = as_routable(model)
    with torch.random.fork_rng(devices=[]):  # seeded Xavier router weights: a rerun resumes the same training
        torch.manual_seed(ctx.seed)
        routing = apply_dydit(model, cfg.routing(model))
    cost = cost_model(model)
    # without the frozen-router recovery, recovery steps are more joint training (the paper has no other phase)
    steps = cfg.train_steps + (0 if cfg.frozen_router_recovery else ctx.recover_steps)
    if steps > 0:
        model = train_routers(model, budget, ctx, cfg, cost, steps)
    model.eval()
    calib = calibrate(model, budget, cost, ctx, cfg) if cfg.calibrate else {}
    if cfg.frozen_router_recovery and ctx.recover_steps > 0:
        model, calib = _frozen_router_recovery(model, budget, cost, ctx, cfg, calib)
    model.eval()
    build_tables(model, ctx.sampler, ctx.steps)
    measured = {"expected_ratio": calib.get("ratio_after"), "calibration": calib, "train_steps": steps,
                "router_lr": cfg.lr_of_routers(steps), "full_macs_forward": cost.full}
    if cfg.heldout_samples > 0:
        measured.update(heldout_ratio(model, ctx, cfg.heldout_samples))
    measured["cpu_seconds"] = time.process_time() - start
    settings = {**asdict(cfg), "budget": budget}
    if not cfg.calibrate:  # said by compress when the realised ratio misses the budget
        settings[BUDGET_NOTE] = (f"routers trained {steps} steps meet the FLOPs target only approximately (the paper "
                                 "has no calibration); calibrate=1 (beyond the paper) shifts every router bias to meet it")
    return record(model, "dydit", settings, measured, routing_extras(routing))


# --------------------------------------------------------------------------- pictures and the speed bench
def draw(name: str, extras: dict, model: nn.Module | None, out: Path, ctx: dict) -> list[Path]:
    """Active heads / MLP channel groups per (sampling step, block) from the saved tables, and
    (given the routed model) token-keep maps of a sampling run."""
    from slimdiff.eval.report import token_keep_maps, width_per_timestep

    config, tables = extras.get("config") or {}, (extras.get("tables") or {}).get("entries") or []
    files = []
    if tables:
        files.append(width_per_timestep(tables, max(config.get("heads") or [1]), max(config.get("groups") or [1]),
                                        out / f"{name}-width_per_timestep.png"))
    if model is not None and hasattr(model, "dydit"):
        files.append(token_keep_maps(model, out / f"{name}-token_keep_maps.png", steps=ctx.get("steps", 50),
                                     cfg=ctx.get("cfg", 1.0)))
    return files


@torch.no_grad()
def _randomize_routers(routing: DyDiTRouting, seed: int) -> None:
    """Seeded random DyDiT router weights (trained routers differ per timestep and token)."""
    g = torch.Generator().manual_seed(seed)
    for lin in (m for m in routing.modules() if isinstance(m, nn.Linear)):
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 4 / lin.in_features**0.5)
        lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))


def speed_student(model: nn.Module, settings: Any) -> nn.Module:
    """The speed bench's student (``settings``: a :class:`slimdiff.eval.speed.SpeedSettings`): the
    routers with seeded random weights, then the method itself with ``train_steps=0`` and the bias
    calibration to the budget over the sampling run (``calibrate``: untrained routers have no
    budget of their own), per-step tables."""
    model = as_routable(model)
    cfg = DyDiTConfig(train_steps=0, calibrate=True, calibrate_samples=min(settings.batch, 2), calibrate_iters=10,
                      heldout_samples=0)
    _randomize_routers(apply_dydit(model, cfg.routing(model)), settings.seed)
    ctx = settings.context()
    return compress(model, settings.budget, ctx, cfg)


DYDIT = MethodSpec("dydit", "dynamic",
                   "DyDiT: timestep-wise dynamic heads/MLP groups + per-token MLP skipping (trained routers)",
                   compress, DyDiTConfig, restore=restore, draw=draw, speed_student=speed_student, applies=routable)
dydit = DYDIT
"""``dydit(model, budget, ctx, config=None, **options)``: the method as a plain call."""
SPECS = (DYDIT,)

__all__ = ["DyDiTConfig", "DyDiTCost", "cost_model", "as_routable", "dydit", "DYDIT", "SPECS", "compress", "restore",
           "draw", "speed_student", "calibrate", "build_tables", "routed_ratio", "shift_routers", "target_schedule",
           "routing_extras", "train_routers", "realised_macs", "heldout_ratio", "stratified_timesteps"]
