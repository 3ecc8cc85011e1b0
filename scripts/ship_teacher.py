"""Ship a trained teacher inside the package as ``slimdiff/weights/<name>/`` (fp16 safetensors + JSON).

Usage: ``python scripts/ship_teacher.py runs/mnist-dit/model [--name mnist-dit]`` (the name
defaults to the run directory's: ``runs/<name>/model``). ``make teacher`` ships ``digits-dit``,
``make teacher-mnist`` ships ``mnist-dit``. The weights are stored in fp16 to keep the package
small; ``slimdiff.load`` rebuilds the model in fp32 from them, and every number quoted for a
shipped teacher is measured on the shipped (fp16-rounded) weights.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import slimdiff
from slimdiff.io import save
from slimdiff.models.registry import WEIGHTS_DIR

MAX_MB = 20  # a shipped teacher stays small enough to live in the wheel


def default_name(run_model: str) -> str:
    """``runs/<name>/model`` -> ``<name>``."""
    path = Path(run_model).resolve()
    return (path.parent if path.name == "model" else path).name


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_model", help="the model directory written by `slimdiff train`")
    ap.add_argument("--name", default=None, help="shipped name (default: the run directory's name)")
    args = ap.parse_args()
    name = args.name or default_name(args.run_model)
    model = slimdiff.load(args.run_model).half()
    path = save(model, WEIGHTS_DIR / name, meta={"name": name}, overwrite=True)  # the record, renamed
    mb = sum(f.stat().st_size for f in Path(path).iterdir()) / 2**20
    print(f"shipped {path} ({mb:.1f} MB)")
    if mb > MAX_MB:
        raise SystemExit(f"{path} is {mb:.1f} MB, over the {MAX_MB} MB a shipped teacher may take; ship a smaller model")
