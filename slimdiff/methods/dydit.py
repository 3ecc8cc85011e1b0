"""DyDiT (Zhao et al., ICLR 2025): timestep-wise dynamic width + spatial-wise dynamic tokens.

``slimdiff compress --method dydit --budget 0.5 [--train-steps N] [--tune full|lora]``:

1. install the routers (:func:`slimdiff.runtime.routing.apply_dydit`): per block a head router and an MLP
   channel-group router on the timestep embedding, a token router on the tokens; all on;
2. train with ``slimdiff.train.trainer.train``: diffusion loss of the dynamic model (hard
   straight-through decisions) + diffusion loss of the complete model (stabiliser, on by
   default) + FLOPs loss ``w (mean_batch(ratio) - target)^2``, the target held at 1, then
   warmed up linearly to the budget. ``tune="full"`` trains every weight; ``tune="lora"``
   trains routers + LoRA adapters (peft) on the blocks' qkv/proj/fc1/fc2, merged afterwards;
3. calibrate: one shift of every router bias (bisection) so that the routed sampling run
   under ``ctx.sampler``/``ctx.steps``/``ctx.cfg`` spends at most the budget (short trainings
   do not reach the target exactly; the reference trains 200K steps);
4. per-step tables of the width decisions for that schedule; then the shared recovery
   fine-tuning (``recover``) with the routers frozen and masked deterministic routing, after
   which step 3 and the tables are redone (recovery changes the tokens the token routers
   read, so the calibrated budget would otherwise drift).

The ratio the FLOPs loss drives is end to end (:class:`DyDiTCost`), so the budget is the
same currency as every other method. The reference code's differences are listed in
:mod:`slimdiff.runtime.routing`; here: the reference stratifies training timesteps over four
bins (our shared trainer draws them uniformly) and trains far longer, so we add step 3.

Backbones: our DiT; a diffusers ``DiTTransformer2DModel`` is converted to our DiT exactly
(:func:`slimdiff.models.convert.diffusers_to_dit`) and the result is a DiT; a diffusers
``PixArtTransformer2DModel`` is routed in place (:mod:`slimdiff.runtime.dynamic_pixart`: heads of
the self-attention, channel groups of the feed-forward, tokens skipping the feed-forward;
cross-attention always runs) and stays a PixArt. UNets raise :class:`UsageError` (no heads,
MLP groups or tokens to route).

PixArt is text-conditional: router training and recovery need caption embeddings in the
``--data`` latents file (``encoder_hidden_states``, see :func:`slimdiff.data.datasets.latents`).
Its cost model is measured with the Backbone's example caption length (8 tokens, what
``sample``/``macs_sampling`` use when no caption is given); the FLOPs loss during training uses
a cost model at the data's caption length, since cross-attention (fixed cost) grows with it.

Options (``--option k=v``; ``--train-steps`` / ``--tune`` are the CLI's own flags for the first
two) are the fields of :class:`DyDiTConfig`; the spec is :data:`DYDIT` (``dydit(model, budget,
ctx, **options)``).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from slimdiff.errors import UsageError
from slimdiff.compression.calibration import model_dataset
from slimdiff.compression.lora import add_lora, merge_lora
from slimdiff.methods.base import Context, record, recover
from slimdiff.methods.spec import MethodSpec, option
from slimdiff.runtime.routing import DyDiTRouting, RoutingConfig, apply_dydit, default_config, routing_of

TUNE_MODES = ("full", "lora")


@dataclass(frozen=True)
class DyDiTConfig:
    """Every coefficient of a DyDiT run (defaults follow the reference where it fits a CPU budget)."""

    train_steps: int = option(200, "router training steps")
    tune: str = option("full", "what trains with the routers: full (every weight) | lora (LoRA adapters, merged after)")
    # routers move from +init_bias to ~0: 10-50x the weight lr (reference: 15 -> 0 over 200K steps)
    router_lr: float = option(1e-2, "learning rate of the routers")
    flops_weight: float = option(2.0, "weight w of the FLOPs loss w (ratio - target)^2")  # reference: 2.0
    # reference train.py: on (its second stage drops it)
    complete_model_loss: bool = option(True, "add the complete (unrouted) model's diffusion loss as a stabiliser")
    hold_frac: float = option(0.05, "fraction of the steps the FLOPs target is held at 1")  # reference: first 100 steps
    # then linear 1 -> budget over this fraction of the steps (reference: 5000 of 150K steps). On digits-dit at
    # budget 0.5 (bench settings) 0.25 and 0.1 beat 0.5: bench/dydit/warmup.jsonl, scripts/dydit_ablation.py
    warmup_frac: float = option(0.25, "fraction of the steps the FLOPs target falls linearly from 1 to the budget")
    lora_rank: int = option(8, "LoRA rank (tune=lora)")
    calibrate: bool = option(True, "shift the router biases so the routed sampling run meets the budget")
    calibrate_samples: int = option(8, "images per calibration sampling run")
    calibrate_iters: int = option(12, "bisection steps of the calibration")

    def __post_init__(self) -> None:
        if self.tune not in TUNE_MODES:
            raise UsageError(f"unknown --tune {self.tune!r}; use one of {', '.join(TUNE_MODES)}")
        if self.train_steps < 0:
            raise UsageError(f"--train-steps must be >= 0, got {self.train_steps}")


# --------------------------------------------------------------------------- compute model
@dataclass
class DyDiTCost:
    """MACs per sample of one forward as a function of the routing decisions.

    ``fixed`` is everything the routers do not touch (embedders, adaLN, final layer), measured
    by running the complete model under FlopCounterMode; per block ``head`` = MACs of one
    head (qkv, ``QK^T``, ``AV``, proj), ``group_token`` = MACs of one MLP channel group on one
    token, ``router`` = token-router MACs. ``full`` = the original model.
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
        mlp = bb.mlp(i)
        head.append(bb.attention_layout(i).head_macs(n))
        gt.append(mlp.group_token_macs(g))
        router.append(n * mlp.fc1.in_features if routing.config.tokens else 0)  # Linear(D, 1) on each token
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
    """FLOPs target at a step: 1 for ``hold_frac``, then linear to ``budget`` over ``warmup_frac``."""
    hold, warm = int(cfg.hold_frac * steps), max(1, int(cfg.warmup_frac * steps))

    def target(step: int) -> float:
        if step < hold:
            return 1.0
        return 1.0 + (budget - 1.0) * min(1.0, (step - hold + 1) / warm)

    return target


