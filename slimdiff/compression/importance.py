"""Diff-Pruning's importance and channel-group ranking as the paper's code computed them, on
torch-pruning 1.6's dependency graph.

The paper's tables come from ``ddpm_exp/`` (``scripts/simple_cifar_our.sh``), which vendors an
older torch-pruning with two differences from the pip torch-pruning 1.6.1 that the repository's
diffusers script ``ddpm_prune.py`` uses:

* **Score** (:class:`PaperTaylorImportance`; ``ddpm_exp/torch_pruning/importance.py`` ~376-425):
  per channel, the sum over the dependency group's layers of ``sum_k (w_k * dw_k)^2`` over
  conv/linear output and input weights, plus ``|w * dw|`` of GroupNorm affine weights; no bias
  term, summed (not averaged) over the group, no normalisation. torch-pruning 1.6.1's
  ``TaylorImportance(multivariable=False)`` instead sums ``|w_k * dw_k|``, leaves GroupNorm out
  (its default ``target_types``), averages over the group and divides by the mean.
* **Ranking inside channel groups** (:func:`separate_group_indices`; ``ddpm_exp/torch_pruning/
  pruner/algorithms/metapruner.py`` ~237-246): a layer of ``C`` channels in ``G`` channel groups
  (GroupNorm groups; heads) at ratio ``r`` loses ``(C - int(C (1 - r))) // G`` channels *per
  group*, each group ranked on its own scores. torch-pruning 1.6.1 averages the scores over the
  groups, loses ``g - int(g (1 - r))`` of each group of ``g``, the *same* slots in every group
  (ratio 0.3 on 32 channels in 8 groups: the fork keeps 24, 1.6.1 keeps 16).

The fork stacks the layers' scores position by position (dropping layers whose index count
differs from the root's); here they are added at the root channel each index maps to
(torch-pruning 1.6's ``root_idxs``), which is the same on every group the fork could stack.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["PaperTaylorImportance", "separate_group_indices", "group_ratio", "prune_separately", "kept_per_group",
           "ratio_keeping", "GROUP_RANKINGS"]

GROUP_RANKINGS = ("separate", "shared")  # ddpm_exp fork / torch-pruning 1.6.1


class PaperTaylorImportance:
    """``ddpm_exp``'s Taylor importance of a torch-pruning group (see the module docstring).

    Needs ``.grad`` on the group's weights (Diff-Pruning's summed timestep gradients).
    Returns one score per root channel, or ``None`` for a group without conv/linear/GroupNorm
    weights (torch-pruning then skips it, as the fork did).
    """

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        from torch_pruning.pruner import function

        out_fns = (function.prune_conv_out_channels, function.prune_linear_out_channels)
        in_fns = (function.prune_conv_in_channels, function.prune_linear_in_channels)
        scores: list[tuple[torch.Tensor, list]] = []
        for i, (dep, idxs) in enumerate(group):
            layer, fn, root_idxs = dep.target.module, dep.handler, group[i].root_idxs
            idxs = sorted(idxs)  # torch-pruning pairs sorted indices with root_idxs (as its own importances do)
            if fn in out_fns or fn in in_fns:
                w, dw = layer.weight, layer.weight.grad
                transposed = getattr(layer, "transposed", False)
                if (fn in out_fns) == transposed:  # input channels of a conv/linear: dim 1
                    w, dw = w.transpose(0, 1), dw.transpose(0, 1)
                per_channel = (w * dw).flatten(1).pow(2).sum(1)
                grouped = isinstance(layer, nn.modules.conv._ConvNd) and layer.groups not in (1, layer.in_channels)
                if fn in in_fns and grouped:  # grouped conv: its weights hold in/groups channels (as torch-pruning)
                    per_channel = per_channel.repeat(layer.groups)
                scores.append((per_channel[idxs], root_idxs))
            elif fn == function.prune_groupnorm_out_channels and layer.affine:
                scores.append(((layer.weight * layer.weight.grad).abs()[idxs], root_idxs))
        scores = [(s, r) for s, r in scores if all(j is not None for j in r)]
        if not scores:
            return None
        n = len(group[0].root_idxs)
        total = torch.zeros(n, dtype=torch.float32, device=scores[0][0].device)
        for s, r in scores:
            total.scatter_add_(0, torch.tensor(r, device=s.device), s.float())
        return total


def separate_group_indices(imp: torch.Tensor, channel_groups: int, ratio: float) -> list[int]:
    """Channels to remove from a layer of ``len(imp)`` channels in ``channel_groups`` equal groups
    at ``ratio``, each group ranked on its own (``ddpm_exp`` metapruner ~237-246):
    ``(C - int(C (1 - ratio))) // G`` lowest-scoring channels of every group."""
    total = len(imp)
    size = total // channel_groups
    per_group = (total - int(total * (1 - ratio))) // channel_groups
    if per_group <= 0:
        return []
    picked = [torch.argsort(imp[g * size:(g + 1) * size])[:per_group] + g * size for g in range(channel_groups)]
    return sorted(torch.cat(picked).tolist())


