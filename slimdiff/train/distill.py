"""Knowledge distillation losses: output KD, hidden-state KD and TinyFusion's masked KD.

Total loss (TinyFusion, ``train_masked_kd.py``): ``(1 - alpha) * GT + alpha * KD + beta * feat``
with ``alpha = 0.9`` and ``beta`` decaying linearly from ``feat_beta`` to 0 over training.
The masked feature loss ignores activations far from their mean, which dominate the
MSE in DiT hidden states: per sample, ``m = |h - mu| < k sigma`` (``mu``, ``sigma`` over
tokens and channels, ``k = 2``), computed separately for student and teacher, and
``feat = mean((m_s h_s - m_t h_t)^2)`` averaged over the mapped layer pairs. The pairs
(``TrainConfig.layer_map``, student block -> teacher block) come from the caller; the depth
methods pass the reference's group-end map by default (a group's last kept student block ->
the teacher block ending the group, ``train_masked_kd.py`` ~185-193), see
:func:`slimdiff.compression.depth.layer_map`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

KD_MODES = ("none", "output", "hidden", "masked")


class HiddenCapture:
    """Forward hooks that keep the outputs of chosen backbone blocks during one forward."""

    def __init__(self, model: nn.Module, indices: list[int]):
        from slimdiff.models.backbone import Backbone, as_backbone  # lazy: the CLI imports the trainer at start

        self._block_output = Backbone.block_output
        blocks = as_backbone(model).blocks
        bad = [i for i in indices if not 0 <= i < len(blocks)]
        if bad:
            from slimdiff.errors import UsageError

            raise UsageError(f"layer map index {bad} out of range: the model has {len(blocks)} blocks")
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [blocks[i].register_forward_hook(self._hook(i)) for i in indices]

    def _hook(self, i: int):
        def hook(_module, _inputs, output):
            self.outputs[i] = self._block_output(output)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def outlier_mask(h: torch.Tensor, k: float) -> torch.Tensor:
    """1 where ``|h - mu| < k sigma`` with per-sample statistics over all other dims."""
    dims = tuple(range(1, h.ndim))
    mu = h.mean(dim=dims, keepdim=True)
    sigma = h.std(dim=dims, keepdim=True)
    return ((h - mu).abs() < k * sigma).to(h.dtype)


def feature_loss(h_s: torch.Tensor, h_t: torch.Tensor, masked: bool, k: float) -> torch.Tensor:
    """Hidden-state MSE, optionally with TinyFusion's outlier masks."""
    if masked:
        h_s, h_t = outlier_mask(h_s, k) * h_s, outlier_mask(h_t, k) * h_t
    return torch.mean((h_s.float() - h_t.float()) ** 2)


def distill_loss(gt_loss, pred, t_pred, config, beta: float, capture_s=None, capture_t=None) -> torch.Tensor:
    """Combine the ground-truth loss with output KD and (for hidden/masked) feature KD."""
    kd = torch.mean((pred.float() - t_pred.float()) ** 2)
    loss = (1 - config.kd_alpha) * gt_loss + config.kd_alpha * kd
    if config.kd in ("hidden", "masked") and config.layer_map:
        feats = [
            feature_loss(capture_s.outputs[s], capture_t.outputs[t], config.kd == "masked", config.mask_k)
            for s, t in config.layer_map.items()
        ]
        loss = loss + beta * torch.stack(feats).mean()
    return loss
