"""One accelerate-based training loop for every weight-changing job in slimdiff.

Training from scratch, recovery fine-tuning of a compressed model (diffusion loss) and
distillation from a teacher (output KD, hidden-state KD through a layer map, and
TinyFusion's masked KD) share this loop, with EMA, gradient clipping, mixed precision,
atomic checkpoints and exact resume.

Determinism across process counts: every rank draws the *global* batch indices, noise,
timesteps and CFG label-drop mask from one shared seeded generator and keeps its slice,
so a run on 2 processes sees exactly the data of a 1-process run with the same global
batch (DDP averages the gradients). Batches are drawn with replacement.

Exact resume: a checkpoint holds everything a step depends on, so a run killed at any point
(even ``kill -9`` mid-step) and resumed ends bit-identical to an uninterrupted one (same
device and thread count): weights, optimiser, lr schedule, EMA, the mixed-precision loss
scale, the data generator (batch order, noise, timesteps, label drops), the global torch
RNG of the CPU and of the training GPU (whatever a model or hook draws there, e.g.
TinyFusion's Gumbel noise), and the run's ``log`` (the loss curve and whatever the caller's
hooks record, e.g. a search's probability history). Every checkpoint is also a log point,
so no loss is pending when one is written. The RNG states are put back just before the
first resumed step, after the set-up, so nothing the set-up draws can shift them.

Conditions: class-conditional models train on labelled data; text-conditional models
(PixArt, ``UNet2DConditionModel``) on latents with pre-computed caption embeddings
(:func:`slimdiff.data.datasets.latents`), passed through the Backbone view with their
attention mask. Classifier-free-guidance dropout (``cfg_dropout``) replaces a sample's label
by the null class, or its captions by the null condition slimdiff samples with
(``Backbone.null_cond``): the empty prompt as the model's pipeline encodes it (with its mask),
else zero embeddings (every attended caption token is then the same vector, so the caption mask
does not change a dropped sample's prediction).
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from slimdiff.diffusion.losses import ForwardProcess, NoisyBatch, diffusion_loss
from slimdiff.diffusion.schedulers import DiffusionConfig, diffusion_config_of
from slimdiff.errors import UsageError
from slimdiff.models.conditions import TextCondition, text_inputs
from slimdiff.train.checkpoint import find_checkpoint, load_checkpoint, rng_states, save_checkpoint, set_rng_states
from slimdiff.train.distill import KD_MODES, HiddenCapture, distill_loss
from slimdiff.utils import ProgressTask

MIXED_PRECISION = ("no", "fp16", "bf16")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Settings of one training run. ``batch_size`` is global (split over processes)."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    mixed_precision: str = "no"
    cfg_dropout: float = 0.1  # CFG dropout: label -> null class, caption embeddings -> zeros
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    kd: str = "none"
    kd_alpha: float = 0.9
    feat_beta: float = 1e-2
    layer_map: dict[int, int] | None = field(default=None)
    mask_k: float = 2.0
    device: str | None = None  # None: where the model is; else auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise UsageError(f"steps and batch size must be >= 1 (got {self.steps}, {self.batch_size})")
        if not 0 < self.lr < float("inf"):  # also refuses NaN
            raise UsageError(f"learning rate must be a finite number > 0, got {self.lr}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise UsageError(f"unknown lr schedule {self.lr_schedule!r}; use 'cosine' or 'constant'")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UsageError(f"unknown --mixed-precision {self.mixed_precision!r}; choose one of {', '.join(MIXED_PRECISION)}")
        if self.kd not in KD_MODES:
            raise UsageError(f"unknown distillation mode {self.kd!r}; choose one of {', '.join(KD_MODES)}")
        if not 0 <= self.ema_decay < 1:
            raise UsageError(f"EMA decay must be in [0, 1), got {self.ema_decay}")
        if self.layer_map is not None:
            self.layer_map = {int(k): int(v) for k, v in self.layer_map.items()}


class Denoiser(nn.Module):
    """``(x, t, cond) -> prediction`` for any supported model, as one module DDP can wrap."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        from slimdiff.models.backbone import as_backbone

        return as_backbone(self.model)(x, t, cond)


@contextmanager
def no_internal_label_dropout(model: nn.Module) -> Iterator[None]:
    """Turn off label embedders' own random dropout; the trainer drops labels itself
    (from the shared generator) so runs are reproducible across process counts."""
    saved = [(m, m.dropout_prob) for m in model.modules() if hasattr(m, "dropout_prob") and hasattr(m, "num_classes")]
    for m, _ in saved:
        m.dropout_prob = 0.0
    try:
        yield
    finally:
        for m, p in saved:
            m.dropout_prob = p


