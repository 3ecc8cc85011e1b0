"""Every applicable method on tiny random models in each stock diffusers pipeline layout (issue 23).

Per (layout, method): compress (short settings) -> ``slimdiff.apply`` into the stock pipeline
(its default scheduler, CFG where it has one) with the denoiser's MACs counted inside the
pipeline call against the reported ratio -> export: the CLI's refusal for the kinds it refuses
(the Python ``slimdiff.io.export_diffusers`` outcome is kept in the JSON as ``export_api``),
else ``export_diffusers`` and a reload with ``from_pretrained``, run in the pipeline again ->
``slimdiff.save_pipeline`` of the applied pipeline and ``slimdiff.from_pretrained``, run again
(MACs ratio, and whether its images equal the applied pipeline's). Each cell records its
outcome or its error; the script never stops at one. Writes ``bench/pipelines/matrix.json``, ``matrix.md`` and the README's copy of the table.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python scripts/pipeline_matrix.py
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny pipelines the tests build

from test_pipeline_apply import (
    STEPS,
    _ddpm_pipe,
    _dit_pipe,
    _latents,
    _pixart_pipe,
    _run,
    _sd_pipe,
)

import slimdiff
from slimdiff.errors import UsageError
from slimdiff.eval.report import replace_block
from slimdiff.eval.speed import git_commit
from slimdiff.io import export_diffusers
from slimdiff.methods import registry
from slimdiff.methods.base import Context, compress
from slimdiff.models.diffusers_adapter import unwrap
from slimdiff.result import record_of

BUDGET = 0.6
CLI_REFUSES = {"dynamic": "routers", "reuse": "reuse plan", "width": "per-layer widths"}
"""Kinds whose ``compress --export-diffusers`` the CLI refuses before work (what it cannot write)."""
OUT = ROOT / "bench" / "pipelines"
README_START, README_END = "<!-- pipelines:start -->", "<!-- pipelines:end -->"
"""The README block this script writes (the matrix's table)."""
TOLERANCE = 0.03
"""|in pipeline - reported| above which a cell says the ratios differ (DyDiT's routed ratio varies per input)."""
SHORT = {"opt_steps": 2, "train_steps": 5, "heldout_samples": 2, "search_steps": 2, "scratch_steps": 2, "scratch_batch_size": 4, "scratch_lr": 1e-4,
         "calib_samples": 1, "calibrate_iters": 2, "stride": 50, "batch": 2}
"""Short settings: each option a method has is set to this (the recipes' lengths are hundreds of steps)."""

# layout -> (pipeline builder, data: (shape, classes, caption width))
LAYOUTS: dict[str, tuple[Callable[[], Any], tuple[tuple[int, int, int], int | None, int | None]]] = {
    "DiTPipeline (DiTTransformer2DModel)": (_dit_pipe, ((4, 8, 8), 1000, None)),
    "PixArtAlphaPipeline": (_pixart_pipe, ((4, 8, 8), None, 16)),
    "StableDiffusionPipeline (UNet2DConditionModel)": (_sd_pipe, ((4, 8, 8), None, 32)),
    "DDPMPipeline (UNet2DModel)": (_ddpm_pipe, ((3, 16, 16), None, None)),
}


def _denoiser(pipe: Any) -> torch.nn.Module:
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__


def _short(spec: Any) -> dict:
    names = {f.name for f in dataclasses.fields(spec.config)}
    return {k: v for k, v in SHORT.items() if k in names}


def _compressed(model: torch.nn.Module, name: str, ctx: Context, options: dict) -> dict:
    """The compressed copy of ``model`` (under ``"model"``) and its reported MACs ratio."""
    try:
        budget, result = BUDGET, compress(copy.deepcopy(model), name, BUDGET, ctx, options)
    except UsageError as e:  # BUDGET out of a method's reach on a tiny model: the closest budget it reaches
        closest = re.search(r"cannot meet budget .* \(closest: ([0-9.]+)|use a budget >= ([0-9.]+)", str(e))
        if closest is None:
            raise
        budget = float(closest.group(1) or closest.group(2))
        result = compress(copy.deepcopy(model), name, budget, ctx, options)
    return {"model": result, "reported": record_of(result).result.measured.get("macs_ratio"),
            **({"budget": budget} if budget != BUDGET else {})}


def _in_pipeline(make: Callable[[], Any], model: torch.nn.Module, full: int) -> dict:
    """Install ``model`` with ``slimdiff.apply`` in a fresh pipeline; its MACs ratio inside the call."""
    pipe = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slimdiff.apply(pipe, model)
    _, macs = _run(pipe)
    mapped = [str(w.message) for w in caught if "relative position" in str(w.message)]
    return {"macs_ratio": macs / full, "installed": type(_denoiser(pipe)).__name__,
            **({"warning": mapped[0][:200]} if mapped else {})}


def _exported(make: Callable[[], Any], model: torch.nn.Module, full: int, tmp: Path) -> dict:
    """Export with diffusers' layout, reload with ``from_pretrained``, run in a fresh pipeline."""
    pipe = make()
    folder = export_diffusers(unwrap(model), tmp / "hf")
    reloaded = type(_denoiser(pipe)).from_pretrained(folder).eval()
    pipe.register_modules(**{"transformer" if hasattr(pipe, "transformer") else "unet": reloaded})
    _, macs = _run(pipe)
    return {"macs_ratio": macs / full}


def _saved(make: Callable[[], Any], model: torch.nn.Module, full: int, tmp: Path) -> dict:
    """Apply, ``save_pipeline``, ``from_pretrained``: the reloaded pipeline's MACs ratio and images."""
    pipe = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slimdiff.apply(pipe, model)
        applied, _ = _run(pipe)
        slimdiff.save_pipeline(pipe, tmp / "pipeline")
        loaded = slimdiff.from_pretrained(tmp / "pipeline")
    loaded.set_progress_bar_config(disable=True)
    images, macs = _run(loaded)
    return {"macs_ratio": macs / full, "same_images": bool(np.allclose(images, applied, atol=1e-5))}


def _cell(stage: Callable[[], dict]) -> dict:
    start = time.time()
    try:
        out = {"ok": True, **stage()}
    except Exception as e:
        out = {"ok": False, "error": _error(e)}
    return {**out, "seconds": round(time.time() - start, 1)}


def run_layout(layout: str) -> list[dict]:
    make, (shape, classes, text_width) = LAYOUTS[layout]
    rows = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data = _latents(tmp / "latents.npz", shape, classes, text_width)
        base = make()
        _, full = _run(base)
        for name, spec in sorted(registry().items()):
            model = _denoiser(base)
            if spec.applies is not None and not spec.applies(model):
                continue
            row: dict = {"layout": layout, "method": name, "options": _short(spec)}
            work = tmp / name
            ctx = Context(sampler="ddim", steps=STEPS, progress=False, batch_size=4, work_dir=work / "work", data=data)
            row["compress"] = _cell(lambda: _compressed(model, name, ctx, row["options"]))
            result = row["compress"].pop("model", None)
            if result is not None:
                row["apply"] = _cell(lambda: _in_pipeline(make, copy.deepcopy(result), full))
                row["save_pipeline"] = _cell(lambda: _saved(make, copy.deepcopy(result), full, work))
                exported = _cell(lambda: _exported(make, result, full, work))
                refused = CLI_REFUSES.get(spec.kind)
                row.update({"export": {"ok": False, "refused": refused}, "export_api": exported} if refused else
                           {"export": exported})
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _fmt(row: dict, stage: str) -> str:
    cell = row.get(stage)
    if cell is None:
        return "-"
    if cell.get("refused"):
        return f"refused by the CLI before work ({cell['refused']}): use `slimdiff.save_pipeline`"
    if not cell["ok"]:
        return "fails: " + cell["error"].replace("|", "/")
    reported = row["compress"]["reported"]
    if stage == "compress":
        return f"ok, reported {reported:.3f}" + (f" (at budget {cell['budget']}: the closest reachable)"
                                                  if "budget" in cell else "")
    text = f"ok, in pipeline {cell['macs_ratio']:.3f}" + (" (plan mapped, warned)" if cell.get("warning") else "")
    text += {True: ", same images", False: " **images differ**", None: ""}[cell.get("same_images")]
    return text + (" **differs from reported**" if abs(cell["macs_ratio"] - reported) > TOLERANCE else "")


COMMAND = "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python scripts/pipeline_matrix.py"


def markdown(rows: list[dict], commit: str | None) -> str:
    lines = [f"Written by `{COMMAND}` at commit `{(commit or 'unknown')[:12]}`.", "",
             f"Budget {BUDGET}, {STEPS} steps, tiny random models; MACs ratios of the denoiser counted inside the "
             "pipeline call (FlopCounterMode) against the uncompressed pipeline's. A method that "
             "cannot reach the budget on a tiny model (width groups, a cache's coarsest setting) runs at the "
             "closest budget it reaches, as its error states.", "",
             "| layout | method | compress (reported MACs ratio) | apply in the stock pipeline | "
             "save_pipeline + from_pretrained | diffusers export + reload |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['method']} | {_fmt(r, 'compress')} | {_fmt(r, 'apply')} | "
              f"{_fmt(r, 'save_pipeline')} | {_fmt(r, 'export')} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.set_num_threads(1)
    commit = git_commit(ROOT)  # the code that produces the rows, named before it runs
    rows = [row for layout in LAYOUTS for row in run_layout(layout)]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "matrix.json").write_text(json.dumps({"commit": commit, "command": COMMAND, "rows": rows}, indent=1) + "\n")
    text = markdown(rows, commit)
    (OUT / "matrix.md").write_text(text)
    replace_block(ROOT / "README.md", README_START, README_END, f"{README_START}\n\n{text}\n{README_END}")
    print(text)


if __name__ == "__main__":
    main()