def _add_lora(model: nn.Module, rank: int) -> None:
    """LoRA (peft) on every block's attention/MLP Linears (DiT: qkv/proj/fc1/fc2; PixArt: attn1
    to_q/to_k/to_v/to_out.0 and ff); freezes all else but the routers."""
    from slimdiff.models.backbone import as_backbone

    add_lora(model, as_backbone(model).attention_mlp_names(), rank, 2 * rank)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("dydit."))


def train_routers(model: nn.Module, budget: float, ctx: Context, cfg: DyDiTConfig, cost: DyDiTCost) -> nn.Module:
    """Train the dynamic model toward ``budget`` with the shared trainer (see the module docs)."""
    from slimdiff.data.datasets import text_shape
    from slimdiff.diffusion.losses import diffusion_loss
    from slimdiff.models.backbone import as_backbone
    from slimdiff.train.trainer import TrainConfig, check_conditioning, train

    routing = routing_of(model)
    bb = as_backbone(model)
    dataset = model_dataset(model, ctx)
    check_conditioning(bb, dataset)  # before any work: text models need caption embeddings of the right width
    shape = text_shape(dataset) if bb.conditioning == "text" else None
    if shape is not None and shape[0] != bb.text_len:  # cross-attention cost follows the caption length
        cost = cost_model(model, text_len=shape[0])
    if cfg.tune == "lora":
        _add_lora(model, cfg.lora_rank)
    routers = [p for p in routing.parameters() if p.requires_grad]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("dydit.")]
    groups = [{"params": routers, "lr": cfg.router_lr}] + ([{"params": others, "lr": ctx.lr}] if others else [])
    target = target_schedule(budget, cfg.train_steps, cfg)
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

    tc = TrainConfig(steps=cfg.train_steps, batch_size=ctx.batch_size, lr=ctx.lr, lr_schedule="constant",
                     seed=ctx.seed, checkpoint_every=max(1, cfg.train_steps // 4), log_every=max(1, min(50, cfg.train_steps)))
    from slimdiff.methods.base import fingerprint, settings_key

    # a resume key: a rerun resumes only the same model, budget and settings
    work = (ctx.work_dir or Path("runs/compress")) / (f"dydit-train-{cfg.tune}-b{budget:g}-n{cfg.train_steps}"
                                                       f"-s{ctx.seed}-{settings_key(cfg)}-{fingerprint(model)[:12]}")
    model = train(model, dataset, tc, work, resume=True, progress=ctx.progress, param_groups=groups,
                  extra_loss=extra_loss, on_step_begin=on_step_begin)
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
    """Subtract ``delta`` from every router bias (positive: fewer heads, groups and tokens)."""
    for r in routing.routers:
        for lin in (r.head, r.group, r.token):
            if lin is not None:
                lin.bias.sub_(delta)


def calibrate(model: nn.Module, budget: float, cost: DyDiTCost, ctx: Context, cfg: DyDiTConfig) -> dict:
    """Shift all router biases by one scalar (bisection) so the routed sampling run costs at
    most ``budget`` of the original, as close to it as the decisions allow."""
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
    best = 0.0 if before <= budget else hi
    for _ in range(cfg.calibrate_iters):
        mid = (lo + hi) / 2
        if ratio_at(mid) <= budget:
            best, hi = mid, mid
        else:
            lo = mid
    shift_routers(routing, best)
    return {"shift": best, "ratio_before": before, "ratio_after": ratio_at(0.0)}


# --------------------------------------------------------------------------- method
def routing_extras(routing: DyDiTRouting) -> dict:
    """JSON data a saved DyDiT model needs: router config and per-step width tables."""
    entries = [{"t": t, "heads": [list(h) for h, _ in dec], "groups": [list(g) for _, g in dec]}
               for t, dec in sorted(routing.tables.items(), reverse=True)]
    return {"config": asdict(routing.config), "tables": {**routing.table_info, "entries": entries}}


def restore(model: nn.Module, extras: dict | None) -> None:
    """Re-install routers and per-step tables on a freshly built DiT or PixArt (before its weights load)."""
    if not extras or "config" not in extras:
        raise UsageError("this saved DyDiT model lacks its routing config in slimdiff.json; re-save it")
    routing = apply_dydit(model, RoutingConfig(**extras["config"]))
    tables = extras.get("tables") or {}
    routing.tables = {float(e["t"]): [(tuple(h), tuple(g)) for h, g in zip(e["heads"], e["groups"])]
                      for e in tables.get("entries", [])}
    routing.table_info = {k: v for k, v in tables.items() if k != "entries"}


def compress(model: nn.Module, budget: float, ctx: Context, cfg: DyDiTConfig) -> nn.Module:
    """Compress ``model`` to ``budget`` of its sampling MACs with DyDiT (see the module docs)."""
    if budget >= 1.0:  # identity: routers would only add their own MACs (and training would move weights)
        as_routable(model)  # still refuse backbones DyDiT cannot route
        return model
    start = time.process_time()
    model = as_routable(model)
    routing = apply_dydit(model, default_config(model))
    cost = cost_model(model)
    if cfg.train_steps > 0:
        model = train_routers(model, budget, ctx, cfg, cost)
    model.eval()
    calib = calibrate(model, budget, cost, ctx, cfg) if cfg.calibrate else {}
    build_tables(model, ctx.sampler, ctx.steps)
    if ctx.recover_steps > 0:
        routing.requires_grad_(False)
        routing.set_mode("masked")
        model = recover(model, ctx, "dydit")
        routing.set_mode("dynamic")
        routing.requires_grad_(True)
        if cfg.calibrate:  # recovery moved the tokens the token routers read: meet the budget again
            calib = {**calibrate(model, budget, cost, ctx, cfg), "before_recovery": calib}
            build_tables(model, ctx.sampler, ctx.steps)
    model.eval()
    measured = {"expected_ratio": calib.get("ratio_after"), "calibration": calib,
                "cpu_seconds": time.process_time() - start, "full_macs_forward": cost.full}
    return record(model, "dydit", {**asdict(cfg), "budget": budget}, measured, routing_extras(routing))


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
    for r in routing.routers:
        for lin in (r.head, r.group, r.token):
            if lin is not None:
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 4 / lin.in_features**0.5)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))


