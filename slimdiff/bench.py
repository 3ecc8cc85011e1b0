"""``slimdiff bench`` and ``slimdiff demo``: every method and baseline side by side (BENCHMARK.md §1).

One run compresses the teacher with every method (and chains such as ``tinyfusion+dipgo``)
at every budget, all with the same recovery steps, optimiser, sampler, seeds and class
labels, and scores each against the teacher's samples from the same noise. It writes into
``-o DIR``:

- ``entries/<key>.json`` -- one file per finished entry, written atomically. A rerun with
  the same settings keeps them and computes only what is missing (an interrupted entry's
  recovery resumes from its trainer checkpoint under ``work/``, and its ``compress_cpu_s`` /
  ``compress_wall_s`` are summed over every attempt: :class:`slimdiff.reproducible.Spent`). A run with other budgets or
  methods in the same directory (same protocol) adds its entries: the report shows every
  finished entry of the directory;
- ``results.json`` (every number, library versions, seeds, machine, git commit and command),
  ``report.md`` (with the paired verdicts), ``pareto.png`` (MACs vs FD, every point labelled), ``samples.png``
  (teacher and every student from the same noise) and ``pictures/<key>/`` (each method's
  own picture).

Scripts run their own lists of entries with :meth:`Bench.run_entries` (``(method, budget)``
pairs, against ``config.model`` or a model passed in; ``save_models`` keeps each student)
and read the records (:func:`entry_key`, :func:`entry_scores`).

Seeds (``seeds``, default 5): every entry is scored on several seeds -- each its own noise and
its own assignment of the balanced class labels to the noises (seed 0 keeps the classic
protocol: label ``i % K``, so a 1-seed bench is the old one) -- each paired with the teacher's
samples from the same seed. An entry records ``fd_seeds``, ``class_acc_seeds``, ``ssim_seeds``,
``psnr_seeds``, their mean as ``fd`` etc. and the half-width of the 95% interval as
``fd_ci95`` etc.; ``results.json`` holds paired differences for named pairs
(:func:`pair_verdicts`) and the report prints a claim only where the paired interval excludes
zero. The teacher's samples of every seed are cached in the bench directory and reused by every
entry and every later invocation.

Recovery length: with ``long_recover_steps`` (about ten times ``recover_steps``) every static
entry (width, depth, dynamic) is also run with that recovery, keyed ``method@budget/rN``, in the
same table, so that a reader sees which rankings flip with recovery length.

Realised compute: ``macs_ratio`` is measured on one sampling call (seed 0);
``macs_ratio_realised`` is counted over the bench's own first ``realised_samples`` samples of
seed 0 (the noise and labels the entry is scored on), which is what a routed or input-dependent
model really costs on data the calibration did not see.

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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from slimdiff.atomic import exclusive, write_file
from slimdiff.budget import check_budget
from slimdiff.errors import UsageError
from slimdiff.reproducible import Spent
from slimdiff.result import record_of
from slimdiff.utils import resolve_device

DEMO_METHODS = ("diff-pruning", "tinyfusion", "dydit", "dipgo")
DEFAULT_CHAINS = ("tinyfusion+dipgo",)
ENTRY_FIELDS = ("method", "budget", "kind", "skipped", "options", "recover_steps", "wall_ratio", "compress_cpu_s",
                "compress_wall_s", "eval_wall_s", "chain", "extras", "pictures", "kept_blocks")
"""The fields :meth:`Bench.run_entry` records around the scores (:func:`entry_scores`)."""
PROTOCOL = ("model", "sampler", "steps", "cfg", "seed", "samples", "recover_steps", "batch_size", "lr", "kd", "data",
            "options", "seeds", "long_recover_steps", "realised_samples")
LEGACY_PROTOCOL = {"seeds": 1, "long_recover_steps": None, "realised_samples": None}
"""What a ``bench.json`` written before these settings existed was run with."""
SEED_STRIDE = 100_003  # seed i of a bench is seed + i * SEED_STRIDE (generate() uses seed + 1000 * batch)
SEED_METRICS = ("fd", "class_acc", "ssim", "psnr")
STATIC_KINDS = {"depth", "width", "dynamic"}


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
    seeds: int = 5  # scored on this many seeds, each paired with the teacher's samples from the same seed
    recover_steps: int = 300
    long_recover_steps: int | None = None  # static entries also at this recovery length (about 10x)
    realised_samples: int = 64  # samples of seed 0 over which macs_ratio_realised is counted
    batch_size: int = 64
    lr: float = 2e-4
    kd: str = "none"
    data: str = "auto"  # calibration / recovery data; auto = the shipped data set of the teacher's image shape
    options: dict[str, Any] = field(default_factory=dict)  # method options, given to the methods that declare them
    pairs: list[str] = field(default_factory=list)  # extra verdict pairs "A@0.5:B@0.5" (entry keys)
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
        if self.seeds < 1:
            raise UsageError(f"--seeds must be >= 1, got {self.seeds}")
        if self.realised_samples < 1:
            raise UsageError(f"realised_samples must be >= 1, got {self.realised_samples}")
        if self.long_recover_steps is not None and self.long_recover_steps <= self.recover_steps:
            raise UsageError(f"--long-recover-steps ({self.long_recover_steps}) must be larger than --recover-steps "
                             f"({self.recover_steps}); about 10x is the point")
        for pair in self.pairs:
            if pair.count(":") != 1 or not all(pair.split(":")):
                raise UsageError(f"a verdict pair is two entry keys 'A@0.5:B@0.5', got {pair!r}")

    def protocol(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in PROTOCOL}

    def seed_list(self) -> list[tuple[int, int | None]]:
        """``(noise seed, label seed)`` of every bench seed; seed 0 keeps the labels ``i % K``."""
        return [(self.seed + i * SEED_STRIDE, None if i == 0 else self.seed + i * SEED_STRIDE)
                for i in range(self.seeds)]


def demo_config(**overrides) -> BenchConfig:
    """The reduced bench of ``slimdiff demo``: the four methods once at budget 0.5, short recovery.

    TinyFusion keeps its default 500 search steps (about 3 CPU-minutes): with 50, its search
    learned poor block sets at both ``6:12`` and ``3:6`` (demo FD 214 and 303, against 10 for the
    500-step search's choice in the full bench)."""
    base = dict(budgets=[0.5], methods=list(DEMO_METHODS), samples=500, recover_steps=50, seeds=1,
                options={"opt_steps": 10})
    return BenchConfig(**{**base, **overrides})


def entry_key(method: str, budget: float, recover_steps: int | None = None) -> str:
    """The key of a bench entry: ``tinyfusion+dipgo@0.25``; ``diff-pruning@0.5/r3000`` for a
    static entry run with the long recovery (``recover_steps``)."""
    return f"{method}@{budget:g}" + (f"/r{recover_steps}" if recover_steps is not None else "")


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


def _static(method: str) -> bool:
    from slimdiff.methods import get_method, split_chain

    return any(get_method(p).kind in STATIC_KINDS for p in split_chain(method))


def entry_list(config: BenchConfig) -> list[tuple[str, str, float, int | None]]:
    """``(key, method-or-chain, budget, long recovery or None)`` for every entry; keys look like
    ``tinyfusion+dipgo@0.25`` (and ``diff-pruning@0.5/r3000`` with ``long_recover_steps``)."""
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
    long = config.long_recover_steps
    entries = [(entry_key(m, b), m, b, None) for b in config.budgets for m in methods]
    if long is not None:
        entries += [(entry_key(m, b, long), m, b, long) for b in config.budgets for m in methods if _static(m)]
    return entries


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
    ``sample_cache``: a directory where the teacher's sample sets are kept, keyed by the
    teacher's weights and the sampling settings, so that several bench directories (a script
    runs one per option value) sample the teacher once (default: ``out`` itself).
    """

    def __init__(self, config: BenchConfig, out: Path, teacher: nn.Module | None = None, *, save_models: bool = False,
                 fresh: bool = False, sample_cache: Path | None = None):
        from rich.console import Console

        self.config, self.out = config, Path(out)
        if fresh and (self.out / "bench.json").is_file():  # only ever a bench directory
            shutil.rmtree(self.out)
        self.console = Console(stderr=True, quiet=not config.progress)
        self.entries = entry_list(config)
        self.save_models = save_models
        self.sample_cache = Path(sample_cache) if sample_cache is not None else None
        self._holds_lock = False
        self._model, self._teacher, self._teacher_macs = teacher, None, None
        self._check_settings()

    def _check_settings(self) -> None:
        """Refuse to mix results of another protocol into this directory."""
        path = self.out / "bench.json"
        mine = json.loads(json.dumps(self.config.protocol()))
        if path.exists():
            theirs = {**LEGACY_PROTOCOL, **json.loads(path.read_text())}
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
    def teacher(self) -> tuple[nn.Module, dict, list[torch.Tensor]]:
        """The teacher, its scores (over every seed) and its samples of every seed (computed
        once, then read back)."""
        if self._teacher is None:
            self._teacher = self._load_teacher()
        return self._teacher

    def _teacher_samples(self, model: nn.Module, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's samples of bench seed ``i``: read from the cache, or sampled and cached."""
        from slimdiff.eval.evaluate import generate

        c = self.config
        seed, label_seed = c.seed_list()[i]
        if self.sample_cache is None:
            path = self.out / ("teacher_samples.safetensors" if i == 0 else f"teacher_samples_s{i}.safetensors")
        else:
            import hashlib

            from slimdiff.methods.base import fingerprint

            settings = json.dumps([fingerprint(model), c.sampler, c.steps, c.cfg, c.samples, seed, label_seed])
            path = self.sample_cache / f"teacher-{hashlib.sha256(settings.encode()).hexdigest()[:20]}.safetensors"
        if path.exists():
            t = load_tensors(path)
            return t["x"], t.get("y")
        x, y = generate(model, c.samples, sampler=c.sampler, steps=c.steps, cfg=c.cfg, seed=seed, progress=c.progress,
                        label_seed=label_seed)
        save_tensors(path, {"x": x, **({"y": y} if y is not None else {})})
        return x, y

    def _load_teacher(self) -> tuple[nn.Module, dict, list[torch.Tensor]]:
        from slimdiff import load
        from slimdiff.eval.evaluate import score

        c = self.config
        model = (self._model if self._model is not None else load(c.model)).to(resolve_device(c.device))
        model.eval()
        scores = self.out / "entries" / "teacher.json"
        if scores.exists():
            return model, json.loads(scores.read_text()), [self._teacher_samples(model, i)[0] for i in range(c.seeds)]
        self.console.print(f"[bold]teacher[/bold] {c.model}: {c.samples} samples x {c.seeds} seeds")
        start = time.perf_counter()
        refs, per_seed, macs = [], [], None  # the sampling MACs are the same for every seed: counted once
        for i, (seed, _) in enumerate(c.seed_list()):
            x, y = self._teacher_samples(model, i)
            per_seed.append(score(model, x, y, None, sampler=c.sampler, steps=c.steps, cfg=c.cfg, seed=seed, macs=macs))
            macs = (per_seed[-1]["macs_sampling"], None)
            refs.append(x)
        result = seed_scores(per_seed)
        result["eval_wall_s"] = time.perf_counter() - start
        write_json(scores, result)
        return model, result, refs

    # -- one entry -------------------------------------------------------------------
    def _context(self, key: str, teacher: nn.Module, recover_steps: int):
        from slimdiff.methods.base import Context

        from slimdiff.compression.calibration import resolve_data

        c = self.config
        return Context(sampler=c.sampler, steps=c.steps, cfg=c.cfg, data=resolve_data(c.data, teacher), seed=c.seed,
                       recover_steps=recover_steps, kd=c.kd, batch_size=c.batch_size, lr=c.lr,
                       work_dir=self.out / "work" / _filename(key), progress=c.progress, teacher=teacher)

    def _plan(self, parts: list[str], recover: int | None = None) -> tuple[dict, int]:
        """The options each method declares, and the recovery steps: ``recover_steps`` (or the
        long ``recover``) when a static (depth/width) method changes weights; dynamic methods
        train that many steps instead; reuse methods keep the weights."""
        from slimdiff.methods import get_method

        entries = [get_method(p) for p in parts]
        declared = {o for e in entries for o in e.options}
        options = {k: v for k, v in self.config.options.items() if k in declared}
        kinds = {e.kind for e in entries}
        steps = self.config.recover_steps if recover is None else recover
        if "dynamic" in kinds:
            options.setdefault("train_steps", steps)
            return options, 0
        return options, steps if kinds & {"depth", "width"} else 0

    def run_entry(self, key: str, method: str, budget: float, teacher: nn.Module, refs: list[torch.Tensor],
                  recover: int | None = None) -> dict:
        """Compress, score against the teacher on every seed, time, draw; returns the entry's
        record. ``refs``: the teacher's samples of every seed; ``recover``: the long recovery."""
        from slimdiff.eval.evaluate import generate, score
        from slimdiff.methods import get_method, split_chain
        from slimdiff.methods.base import compress
        from slimdiff.models.backbone import as_backbone

        c = self.config
        parts = split_chain(method)
        kind = "+".join(get_method(p).kind for p in parts)
        base = {"method": method, "budget": budget, "kind": kind}
        options, recover_steps = self._plan(parts, recover)
        ctx = self._context(key, teacher, recover_steps)
        try:  # an interrupted entry resumes: its compression time is summed over every attempt
            with Spent(ctx.work_dir / "spent.json") as spent:
                student = compress(teacher, parts, budget, ctx, options)
        except UsageError as e:  # the method does not apply to this model: say so in the table
            return {**base, "skipped": str(e)}
        compress_cpu, compress_wall = spent.cpu_s, spent.wall_s
        student.eval()
        start = time.perf_counter()
        per_seed, macs = [], None  # the sampling MACs are the same for every seed: counted once
        for i, ((seed, label_seed), ref) in enumerate(zip(c.seed_list(), refs)):
            x, y = generate(student, c.samples, sampler=c.sampler, steps=c.steps, cfg=c.cfg, seed=seed,
                            progress=c.progress, label_seed=label_seed)
            per_seed.append(score(student, x, y, teacher, sampler=c.sampler, steps=c.steps, cfg=c.cfg, seed=seed,
                                  reference_samples=ref, macs=macs))
            macs = (per_seed[-1]["macs_sampling"], per_seed[-1]["reference_macs_sampling"])
            if i == 0:
                save_tensors(self.out / "samples" / f"{_filename(key)}.safetensors", {"x": x[: c.grid]})
        scores = seed_scores(per_seed)
        scores["params_ratio"] = scores["params"] / scores["reference_params"]
        scores["macs_ratio_realised"] = self.realised_ratio(teacher, student)
        eval_wall = time.perf_counter() - start
        pictures = method_pictures(student, self.out / "pictures" / _filename(key), steps=c.steps, cfg=c.cfg,
                                   depth=len(as_backbone(teacher).blocks))
        if self.save_models:
            from slimdiff.io import save

            save(student, self.model_dir(key), overwrite=True)
        result = record_of(student).result
        kept = [e.measured["kept_blocks"] for e in result.chain if (e.measured or {}).get("kept_blocks") is not None]
        return {**base, **scores, "options": options, "recover_steps": ctx.recover_steps,
                **({"kept_blocks": kept[-1]} if kept else {}),
                "wall_ratio": self.wall_ratio(teacher, student),
                "compress_cpu_s": compress_cpu, "compress_wall_s": compress_wall, "eval_wall_s": eval_wall,
                "chain": [e.to_dict() for e in result.chain],
                # a reuse entry's student is the teacher plus this plan: entry_model() rebuilds it
                **({"extras": result.extras} if kind == "reuse" else {}),
                "pictures": [str(p.relative_to(self.out)) for p in pictures]}

    def model_dir(self, key: str) -> Path:
        """Where ``save_models`` keeps the student of entry ``key``."""
        return self.out / "models" / _filename(key)

    def realised_ratio(self, teacher: nn.Module, student: nn.Module) -> float:
        """MACs of sampling the bench's first ``realised_samples`` samples of seed 0 (its own
        noise and labels) with the student / the teacher's, counted by
        ``torch.utils.flop_counter``: what an input-dependent model (routing, caches) costs on
        samples its calibration did not see."""
        from slimdiff.eval.compute import count_macs
        from slimdiff.eval.evaluate import generate

        c = self.config
        n = min(c.realised_samples, c.samples)

        def macs(m: nn.Module) -> int:
            return count_macs(generate, m, n, sampler=c.sampler, steps=c.steps, cfg=c.cfg, seed=c.seed)

        if self._teacher_macs is None:
            self._teacher_macs = macs(teacher)
        return macs(student) / self._teacher_macs

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
    def run_entries(self, entries: Sequence[tuple] | None = None, *,
                    after: Callable[[dict[str, dict]], None] | None = None) -> dict[str, dict]:
        """Run ``entries`` -- ``(method or chain, budget)`` pairs, or ``(method, budget,
        recover_steps)`` for a static entry with another recovery length; default: the
        config's -- and return their records by key (:func:`entry_key`). A finished entry is read
        back from ``entries/<key>.json``; ``after(done so far)`` runs after each newly computed one.
        A second process running entries into the same directory is refused at once."""
        with self._locked():
            return self._run_entries(entries, after)

    def _run_entries(self, entries: Sequence[tuple] | None, after: Callable[[dict[str, dict]], None] | None
                     ) -> dict[str, dict]:
        if entries is None:
            todo = self.entries
        else:
            _check([e[0] for e in entries], self.config.options)
            todo = []
            for m, b, *rest in entries:
                recover = rest[0] if rest else None
                todo.append((entry_key(m, check_budget(b), recover), m, check_budget(b), recover))
        teacher, _, refs = self.teacher()
        done: dict[str, dict] = {}
        for i, (key, method, budget, recover) in enumerate(todo, 1):
            path = self.out / "entries" / f"{_filename(key)}.json"
            if path.exists():
                done[key] = json.loads(path.read_text())
                self.console.print(f"[dim][{i}/{len(todo)}] {key}: done earlier[/dim]")
                continue
            self.console.print(f"[bold][{i}/{len(todo)}] {key}[/bold]")
            record = self.run_entry(key, method, budget, teacher, refs, recover)
            write_json(path, record)
            shutil.rmtree(self.out / "work" / _filename(key), ignore_errors=True)
            done[key] = record
            self.console.print(f"    {key}: " + (f"skipped ({record['skipped']})" if record.get("skipped") else
                                                 f"MACs {record['macs_ratio']:.3f}, FD {record['fd']:.2f}, "
                                                 f"acc {record['class_acc']}, CPU {record['compress_cpu_s']:.0f}s"))
            if after is not None:
                after(done)
        return done

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the directory's lock (:func:`slimdiff.atomic.exclusive`) while entries run, so that
        two processes (CLI or scripts) never compute one entry twice; re-entrant within this bench."""
        if self._holds_lock:  # run() -> run_entries(), or run_bench holding it already
            yield
            return
        with exclusive(self.out, f"bench directory {self.out}"):
            self._holds_lock = True
            try:
                yield
            finally:
                self._holds_lock = False

    def run(self) -> dict:
        """Every entry (finished ones are read back), then results.json, report.md and the plots."""
        with self._locked():
            return self._run()

    def _run(self) -> dict:
        earlier = self.earlier_entries()
        if earlier:
            self.console.print(f"[dim]{self.out} also holds {len(earlier)} finished entries this run does not list "
                               f"(e.g. {next(iter(earlier))}): the report keeps them[/dim]")
        teacher_scores = self.teacher()[1]
        # the report is current after every entry
        done = self.run_entries(after=lambda done: self.finish(teacher_scores, done))
        return self.finish(teacher_scores, done)

    def earlier_entries(self) -> dict[str, dict]:
        """Finished entries in this directory that the config does not list (an earlier run with
        other budgets or methods), by key. The directory's protocol check guarantees they were
        scored like this run's, so the report shows them too."""
        c, listed = self.config, {key for key, *_ in self.entries}
        out = {}
        for path in sorted((self.out / "entries").glob("*.json")):
            if path.stem == "teacher":
                continue
            record = json.loads(path.read_text())
            recover = record.get("recover_steps")
            long = recover if c.long_recover_steps and recover == c.long_recover_steps else None
            key = entry_key(record["method"], record["budget"], long)
            if key not in listed:
                out[key] = record
        return out

    def finish(self, teacher_scores: dict, done: dict[str, dict]) -> dict:
        """Write results.json, report.md and the plots for the entries ``done`` so far."""
        from slimdiff.eval.report import markdown, pareto, sample_rows

        c = self.config
        pending = [key for key, *_ in self.entries if key not in done]
        done = {**self.earlier_entries(), **done}
        results = {"config": asdict(c), "environment": environment(), "teacher": teacher_scores, "entries": done,
                   "pending": pending,
                   "chains": chain_verdicts(done),
                   "pairs": pair_verdicts(done, c.pairs),
                   "pictures": {k: e["pictures"] for k, e in done.items() if e.get("pictures")}}
        points = {k: (e["macs_ratio"], e["fd"], e.get("fd_ci95")) for k, e in done.items() if not e.get("skipped")}
        points["teacher"] = (1.0, teacher_scores["fd"], teacher_scores.get("fd_ci95"))
        pareto(points, self.out / "pareto.png", reference_fd=teacher_scores["fd"], floor=teacher_scores["fd_floor"],
               title=f"{c.model}: {c.sampler} x{c.steps}, {c.samples} samples, recovery {c.recover_steps} steps")
        rows = {"teacher": self.teacher()[2][0][: c.grid]}
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