def lr_lambda(config: TrainConfig):
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio``."""
    import math

    def f(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _has_null(bb) -> bool:
    try:
        bb.null_cond(torch.zeros(1, dtype=torch.long), 1)
    except UsageError:
        return False
    return True


def _check_same_run(saved: dict | None, current: dict, path: Path) -> None:
    """Refuse to resume a checkpoint written with other settings (it would silently mix runs)."""
    if saved is None:
        return
    current = {k: (v if not isinstance(v, dict) else {str(a): b for a, b in v.items()}) for k, v in current.items()}
    diff = sorted(k for k in current if k in saved and saved[k] != current[k] and k not in ("checkpoint_every", "device"))
    if diff:
        raise UsageError(
            f"the checkpoint in {path} was written with other settings ({', '.join(diff)}); "
            "delete it or choose another output directory to start a new run"
        )


def check_conditioning(bb, dataset: Dataset) -> None:
    """Fail up front when the data cannot condition the model."""
    from slimdiff.data.datasets import text_shape

    if bb.conditioning == "text":
        shape = text_shape(dataset)
        if shape is None:
            raise UsageError(
                f"the {bb.kind} model is text-conditional but the data has no caption embeddings: pass a latents "
                "file (.npz/.safetensors) with 'encoder_hidden_states' (N, L, D) [and 'encoder_attention_mask' (N, L)]"
            )
        if shape[1] != bb._text_dim():
            raise UsageError(
                f"the data's caption embeddings have width {shape[1]} but the {bb.kind} model takes {bb._text_dim()}: "
                "encode the captions with the model's own text encoder"
            )
    if bb.conditioning == "class":
        if callable(getattr(dataset, "check_labelled", None)):  # an image folder without class sub-folders
            dataset.check_labelled(bb.num_classes)
        y = dataset[0][1]  # one read (datasets may count them)
        if isinstance(y, TextCondition):
            raise UsageError(f"the data holds caption embeddings but the {bb.kind} model is class-conditional: "
                             "use labelled data (class sub-folders or a 'labels' array)")
        tensors = getattr(dataset, "tensors", None)  # in memory (latents file, shipped data): every label is checked
        labels = tensors[1] if isinstance(tensors, tuple) and len(tensors) > 1 and len(tensors[1]) else None
        label = int(torch.as_tensor(y)) if labels is None else int(labels.min() if labels.min() < 0 else labels.max())
        if not 0 <= label < bb.num_classes:
            raise UsageError(
                f"the model is class-conditional ({bb.num_classes} classes) but the data has label {label}: "
                "use labelled data (class sub-folders or a 'labels' array)"
            )


_check_conditioning = check_conditioning  # the earlier private name


def _drop_captions(cond: TextCondition, null: Any, drop: torch.Tensor) -> TextCondition:
    """``cond`` with the rows where ``drop`` is set replaced by the null condition ``null``
    (embeddings, or a :class:`TextCondition` with the empty prompt's mask)."""
    null_embeds, null_mask = text_inputs(null)
    embeds = torch.where(drop[:, None, None], null_embeds.to(cond.embeds), cond.embeds)
    if cond.mask is None and null_mask is None:
        return TextCondition(embeds)
    ones = torch.ones(cond.shape[:2], dtype=torch.long, device=embeds.device)
    mask, null_mask = (ones if cond.mask is None else cond.mask), (ones if null_mask is None else null_mask)
    return TextCondition(embeds, torch.where(drop[:, None], null_mask.to(mask), mask))


def _batch(dataset: Dataset, idx: torch.Tensor):
    items = [dataset[int(i)] for i in idx]
    x = torch.stack([it[0] for it in items])
    if isinstance(items[0][1], TextCondition):
        return x, TextCondition.stack([it[1] for it in items])
    return x, torch.stack([torch.as_tensor(it[1]) for it in items])


def _to_fp32(model: nn.Module, what: str, accelerator) -> None:
    """Cast half-precision weights (the shipped fp16 models) to fp32 in place: AdamW on fp16
    weights loses small updates and fp32 data cannot run through fp16 layers; ``mixed_precision``
    is the way to compute in 16 bits."""
    low = {p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32}
    if low:
        model.float()
        accelerator.print(f"{what} weights are {', '.join(sorted(str(d) for d in low))}: training an fp32 copy "
                          "(use --mixed-precision to compute in 16 bits)")


def train(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    teacher: nn.Module | None = None,
    resume: bool = False,
    diffusion: DiffusionConfig | None = None,
    progress: bool = True,
    param_groups: list[dict] | None = None,
    extra_loss: Callable[[int, NoisyBatch, torch.Tensor | None, torch.Tensor], torch.Tensor] | None = None,
    on_step_begin: Callable[[int], None] | None = None,
    sample_timesteps: Callable[[int, torch.Generator], torch.Tensor] | None = None,
    log: dict[str, list] | None = None,
) -> nn.Module:
    """Train ``model`` in place and return it (with EMA weights when EMA is on).

    Checkpoints go to ``out_dir/checkpoint`` every ``config.checkpoint_every`` steps and at
    the end; ``resume=True`` continues from there with optimiser, EMA, lr schedule and RNG
    state restored, so a resumed run ends with the same weights as an uninterrupted one.
    Training runs on the model's device unless ``config.device`` names one (under
    ``accelerate launch`` each process then takes its own GPU).

    Hooks for methods that train more than weights (search, routers): ``param_groups``
    replaces the optimiser's groups (e.g. a higher lr for logits; every trainable parameter
    must be in one), ``extra_loss(step, batch, cond, pred)`` is added to the loss, and
    ``on_step_begin(step)`` runs first in every step (temperature or target schedules);
    ``sample_timesteps(n, generator)`` draws the global batch's timesteps (default: the forward
    process's uniform draw; DyDiT stratifies them).

    ``log`` (optional, JSON-serialisable lists by name): the run's record. The trainer
    appends ``[step, mean loss, lr]`` to ``log["loss"]`` at every log point; hooks may append
    their own (e.g. per-step probabilities). It is saved in every checkpoint and, on resume,
    its lists are replaced in place by the checkpoint's, so it ends as in an uninterrupted run.
    """
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    from slimdiff.models.backbone import as_backbone
    from slimdiff.utils import resolve_device

    out_dir = Path(out_dir)
    if config.kd != "none" and teacher is None:
        raise UsageError(f"distillation mode {config.kd!r} needs a teacher model (--teacher)")
    import importlib.util

    tensorboard = importlib.util.find_spec("tensorboard") is not None
    where = resolve_device(config.device) if config.device is not None else next(model.parameters()).device
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=where.type == "cpu",
                              log_with="tensorboard" if tensorboard else None, project_dir=str(out_dir))
    if tensorboard:
        accelerator.init_trackers("logs", config={k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool))})
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise UsageError(f"global batch {config.batch_size} does not divide over {world} processes")
    local = config.batch_size // world
    diffusion = diffusion or diffusion_config_of(model)
    process = ForwardProcess(diffusion)
    torch.manual_seed(config.seed)
    data_gen = torch.Generator().manual_seed(config.seed)

    _to_fp32(model, "model", accelerator)
    if teacher is not None:
        _to_fp32(teacher, "teacher", accelerator)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise UsageError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(param_groups or trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    ema = EMAModel(trainable, decay=config.ema_decay) if config.ema_decay > 0 else None
    names = {id(p): n for n, p in model.named_parameters()}
    trainable_names = [names[id(p)] for p in trainable]

    log = {} if log is None else log
    log.setdefault("loss", [])
    start, state = 0, None
    ckpt = find_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        _check_same_run(state["info"].get("config"), asdict(config), ckpt)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        if ema is not None and state["ema"] is not None:
            ema.shadow_params = [state["ema"][n].clone() for n in trainable_names]
            ema.optimization_step = state["info"]["ema_step"]
        for name, values in state["info"].get("log", {}).items():
            log.setdefault(name, [])[:] = values
        start = state["step"]
        accelerator.print(f"resumed from {ckpt} at step {start}")

    denoiser, optimizer = accelerator.prepare(Denoiser(model), optimizer)
    device = accelerator.device
    if state is not None and accelerator.scaler is not None and state["info"].get("scaler"):
        accelerator.scaler.load_state_dict(state["info"]["scaler"])
    if ema is not None:
        ema.to(device)
    bb = as_backbone(model)
    check_conditioning(bb, dataset)
    drop_labels = config.cfg_dropout > 0 and bb.conditioning == "class" and _has_null(bb)
    drop_text = config.cfg_dropout > 0 and bb.conditioning == "text"
    sl = slice(rank * local, (rank + 1) * local)
    t_den = capture_s = capture_t = None
    if teacher is not None:
        teacher = teacher.to(device).eval()  # run under no_grad; its requires_grad flags stay the caller's
        t_den = Denoiser(teacher)
        if config.kd in ("hidden", "masked"):
            capture_s = HiddenCapture(model, list(config.layer_map or {}))
            capture_t = HiddenCapture(teacher, list((config.layer_map or {}).values()))

    def checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_checkpoint(
                out_dir, step=step, model=accelerator.unwrap_model(denoiser).model.state_dict(),
                optimizer=optimizer.optimizer.state_dict() if hasattr(optimizer, "optimizer") else optimizer.state_dict(),
                lr_scheduler=scheduler.state_dict(), rng=rng_states(device, data=data_gen),
                info={"ema_step": ema.optimization_step if ema else 0, "config": asdict(config), "log": log,
                      "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None},
                ema={n: p for n, p in zip(trainable_names, ema.shadow_params)} if ema else None,
            )
        accelerator.wait_for_everyone()

    bad = torch.zeros((), dtype=torch.bool, device=device)
    running, t0, seen = torch.zeros((), device=device), time.perf_counter(), 0
    if state is not None:
        set_rng_states(state["rng"], device, data=data_gen)
    show = progress and accelerator.is_main_process
    bar = ProgressTask("train", config.steps, start, transient=False) if show else None
    denoiser.train()
    with no_internal_label_dropout(model), (bar or nullcontext()):
        for step in range(start, config.steps):
            if on_step_begin is not None:
                on_step_begin(step)
            idx = torch.randint(len(dataset), (config.batch_size,), generator=data_gen)
            t_all = (sample_timesteps or process.sample_timesteps)(config.batch_size, data_gen)
            x0, y = _batch(dataset, idx[sl])
            noise = torch.randn((config.batch_size, *x0.shape[1:]), generator=data_gen)[sl]
            drop = torch.rand(config.batch_size, generator=data_gen)[sl] < config.cfg_dropout
            x0 = x0.to(device)
            batch = process.noisy(x0, noise.to(device, x0.dtype), t_all[sl])
            cond = y.to(device) if bb.conditioning in ("class", "text") else None
            if drop_labels:
                cond = torch.where(drop.to(device), bb.null_cond(cond, len(cond)).to(device), cond)
            if drop_text:  # CFG dropout for captions: the null condition (the pipeline's empty prompt, or zeros)
                cond = _drop_captions(cond, bb.null_cond(cond, len(cond)), drop.to(device))
            with accelerator.autocast():
                pred = denoiser(batch.x_t, batch.t, cond)
                loss = diffusion_loss(pred, batch)
                if extra_loss is not None:
                    loss = loss + extra_loss(step, batch, cond, pred)
                if t_den is not None:
                    with torch.no_grad():
                        t_pred = t_den(batch.x_t, batch.t, cond)
                    beta = config.feat_beta * (1 - step / config.steps)
                    loss = distill_loss(loss, pred, t_pred, config, beta, capture_s, capture_t)
            bad |= ~torch.isfinite(loss.detach())
            accelerator.backward(loss)
            if config.grad_clip > 0:
                accelerator.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.step(trainable)
            running += loss.detach()
            seen += config.batch_size
            done = step + 1
            if done % config.log_every == 0 or done == config.steps or done % config.checkpoint_every == 0:
                if bool(bad):
                    raise TrainingDiverged(
                        f"loss became NaN/inf before step {done}; the last good checkpoint in {out_dir} is kept. "
                        "Lower --lr or check the data, then --resume"
                    )
                dt = time.perf_counter() - t0
                logs = {"loss": float(running) / (seen // config.batch_size), "lr": scheduler.get_last_lr()[0],
                        "samples_per_s": seen / dt}
                log["loss"].append([done, logs["loss"], logs["lr"]])
                running.zero_()
                t0, seen = time.perf_counter(), 0
                if bar is not None:
                    bar.update(done, f"loss {logs['loss']:.4f} | {logs['samples_per_s']:.0f} samples/s")
                elif accelerator.is_main_process and done % (10 * config.log_every) == 0:
                    accelerator.print(f"step {done}: loss {logs['loss']:.4f}, {logs['samples_per_s']:.0f} samples/s")
                accelerator.log(logs, step=done)
            if done % config.checkpoint_every == 0 or done == config.steps:
                checkpoint(done)
    if capture_s is not None:
        capture_s.remove()
        capture_t.remove()
    model = accelerator.unwrap_model(denoiser).model
    if ema is not None:
        ema.copy_to(trainable)
    accelerator.end_training()
    return model.eval()

