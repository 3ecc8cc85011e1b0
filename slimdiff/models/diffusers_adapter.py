"""Our :class:`~slimdiff.models.dit.DiT` as a diffusers model, so a ``DiTPipeline`` runs it.

Results whose model is our DiT (DyDiT with its routers, TinyFusion and width pruning of our
DiT, residual width) keep per-block widths and runtime hooks that diffusers'
``DiTTransformer2DModel`` cannot hold. :class:`DiffusersDiT` wraps the DiT itself (its hooks,
routers, reuse plan and record stay on it) and presents ``DiTTransformer2DModel``'s call
(``hidden_states, timestep, class_labels, return_dict`` -> ``.sample``) and the config
fields ``DiTPipeline`` reads (``sample_size``, ``in_channels``, ``out_channels``). The wrapper
is for running, not for ``save_pretrained`` (which refuses): save the pipeline with
``slimdiff.save_pipeline`` (or the model with ``slimdiff.save``) instead.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import ConfigMixin, DiTTransformer2DModel, ModelMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from slimdiff.errors import UsageError
from slimdiff.models.dit import DiT

__all__ = ["DiffusersDiT", "for_slot", "unwrap"]


class DiffusersDiT(ModelMixin, ConfigMixin):
    """``DiTTransformer2DModel``'s interface around our DiT ``dit`` (see the module docs)."""

    def __init__(self, dit: DiT):
        super().__init__()
        self.dit = dit
        self.register_to_config(sample_size=dit.x_embedder.grid_size * dit.patch_size, in_channels=dit.in_channels,
                                out_channels=dit.out_channels, patch_size=dit.patch_size,
                                num_embeds_ada_norm=dit.num_classes, num_layers=len(dit.blocks))
        self.train(dit.training)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor | float, class_labels: torch.Tensor,
                cross_attention_kwargs: dict | None = None, return_dict: bool = True):
        """``dit(hidden_states, timestep, class_labels)``; a scalar ``timestep`` is broadcast to the batch."""
        t = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(len(hidden_states))
        out = self.dit(hidden_states, t, class_labels)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def save_pretrained(self, *args, **kwargs) -> None:
        """Refused: a diffusers folder cannot hold our DiT's widths, routers or plan, and plain
        diffusers could not load the class back."""
        raise UsageError("a slimdiff DiT installed in a pipeline cannot be saved with save_pretrained: save the "
                         "pipeline with slimdiff.save_pipeline(pipe, path) (load it with slimdiff.from_pretrained), "
                         "or the model with slimdiff.save(pipe.transformer, path)")


def unwrap(model: nn.Module) -> nn.Module:
    """The slimdiff model inside ``model`` (the DiT of a :class:`DiffusersDiT`, else ``model``)."""
    return model.dit if isinstance(model, DiffusersDiT) else model


def for_slot(model: nn.Module, expected: type) -> nn.Module | None:
    """``model`` as a module a pipeline slot declaring ``expected`` accepts, or None if none is."""
    if isinstance(model, expected):
        return model
    if isinstance(model, DiT) and issubclass(DiTTransformer2DModel, expected):
        return DiffusersDiT(model)
    return None
