"""Atomic, pickle-free training checkpoints.

A checkpoint is a directory ``<run>/checkpoint`` with ``state.json`` (step, lr scheduler,
param groups and the caller's JSON ``info``: for the trainer its config, EMA step, loss scale
and logged histories) and safetensors files for model, EMA, optimiser tensors and RNG states
(every generator the run draws from, the GPU's included: :func:`rng_states`). It is
written into a temporary sibling and swapped in with renames, so a crash at any point
leaves either the previous or the new checkpoint complete (:func:`slimdiff.atomic.write_dir`).

Work that is not an optimisation (Diff-Pruning's gradient pass) keeps its state with
:func:`save_state` / :func:`load_state`: the same directory layout and atomicity, with one
safetensors file of named tensors and a JSON ``info``, and no optimiser or scheduler.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimdiff.atomic import write_dir
from slimdiff.errors import UsageError

NAME = "checkpoint"
OLD = f".{NAME}-old"  # the previous checkpoint while the new one is renamed into place


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


def save_checkpoint(run_dir: Path, *, step: int, model: dict, optimizer: dict, lr_scheduler: dict,
                    rng: dict[str, torch.Tensor], info: dict, ema: dict | None = None) -> Path:
    """Write the checkpoint for ``step`` atomically and return its path.

    The previous checkpoint is kept as ``.checkpoint-old`` until the new one is renamed in,
    so :func:`find_checkpoint` finds a complete one whenever the process dies.
    """
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    sched = {k: v for k, v in lr_scheduler.items() if k != "lr_lambdas"}
    state = {"step": step, "optimizer": opt_meta, "lr_scheduler": sched, "info": info}

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().clone() for k, v in model.items()}, tmp / "model.safetensors")
        if ema is not None:
            save_file({k: v.detach().contiguous().clone() for k, v in ema.items()}, tmp / "ema.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file(rng, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps(state))

    return write_dir(run_dir / NAME, write, backup=run_dir / OLD)


def save_state(run_dir: Path, *, step: int, tensors: dict[str, torch.Tensor], info: dict) -> Path:
    """Write a non-optimiser checkpoint (``step``, named ``tensors``, JSON ``info``) atomically into
    ``run_dir/checkpoint`` and return its path; :func:`find_checkpoint` finds it as any other."""
    state = {"step": step, "info": info}

    def write(tmp: Path) -> None:
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
                  tmp / "tensors.safetensors")
        (tmp / "state.json").write_text(json.dumps(state))

    return write_dir(run_dir / NAME, write, backup=run_dir / OLD)


def load_state(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_state`: ``{"step", "info", "tensors"}`` (no pickle)."""
    try:
        state = json.loads((path / "state.json").read_text())
        return {"step": state["step"], "info": state["info"], "tensors": load_file(str(path / "tensors.safetensors"))}
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:  # damaged, or not ours
        raise UsageError(f"checkpoint {path} is unreadable ({str(e).splitlines()[0]}); delete it to start over") from None


def rng_states(device: torch.device, **generators: torch.Generator) -> dict[str, torch.Tensor]:
    """The RNG states a checkpoint keeps: torch's global CPU RNG (``torch``), the global RNG
    of ``device`` when it is a GPU (``cuda``: dropout or Gumbel noise drawn there), and each
    of ``generators`` by its name."""
    states = {name: g.get_state() for name, g in generators.items()}
    states["torch"] = torch.get_rng_state()
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, torch.Tensor], device: torch.device, **generators: torch.Generator) -> None:
    """Put back what :func:`rng_states` saved (a checkpoint written on the CPU sets no GPU state)."""
    for name, g in generators.items():
        g.set_state(states[name])
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``run_dir`` (survives a crash between renames)."""
    for name in (NAME, OLD):
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