def seed_scores(per_seed: list[dict]) -> dict:
    """One record from :func:`slimdiff.eval.evaluate.score`'s per-seed results: the first
    seed's record, with ``fd_seeds`` (etc.: :data:`SEED_METRICS`) the per-seed values, ``fd``
    their mean and ``fd_ci95`` the half-width of its 95% interval (``None`` for one seed), and
    ``seeds`` the noise seeds."""
    from slimdiff.eval.stats import summary

    out = dict(per_seed[0])
    out["seeds"] = [r["seed"] for r in per_seed]
    for metric in SEED_METRICS:
        values = [r.get(metric) for r in per_seed]
        if any(v is None for v in values):
            continue
        stats = summary(values)
        out.update({f"{metric}_seeds": values, metric: stats["mean"], f"{metric}_ci95": stats["ci95"]})
    return out


def default_pairs(entries: dict[str, dict]) -> list[tuple[str, str]]:
    """The pairs the report judges, at each budget and recovery length: every paper method
    (:data:`DEMO_METHODS`) against every baseline of its kind, and every chain against every
    single method."""
    pairs = []
    live = {k: e for k, e in entries.items() if not e.get("skipped") and e.get("fd_seeds")}
    for a, ea in live.items():
        for b, eb in live.items():
            if a == b or ea["budget"] != eb["budget"] or ("/r" in a) != ("/r" in b):  # same recovery length
                continue
            chain = "+" in ea["method"] and "+" not in eb["method"]
            paper = ea["method"] in DEMO_METHODS and ea["kind"] == eb["kind"] and eb["method"] not in DEMO_METHODS
            if chain or paper:
                pairs.append((a, b))
    return pairs