def speed_student(model: nn.Module, settings: Any) -> nn.Module:
    """The speed bench's student (``settings``: a :class:`slimdiff.eval.speed.SpeedSettings`): the
    routers with seeded random weights, then the method itself with ``train_steps=0`` (bias
    calibration to the budget over the sampling run, per-step tables)."""
    model = as_routable(model)
    _randomize_routers(apply_dydit(model, default_config(model)), settings.seed)
    ctx = settings.context()
    cfg = DyDiTConfig(train_steps=0, calibrate_samples=min(settings.batch, 2), calibrate_iters=10)
    return compress(model, settings.budget, ctx, cfg)


DYDIT = MethodSpec("dydit", "dynamic",
                   "DyDiT: timestep-wise dynamic heads/MLP groups + per-token MLP skipping (trained routers)",
                   compress, DyDiTConfig, restore=restore, draw=draw, speed_student=speed_student, applies=routable)
dydit = DYDIT
"""``dydit(model, budget, ctx, config=None, **options)``: the method as a plain call."""
SPECS = (DYDIT,)

__all__ = ["DyDiTConfig", "DyDiTCost", "cost_model", "as_routable", "dydit", "DYDIT", "SPECS", "compress", "restore",
           "draw", "speed_student", "calibrate", "build_tables", "routed_ratio", "shift_routers", "target_schedule",
           "routing_extras", "train_routers"]
