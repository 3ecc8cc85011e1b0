"""How much does the benchmark's FD move with the sampling seed alone?

The bench scores every model on the same 2,000 noises (seed 0), so a difference between two
entries mixes the models' difference with the luck of that one draw. This script samples the
teacher with ``--seeds`` different seeds at each of several DDIM step counts (50 = the
teacher, 25 and 12 = the fewer-steps baseline at budgets 0.5 and 0.25) and records FD and
class accuracy per seed, their mean and standard deviation.

A difference between two bench entries smaller than about twice the per-seed standard
deviation is not evidence that one model is better. Much of that noise is shared by two
models sampled from the same noises, so ``--paired FILE`` compares this run seed by seed
with an earlier one (e.g. a compressed model against the teacher at fewer steps): the mean
and standard deviation of the per-seed FD differences, and how many seeds this run wins.

``--model`` is a shipped name, a model directory, or a bench entry of a reuse method
(``bench/digits/entries/dipgo@0.5.json``: the teacher ``--teacher`` plus the recorded plan).

``--reference MODEL@STEPS`` (e.g. ``digits-dit@50``) also scores every sample set against
that model's samples from the same seed: FD between the two sets (does the student reproduce
the reference's *distribution*?), SSIM and PSNR. ``--cache DIR`` keeps every sample set
(one file per model, steps, seed and sample count), so a rerun or another invocation with
the same reference reads them back instead of sampling again.

Writes ``bench/digits/fd_noise.json`` (or ``--out``).

Usage: ``OMP_NUM_THREADS=1 python scripts/fd_noise.py [--seeds 5] [--steps 50,25,12]
[--model M] [--paired bench/digits/fd_noise.json] [--reference digits-dit@50] [--cache DIR] [--out FILE]``
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def paired(rows: list[dict], others: list[dict]) -> dict:
    """Per (this run's steps, the other run's steps): statistics of FD(this) - FD(other) over common seeds."""
    out = {}
    for mine in sorted({r["steps"] for r in rows}, reverse=True):
        for theirs in sorted({r["steps"] for r in others}, reverse=True):
            a = {r["seed"]: r["fd"] for r in rows if r["steps"] == mine}
            b = {r["seed"]: r["fd"] for r in others if r["steps"] == theirs}
            diffs = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
            if diffs:
                out[f"{mine} vs {theirs}"] = {
                    "diff_mean": statistics.mean(diffs), "diff_std": statistics.stdev(diffs) if len(diffs) > 1 else None,
                    "wins": sum(d < 0 for d in diffs), "seeds": len(diffs), "diffs": diffs}
    return out


class Samples:
    """Sample sets of one model (loaded on first need), read from / written to an optional cache."""

    def __init__(self, spec: str, teacher: str, samples: int, cache: Path | None):
        self.spec, self.teacher, self.n, self.cache, self._model = spec, teacher, samples, cache, None

    def model(self):
        import slimdiff

        if self._model is None:
            if self.spec.endswith(".json"):
                from slimdiff.bench import entry_model

                entry = json.loads(Path(self.spec).read_text())
                self._model = entry_model(entry, slimdiff.load(self.teacher)).eval()
            else:
                self._model = slimdiff.load(self.spec).eval()
        return self._model

    def get(self, steps: int, seed: int):
        """``(x, y)`` at ``steps`` DDIM steps from the protocol's noise of ``seed``."""
        from slimdiff.bench import load_tensors, save_tensors
        from slimdiff.eval.evaluate import generate

        slug = re.sub(r"[^A-Za-z0-9.@-]+", "_", self.spec).strip("_")
        path = self.cache / f"{slug}-steps{steps}-seed{seed}-n{self.n}.safetensors" if self.cache else None
        if path is not None and path.exists():
            t = load_tensors(path)
            return t["x"], t["y"]
        x, y = generate(self.model(), self.n, steps=steps, seed=seed)
        if path is not None:
            save_tensors(path, {"x": x, "y": y})
        return x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="digits-dit", help="name, model directory or reuse bench entry (.json)")
    ap.add_argument("--teacher", default="digits-dit", help="the teacher a bench entry's plan applies to")
    ap.add_argument("--paired", help="an earlier fd_noise json to compare with, seed by seed")
    ap.add_argument("--reference", help="MODEL@STEPS whose same-seed samples every set is also scored against")
    ap.add_argument("--cache", help="directory that keeps the sample sets")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", default="50,25,12")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "digits" / "fd_noise.json"))
    args = ap.parse_args()

    from slimdiff.bench import write_json
    from slimdiff.data.datasets import digits
    from slimdiff.eval.quality import class_accuracy, fd, psnr, ssim
    from slimdiff.eval.speed import environment

    cache = Path(args.cache) if args.cache else None
    mine = Samples(args.model, args.teacher, args.samples, cache)
    ref, ref_steps = None, None
    if args.reference:
        spec, _, steps_text = args.reference.rpartition("@")
        if not spec or not steps_text.isdigit():
            ap.error(f"--reference must look like MODEL@STEPS (e.g. digits-dit@50), got {args.reference!r}")
        ref, ref_steps = Samples(spec, args.teacher, args.samples, cache), int(steps_text)
    real = digits("test").tensors[0]
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        for seed in range(args.seeds):
            t0 = time.process_time()
            x, y = mine.get(steps, seed)
            row = {"steps": steps, "seed": seed, "fd": fd(x, real), "class_acc": class_accuracy(x, y)}
            if ref is not None and (ref.spec, ref_steps) != (mine.spec, steps):  # not the reference itself
                xr, _ = ref.get(ref_steps, seed)
                row.update(fd_to_reference=fd(x, xr), ssim_to_reference=ssim(x, xr), psnr_to_reference=psnr(x, xr))
            rows.append({**row, "cpu_s": time.process_time() - t0})
            print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for steps in sorted({r["steps"] for r in rows}, reverse=True):
        group = [r for r in rows if r["steps"] == steps]
        summary[str(steps)] = {}
        for key in ("fd", "fd_to_reference", "ssim_to_reference"):
            values = [r[key] for r in group if key in r]
            if values:
                summary[str(steps)].update({f"{key}_mean": statistics.mean(values),
                                            f"{key}_std": statistics.stdev(values) if len(values) > 1 else None})
        fds = [r["fd"] for r in group]
        summary[str(steps)].update(fd_min=min(fds), fd_max=max(fds))
    out = {"model": args.model, "reference": args.reference, "sampler": "ddim", "samples": args.samples, "cfg": 1.0,
           "rows": rows, "summary": summary, "environment": environment()}
    if args.paired:
        out["paired"] = {"against": args.paired, **paired(rows, json.loads(Path(args.paired).read_text())["rows"])}
    write_json(Path(args.out), out)
    print(json.dumps({k: out[k] for k in ("summary", "paired") if k in out}, indent=2))


if __name__ == "__main__":
    main()