def pair_verdicts(entries: dict[str, dict], extra: Sequence[str] = ()) -> dict[str, dict]:
    """Seed-paired FD differences (:func:`slimdiff.eval.stats.paired`) for :func:`default_pairs`
    and the ``extra`` pairs ``"A:B"``; each with its one-line verdict."""
    from slimdiff.eval.stats import paired, verdict

    out = {}
    for a, b in [*default_pairs(entries), *(tuple(p.split(":")) for p in extra)]:
        ea, eb = entries.get(a), entries.get(b)
        if not ea or not eb or not ea.get("fd_seeds") or not eb.get("fd_seeds") or ea["seeds"] != eb["seeds"]:
            continue
        pair = paired(ea["fd_seeds"], eb["fd_seeds"], "fd")
        out[f"{a} vs {b}"] = {**pair, "a": a, "b": b, "verdict": verdict(a, b, pair)}
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


def run_bench(config: BenchConfig, out: str | Path, sample_cache: str | Path | None = None) -> dict:
    """Run (or resume) a bench into ``out``; returns the results written to ``out/results.json``.
    ``sample_cache``: see :class:`Bench`."""
    out = Path(out)
    with exclusive(out, f"bench directory {out}"):  # before the Bench writes anything into ``out``
        bench = Bench(config, out, sample_cache=Path(sample_cache) if sample_cache else None)
        bench._holds_lock = True  # held here: Bench.run takes it only when not
        return bench.run()


def summary_rows(results: dict) -> list[dict]:
    """One flat row per entry (for the CLI table and --json)."""
    rows = [{"entry": "teacher", "macs_ratio": 1.0, "fd": results["teacher"]["fd"],
             "class_acc": results["teacher"]["class_acc"]}]
    for key, e in results["entries"].items():
        rows.append({"entry": key, "macs_ratio": e.get("macs_ratio"), "macs_ratio_realised": e.get("macs_ratio_realised"),
                     "params_ratio": e.get("params_ratio"), "fd": e.get("fd"), "fd_ci95": e.get("fd_ci95"),
                     "class_acc": e.get("class_acc"),
                     "ssim": e.get("ssim"), "wall_ratio": e.get("wall_ratio"), "compress_cpu_s": e.get("compress_cpu_s"),
                     **({"skipped": e["skipped"]} if e.get("skipped") else {})})
    return rows
