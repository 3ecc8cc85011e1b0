"""The speed bench (BENCHMARK.md section 2): realised vs theoretical speedup of every method.

One bench for every method, so each speedup is measured the same way:

* **Models**: random-init DiT-S/2 and DiT-B/2 on 32x32x4 latents (our DiT) and a UNet2DModel
  of google/ddpm-cifar10-32's shape; batch 8. DiT's zero-initialised adaLN and output layers
  get small random weights first, so every block does real work (values do not change the
  cost of a matmul, but a degenerate model could hide data-dependent costs such as routing).
* **Students** at ``budget`` (default 0.5) built with the methods' own code: Diff-Pruning's
  budget search and pruner (calibrated on seeded random latents); TinyFusion's depth for the
  budget and its ``finish_depth`` (the search only decides *which* blocks stay, which does
  not change the cost); DyDiT's routers with seeded random weights, then the method itself
  with ``train_steps=0`` (bias calibration to the budget over the sampling run, per-step
  tables); DiP-GO's post-processing (:func:`slimdiff.methods.dipgo.threshold_plan`) of
  seeded random reuse scores and its ``finish`` (the runtime's cost does not depend on how
  the plan was learned).
* **What is timed**: static students (Diff-Pruning, TinyFusion) one forward of the batch;
  step-dependent ones (DyDiT's per-step widths, DiP-GO's per-step reuse) one short DDIM
  sampling run (``steps``, default 5) of the batch, since their savings exist per run. The
  teacher is timed on the same call.
* **Theoretical speedup** = teacher MACs / student MACs of *exactly the calls timed*
  (:func:`slimdiff.eval.compute.count_macs`, attention included). **Measured speedup** =
  teacher median / student median from :func:`slimdiff.eval.compute.latency_ratio` (warm-up,
  then interleaved rounds in one process; the teacher and every student of one model and
  call kind share the rounds). **Realisation** = measured / theoretical, checked against
  :data:`TARGETS`. The median of per-round ratios is recorded too (robust to slow drifts).
* On CUDA every timed call ends with ``torch.cuda.synchronize()`` (kernels are asynchronous;
  :func:`slimdiff.eval.compute.latency_ratio` does it).

``run_speed`` returns the results dict; ``write_outputs`` writes ``results.json`` and
``report.md``. The CLI is ``slimdiff bench-speed``.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from slimdiff.errors import UsageError
from slimdiff.utils import resolve_device

TARGETS: dict[str, float] = {"diff-pruning": 0.90, "tinyfusion": 0.90, "dydit": 0.85, "dipgo": 0.90}
"""Least realisation (measured / theoretical speedup) each method must reach (issue 9)."""
METHODS = tuple(TARGETS)
DEFAULT_MODELS = ("DiT-S/2", "DiT-B/2", "UNet-CIFAR10")
UNETS = ("UNet-CIFAR10", "UNet-tiny")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNIT = {"diff-pruning": "forward", "tinyfusion": "forward", "dydit": "sampling", "dipgo": "sampling"}
"""What is timed per method: one forward, or one sampling run (per-step runtimes)."""


@dataclass
class SpeedSettings:
    """Everything that defines one bench run (stored in results.json)."""

    models: tuple[str, ...] = DEFAULT_MODELS
    methods: tuple[str, ...] = METHODS
    budget: float = 0.5
    batch: int = 8
    repeats: int = 7
    warmup: int = 2
    steps: int = 5  # DDIM steps of the timed sampling runs (DyDiT, DiP-GO)
    device: str = "cpu"
    dtype: str = "float32"
    latent_size: int = 32  # DiT input size (latents 4 x latent_size x latent_size)
    seed: int = 0
    threshold: float = 0.05  # Diff-Pruning's loss threshold
    stride: int = 250  # Diff-Pruning's timestep stride (4 timesteps: a speed bench needs the shape only)
    calibration_batch: int = 4  # Diff-Pruning's calibration batch
    heads: str = "dims"  # Diff-Pruning's head mode ("dims" narrows heads, "whole" removes heads)

    def validate(self) -> "SpeedSettings":
        """Clear errors for bad values (the CLI passes user input straight here)."""
        bad = [m for m in self.methods if m not in TARGETS]
        if bad:
            raise UsageError(f"unknown method(s) {', '.join(bad)} for bench-speed; choose from {', '.join(METHODS)}")
        for m in self.models:
            model_kind(m)
        if self.dtype not in DTYPES:
            raise UsageError(f"unknown --dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        self.device = str(resolve_device(self.device))
        if self.batch < 1 or self.repeats < 1 or self.warmup < 0 or self.steps < 2:
            raise UsageError(f"need --batch >= 1, --repeats >= 1, warmup >= 0 and steps >= 2 (got batch {self.batch}, "
                             f"repeats {self.repeats}, warmup {self.warmup}, steps {self.steps})")
        if not 0 < self.budget < 1:
            raise UsageError(f"budget must be in (0, 1), got {self.budget}")
        return self


# --------------------------------------------------------------------------- models
def model_kind(name: str) -> str:
    """"dit" or "unet" for a bench model name, else :class:`UsageError`."""
    from slimdiff.models.dit import DiT_models

    if name in UNETS:
        return "unet"
    if name in DiT_models:
        return "dit"
    raise UsageError(f"unknown bench model {name!r}; use a DiT size name (DiT-S/2, DiT-B/2, ...) or one of "
                     f"{', '.join(UNETS)}")


def ddpm_cifar10_unet() -> nn.Module:
    """google/ddpm-cifar10-32's UNet2DModel shape (35.7M parameters), random init."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=32, attention_head_dim=None)