def kept_per_group(size: int, channel_groups: int, ratio: float) -> int:
    """Channels :func:`separate_group_indices` keeps in each of ``channel_groups`` groups of ``size``."""
    total = size * channel_groups
    return size - max(0, (total - int(total * (1 - ratio))) // channel_groups)


def ratio_keeping(size: int, channel_groups: int, kept: int) -> float:
    """A ratio at which :func:`separate_group_indices` keeps exactly ``kept`` of each group
    (``C (1 - r) = G kept + 1/2``, away from the floor's edges)."""
    return max(0.0, 1 - (kept + 0.5 / channel_groups) / size)


def group_ratio(pruner, group) -> float:
    """The ratio torch-pruning applies to ``group``: a ``pruning_ratio_dict`` entry of one of its
    layers (where torch-pruning 1.6 looks: a layer whose output channels the group prunes), else
    the pruner's ratio at its current step."""
    for dep, _ in group:
        for module, fn in ((dep.source.module, dep.trigger), (dep.target.module, dep.handler)):
            if module in pruner.pruning_ratio_dict and pruner.DG.is_out_channel_pruning_fn(fn):
                return pruner.get_target_pruning_ratio(module)
    return pruner.get_target_pruning_ratio(None)


def prune_separately(pruner, *, whole_heads: bool = False) -> None:
    """One pruning step of ``pruner`` (a torch-pruning ``BasePruner``, local ranking) with every
    channel group ranked on its own (:func:`separate_group_indices`) instead of torch-pruning's
    shared slots.

    torch-pruning decides which groups to prune (ignored layers, attention roots, the ratio
    dictionary) and scores them; only the indices are chosen here. Whole-head attention groups
    (``whole_heads``) are pruned as torch-pruning chose (heads are not channel groups to rank
    inside). Relies on ``BasePruner._get_channel_groups`` and ``_is_atten_group`` (private;
    ``tests/test_importance.py`` checks they exist with these signatures).
    """
    dg = pruner.DG
    for chosen in pruner.step(interactive=True):
        dep = chosen[0].dep
        module, fn = dep.target.module, dep.handler
        if whole_heads and pruner._is_atten_group(chosen)[0]:
            chosen.prune()
            continue
        channels = dg.get_out_channels(module) if dg.is_out_channel_pruning_fn(fn) else dg.get_in_channels(module)
        full = dg.get_pruning_group(module, fn, list(range(channels)))
        imp = pruner.estimate_importance(full)
        idxs = separate_group_indices(imp, pruner._get_channel_groups(full), group_ratio(pruner, full))
        group = dg.get_pruning_group(module, fn, idxs) if idxs else None
        if group is not None and dg.check_pruning_group(group):
            group.prune()
