"""Atomic, pickle-free training checkpoints.

A checkpoint is a directory ``<run>/checkpoint`` with ``state.json`` (step, config, lr
scheduler, param groups) and safetensors files for model, EMA, optimiser tensors and RNG
states. It is written into a temporary sibling and swapped in with renames, so a crash
at any point leaves either the previous or the new checkpoint complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimdiff.errors import UsageError

NAME = "checkpoint"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, *, step: int, model: dict, optimizer: dict, lr_scheduler: dict,
                    rng: dict[str, torch.Tensor], info: dict, ema: dict | None = None) -> Path:
    """Write the checkpoint for ``step`` atomically and return its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=run_dir))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    save_file({k: v.detach().contiguous().clone() for k, v in model.items()}, tmp / "model.safetensors")
    if ema is not None:
        save_file({k: v.detach().contiguous().clone() for k, v in ema.items()}, tmp / "ema.safetensors")
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file(rng, tmp / "rng.safetensors")
    sched = {k: v for k, v in lr_scheduler.items() if k != "lr_lambdas"}
    state = {"step": step, "optimizer": opt_meta, "lr_scheduler": sched, "info": info}
    (tmp / "state.json").write_text(json.dumps(state))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    final, old = run_dir / NAME, run_dir / f".{NAME}-old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``run_dir`` (survives a crash between renames)."""
    for name in (NAME, f".{NAME}-old"):
        path = run_dir / name
        if (path / "state.json").is_file():
            return path
    return None


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (no pickle)."""
    try:
        state = json.loads((path / "state.json").read_text())
        out = {
            "step": state["step"],
            "info": state["info"],
            # the schedule's lambda is code, rebuilt from the config; LambdaLR wants a slot per group
            "lr_scheduler": {**state["lr_scheduler"], "lr_lambdas": [None] * len(state["lr_scheduler"]["base_lrs"])},
            "model": load_file(str(path / "model.safetensors")),
            "optimizer": _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state["optimizer"]),
            "rng": load_file(str(path / "rng.safetensors")),
            "ema": load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").exists() else None,
        }
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # damaged, or not safetensors at all
        raise UsageError(f"checkpoint {path} is unreadable ({str(e).splitlines()[0]}); delete it to start over") from None
    return out
