"""``slimdiff bench`` and ``slimdiff demo``: every method and baseline side by side (BENCHMARK.md §1).

One run compresses the teacher with every method (and chains such as ``tinyfusion+dipgo``)
at every budget, all with the same recovery steps, optimiser, sampler, seeds and class
labels, and scores each against the teacher's samples from the same noise. It writes into
``-o DIR``:

- ``entries/<key>.json`` -- one file per finished entry, written atomically. A rerun with
  the same settings keeps them and computes only what is missing (an interrupted entry's
  recovery resumes from its trainer checkpoint under ``work/``);
- ``results.json`` (every number, library versions, seeds, machine, git commit),
  ``report.md``, ``pareto.png`` (MACs vs FD, every point labelled), ``samples.png``
  (teacher and every student from the same noise) and ``pictures/<key>/`` (each method's
  own picture).

Scripts run their own lists of entries with :meth:`Bench.run_entries` (``(method, budget)``
pairs, against ``config.model`` or a model passed in; ``save_models`` keeps each student)
and read the records (:func:`entry_key`, :func:`entry_scores`).

Equal recovery: weight-changing methods get ``recover_steps`` fine-tuning steps. DyDiT
trains its routers *with* the weights, so it gets ``train_steps = recover_steps`` in place
of a separate recovery (the same number of optimiser steps); pass ``--option
train_steps=N`` to change that. Reuse methods (DiP-GO, DeepCache, ...) keep the weights.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from slimdiff.atomic import write_file
from slimdiff.budget import check_budget
from slimdiff.errors import UsageError
from slimdiff.result import record_of
from slimdiff.utils import resolve_device

DEMO_METHODS = ("diff-pruning", "tinyfusion", "dydit", "dipgo")
DEFAULT_CHAINS = ("tinyfusion+dipgo",)
ENTRY_FIELDS = ("method", "budget", "kind", "skipped", "options", "recover_steps", "wall_ratio", "compress_cpu_s",
                "compress_wall_s", "eval_wall_s", "chain", "extras", "pictures")
"""The fields :meth:`Bench.run_entry` records around the scores (:func:`entry_scores`)."""
PROTOCOL = ("model", "sampler", "steps", "cfg", "seed", "samples", "recover_steps", "batch_size", "lr", "kd", "data",
            "options")


@dataclass
class BenchConfig:
    """What one bench run compares, and under which protocol."""

    model: str = "digits-dit"
    budgets: list[float] = field(default_factory=lambda: [0.5, 0.25])
    methods: list[str] | None = None  # None: every registered method and baseline, plus DEFAULT_CHAINS
    samples: int = 2000
    sampler: str = "ddim"
    steps: int = 50
    cfg: float = 1.0
    seed: int = 0
    recover_steps: int = 300
    batch_size: int = 64
    lr: float = 2e-4
    kd: str = "none"
    data: str = "digits"
    options: dict[str, Any] = field(default_factory=dict)  # method options, given to the methods that declare them
    latency_batch: int = 16
    latency_repeats: int = 3
    grid: int = 10
    progress: bool = True
    device: str = "auto"  # where models run (not part of the protocol): auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        self.budgets = [check_budget(b) for b in self.budgets]
        if self.samples < 1:
            raise UsageError(f"--samples must be >= 1, got {self.samples}")
        if self.recover_steps < 0:
            raise UsageError(f"--recover-steps must be >= 0, got {self.recover_steps}")

    def protocol(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in PROTOCOL}


def demo_config(**overrides) -> BenchConfig:
    """The reduced bench of ``slimdiff demo``: the four methods once at budget 0.5, short recovery.

    TinyFusion keeps its default 500 search steps (about 3 CPU-minutes): with 50, its search
    learned poor block sets at both ``6:12`` and ``3:6`` (demo FD 214 and 303, against 10 for the
    500-step search's choice in the full bench)."""
    base = dict(budgets=[0.5], methods=list(DEMO_METHODS), samples=500, recover_steps=50,
                options={"opt_steps": 10})
    return BenchConfig(**{**base, **overrides})


def entry_key(method: str, budget: float) -> str:
    """The key of a bench entry: ``tinyfusion+dipgo@0.25``."""
    return f"{method}@{budget:g}"


def _check(methods: Sequence[str], options: dict[str, Any]) -> None:
    """Before any entry runs: every method (or chain part) is registered (a :class:`UsageError`
    with suggestions otherwise); every ``--option`` is an option of some registered method (a
    typo is an error, not silently dropped) and converts to its type in each benched method that
    declares it (a benched method that does not declare it ignores it)."""
    from slimdiff.methods import get_method, registry, split_chain

    specs = {p: get_method(p) for m in methods for p in split_chain(m)}
    unknown = set(options) - {o for s in registry().values() for o in s.options}
    if unknown:
        raise UsageError(f"option(s) {', '.join(sorted(unknown))} are not an option of any method; "
                         "see `slimdiff methods`")
    for spec in specs.values():
        spec.make_config({k: v for k, v in options.items() if k in spec.options})


def entry_list(config: BenchConfig) -> list[tuple[str, str, float]]:
    """``(key, method-or-chain, budget)`` for every entry; keys look like ``tinyfusion+dipgo@0.25``."""
    from slimdiff.methods import KIND_ORDER, registry

    specs = registry()
    # the default order groups each paper method with its baselines (so a partial run is useful)
    order = sorted(specs, key=lambda n: (KIND_ORDER.index(specs[n].kind), n not in DEMO_METHODS, n))
    methods = config.methods if config.methods is not None else order + list(DEFAULT_CHAINS)
    if not methods:
        raise UsageError("no methods to bench; pass --methods (see `slimdiff methods`)")
    if not config.budgets:
        raise UsageError("no budgets to bench; pass --budgets 0.5,0.25")
    _check(methods, config.options)
    return [(entry_key(m, b), m, b) for b in config.budgets for m in methods]


def _filename(key: str) -> str:
    return key.replace("/", "_")


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, atomically (:func:`slimdiff.atomic.write_file`)."""
    write_file(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str)))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` as safetensors at ``path``, atomically (:func:`slimdiff.atomic.write_file`)."""
    from safetensors.torch import save_file

    write_file(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def environment() -> dict:
    """Machine, threads and git commit (:func:`slimdiff.eval.speed.environment`), library versions and load."""
    from importlib.metadata import PackageNotFoundError, version

    from slimdiff.eval.speed import environment as machine

    libs = {}
    for lib in ("slimdiff", "torch", "diffusers", "torch-pruning", "peft", "accelerate", "torchmetrics", "pytorch-msssim"):
        try:
            libs[lib] = version(lib)
        except PackageNotFoundError:
            libs[lib] = None
    return {**machine(), "libraries": libs, "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


class Bench:
    """One bench directory: its settings, the teacher's samples, and the finished entries.

    ``teacher``: the model to compress, when it is not ``config.model`` loaded by name (a
    script's random stand-in; ``config.model`` then only names it). ``save_models``: also save
    each new entry's student to ``models/<key>/`` (:meth:`model_dir`). ``fresh``: remove an
    earlier bench in ``out`` first (a measurement that must not read back old entries).
    """

    def __init__(self, config: BenchConfig, out: Path, teacher: nn.Module | None = None, *, save_models: bool = False,
                 fresh: bool = False):
        from rich.console import Console

        self.config, self.out = config, Path(out)
        if fresh and (self.out / "bench.json").is_file():  # only ever a bench directory
            shutil.rmtree(self.out)
        self.console = Console(stderr=True, quiet=not config.progress)
        self.entries = entry_list(config)
        self.save_models = save_models
        self._model, self._teacher = teacher, None
        self._check_settings()

    def _check_settings(self) -> None:
        """Refuse to mix results of another protocol into this directory."""
        path = self.out / "bench.json"
        mine = json.loads(json.dumps(self.config.protocol()))
        if path.exists():
            theirs = json.loads(path.read_text())
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if diff:
                raise UsageError(f"{self.out} holds bench results made with other settings ({', '.join(diff)}); "
                                 f"rerun with the same settings to resume, or pass another -o")
        else:
            try:
                write_json(path, mine)
            except OSError as e:
                raise UsageError(f"cannot write the bench directory {self.out} ({e.strerror}); pass a writable -o") from None

    # -- the teacher -----------------------------------------------------------------
    def teacher(self) -> tuple[nn.Module, dict, torch.Tensor]:
        """The teacher, its scores and its samples (computed once, then read back)."""
        if self._teacher is None:
            self._teacher = self._load_teacher()
        return self._teacher

    def _load_teacher(self) -> tuple[nn.Module, dict, torch.Tensor]:
        from slimdiff import load
        from slimdiff.eval.evaluate import generate, score

        c = self.config
        model = (self._model if self._model is not None else load(c.model)).to(resolve_device(c.device))
        model.eval()
        path, scores = self.out / "teacher_samples.safetensors", self.out / "entries" / "teacher.json"
        if path.exists() and scores.exists():
            return model, json.loads(scores.read_text()), load_tensors(path)["x"]
        self.console.print(f"[bold]teacher[/bold] {c.model}: {c.samples} samples")
        start = time.perf_counter()
        x, y = generate(model, c.samples, sampler=c.sampler, steps=c.steps, cfg=c.cfg, seed=c.seed, progress=c.progress)
        result = score(model, x, y, None, sampler=c.sampler, steps=c.steps, cfg=c.cfg, seed=c.seed)
        result["eval_wall_s"] = time.perf_counter() - start
        save_tensors(path, {"x": x, **({"y": y} if y is not None else {})})
        write_json(scores, result)
        return model, result, x

    # -- one entry -------------------------------------------------------------------
    def _context(self, key: str, teacher: nn.Module, recover_steps: int):
        from slimdiff.methods.base import Context

        c = self.config
        return Context(sampler=c.sampler, steps=c.steps, cfg=c.cfg, data=c.data, seed=c.seed,
                       recover_steps=recover_steps, kd=c.kd, batch_size=c.batch_size, lr=c.lr,
                       work_dir=self.out / "work" / _filename(key), progress=c.progress, teacher=teacher)

    def _plan(self, parts: list[str]) -> tuple[dict, int]:
        """The options each method declares, and the recovery steps: ``recover_steps`` when a
        static (depth/width) method changes weights; dynamic methods train that many steps
        instead; reuse methods keep the weights."""
        from slimdiff.methods import get_method

        entries = [get_method(p) for p in parts]
        declared = {o for e in entries for o in e.options}
        options = {k: v for k, v in self.config.options.items() if k in declared}
        kinds = {e.kind for e in entries}
        if "dynamic" in kinds:
            options.setdefault("train_steps", self.config.recover_steps)
            return options, 0
        return options, self.config.recover_steps if kinds & {"depth", "width"} else 0

    def run_entry(self, key: str, method: str, budget: float, teacher: nn.Module, ref: torch.Tensor) -> dict:
        """Compress, score against the teacher, time, draw; returns the entry's record."""
        from slimdiff.eval.evaluate import generate, score
        from slimdiff.methods import get_method, split_chain
        from slimdiff.methods.base import compress
        from slimdiff.models.backbone import as_backbone

        c = self.config
        parts = split_chain(method)
        kind = "+".join(get_method(p).kind for p in parts)
        base = {"method": method, "budget": budget, "kind": kind}
        options, recover_steps = self._plan(parts)
        ctx = self._context(key, teacher, recover_steps)
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            student = compress(teacher, parts, budget, ctx, options)
        except UsageError as e:  # the method does not apply to this model: say so in the table
            return {**base, "skipped": str(e)}
        compress_cpu, compress_wall = time.process_time() - cpu, time.perf_counter() - wall
        student.eval()
        start = time.perf_counter()
        x, y = generate(student, c.samples, sampler=c.sampler, steps=c.steps, cfg=c.cfg, seed=c.seed,
                        progress=c.progress)
        scores = score(student, x, y, teacher, sampler=c.sampler, steps=c.steps, cfg=c.cfg, seed=c.seed,
                       reference_samples=ref)
        eval_wall = time.perf_counter() - start
        save_tensors(self.out / "samples" / f"{_filename(key)}.safetensors", {"x": x[: c.grid]})
        pictures = method_pictures(student, self.out / "pictures" / _filename(key), steps=c.steps, cfg=c.cfg,
                                   depth=len(as_backbone(teacher).blocks))
        if self.save_models:
            from slimdiff.io import save

            save(student, self.model_dir(key), overwrite=True)
        result = record_of(student).result
        return {**base, **scores, "options": options, "recover_steps": ctx.recover_steps,
                "wall_ratio": self.wall_ratio(teacher, student),
                "compress_cpu_s": compress_cpu, "compress_wall_s": compress_wall, "eval_wall_s": eval_wall,
                "chain": [e.to_dict() for e in result.chain],
                # a reuse entry's student is the teacher plus this plan: entry_model() rebuilds it
                **({"extras": result.extras} if kind == "reuse" else {}),
                "pictures": [str(p.relative_to(self.out)) for p in pictures]}

    def model_dir(self, key: str) -> Path:
        """Where ``save_models`` keeps the student of entry ``key``."""
        return self.out / "models" / _filename(key)

    def wall_ratio(self, teacher: nn.Module, student: nn.Module) -> float:
        """Sampling wall time of the student / the teacher's: interleaved repeats, same process."""
        from slimdiff.diffusion.sampling import sample
        from slimdiff.eval.compute import latency_ratio
        from slimdiff.models.backbone import as_backbone

        c = self.config
        bb = as_backbone(teacher)
        classes = [i % bb.num_classes for i in range(c.latency_batch)] if bb.conditioning == "class" else None
        n = None if classes else c.latency_batch

        def run(m):
            return lambda: sample(m, sampler=c.sampler, steps=c.steps, num_samples=n, classes=classes, cfg=c.cfg,
                                  seed=c.seed)

        timing = latency_ratio({"teacher": run(teacher), "student": run(student)}, "teacher", warmup=1,
                               repeats=c.latency_repeats)
        return timing["student"]["ratio"]

    # -- the whole run ---------------------------------------------------------------
    def run_entries(self, entries: Sequence[tuple[str, float]] | None = None, *,
                    after: Callable[[dict[str, dict]], None] | None = None) -> dict[str, dict]:
        """Run ``entries`` -- ``(method or chain, budget)`` pairs; default: the config's -- and
        return their records by key (:func:`entry_key`). A finished entry is read back from
        ``entries/<key>.json``; ``after(done so far)`` runs after each newly computed one."""
        if entries is None:
            todo = self.entries
        else:
            _check([m for m, _ in entries], self.config.options)
            todo = [(entry_key(m, b), m, b) for m, b in ((m, check_budget(b)) for m, b in entries)]
        teacher, _, ref = self.teacher()
        done: dict[str, dict] = {}
        for i, (key, method, budget) in enumerate(todo, 1):
            path = self.out / "entries" / f"{_filename(key)}.json"
            if path.exists():
                done[key] = json.loads(path.read_text())
                self.console.print(f"[dim][{i}/{len(todo)}] {key}: done earlier[/dim]")
                continue
            self.console.print(f"[bold][{i}/{len(todo)}] {key}[/bold]")
            record = self.run_entry(key, method, budget, teacher, ref)
            write_json(path, record)
            shutil.rmtree(self.out / "work" / _filename(key), ignore_errors=True)
            done[key] = record
            self.console.print(f"    {key}: " + (f"skipped ({record['skipped']})" if record.get("skipped") else
                                                 f"MACs {record['macs_ratio']:.3f}, FD {record['fd']:.2f}, "
                                                 f"acc {record['class_acc']}, CPU {record['compress_cpu_s']:.0f}s"))
            if after is not None:
                after(done)
        return done

    def run(self) -> dict:
        """Every entry (finished ones are read back), then results.json, report.md and the plots."""
        teacher_scores = self.teacher()[1]
        # the report is current after every entry
        done = self.run_entries(after=lambda done: self.finish(teacher_scores, done))
        return self.finish(teacher_scores, done)

    def finish(self, teacher_scores: dict, done: dict[str, dict]) -> dict:
        """Write results.json, report.md and the plots for the entries ``done`` so far."""
        from slimdiff.eval.report import markdown, pareto, sample_rows

        c = self.config
        pending = [key for key, _, _ in self.entries if key not in done]
        results = {"config": asdict(c), "environment": environment(), "teacher": teacher_scores, "entries": done,
                   "pending": pending,
                   "chains": chain_verdicts(done),
                   "pictures": {k: e["pictures"] for k, e in done.items() if e.get("pictures")}}
        points = {k: (e["macs_ratio"], e["fd"]) for k, e in done.items() if not e.get("skipped")}
        points["teacher"] = (1.0, teacher_scores["fd"])
        pareto(points, self.out / "pareto.png", reference_fd=teacher_scores["fd"], floor=teacher_scores["fd_floor"],
               title=f"{c.model}: {c.sampler} x{c.steps}, {c.samples} samples, recovery {c.recover_steps} steps")
        rows = {"teacher": load_tensors(self.out / "teacher_samples.safetensors")["x"][: c.grid]}
        for key in done:
            f = self.out / "samples" / f"{_filename(key)}.safetensors"
            if f.exists():
                rows[key] = load_tensors(f)["x"]
        sample_rows(rows, self.out / "samples.png")
        write_json(self.out / "results.json", results)
        write_file(self.out / "report.md", lambda tmp: tmp.write_text(markdown(results)))
        return results


def chain_verdicts(entries: dict[str, dict]) -> dict[str, dict]:
    """For each chain: its FD against the best single method at the same budget."""
    out = {}
    for key, e in entries.items():
        if "+" not in e["method"] or e.get("skipped"):
            continue
        singles = {k: s["fd"] for k, s in entries.items()
                   if "+" not in s["method"] and s["budget"] == e["budget"] and not s.get("skipped")}
        best = min(singles, key=singles.get) if singles else None
        out[key] = {"budget": e["budget"], "fd": e["fd"], "best_single": best,
                    "best_single_fd": singles.get(best), "beats_every_single": bool(singles) and e["fd"] < min(singles.values())}
    return out


def entry_model(entry: dict, teacher: nn.Module) -> nn.Module:
    """The student of a finished reuse entry: a copy of ``teacher`` with the entry's recorded plan.

    Only reuse methods keep the teacher's weights, so only their entries can be rebuilt;
    the others need ``slimdiff compress`` again (or a bench run with ``save_models``).
    """
    import copy

    from slimdiff.io import restore_runtime
    from slimdiff.result import ChainEntry, CompressionResult, set_record

    if entry.get("kind") != "reuse" or "extras" not in entry:
        raise UsageError(f"bench entry {entry.get('method')}@{entry.get('budget')} cannot be rebuilt from its record: "
                         "only reuse entries written by this version hold their plan; "
                         "run `slimdiff compress` for this method to get the model")
    record = record_of(teacher)
    record.result = CompressionResult(entry["method"], [ChainEntry.from_dict(e) for e in entry["chain"]],
                                      entry["extras"], record.result.measured)
    return restore_runtime(set_record(copy.deepcopy(teacher), record))


def method_pictures(model: nn.Module, out: Path, *, steps: int = 50, cfg: float = 1.0, depth: int = 0) -> list[Path]:
    """Each method in ``model``'s chain draws its own picture(s) into ``out`` (its
    ``MethodSpec.draw``, from what it recorded; none when it has no ``draw``); returns the files.

    ``depth`` is the original block count (for the depth baselines' kept-blocks row).
    """
    from slimdiff.methods import get_method

    result = record_of(model).result
    files: list[Path] = []
    for entry in result.chain:
        draw = get_method(entry.method).draw
        if draw is not None:
            ctx = {"steps": steps, "cfg": cfg, "depth": depth, **(entry.settings or {})}
            files += draw(entry.method, result.extras.get(entry.method) or {}, model, out, ctx)
    return files


def entry_scores(entry: dict) -> dict:
    """What :func:`slimdiff.eval.evaluate.score` measured for an entry (FD, class accuracy,
    SSIM/PSNR to the teacher, MACs, parameters, ...): its record less the bench's own fields."""
    return {k: v for k, v in entry.items() if k not in ENTRY_FIELDS}


def run_bench(config: BenchConfig, out: str | Path) -> dict:
    """Run (or resume) a bench into ``out``; returns the results written to ``out/results.json``."""
    from slimdiff.atomic import exclusive

    out = Path(out)
    with exclusive(out, f"bench directory {out}"):
        return Bench(config, out).run()


def summary_rows(results: dict) -> list[dict]:
    """One flat row per entry (for the CLI table and --json)."""
    rows = [{"entry": "teacher", "macs_ratio": 1.0, "fd": results["teacher"]["fd"],
             "class_acc": results["teacher"]["class_acc"]}]
    for key, e in results["entries"].items():
        rows.append({"entry": key, "macs_ratio": e.get("macs_ratio"), "fd": e.get("fd"), "class_acc": e.get("class_acc"),
                     "ssim": e.get("ssim"), "wall_ratio": e.get("wall_ratio"), "compress_cpu_s": e.get("compress_cpu_s"),
                     **({"skipped": e["skipped"]} if e.get("skipped") else {})})
    return rows
