"""LoRA adapters (peft) for methods that train a frozen model cheaply.

TinyFusion trains LoRA jointly with its layer-selection logits (and discards the adapters:
they only measure recoverability); DyDiT's ``tune="lora"`` trains them with its routers and
merges them into the weights afterwards. Both go through :func:`add_lora` and
:func:`merge_lora`, so adapters are inserted, initialised and merged one way.

peft initialises ``lora_A`` from the global torch RNG; :func:`add_lora` with a ``seed``
draws it from a forked RNG seeded with ``seed`` instead, so the adapters (and whatever is
trained with them) are the same in every process and whatever ran before.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from slimdiff.errors import UsageError

__all__ = ["linear_layers", "add_lora", "merge_lora"]


def linear_layers(model: nn.Module, under: Sequence[str] | None = None) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules of ``model`` inside the modules named
    ``under`` (e.g. a backbone's ``block_names``; ``None``: every ``nn.Linear`` of the model,
    embedders and output layer included), in ``named_modules`` order."""
    prefixes = tuple(n + "." for n in under) if under is not None else ("",)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefixes)]


def add_lora(model: nn.Module, targets: str | Sequence[str], rank: int, alpha: float,
             seed: int | None = None) -> list[nn.Parameter]:
    """Freeze ``model`` and inject peft LoRA adapters of ``rank`` / ``alpha`` into ``targets``
    (module names, or one regex as peft's ``target_modules`` takes it); return the adapter
    parameters (the only trainable ones). Rank 0 adds nothing and only freezes. With ``seed``
    the initial adapter weights come from that seed and the global RNG is left untouched."""
    model.requires_grad_(False)
    if rank == 0:
        return []
    if not targets:
        raise UsageError("no LoRA target modules found; name nn.Linear modules of the model as LoRA targets")
    from peft import LoraConfig, inject_adapter_in_model

    names = targets if isinstance(targets, str) else list(targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names)
    if seed is None:
        inject_adapter_in_model(config, model)
    else:
        cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            inject_adapter_in_model(config, model)
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA delta into its base weight and put the plain layers back (in place;
    returns ``model``, trainable again as before :func:`add_lora`)."""
    from peft.tuners.lora import LoraLayer

    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer):
            mod.merge(safe_merge=True)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, mod.get_base_layer())
    model.requires_grad_(True)
    return model