def tiny_unet() -> nn.Module:
    """A small UNet2DModel (16x16x3) for tests."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)


@torch.no_grad()
def wake_zero_init_(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Give every all-zero weight matrix (DiT's adaLN-Zero and output layers) N(0, std^2)
    entries, so every block contributes to the output. Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.ndim >= 2 and not p.any():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def build_model(name: str, latent_size: int = 32, seed: int = 0) -> nn.Module:
    """A random-init bench model in eval mode, fp32 on the CPU."""
    import slimdiff

    torch.manual_seed(seed)
    if model_kind(name) == "unet":
        model = ddpm_cifar10_unet() if name == "UNet-CIFAR10" else tiny_unet()
    else:
        model = slimdiff.load(name, input_size=latent_size, in_channels=4)
    return wake_zero_init_(model, seed).eval()


def applicable(method: str, model: nn.Module) -> bool:
    """Whether ``method`` applies to ``model`` (TinyFusion and DyDiT need a transformer / our DiT)."""
    from slimdiff.models.backbone import as_backbone

    kind = as_backbone(model).kind
    if method == "tinyfusion":
        return as_backbone(model).is_transformer
    if method == "dydit":
        return kind in ("dit", "diffusers-dit")
    return True


# --------------------------------------------------------------------------- students
def _ctx(s: SpeedSettings):
    from slimdiff.methods.base import Context

    return Context(sampler="ddim", steps=s.steps, cfg=1.0, seed=s.seed, batch_size=s.calibration_batch,
                   progress=False, recover_steps=0)


def _diff_pruning(model: nn.Module, s: SpeedSettings) -> nn.Module:
    from slimdiff.methods.diff_pruning import diff_pruning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random calibration latents are intended for a speed bench
        return diff_pruning(model, s.budget, _ctx(s), s.threshold, stride=s.stride, heads=s.heads)


def _tinyfusion(model: nn.Module, s: SpeedSettings) -> nn.Module:
    from slimdiff.methods.tinyfusion import finish_depth, group_options, resolve_depth

    ctx = _ctx(s)
    groups, chosen = resolve_depth(model, s.budget, ctx, None)
    kept = [g.start + int(i) for g in groups for i in torch.nonzero(group_options(g.n, g.m)[0]).flatten()]
    return finish_depth(model, kept, ctx, "tinyfusion", {**chosen, "searched": False, "note": "first option per group"},
                        {"searched": False})


@torch.no_grad()
def _randomize_routers(routing, seed: int) -> None:
    """Seeded random DyDiT router weights (trained routers differ per timestep and token)."""
    g = torch.Generator().manual_seed(seed)
    for r in routing.routers:
        for lin in (r.head, r.group, r.token):
            if lin is not None:
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 4 / lin.in_features**0.5)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))


def _dydit(model: nn.Module, s: SpeedSettings) -> nn.Module:
    from slimdiff.methods.dydit import DyDiTConfig, as_dit, dydit
    from slimdiff.runtime.dynamic import default_config, install

    model = as_dit(model)
    _randomize_routers(install(model, default_config(model)), s.seed)
    cfg = DyDiTConfig(train_steps=0, calibrate_samples=min(s.batch, 2), calibrate_iters=10)
    return dydit(model, s.budget, _ctx(s), config=cfg)


def _dipgo(model: nn.Module, s: SpeedSettings) -> nn.Module:
    from slimdiff.methods.dipgo import finish, prepare, threshold_plan
    from slimdiff.runtime.reuse import ReusePlan

    ctx = _ctx(s)
    costs = prepare(model, s.budget, ctx)
    n_calls = len(ReusePlan.full(ctx.sampler, ctx.steps, model).timesteps)
    scores = torch.rand(n_calls, len(costs.blocks), generator=torch.Generator().manual_seed(s.seed))
    compute = threshold_plan(scores, costs, s.budget)
    return finish(model, "dipgo", compute, ctx, costs, {"scores": "seeded random", "budget": s.budget}, {})


BUILDERS: dict[str, Callable[[nn.Module, SpeedSettings], nn.Module]] = {
    "diff-pruning": _diff_pruning, "tinyfusion": _tinyfusion, "dydit": _dydit, "dipgo": _dipgo}


def make_student(model: nn.Module, method: str, s: SpeedSettings) -> tuple[nn.Module, float]:
    """``method`` applied at ``s.budget`` to a copy of ``model``; returns it and the wall seconds."""
    start = time.perf_counter()
    student = BUILDERS[method](copy.deepcopy(model), s)
    return student.eval(), time.perf_counter() - start


# --------------------------------------------------------------------------- calls
def make_call(model: nn.Module, unit: str, s: SpeedSettings) -> Callable[[], Any]:
    """The zero-argument call that is timed and counted: one forward or one sampling run."""
    from slimdiff.diffusion.sampling import sample
    from slimdiff.models.backbone import as_backbone

    bb = as_backbone(model)
    if unit == "forward":
        x, t, c = bb.example_inputs(s.batch, torch.Generator().manual_seed(s.seed + 1))

        @torch.no_grad()
        def forward() -> torch.Tensor:
            return bb(x, t, c)

        return forward
    return lambda: sample(model, sampler="ddim", steps=s.steps, num_samples=s.batch, seed=s.seed + 1)


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` in ``dtype`` (untouched when it already is: diffusers warns on every cast)."""
    return model if next(model.parameters()).dtype == dtype else model.to(dtype=dtype)


