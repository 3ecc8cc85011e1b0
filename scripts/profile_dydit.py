"""Where DyDiT's sampling time goes: torch.profiler over one DDIM run of the teacher and of the
DyDiT student that ``slimdiff bench-speed`` builds (random-init DiT, routers set to the budget).

Prints wall time, the GPU's busy time (sum of kernel times) and the host's op time per model,
then the top ops by device (or CPU) self time. A student whose kernel time is about half the
teacher's but whose wall time is not is held back by the host (launches, syncs), not by its
kernels. The student is profiled twice: with its kept tokens found by ``nonzero`` (a host
sync per block) and by the sync-free capacity path (``set_token_capacity``). Writes
``OUT/profile_dydit.json``::

    python scripts/profile_dydit.py --model DiT-XL/2 --batch 32 --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def profile(fn, device: str, top: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as prof

    from slimdiff.eval.compute import synchronize

    fn()
    synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    start = time.perf_counter()
    with prof(activities=activities) as p:
        fn()
        synchronize()
    wall = time.perf_counter() - start
    events = p.key_averages()
    use_dev = device.startswith("cuda")
    key = "self_device_time_total" if use_dev else "self_cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:top]
    return {
        "wall_s_profiled": wall,
        # kernels only: an aten op row repeats the time of the kernels it launched
        "device_busy_s": sum(e.self_device_time_total for e in events
                             if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6 if use_dev else None,
        "host_op_s": sum(e.self_cpu_time_total for e in events) / 1e6,
        "ops": sum(e.count for e in events),
        "top": [{"op": e.key, "count": e.count, "self_s": getattr(e, key, 0) / 1e6,
                 "host_self_s": e.self_cpu_time_total / 1e6} for e in rows],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "profile")
    a = ap.parse_args()
    from slimdiff.eval import speed as sp
    from slimdiff.eval.models import build_model

    s = sp.SpeedSettings(models=(a.model,), methods=("dydit",), batch=a.batch, device=a.device, dtype=a.dtype,
                         steps=a.steps).validate()
    teacher = build_model(a.model, s.latent_size, s.seed).to(s.device)
    student, _ = sp.make_student(teacher, "dydit", s)
    dtype = sp.DTYPES[s.dtype]
    res = {"settings": vars(a) | {"out": str(a.out)}, "environment": sp.environment(s.device)}
    student = student.to(dtype=dtype)
    for name, model, capacity in (("teacher", teacher.to(dtype=dtype), None), ("dydit-nonzero", student, "off"),
                                  ("dydit-capacity", student, "on")):
        if capacity is not None:
            model.dydit.set_token_capacity(capacity)
        res[name] = profile(sp.make_call(model, "sampling", s), s.device, a.top)
        r = res[name]
        print(f"{name}: wall {r['wall_s_profiled']:.4f} s, device busy {r['device_busy_s']}, host ops "
              f"{r['host_op_s']:.4f} s, {r['ops']} ops", flush=True)
        for row in r["top"]:
            print(f"   {row['self_s'] * 1e3:9.3f} ms  host {row['host_self_s'] * 1e3:8.3f} ms  x{row['count']:<5d} {row['op']}")
    res["dydit-capacity"]["recomputed_calls"] = student.dydit.recomputed
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "profile_dydit.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
