"""Ship a trained teacher inside the package as ``digits-dit`` (fp16 safetensors + JSON).

Usage: ``python scripts/ship_teacher.py runs/digits-dit/model [--name digits-dit]``.
The weights are stored in fp16 to keep the package small; ``slimdiff.load`` rebuilds the
model in fp32 from them, and every number quoted for ``digits-dit`` is measured on the
shipped (fp16-rounded) weights.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import slimdiff
from slimdiff.io import save

WEIGHTS = Path(slimdiff.__file__).parent / "weights"

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_model", help="the model directory written by `slimdiff train`")
    ap.add_argument("--name", default="digits-dit")
    args = ap.parse_args()
    model = slimdiff.load(args.run_model).half()
    path = save(model, WEIGHTS / args.name, meta={"name": args.name}, overwrite=True)  # the record, renamed
    print(f"shipped {path}")
