"""CUDA end to end (BENCHMARK.md section 2, issue 9's GPU part): every method through the
command line on the shipped ``digits-dit`` with ``--device cuda`` (short settings), then the
saved result loaded and sampled on the GPU and on the CPU from the same noise.

Records per method: the compress wall time and MACs ratio, the largest difference between
CUDA and CPU samples in float32 (the same model and noise: only kernel rounding may differ),
and between CUDA float32 and CUDA bfloat16. Writes ``OUT/e2e.json``; exits 1 when a command
fails or float32 samples differ by more than ``--tol``. Needs a GPU::

    python scripts/gpu_check.py --out runs/gpu
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHORT = {  # a few steps each: this checks that the code runs on CUDA, not the quality
    "diff-pruning": ["--recover-steps", "4"],
    "tinyfusion": ["--search-steps", "4", "--recover-steps", "4", "--kd", "masked"],
    "dydit": ["--train-steps", "4"],
    "dipgo": ["--opt-steps", "3"],
    "tinyfusion,dipgo": ["--search-steps", "4", "--opt-steps", "3"],
}
STEPS = 10  # DDIM steps the budgets and plans are made for


def compress(method: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "slimdiff.cli", "compress", "--method", method, "--model", "digits-dit",
           "--budget", "0.5", "--steps", str(STEPS), "--batch-size", "32", "--device", "cuda", "-o", str(out),
           "--json", *SHORT[method]]
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        return {"ok": False, "cmd": " ".join(cmd[2:]), "stderr": run.stderr[-4000:], "wall_s": wall}
    return {"ok": True, "cmd": " ".join(cmd[2:]), "wall_s": wall, **json.loads(run.stdout.strip().splitlines()[-1])}


def compare(path: Path) -> dict:
    """Samples of the saved result on CPU and CUDA (float32 and bfloat16), same noise."""
    import torch

    from slimdiff import load
    from slimdiff.diffusion.sampling import sample

    def draw(device: str, dtype=torch.float32) -> torch.Tensor:
        model = load(path).to(device=device, dtype=dtype)
        with torch.no_grad():
            x = sample(model, sampler="ddim", steps=STEPS, classes=list(range(10)), seed=1)
        return x.float().cpu()

    cpu, cuda, bf16 = draw("cpu"), draw("cuda"), draw("cuda", torch.bfloat16)
    return {"max_abs_cuda_vs_cpu_fp32": float((cpu - cuda).abs().max()),
            "max_abs_bf16_vs_fp32_cuda": float((bf16 - cuda).abs().max()),
            "finite": bool(torch.isfinite(bf16).all() and torch.isfinite(cuda).all())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest CUDA vs CPU float32 difference accepted")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this script checks the GPU path", file=sys.stderr)
        return 2
    from slimdiff.eval.speed import environment

    results: dict = {"environment": environment("cuda"), "steps": STEPS, "tol": args.tol, "methods": {}}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for method in SHORT:
            entry = compress(method, Path(tmp) / method.replace(",", "+"))
            if entry["ok"]:
                entry.update(compare(Path(entry["output"])))
                entry["ok"] = entry["finite"] and entry["max_abs_cuda_vs_cpu_fp32"] <= args.tol
            ok &= entry["ok"]
            results["methods"][method] = entry
            print(method, json.dumps({k: v for k, v in entry.items() if k != "stderr"}), flush=True)
            if "stderr" in entry:
                print(entry["stderr"], file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