def _paired_speedup(teacher: list[float], student: list[float]) -> float:
    """Median over rounds of teacher time / student time (same round: same machine state)."""
    return statistics.median(a / b for a, b in zip(teacher, student))


def _runtime_note(student: nn.Module, device: torch.device) -> dict | None:
    """How a DyDiT student found its kept tokens (capacity path or nonzero), and how many of its
    calls since it was built (calibration and warm-up included) overflowed and were recomputed."""
    routing = getattr(student, "dydit", None)
    if routing is None:
        return None
    return {"token_capacity": routing.token_capacity, "capacity_path": routing.capacity_on(device),
            "recomputed_calls": routing.recomputed}


def bench_model(name: str, s: SpeedSettings, log: Callable[[str], None] = print) -> list[dict]:
    """Every applicable method on model ``name``: one entry per method."""
    from slimdiff.eval.compute import count_macs, latency_ratio, params

    device, dtype = torch.device(s.device), DTYPES[s.dtype]
    teacher = build_model(name, s.latent_size, s.seed).to(device)
    students: dict[str, tuple[nn.Module, float]] = {}
    for method in s.methods:
        if applicable(method, teacher):
            log(f"{name}: building {method} at budget {s.budget}")
            students[method] = make_student(teacher, method, s)
    teacher = _cast(teacher, dtype)
    entries = []
    for unit in ("forward", "sampling"):
        group = [m for m in students if UNIT[m] == unit]
        if not group:
            continue
        calls = {"teacher": make_call(teacher, unit, s)}
        for m in group:
            calls[m] = make_call(_cast(students[m][0], dtype), unit, s)
        macs = {k: count_macs(fn) for k, fn in calls.items()}
        log(f"{name}: timing {unit} of teacher + {', '.join(group)} ({s.warmup} warm-up, {s.repeats} rounds)")
        lat = latency_ratio(calls, "teacher", warmup=s.warmup, repeats=s.repeats)
        for m in group:
            student, build_s = students[m]
            theoretical = macs["teacher"] / macs[m]
            measured = 1 / lat[m]["ratio"]
            realisation = measured / theoretical
            chain = (getattr(student, "slimdiff_meta", None) or {}).get("method", {}).get("chain", [{}])
            entries.append({
                "model": name, "method": m, "unit": unit, "budget": s.budget,
                "call": f"one forward, batch {s.batch}" if unit == "forward"
                else f"one DDIM sampling run, {s.steps} steps, batch {s.batch}",
                "macs_teacher": macs["teacher"], "macs_student": macs[m], "macs_ratio": macs[m] / macs["teacher"],
                "theoretical_speedup": theoretical, "measured_speedup": measured, "realisation": realisation,
                "measured_speedup_paired": _paired_speedup(lat["teacher"]["times_s"], lat[m]["times_s"]),
                "measured_speedup_min": min(lat["teacher"]["times_s"]) / min(lat[m]["times_s"]),
                "target": TARGETS[m], "met": realisation >= TARGETS[m],
                "teacher_median_s": lat["teacher"]["median_s"], "student_median_s": lat[m]["median_s"],
                "teacher_times_s": lat["teacher"]["times_s"], "student_times_s": lat[m]["times_s"],
                "params_teacher": params(teacher), "params_student": params(student), "build_s": build_s,
                "method_measured": chain[-1].get("measured") if chain else None,
                "runtime": _runtime_note(student, device),
            })
            log(f"  {m:13s} theoretical x{theoretical:.3f}  measured x{measured:.3f}  realisation {realisation:.3f}  "
                f"target {TARGETS[m]:.2f} {'met' if realisation >= TARGETS[m] else 'NOT MET'}")
    return entries


