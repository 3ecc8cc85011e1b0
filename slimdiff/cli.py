"""The ``slimdiff`` command line (typer + rich).

Every command that reports numbers takes ``--json`` and then prints exactly one JSON
object on stdout. Usage errors print one line and exit with code 2, and every check that
needs no model (arguments, method options, chains, output paths) runs before a model is
loaded. (One typer function per command keeps every command's options and help in one
readable place: hence about 600 lines; the work itself lives in the package.)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from slimdiff.errors import UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0], pretty_exceptions_enable=False)
err = Console(stderr=True)

SAVE_PIPELINE = ("; slimdiff.save_pipeline(pipe, DIR) then writes the whole pipeline to one folder, which "
                 "slimdiff.from_pretrained(DIR) loads")
MODEL_HELP = ("a slimdiff model directory, a diffusers model or pipeline folder, a shipped name (digits-dit, mnist-dit), "
              "a DiT size name (DiT-S/2) or an official DiT .pt checkpoint")
DIT_CONFIG = typer.Option(None, "--dit-config", help="DiTConfig fields for a DiT size name or an official .pt, e.g. "
                                                     "input_size=32,num_classes=1000 (a .pt's config is read from its "
                                                     "weights; these override it)")
DEVICE = typer.Option("auto", help="auto | cpu | cuda | cuda:N (auto: the GPU when torch sees one)")


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(2)


def _parse_ints(text: str | None, what: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None


def _check_image_output(path: Path, flag: str) -> None:
    """Fail before any work when an image cannot be written to ``path``: a directory, a name
    whose extension PIL cannot write, or a place where no file can be created (probed with a
    temporary file in the nearest existing folder, removed at once)."""
    import tempfile

    from PIL import Image

    path = path.expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; name the image file to write, e.g. {path / 'grid.png'}")
    Image.init()
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        raise UsageError(f"{flag} {path}: cannot write an image with extension {path.suffix or '(none)'!r}; "
                         "name a .png file")
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    try:
        tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.probe-").close()
    except OSError as e:
        raise UsageError(f"cannot write {flag} {path} ({e.strerror or type(e).__name__}); "
                         "choose a writable output path") from None


def _emit(obj: dict, as_json: bool, title: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(obj) + "\n")
        return
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for k, v in obj.items():
        if not isinstance(v, (dict, list)):
            table.add_row(k, f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)


def _model(name: str, device: str | None = None, **kwargs):
    """Load ``name``; on ``device`` when one is given (``auto`` picks the GPU when there is one)."""
    from slimdiff import load
    from slimdiff.utils import resolve_device

    where = None if device is None else resolve_device(device)  # a bad or absent device before any loading
    model = load(name, **kwargs)
    return model if where is None else model.to(where)


def _data(spec: str, m, *, sampler: str = "ddim", steps: int = 50, cfg: float = 1.0, seed: int = 0) -> str:
    """``--data`` for model ``m``: images or prompts encoded with the pipeline it was loaded from
    (a cached latents file; prompts get the model's own samples at this sampler, step count,
    guidance and seed), the shipped data set of its shape for ``auto``, anything else as given."""
    from slimdiff.compression.calibration import resolve_data
    from slimdiff.data.encode import encoded_data
    from slimdiff.diffusion.sampling import sample as run
    from slimdiff.methods.base import fingerprint
    from slimdiff.models.backbone import as_backbone
    from slimdiff.models.registry import pipeline_of

    bb = as_backbone(m)
    generate = lambda cond, start: run(m, sampler=sampler, steps=steps, cond=cond, cfg=cfg, seed=seed + start)  # noqa: E731
    key = f"{fingerprint(m)}:{sampler}:{steps}:{cfg}:{seed}" if spec.startswith("prompts:") else ""
    return resolve_data(encoded_data(spec, pipeline_of(m), bb.sample_size, bb.conditioning == "text", device=bb.device,
                                     generate=generate, generate_key=key), m)


@app.command()
def sample(
    model: str = typer.Option("digits-dit", help=MODEL_HELP),
    sampler: str = typer.Option("ddim", help="ddpm | ddim | dpm | euler (flow models)"),
    steps: int = typer.Option(50, help="sampling steps"),
    cfg: float = typer.Option(1.0, help="classifier-free guidance scale (1 = off; digits-dit is best without)"),
    classes: Optional[str] = typer.Option(None, help="comma-separated class labels, e.g. 0,1,2"),
    prompt: Optional[list[str]] = typer.Option(None, help="caption of a text model's sample, repeatable (one sample "
                                                          "each; one prompt with -n N: N samples of it), encoded with "
                                                          "the pipeline's text encoder"),
    pipeline: Optional[Path] = typer.Option(None, help="diffusers pipeline folder whose VAE decodes the samples and "
                                                       "whose text encoder encodes --prompt (default: the one the "
                                                       "model was loaded from)"),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", help="number of samples"),
    seed: int = typer.Option(0),
    guidance_channels: Optional[int] = typer.Option(
        None, help="guide only the first N output channels; 3 = the official DiT's forward_with_cfg (exact official "
                   "samples/FIDs); default: all channels (diffusers' DiTPipeline)"),
    output: Path = typer.Option(Path("grid.png"), "-o", "--output", help="PNG grid to write"),
    dit_config: Optional[str] = DIT_CONFIG,
    device: str = DEVICE,
) -> None:
    """Sample a grid of images from a model (latents decoded through its pipeline's VAE)."""
    from slimdiff.data.encode import load_encoders
    from slimdiff.diffusion.sampling import sample as run
    from slimdiff.models.backbone import as_backbone, set_null_prompt
    from slimdiff.models.registry import dit_options, pipeline_of
    from slimdiff.utils import save_grid

    labels = _parse_ints(classes, "--classes")
    _check_image_output(output, "-o")
    m = _model(model, device, **dit_options(dit_config, model))
    bb = as_backbone(m)
    folder = pipeline or pipeline_of(m)
    if pipeline is None and folder is not None and not folder.is_dir():
        raise UsageError(f"the pipeline folder {folder} that {model} was loaded from is gone; pass --pipeline DIR")
    enc = load_encoders(folder, bb.device) if folder is not None else None
    cond = _prompts(bb, enc, prompt, num_samples)
    if bb.conditioning == "text" and enc is not None and enc.text_encoder is not None:
        set_null_prompt(m, enc.encode_prompts([""]))  # guidance with this pipeline's empty prompt (no second load)
    x = run(m, sampler=sampler, steps=steps, num_samples=num_samples, classes=labels, cond=cond, cfg=cfg, seed=seed,
            progress=True, guidance_channels=guidance_channels)
    if enc is not None and enc.vae is not None:
        if x.shape[1] != enc.vae.config.latent_channels:
            raise UsageError(f"the model samples {x.shape[1]} channels but the VAE of {folder} decodes "
                             f"{enc.vae.config.latent_channels}: pass the model's own pipeline as --pipeline")
        x = enc.decode(x)
    save_grid(x, output)
    err.print(f"wrote {output} ({len(x)} samples, {sampler} x{steps}, cfg {cfg})")


def _prompts(bb, enc, prompts: list[str] | None, n: int | None):
    """The caption condition of ``sample``: ``prompts`` (one repeated ``n`` times, else one per
    sample; the empty prompt when none) encoded with the pipeline's text encoder; None when the
    model takes no captions or there is no text encoder (random embeddings then)."""
    if prompts and bb.conditioning != "text":
        raise UsageError(f"--prompt is for text models; this {bb.kind} model is {bb.conditioning or 'unconditional'}: "
                         "leave --prompt out")
    if bb.conditioning != "text" or enc is None or enc.text_encoder is None:
        if prompts:
            raise UsageError("--prompt needs the pipeline's text encoder: pass --pipeline DIR, a diffusers pipeline "
                             "folder with text_encoder/ and tokenizer/")
        return None
    texts = list(prompts or [""])
    if len(texts) == 1 and n is not None:
        texts *= n
    if n is not None and n != len(texts):
        raise UsageError(f"-n {n} with {len(texts)} prompts: pass one --prompt per sample, or one --prompt and -n")
    return enc.encode_prompts(texts)


@app.command()
def info(
    model: str = typer.Argument(..., help=MODEL_HELP),
    sampler: str = typer.Option("ddim"),
    steps: int = typer.Option(50),
    cfg: float = typer.Option(1.0, help="guidance scale assumed for sampling MACs"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    dit_config: Optional[str] = DIT_CONFIG,
) -> None:
    """Parameters, MACs per forward and per full sampling run, and per-layer structure."""
    from slimdiff.eval.compute import macs_forward, macs_sampling, params
    from slimdiff.models.backbone import as_backbone
    from slimdiff.models.registry import dit_options
    from slimdiff.result import record_of

    m = _model(model, **dit_options(dit_config, model))
    bb = as_backbone(m)
    out = {
        "model": model,
        "kind": bb.kind,
        "params": params(m),
        "macs_forward": macs_forward(m),
        "macs_sampling": macs_sampling(m, sampler=sampler, steps=steps, cfg=cfg),
        "sampler": sampler,
        "steps": steps,
        "blocks": len(bb.blocks),
    }
    if bb.is_transformer:
        out["structure"] = [{"block": i, "heads": bb.heads(i), "mlp": bb.mlp_width(i)} for i in range(len(bb.blocks))]
    out["method"] = record_of(m).result.method_dict()
    _emit(out, as_json, f"slimdiff info {model}")
    if not as_json and "structure" in out:
        err.print("blocks (heads/mlp): " + " ".join(f"{s['heads']}/{s['mlp']}" for s in out["structure"]))


@app.command()
def train(
    data: str = typer.Option("digits", help="'digits', 'mnist', an image folder, or a .npz/.safetensors latents file"),
    model: str = typer.Option("DiT-T/2", help="a DiT size name (random init) or a model to continue from (a "
                                               "directory or shipped name: it keeps its own size and diffusion config)"),
    input_size: Optional[int] = typer.Option(None, help="image/latent size (default: from --data; digits = 8, mnist = 32)"),
    in_channels: Optional[int] = typer.Option(None, help="channels (default: from --data; digits = 1)"),
    num_classes: Optional[int] = typer.Option(None, help="classes (default: from --data; digits = 10)"),
    learn_sigma: bool = typer.Option(False, help="also predict the variance (official DiT); slimdiff samplers ignore it"),
    objective: str = typer.Option("epsilon", help="epsilon | v_prediction | flow"),
    clip_sample: Optional[bool] = typer.Option(None, help="clip x0 to [-1, 1] when sampling (default: on for pixel data: digits, mnist, image folders)"),
    steps: int = typer.Option(3000, help="optimisation steps"),
    batch_size: int = typer.Option(128, "--batch-size", help="global batch size (split over processes)"),
    lr: float = typer.Option(3e-4),
    warmup: int = typer.Option(100, help="linear warm-up steps"),
    schedule: str = typer.Option("cosine", help="cosine | constant"),
    ema: float = typer.Option(0.999, help="EMA decay (0 = off)"),
    cfg_dropout: float = typer.Option(0.1, help="probability of dropping the class label (for guidance)"),
    checkpoint_every: int = typer.Option(500),
    mixed_precision: str = typer.Option("no", help="no | fp16 | bf16"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("runs/train"), "-o", "--out", help="run directory (checkpoints, final model)"),
    resume: bool = typer.Option(False, help="continue from the run directory's last checkpoint"),
    device: str = DEVICE,
) -> None:
    """Train a diffusion model from scratch (the default teacher: ``--data digits``)."""
    from slimdiff.data.datasets import BUILTIN, get_dataset
    from slimdiff.diffusion.schedulers import DiffusionConfig
    from slimdiff.io import save
    from slimdiff.models.registry import takes_options
    from slimdiff.result import record_of, set_record

    config = dict(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup, lr_schedule=schedule, ema_decay=ema,
                  cfg_dropout=cfg_dropout, checkpoint_every=checkpoint_every, mixed_precision=mixed_precision,
                  seed=seed, device=device)
    _check_training(config)
    probe = get_dataset(data, size=input_size or 8)
    x0, _ = probe[0]
    labels = [int(probe[i][1]) for i in range(min(len(probe), 2000))]
    kwargs = dict(
        input_size=input_size or x0.shape[-1],
        in_channels=in_channels or x0.shape[0],
        num_classes=num_classes or (max(labels) + 1 if min(labels) >= 0 else 1),
        learn_sigma=learn_sigma,
    )
    pixels = data in BUILTIN or Path(data).is_dir()
    diffusion = DiffusionConfig(objective=objective, clip_sample=clip_sample if clip_sample is not None else pixels)
    import torch

    torch.manual_seed(seed)  # the random init is part of the recipe
    fresh = takes_options(model)  # a size name or .pt is built for the data; a saved model is continued as it is
    m = _model(model, device, **(kwargs if fresh else {}))
    record = record_of(m)
    if fresh or record.diffusion is None:
        record.diffusion = diffusion.to_dict()
    else:
        diffusion = DiffusionConfig.from_dict(record.diffusion)
    set_record(m, record)
    m = _run_training(m, data, out, resume, diffusion=diffusion, **config)
    if not _is_main_process():
        return
    recipe = {"data": data, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "schedule": schedule,
              "ema": ema, "cfg_dropout": cfg_dropout, "mixed_precision": mixed_precision, "seed": seed,
              "command": " ".join(sys.argv[1:])}  # the whole recipe: the scratch baseline retrains with it
    path = save(m, out / "model", meta={"training": recipe}, overwrite=True)
    err.print(f"saved {path}")


def _check_training(config: dict) -> None:
    """The training settings, checked before any data or model is loaded."""
    from slimdiff.train.trainer import TrainConfig

    TrainConfig(**config)


def _run_training(m, data: str, out: Path, resume: bool, *, diffusion=None, teacher=None, **config):
    import os
    from contextlib import nullcontext

    from slimdiff.atomic import exclusive
    from slimdiff.data.datasets import get_dataset
    from slimdiff.io import check_output
    from slimdiff.models.backbone import as_backbone
    from slimdiff.train.checkpoint import find_checkpoint
    from slimdiff.train.trainer import TrainConfig, train

    # the first process holds the run directory (the other processes of a multi-process run share it)
    first = os.environ.get("RANK", "0") == "0"
    lock = exclusive(out, f"--out {out}") if first else nullcontext()
    with lock:
        check_output(out / "model")
        if not resume and find_checkpoint(out) is not None:  # starting over would overwrite finished steps
            raise UsageError(f"{out} holds a checkpoint of an earlier run; pass --resume to continue it, "
                             "or choose another --out to start a new run")
        bb = as_backbone(m)
        dataset = get_dataset(data, size=bb.sample_size, channels=bb.in_channels)
        return train(m, dataset, TrainConfig(**config), out, teacher=teacher, resume=resume, diffusion=diffusion)


@app.command()
def finetune(
    model: str = typer.Option(..., help=MODEL_HELP + " (the compressed student)"),
    data: str = typer.Option("auto", help="digits, mnist, an image folder (images:DIR; encoded with a pipeline's VAE), "
                                          "prompts:FILE or a latents file (auto: the shipped data set of the model's "
                                          "image shape)"),
    teacher: Optional[str] = typer.Option(None, help="teacher for distillation (e.g. digits-dit)"),
    kd: str = typer.Option("none", help="none | output | hidden | masked (TinyFusion)"),
    layer_map: Optional[str] = typer.Option(None, help="student:teacher block pairs, e.g. 0:1,1:3"),
    steps: int = typer.Option(500),
    batch_size: int = typer.Option(128, "--batch-size"),
    lr: float = typer.Option(2e-4),
    ema: float = typer.Option(0.999),
    checkpoint_every: int = typer.Option(100),
    mixed_precision: str = typer.Option("no"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("runs/finetune"), "-o", "--out"),
    resume: bool = typer.Option(False),
    dit_config: Optional[str] = DIT_CONFIG,
    device: str = DEVICE,
) -> None:
    """Recovery fine-tuning (diffusion loss) or distillation of a compressed model."""
    from slimdiff.data.encode import data_source
    from slimdiff.io import save
    from slimdiff.models.registry import dit_options

    pairs = None
    if layer_map:
        try:
            pairs = {int(a): int(b) for a, b in (p.split(":") for p in layer_map.split(","))}
        except ValueError:
            raise UsageError(f"--layer-map must look like 0:1,1:3, got {layer_map!r}") from None
    config = dict(steps=steps, batch_size=batch_size, lr=lr, lr_schedule="constant", ema_decay=ema,
                  checkpoint_every=checkpoint_every, mixed_precision=mixed_precision, seed=seed, kd=kd,
                  layer_map=pairs, device=device)
    _check_training(config)
    data_source(data)  # a missing images:/prompts: path before any model loads
    m = _model(model, device, **dit_options(dit_config, model))
    data = _data(data, m, seed=seed)
    t = _model(teacher, device) if teacher else None
    m = _run_training(m, data, out, resume, teacher=t, **config)
    if not _is_main_process():
        return
    path = save(m, out / "model", meta={"finetune": {"data": data, "steps": steps, "kd": kd, "teacher": teacher}},
                overwrite=True)
    err.print(f"saved {path}")


@app.command("eval")
def eval_(
    model: str = typer.Option("digits-dit", help=MODEL_HELP),
    reference: Optional[str] = typer.Option(None, help="reference (teacher) model for SSIM/PSNR and MACs ratio"),
    samples: int = typer.Option(1000, help="number of samples (balanced over classes)"),
    sampler: str = typer.Option("ddim"),
    steps: int = typer.Option(50),
    cfg: float = typer.Option(1.0, help="guidance scale (1 = off; digits-dit is best without)"),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    grid: Optional[Path] = typer.Option(None, help="also write the first 100 samples as a PNG grid"),
    dit_config: Optional[str] = DIT_CONFIG,
    device: str = DEVICE,
) -> None:
    """Quality and compute of a model: FD (and its real-data floor), class accuracy,
    SSIM/PSNR to a reference from the same noise, MACs ratio, parameters."""
    from slimdiff.eval.evaluate import generate, score
    from slimdiff.models.registry import dit_options
    from slimdiff.utils import save_grid

    if grid is not None:
        _check_image_output(grid, "--grid")
    m = _model(model, device, **dit_options(dit_config, model))
    ref = _model(reference, device) if reference else None
    settings = dict(sampler=sampler, steps=steps, cfg=cfg, seed=seed)
    x, y = generate(m, samples, progress=not as_json, **settings)
    if grid is not None:
        save_grid(x[:100], grid, nrow=10)
    out = {"model": model, "reference": reference, **score(m, x, y, ref, progress=not as_json, **settings)}
    _emit(out, as_json, f"slimdiff eval {model}")


@app.command()
def compress(
    method: str = typer.Option(..., help="a method or a chain, e.g. diff-pruning, tinyfusion+dipgo (`,` also joins a "
                                         "chain; see `slimdiff methods`)"),
    model: str = typer.Option("digits-dit", help=MODEL_HELP),
    budget: str = typer.Option("0.5", help="fraction of the original's sampling MACs, in (0, 1]"),
    sampler: str = typer.Option("ddim", help="sampler the budget (and a reuse plan) is made for"),
    steps: int = typer.Option(50, help="sampling steps the budget is made for"),
    cfg: float = typer.Option(1.0, help="guidance scale assumed for the budget"),
    data: str = typer.Option("auto", help="calibration / recovery data: digits, mnist, an image folder (images:DIR; "
                                          "encoded with a pipeline's VAE), prompts:FILE (a text pipeline's own samples "
                                          "of these prompts) or a latents file (auto: the shipped data set of the "
                                          "model's image shape)"),
    recover_steps: int = typer.Option(0, help="recovery fine-tuning steps after compression"),
    kd: str = typer.Option("none", help="recovery loss: none | output | hidden | masked"),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(2e-4, help="recovery learning rate"),
    threshold: Optional[float] = typer.Option(None, help="[diff-pruning] relative-loss threshold (0 = all timesteps)"),
    keep: Optional[str] = typer.Option(None, help="[tinyfusion] N:M group shape(s), e.g. 1:2 or 2:4,1:2"),
    keep_blocks: Optional[str] = typer.Option(None, help="[oracle-depth] indices of the blocks to keep, e.g. 0,2,4"),
    search_steps: Optional[int] = typer.Option(None, help="[tinyfusion] search steps"),
    train_steps: Optional[int] = typer.Option(None, help="[dydit] router training steps"),
    tune: Optional[str] = typer.Option(None, help="[dydit] full | lora"),
    opt_steps: Optional[int] = typer.Option(None, help="[dipgo] pruner optimisation steps"),
    loss: Optional[str] = typer.Option(None, help="[dipgo] consistency loss: ssim | l1 | l2"),
    step_gates: Optional[bool] = typer.Option(None, "--step-gates/--no-step-gates",
                                              help="[dipgo] also learn whole-step reuse (beyond the paper)"),
    option: Optional[list[str]] = typer.Option(None, help="method option NAME=VALUE, repeatable (every option of "
                                                          "every method: `slimdiff methods`); the [method] flags "
                                                          "above are aliases"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(..., "-o", "--out", help="result directory"),
    overwrite: bool = typer.Option(False, help="replace an existing, different result in --out"),
    export_diffusers: Optional[Path] = typer.Option(
        None, help="also write a diffusers save_pretrained copy here (when the result fits a diffusers config: "
                   "depth pruning; refused up front for width, reuse and dynamic methods, whose result "
                   "slimdiff.apply(pipe, OUT) installs in a pipeline and slimdiff.save_pipeline saves)"),
    dit_config: Optional[str] = DIT_CONFIG,
    device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Compress a model to a compute budget with one method or a chain, and save the result."""
    import shutil

    from slimdiff.atomic import exclusive
    from slimdiff.budget import check_budget
    from slimdiff.data.encode import data_source
    from slimdiff.diffusion.sampling import check_steps
    from slimdiff.eval.compute import params
    from slimdiff.io import check_output, save
    from slimdiff.methods.base import Context, plan_chain
    from slimdiff.models.registry import dit_options
    from slimdiff.result import record_of
    from slimdiff.methods.base import compress as run
    from slimdiff.utils import resolve_device

    b = check_budget(budget)
    flags = dict(threshold=threshold, keep=keep, keep_blocks=keep_blocks, search_steps=search_steps, train_steps=train_steps, tune=tune,
                 opt_steps=opt_steps, loss=loss, step_gates=step_gates)
    settings = _merge_options({k: v for k, v in flags.items() if v is not None}, _parse_options(option))
    # every check that needs no model comes first: nothing is loaded or written before them
    work = out.parent / f".{out.name}.work"
    ctx = Context(sampler=sampler, steps=steps, cfg=cfg, data=data, seed=seed, recover_steps=recover_steps, kd=kd,
                  batch_size=batch_size, lr=lr, work_dir=work, progress=not as_json)
    chain = plan_chain(method, settings, recover_steps)  # names, which methods compose, options and their values
    runtime = [spec.name for spec, _ in chain if spec.kind in ("dynamic", "reuse")]
    if export_diffusers is not None and runtime:  # a diffusers folder would hold the weights without the runtime
        raise UsageError(f"--export-diffusers cannot carry {', '.join(runtime)}'s runtime (reuse plan or routers) in "
                         f"a diffusers folder: drop it and install the result in your pipeline with "
                         f"slimdiff.apply(pipe, \"{out}\"){SAVE_PIPELINE}")
    width = [spec.name for spec, _ in chain if spec.kind == "width"]
    if export_diffusers is not None and width:  # per-layer widths do not fit a diffusers config
        raise UsageError(f"--export-diffusers cannot write {', '.join(width)}'s per-layer widths in a diffusers "
                         f"config: drop it and install the result in your pipeline with "
                         f"slimdiff.apply(pipe, \"{out}\") (the slimdiff directory keeps every width){SAVE_PIPELINE}")
    model_options = dit_options(dit_config, model)
    data_source(data)  # a missing images:/prompts: path
    resolve_device(device)
    _check_not_input(out, model)
    check_output(out)  # an output that cannot take the result
    with exclusive(out, f"--out {out}"):  # a second run into --out is refused
        m = _model(model, device, **model_options)
        check_steps(m, steps)  # the one check that needs the model's schedule
        ctx.data = _data(data, m, sampler=sampler, steps=steps, cfg=cfg, seed=seed)
        result = run(m, method, b, ctx, settings)
        path = save(result, out, overwrite=overwrite)
        shutil.rmtree(work, ignore_errors=True)  # resumable work is only needed until the result is saved
    if export_diffusers is not None:
        from slimdiff.io import export_diffusers as export

        try:
            export(result, export_diffusers)
        except UsageError as e:
            raise UsageError(f"{e} (the slimdiff result is saved in {path})") from None
    measured = record_of(result).result.measured
    _emit({"method": method, "model": model, "budget": b, "macs_ratio": measured["macs_ratio"],
           "macs_sampling": measured["macs_sampling"], "params": params(result),
           "original_params": params(m), "params_ratio": params(result) / max(params(m), 1), "output": str(path),
           **({"diffusers": str(export_diffusers)} if export_diffusers is not None else {})}, as_json,
          f"slimdiff compress {method}")


def _check_not_input(out: Path, model: str) -> None:
    """``--out`` must not be the model directory the result is made from (the result would replace it)."""
    source = Path(model).expanduser()
    if source.is_dir() and source.resolve() == out.expanduser().resolve():
        raise UsageError(f"--out {out} is the input model directory; the result would replace the model it is "
                         "made from: choose another --out")


@app.command("bench-speed")
def bench_speed(
    models: Optional[str] = typer.Option(None, help="comma-separated: DiT size names (DiT-S/2, DiT-B/2, ...), "
                                                    "UNet-CIFAR10, UNet-tiny (default DiT-S/2,DiT-B/2,UNet-CIFAR10)"),
    methods: Optional[str] = typer.Option(None, help="comma-separated subset of diff-pruning,tinyfusion,dydit,dipgo"),
    repeats: int = typer.Option(7, help="interleaved timing rounds (medians are reported)"),
    warmup: int = typer.Option(2, help="untimed calls of each model first"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N (the protocol times CPU by default)"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    batch: int = typer.Option(8, help="batch size of the timed calls"),
    budget: float = typer.Option(0.5, help="fraction of the teacher's MACs each method is compressed to"),
    steps: int = typer.Option(5, help="DDIM steps of the timed sampling runs (DyDiT, DiP-GO)"),
    latent_size: int = typer.Option(32, help="DiT latent size (4 x S x S)"),
    residual_width: bool = typer.Option(False, help="Diff-Pruning's residual_width option on DiTs (the hidden size "
                                                    "shrinks too; UNets are pruned as usual)"),
    output: Path = typer.Option(Path("bench/speed"), "-o", "--output", help="folder for results.json and report.md"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Realised vs theoretical speedup of every method (BENCHMARK.md section 2)."""
    from slimdiff.eval.speed import DEFAULT_MODELS, METHODS, SpeedSettings, run_speed, write_outputs

    split = lambda text, default: tuple(v.strip() for v in text.split(",") if v.strip()) if text else default  # noqa: E731
    settings = SpeedSettings(models=split(models, DEFAULT_MODELS), methods=split(methods, METHODS), repeats=repeats,
                             warmup=warmup, device=device, dtype=dtype, batch=batch, budget=budget, steps=steps,
                             latent_size=latent_size, residual_width=residual_width)
    res = run_speed(settings, log=lambda line: err.print(line, highlight=False, markup=False))
    paths = write_outputs(res, output)
    if as_json:
        sys.stdout.write(json.dumps({"output": str(output), "summary": res["summary"], "entries": [
            {k: e[k] for k in ("model", "method", "theoretical_speedup", "measured_speedup", "realisation", "target",
                               "met")} for e in res["entries"]]}) + "\n")
    else:
        err.print(f"wrote {', '.join(map(str, paths))}: {res['summary']['met']} of {res['summary']['entries']} "
                  "entries meet their realisation target")


@app.command("methods")
def methods_(as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """List the compression methods and baselines with their options (types, defaults, help)."""
    from dataclasses import asdict

    from slimdiff.methods import registry

    if as_json:
        sys.stdout.write(json.dumps({name: {"kind": spec.kind, "help": spec.help,
                                            "options": [asdict(o) for o in spec.option_info()]}
                                     for name, spec in sorted(registry().items())}, default=str) + "\n")
        return

    console = Console(soft_wrap=True, highlight=False)
    for name, spec in sorted(registry().items()):
        console.print(f"{name:20s} [{spec.kind}] {spec.help}", markup=False)
        for o in spec.option_info():  # compress / bench: --option NAME=VALUE
            allowed = f" [{o.allowed}]" if o.allowed else ""
            console.print(f"{'':22s}--option {o.name}={o.default!s} ({o.type}{allowed}) {o.help}".rstrip(), markup=False)


def _parse_options(items: list[str] | None) -> dict:
    """``KEY=VALUE`` pairs (values as int, float or text) for method options."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option must look like NAME=VALUE (e.g. train_steps=100), got {item!r}")
        for cast in (int, float):
            try:
                out[key.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = value
    return out


def _merge_options(flags: dict, options: dict) -> dict:
    """The per-method flags (aliases) and ``--option`` pairs as one settings dict; one name set
    two ways is an error, not a silent choice."""
    twice = sorted(set(flags) & set(options))
    if twice:
        raise UsageError(f"{', '.join(twice)} given both as a flag and as --option; pass it once")
    return {**flags, **options}


def _bench_table(results: dict, as_json: bool, out: Path) -> None:
    from slimdiff.bench import summary_rows

    rows = summary_rows(results)
    if as_json:
        sys.stdout.write(json.dumps({"output": str(out), "rows": rows}) + "\n")
        return
    from rich.table import Table

    table = Table(title=f"slimdiff bench ({results['config']['model']})")
    table.add_column("entry", no_wrap=True)
    for col in ("MACs ratio", "FD", "class acc", "SSIM", "wall ratio", "compress CPU-s"):
        table.add_column(col)
    for r in sorted(rows, key=lambda r: (r.get("fd") is None, r.get("fd") or 0)):
        cells = [r.get(k) for k in ("macs_ratio", "fd", "class_acc", "ssim", "wall_ratio", "compress_cpu_s")]
        table.add_row(r["entry"], *("-" if v is None else f"{v:.3g}" for v in cells))
    Console().print(table)
    err.print(f"report: {out / 'report.md'}  (results.json, pareto.png, samples.png, pictures/)")


BENCH_OUT = typer.Option(Path("runs/bench"), "-o", "--out", help="bench directory (rerun to resume)")


@app.command()
def bench(
    model: str = typer.Option("digits-dit", help=MODEL_HELP),
    budgets: str = typer.Option("0.5,0.25", help="comma-separated budgets (fractions of the teacher's sampling MACs)"),
    methods: Optional[str] = typer.Option(None, help="comma-separated methods; join a chain with '+', e.g. "
                                                     "diff-pruning,tinyfusion+dipgo (default: all, and tinyfusion+dipgo)"),
    samples: int = typer.Option(2000, help="samples per model (balanced over classes)"),
    sampler: str = typer.Option("ddim"),
    steps: int = typer.Option(50),
    cfg: float = typer.Option(1.0, help="guidance scale (1 = off)"),
    recover_steps: int = typer.Option(300, help="recovery steps, the same for every weight-changing method"),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(2e-4, help="recovery learning rate"),
    kd: str = typer.Option("none", help="recovery loss: none | output | hidden | masked"),
    option: Optional[list[str]] = typer.Option(None, help="method option NAME=VALUE, repeatable (e.g. opt_steps=30)"),
    seed: int = typer.Option(0),
    seeds: int = typer.Option(5, help="score every entry on this many seeds (noise and labels), paired with the "
                                      "teacher's samples of the same seed; verdicts need the interval to exclude 0"),
    long_recover_steps: Optional[int] = typer.Option(None, help="also run every static (width/depth/dynamic) entry "
                                                                "with this recovery length (about 10x --recover-steps)"),
    pair: Optional[list[str]] = typer.Option(None, help="an extra verdict pair of entry keys A@0.5:B@0.5, repeatable"),
    sample_cache: Optional[Path] = typer.Option(None, help="folder where the teacher's sample sets are kept across "
                                                           "bench directories (default: the output folder)"),
    out: Path = BENCH_OUT,
    device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Every method and baseline at every budget, same recovery, sampler, seeds and labels;
    writes results.json, report.md and plots (an interrupted run resumes)."""
    from slimdiff.bench import BenchConfig, run_bench
    from slimdiff.methods.base import Context

    # the settings every entry shares, checked before any work (BenchConfig checks the rest)
    Context(sampler=sampler, steps=steps, cfg=cfg, seed=seed, recover_steps=recover_steps, kd=kd,
            batch_size=batch_size, lr=lr)
    config = BenchConfig(model=model, budgets=[b for b in budgets.split(",") if b.strip()],
                         methods=[m.strip() for m in methods.split(",") if m.strip()] if methods else None,
                         samples=samples, sampler=sampler, steps=steps, cfg=cfg, recover_steps=recover_steps,
                         batch_size=batch_size, lr=lr, kd=kd, options=_parse_options(option), seed=seed,
                         seeds=seeds, long_recover_steps=long_recover_steps, pairs=list(pair or []),
                         progress=not as_json, device=device)
    _bench_table(run_bench(config, out, sample_cache=sample_cache), as_json, out)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "-o", "--out", help="demo directory (rerun to resume)"),
    samples: int = typer.Option(500, help="samples per model"),
    recover_steps: int = typer.Option(50, help="recovery steps per method"),
    device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """The four methods once at budget 0.5 on the shipped digits-dit (a reduced bench, ~15 min on 2 CPU cores)."""
    from slimdiff.bench import demo_config, run_bench

    _bench_table(run_bench(demo_config(samples=samples, recover_steps=recover_steps, progress=not as_json,
                                       device=device), out),
                 as_json, out)


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def main() -> None:
    """Console-script entry point: one-line errors, exit code 2 for usage errors (ours and
    click's: a bad or missing option), exit code 1 for a run that diverged."""
    from slimdiff.train.trainer import TrainingDiverged

    try:
        code = app(standalone_mode=False)
    except UsageError as e:
        _fail(str(e))
    except typer.TyperException as e:  # typer's (vendored click) parse errors: exit code 2 = usage
        if e.exit_code != 2 or type(e).__name__ == "NoArgsIsHelpError":
            e.show()  # help for a bare `slimdiff`, click's own text for anything else
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        _fail(f"{e.format_message().rstrip('.')}; see `{ctx.command_path if ctx is not None else 'slimdiff'} --help`")
    except typer.Abort:
        sys.exit(1)
    except TrainingDiverged as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True, markup=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
