"""The speed bench (BENCHMARK.md section 2): realised vs theoretical speedup of every method.

One bench for every method, so each speedup is measured the same way:

* **Models**: random-init DiT-S/2 and DiT-B/2 on 32x32x4 latents (our DiT) and a UNet2DModel
  of google/ddpm-cifar10-32's shape (:func:`slimdiff.eval.models.build_model`); batch 8. DiT's
  zero-initialised adaLN and output layers get small random weights first, so every block
  does real work (values do not change the cost of a matmul, but a degenerate model could
  hide data-dependent costs such as routing).
* **Methods**: every registered method whose :class:`~slimdiff.methods.spec.MethodSpec` has a
  ``speed_student`` (:func:`speed_methods`; ``METHODS`` is that tuple, computed on first use).
  Each builds its student at ``budget`` (default 0.5) with the method's own code: Diff-Pruning's
  budget search and pruner (calibrated on seeded random latents); TinyFusion's depth for the
  budget and its ``finish_depth`` (the search only decides *which* blocks stay, which does
  not change the cost); DyDiT's routers with seeded random weights, then the method itself
  with ``train_steps=0`` (bias calibration to the budget over the sampling run, per-step
  tables); DiP-GO's post-processing of seeded random reuse scores and its ``finish`` (the
  runtime's cost does not depend on how the plan was learned). A method that does not apply
  to a model (TinyFusion and DyDiT need a transformer) is skipped there.
* **What is timed** (:data:`UNIT`, by the method's kind): static students (depth and width:
  Diff-Pruning, TinyFusion) one forward of the batch; step-dependent ones (dynamic and reuse:
  DyDiT's per-step widths, DiP-GO's per-step reuse) one short DDIM
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
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from slimdiff.errors import UsageError
from slimdiff.eval.models import build_model, model_kind
from slimdiff.utils import resolve_device

TARGETS: dict[str, float] = {"diff-pruning": 0.90, "tinyfusion": 0.90, "dydit": 0.85, "dipgo": 0.90}
"""Least realisation (measured / theoretical speedup) each method must reach (issue 9)."""
DEFAULT_TARGET = 0.90
"""The target of a method with a speed student but no entry in :data:`TARGETS` (yours)."""
DEFAULT_MODELS = ("DiT-S/2", "DiT-B/2", "UNet-CIFAR10")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNIT = {"depth": "forward", "width": "forward", "dynamic": "sampling", "reuse": "sampling"}
"""What is timed per method kind: one forward (static students), or one sampling run (per-step runtimes)."""


@dataclass
class SpeedSettings:
    """Everything that defines one bench run (stored in results.json)."""

    models: tuple[str, ...] = DEFAULT_MODELS
    methods: tuple[str, ...] = field(default_factory=lambda: speed_methods())
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
    residual_width: bool = False  # Diff-Pruning's residual_width option (DiT: the hidden size shrinks too)

    def context(self):
        """The compression :class:`~slimdiff.methods.base.Context` every speed student is built
        under (DDIM at ``steps``, no guidance, no recovery, Diff-Pruning's calibration batch)."""
        from slimdiff.methods.base import Context

        return Context(sampler="ddim", steps=self.steps, cfg=1.0, seed=self.seed, batch_size=self.calibration_batch,
                       progress=False, recover_steps=0)

    def validate(self) -> "SpeedSettings":
        """Clear errors for bad values (the CLI passes user input straight here)."""
        known = speed_methods()
        bad = [m for m in self.methods if m not in known]
        if bad:
            raise UsageError(f"unknown method(s) {', '.join(bad)} for bench-speed; choose from {', '.join(known)}")
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


# --------------------------------------------------------------------------- methods and students
def speed_methods() -> tuple[str, ...]:
    """Every registered method with a ``speed_student``, in registration order (the built-in
    ones: diff-pruning, tinyfusion, dydit, dipgo)."""
    from slimdiff.methods import registry

    return tuple(name for name, spec in registry().items() if spec.speed_student is not None)


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # computed on first use: the registry imports the method modules
        return speed_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def target(method: str) -> float:
    """The least realisation ``method`` must reach: :data:`TARGETS`, else :data:`DEFAULT_TARGET`."""
    return TARGETS.get(method, DEFAULT_TARGET)


def timed_unit(method: str) -> str:
    """What is timed for ``method``: ``"forward"`` or ``"sampling"``, by its kind (:data:`UNIT`)."""
    from slimdiff.methods import get_method

    return UNIT[get_method(method).kind]


def make_student(model: nn.Module, method: str, s: SpeedSettings) -> tuple[nn.Module, float]:
    """``method``'s speed student (its spec's ``speed_student``) at ``s.budget`` from a copy of
    ``model``; returns it and the wall seconds. A method that does not apply to ``model``
    (TinyFusion and DyDiT on a UNet) raises :class:`UsageError`."""
    from slimdiff.methods import get_method

    start = time.perf_counter()
    student = get_method(method).speed_student(copy.deepcopy(model), s)
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
    from slimdiff.methods import get_method
    from slimdiff.result import record_of

    device, dtype = torch.device(s.device), DTYPES[s.dtype]
    teacher = build_model(name, s.latent_size, s.seed).to(device)
    students: dict[str, tuple[nn.Module, float]] = {}
    for method in s.methods:
        applies = get_method(method).applies
        if applies is not None and not applies(teacher):  # TinyFusion, DyDiT on a UNet
            log(f"{name}: {method} skipped (it does not apply to this model)")
            continue
        log(f"{name}: building {method} at budget {s.budget}")
        students[method] = make_student(teacher, method, s)
    teacher = _cast(teacher, dtype)
    entries = []
    for unit in ("forward", "sampling"):
        group = [m for m in students if timed_unit(m) == unit]
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
            chain = record_of(student).result.chain
            entries.append({
                "model": name, "method": m, "unit": unit, "budget": s.budget,
                "call": f"one forward, batch {s.batch}" if unit == "forward"
                else f"one DDIM sampling run, {s.steps} steps, batch {s.batch}",
                "macs_teacher": macs["teacher"], "macs_student": macs[m], "macs_ratio": macs[m] / macs["teacher"],
                "theoretical_speedup": theoretical, "measured_speedup": measured, "realisation": realisation,
                "measured_speedup_paired": _paired_speedup(lat["teacher"]["times_s"], lat[m]["times_s"]),
                "measured_speedup_min": min(lat["teacher"]["times_s"]) / min(lat[m]["times_s"]),
                "target": target(m), "met": realisation >= target(m),
                "teacher_median_s": lat["teacher"]["median_s"], "student_median_s": lat[m]["median_s"],
                "teacher_times_s": lat["teacher"]["times_s"], "student_times_s": lat[m]["times_s"],
                "params_teacher": params(teacher), "params_student": params(student), "build_s": build_s,
                "method_measured": chain[-1].measured if chain else None,
                "runtime": _runtime_note(student, device),
            })
            log(f"  {m:13s} theoretical x{theoretical:.3f}  measured x{measured:.3f}  realisation {realisation:.3f}  "
                f"target {target(m):.2f} {'met' if realisation >= target(m) else 'NOT MET'}")
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


def command(argv: list[str] | None = None) -> str:
    """The command line that runs this process, as a reader would retype it: ``slimdiff bench
    ...`` for the CLI, ``python scripts/x.py ...`` for a script (path relative to the working
    directory when it lies inside it). Every results file records it next to the commit."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0]:
        return "python"
    prog = Path(argv[0])
    if prog.name == "slimdiff" or prog.name == "__main__.py" and prog.parent.name == "slimdiff":
        head = ["slimdiff"]
    else:
        try:
            prog = prog.resolve().relative_to(Path.cwd().resolve())
        except ValueError:
            pass
        head = ["python", str(prog)]
    return shlex.join(head + argv[1:])


def environment(device: str = "cpu") -> dict:
    """Library versions, machine, threads, commit and command (for results.json)."""
    import diffusers
    import torch_pruning

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "torch_pruning": torch_pruning.__version__,
           "python": platform.python_version(), "platform": platform.platform(),
           "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "git_commit": git_commit(), "command": command()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def run_speed(settings: SpeedSettings, log: Callable[[str], None] = print) -> dict:
    """Run the bench; returns ``{"settings", "environment", "entries", "summary", ...}``."""
    s = settings.validate()
    start = time.time()
    targets = {**TARGETS, **{m: target(m) for m in s.methods}}
    res: dict[str, Any] = {"settings": asdict(s), "targets": targets, "environment": environment(s.device),
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
    lines = ["| model | method | timed call | MACs ratio | params ratio | theoretical | measured | paired | fastest | "
             "realisation | target | |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        params = f"{e['params_student'] / e['params_teacher']:.3f}" if e.get("params_teacher") else "-"
        lines.append(f"| {e['model']} | {e['method']} | {e['call']} | {e['macs_ratio']:.3f} | {params} | "
                     f"x{e['theoretical_speedup']:.3f} | x{e['measured_speedup']:.3f} | "
                     f"x{e['measured_speedup_paired']:.3f} | x{e['measured_speedup_min']:.3f} | "
                     f"**{e['realisation']:.3f}** | {e['target']:.2f} | "
                     f"{'met' if e['met'] else 'NOT MET'} |")
    return lines


def report_markdown(res: dict) -> str:
    """``report.md``: the table of results.json (every number comes from there)."""
    from slimdiff.eval.report import provenance_line

    s, env = res["settings"], res["environment"]
    where = env.get("gpu") or f"CPU ({env['processor']}, {env['torch_threads']} torch thread(s))"
    lines = ["# Speed: realised vs theoretical speedup", "",
             provenance_line(env) + " Numbers from results.json.", "",
             f"Budget {s['budget']}, batch {s['batch']}, {s['dtype']} on {where}; {s['warmup']} warm-up call(s), "
             f"{s['repeats']} interleaved rounds, medians. Load average {res['load_average_start'][0]:.2f} at the "
             f"start, {res['load_average_end'][0]:.2f} at the end. torch {env['torch']}, diffusers {env['diffusers']}."
             + (" Diff-Pruning with residual_width (DiTs: the hidden size shrinks too)." if s.get("residual_width")
                else ""),
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


__all__ = ["SpeedSettings", "TARGETS", "DEFAULT_TARGET", "UNIT", "speed_methods", "target", "timed_unit", "run_speed",
           "bench_model", "make_student", "make_call", "entries_table", "report_markdown", "write_outputs",
           "method_speed", "environment"]