# --------------------------------------------------------------------------- environment and outputs
def git_commit(root: Path | None = None) -> str | None:
    """The checked-out commit (None outside a git work tree)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or Path(__file__).resolve().parents[2],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: str = "cpu") -> dict:
    """Library versions, machine, threads and commit (for results.json)."""
    import diffusers
    import torch_pruning

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "torch_pruning": torch_pruning.__version__,
           "python": platform.python_version(), "platform": platform.platform(),
           "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "git_commit": git_commit()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def run_speed(settings: SpeedSettings, log: Callable[[str], None] = print) -> dict:
    """Run the bench; returns ``{"settings", "environment", "entries", "summary", ...}``."""
    s = settings.validate()
    start = time.time()
    res: dict[str, Any] = {"settings": asdict(s), "targets": dict(TARGETS), "environment": environment(s.device),
                           "load_average_start": list(os.getloadavg())}
    entries: list[dict] = []
    for name in s.models:
        entries += bench_model(name, s, log)
    res["entries"] = entries
    res["load_average_end"] = list(os.getloadavg())
    res["wall_s"] = time.time() - start
    res["summary"] = {"entries": len(entries), "met": sum(e["met"] for e in entries),
                      "all_met": all(e["met"] for e in entries),
                      "not_met": [f"{e['model']} {e['method']}" for e in entries if not e["met"]]}
    return res


def entries_table(entries: list[dict]) -> list[str]:
    """Markdown table rows of bench entries (also used by the per-method scripts' reports)."""
    lines = ["| model | method | timed call | MACs ratio | theoretical | measured | paired | fastest | realisation | "
             "target | |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['model']} | {e['method']} | {e['call']} | {e['macs_ratio']:.3f} | "
                     f"x{e['theoretical_speedup']:.3f} | x{e['measured_speedup']:.3f} | "
                     f"x{e['measured_speedup_paired']:.3f} | x{e['measured_speedup_min']:.3f} | "
                     f"**{e['realisation']:.3f}** | {e['target']:.2f} | "
                     f"{'met' if e['met'] else 'NOT MET'} |")
    return lines


def report_markdown(res: dict) -> str:
    """``report.md``: the table of results.json (every number comes from there)."""
    s, env = res["settings"], res["environment"]
    where = env.get("gpu") or f"CPU ({env['processor']}, {env['torch_threads']} torch thread(s))"
    lines = ["# Speed: realised vs theoretical speedup", "",
             f"Written by `slimdiff bench-speed` at commit `{(env.get('git_commit') or 'unknown')[:12]}`; numbers "
             "from results.json.", "",
             f"Budget {s['budget']}, batch {s['batch']}, {s['dtype']} on {where}; {s['warmup']} warm-up call(s), "
             f"{s['repeats']} interleaved rounds, medians. Load average {res['load_average_start'][0]:.2f} at the "
             f"start, {res['load_average_end'][0]:.2f} at the end. torch {env['torch']}, diffusers {env['diffusers']}.",
             "", "Theoretical = teacher MACs / student MACs of the timed call; measured = teacher median / student "
             "median; realisation = measured / theoretical (the target applies to it). For reading the noise of a "
             "shared machine: paired = median of per-round ratios, fastest = ratio of the fastest calls.", ""]
    lines += entries_table(res["entries"])
    if env.get("gpu"):
        lines += ["", "Absolute medians on the GPU:", "", "| model | method | teacher s | student s |", "|---|---|---|---|"]
        lines += [f"| {e['model']} | {e['method']} | {e['teacher_median_s']:.4f} | {e['student_median_s']:.4f} |"
                  for e in res["entries"]]
    sm = res["summary"]
    lines += ["", f"{sm['met']} of {sm['entries']} entries meet their target"
              + (f"; not met: {', '.join(sm['not_met'])}." if sm["not_met"] else "."), ""]
    return "\n".join(lines)


def write_outputs(res: dict, out: Path) -> list[Path]:
    """Write ``results.json`` and ``report.md`` into ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "report.md"]
    paths[0].write_text(json.dumps(res, indent=2, default=float) + "\n")
    paths[1].write_text(report_markdown(res))
    return paths


def method_speed(method: str, quick: bool = False, **overrides) -> dict:
    """The speed section of one method's measurement script: this bench restricted to
    ``method`` (``quick``: DiT-S/2 on 16x16 latents, 2 repeats, batch 2)."""
    base = dict(methods=(method,))
    if quick:
        base.update(models=("DiT-S/2",), latent_size=16, repeats=2, warmup=1, batch=2, steps=3)
    res = run_speed(SpeedSettings(**{**base, **overrides}))
    return {"note": "from slimdiff.eval.speed (same as `slimdiff bench-speed`)", **res}


__all__ = ["SpeedSettings", "TARGETS", "METHODS", "run_speed", "bench_model", "make_student", "make_call",
           "build_model", "entries_table", "report_markdown", "write_outputs", "method_speed", "environment"]
