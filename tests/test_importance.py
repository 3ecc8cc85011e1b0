"""Diff-Pruning's importances against hand computations (slimdiff.compression.importance), the
ddpm_prune.py procedure reproduced exactly, the Taylor baseline, calibration without random
fallbacks, and the torch-pruning internals slimdiff relies on."""
from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from conftest import tiny_dit, tiny_pixart, tiny_unet

from slimdiff.compression import width
from slimdiff.compression.calibration import calibration_batch
from slimdiff.compression.importance import PaperTaylorImportance, kept_per_group, prune_separately
from slimdiff.errors import UsageError
from slimdiff.methods import diff_pruning as dp
from slimdiff.methods import width_baselines as wb
from slimdiff.methods.base import Context
from slimdiff.models.backbone import as_backbone


class TwoConv(nn.Module):
    """conv1 -> GroupNorm -> ReLU -> conv2: one prunable group (conv1 out, GroupNorm, conv2 in)."""

    def __init__(self, channels: int = 8, groups: int = 2):
        super().__init__()
        self.conv1, self.norm = nn.Conv2d(3, channels, 3, padding=1), nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, 4, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.norm(self.conv1(x))))


def two_conv(channels: int = 8, groups: int = 2) -> tuple[TwoConv, torch.Tensor]:
    torch.manual_seed(0)
    net = TwoConv(channels, groups)
    with torch.no_grad():
        net.norm.weight.normal_()  # non-trivial GroupNorm affine
    x = torch.randn(2, 3, 6, 6)
    (net(x) ** 2).mean().backward()
    return net, x


def pruner_of(net: TwoConv, x: torch.Tensor, imp, ratio: float):
    return tp.pruner.BasePruner(net, x, importance=imp, pruning_ratio=ratio, ignored_layers=[net.conv2],
                                in_channel_groups={}, out_channel_groups={})


def full_group(pruner, net: TwoConv):
    return pruner.DG.get_pruning_group(net.conv1, tp.prune_conv_out_channels, list(range(net.conv1.out_channels)))


def hand_terms(net: TwoConv) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel w*dw of conv1's rows, conv2's columns and the GroupNorm weight."""
    w1 = (net.conv1.weight * net.conv1.weight.grad).flatten(1)
    w2 = (net.conv2.weight * net.conv2.weight.grad).transpose(0, 1).flatten(1)
    return w1, w2, net.norm.weight * net.norm.weight.grad


def kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return [int((before == row).all(1).nonzero()) for row in after]


# --------------------------------------------------------------------------- hand computations
def test_paper_importance_by_hand():
    """sum (w dw)^2 over conv1's out and conv2's in channels + |w dw| of the GroupNorm weight, summed."""
    net, x = two_conv()
    w1, w2, gn = hand_terms(net)
    want = w1.pow(2).sum(1) + w2.pow(2).sum(1) + gn.abs()
    pruner = pruner_of(net, x, PaperTaylorImportance(), 0.3)
    torch.testing.assert_close(PaperTaylorImportance()(full_group(pruner, net)), want)


@pytest.mark.parametrize("channels, groups, ratio, kept", [(8, 2, 0.3, 6), (32, 8, 0.3, 24), (8, 2, 0.5, 4)])
def test_paper_ranking_by_hand(channels, groups, ratio, kept):
    """Each GroupNorm group loses its own (C - int(C (1-r))) // G lowest channels (the fork's rule:
    ratio 0.3 on 32 channels in 8 groups keeps 24)."""
    net, x = two_conv(channels, groups)
    w1, w2, gn = hand_terms(net)
    imp = (w1.pow(2).sum(1) + w2.pow(2).sum(1) + gn.abs()).view(groups, -1)
    per_group = channels // groups - kept // groups
    want = sorted((torch.argsort(imp, 1)[:, per_group:] + torch.arange(groups).view(-1, 1) * (channels // groups))
                  .flatten().tolist())
    before = net.conv1.weight.detach().flatten(1).clone()
    prune_separately(pruner_of(net, x, PaperTaylorImportance(), ratio))
    assert net.conv1.out_channels == net.norm.num_channels == net.conv2.in_channels == kept
    assert kept_per_group(channels // groups, groups, ratio) == kept // groups
    assert sorted(kept_rows(before, net.conv1.weight.detach().flatten(1))) == want
    assert net(x).shape == (2, 4, 6, 6)


@pytest.mark.parametrize("multivariable", [False, True])
def test_taylor_tp_by_hand(multivariable):
    """torch-pruning's TaylorImportance: mean over conv1 and conv2 of sum |w dw| (|sum w dw| if
    multivariable), GroupNorm left out, divided by the mean; the same slots removed in every group."""
    net, x = two_conv()
    w1, w2, _ = hand_terms(net)
    per = (lambda t: t.sum(1).abs()) if multivariable else (lambda t: t.abs().sum(1))
    want = (per(w1) + per(w2)) / 2
    want = want / want.mean()
    imp = tp.importance.TaylorImportance(multivariable=multivariable)
    pruner = pruner_of(net, x, imp, 0.3)
    torch.testing.assert_close(imp(full_group(pruner, net)), want)
    slots = torch.argsort(want.view(2, -1).mean(0))[2:]  # each group of 4 loses 4 - int(4 * 0.7) = 2 shared slots
    before = net.conv1.weight.detach().flatten(1).clone()
    pruner.step()
    want_kept = sorted((slots.view(1, -1) + torch.tensor([[0], [4]])).flatten().tolist())
    assert sorted(kept_rows(before, net.conv1.weight.detach().flatten(1))) == want_kept


def test_our_importance_kinds_are_those_classes():
    assert isinstance(width._importance("taylor-paper"), PaperTaylorImportance)
    for kind, multivariable in (("taylor", False), ("taylor-multivariable", True)):
        imp = width._importance(kind)
        assert type(imp) is tp.importance.TaylorImportance and imp.multivariable is multivariable
    with pytest.raises(UsageError, match="unknown importance"):
        width._importance("fisher")


# --------------------------------------------------------------------------- ddpm_prune.py, exactly
def with_grads(model: nn.Module) -> nn.Module:
    x, _, cond = as_backbone(model).example_inputs(2, torch.Generator().manual_seed(3))
    dp.accumulate_gradients(model, x, cond, threshold=0.0, stride=250)
    return model


def test_taylor_tp_keeps_the_channels_ddpm_prune_py_keeps():
    """Same model, gradients and ratio: slimdiff's taylor-tp == ddpm_prune.py's MagnitudePruner call
    (TaylorImportance(multivariable=False), channel_groups={}, ignored_layers=[conv_out]); both with the
    importance computed on the model and replayed from a record (the budget search's path)."""
    model = with_grads(tiny_unet(attention_head_dim=32))  # heads=1, as the CIFAR-10 DDPM
    ref = width._copy_with_grads(model)
    example = {"sample": torch.randn(1, 3, 16, 16), "timestep": torch.ones((1,)).long()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecated argument names, as the script passes them
        pruner = tp.pruner.MagnitudePruner(ref, example, importance=tp.importance.TaylorImportance(multivariable=False),
                                           iterative_steps=1, channel_groups={}, ch_sparsity=0.3,
                                           ignored_layers=[ref.conv_out])
    for g in pruner.step(interactive=True):
        g.prune()
    want = ref.state_dict()
    ours, _ = width.prune_with_ratio(model, 0.3, "taylor", group_ranking="shared")
    scores = width.record_importance(model, "taylor")
    replayed, _ = width.prune_with_ratio(model, 0.3, "taylor", group_ranking="shared", scores=scores)
    for got in (ours.state_dict(), replayed.state_dict()):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert ours.down_blocks[0].resnets[0].conv1.out_channels == 8  # 16 in 8 groups of 2: 2 - int(1.4) = 1 each


def test_paper_and_tp_structures_differ_on_a_unet():
    """At ratio 0.3, 32 channels in 8 GroupNorm groups: the paper keeps 24, torch-pruning 1.6 keeps 16."""
    model = with_grads(tiny_unet())
    paper, _ = width.prune_with_ratio(model, 0.3, "taylor-paper")
    shared, _ = width.prune_with_ratio(model, 0.3, "taylor", group_ranking="shared")
    assert paper.down_blocks[1].resnets[0].conv1.out_channels == 24
    assert shared.down_blocks[1].resnets[0].conv1.out_channels == 16


def test_budget_search_with_the_paper_importance():
    """Our DiT here; every tiny backbone (UNet2DModel included) through Diff-Pruning's default in
    tests/test_diff_pruning.py::test_prune_every_backbone."""
    from slimdiff.eval.compute import macs_forward

    budget = 0.5
    model = with_grads(tiny_dit())
    best, _ = width.prune_to_budget(model, budget, "taylor-paper")
    assert abs(best.macs_ratio / budget - 1) <= width.TOLERANCE
    assert macs_forward(best.model) / macs_forward(model) == pytest.approx(best.macs_ratio)


@pytest.mark.parametrize("ranking", ["separate", "shared"])
def test_aligned_ratios_keep_aligned_widths_under_either_count_rule(ranking):
    """The budget search's alignment sets ratios for the count rule the pruner will apply."""
    table = [width.GroupInfo("conv", 100, 3, False), width.GroupInfo("attn", 72, 4, True)]
    ratios = width.aligned_ratios(table, 0.3, group_ranking=ranking)
    for g, step, want in ((table[0], 8, 72), (table[1], 8, 48)):  # widths >= ALIGN_MIN_WIDTH
        r = ratios[g.root]
        kept = kept_per_group(g.size, g.channel_groups, r) if ranking == "separate" else int(g.size * (1 - r))
        assert kept == want and kept % step == 0


def test_ranking_option_is_checked():
    with pytest.raises(UsageError, match="group_ranking"):
        width.prune_with_ratio(tiny_dit(), 0.3, "magnitude", group_ranking="global")
    with pytest.raises(UsageError, match="unknown importance 'fisher'; choose one of paper, taylor-tp"):
        dp.diff_pruning(tiny_dit(), 0.5, Context(), importance="fisher")


# --------------------------------------------------------------------------- torch-pruning internals
def test_torch_pruning_private_api_we_use():
    """width.py / importance.py call these private torch-pruning members: fail loudly if they change."""
    base = tp.pruner.BasePruner
    for name in ("_get_channel_groups", "_is_atten_group", "_downstream_node_as_root_if_attention"):
        assert list(inspect.signature(getattr(base, name)).parameters) == ["self", "group"], name
    public = inspect.signature(base.__init__).parameters
    for name in ("pruning_ratio_dict", "num_heads", "prune_num_heads", "prune_head_dims", "head_pruning_ratio_dict",
                 "in_channel_groups", "out_channel_groups", "forward_fn", "unwrapped_parameters"):
        assert name in public, name
    assert list(inspect.signature(base.step).parameters) == ["self", "interactive"]
    net, x = two_conv()
    pruner = pruner_of(net, x, PaperTaylorImportance(), 0.3)
    group = full_group(pruner, net)
    assert pruner._get_channel_groups(group) == 2 and pruner._is_atten_group(group) == (False, [])
    assert len(group[0].root_idxs) == 8 and group[0].dep.handler == tp.prune_conv_out_channels
    assert group[1].dep.handler == tp.prune_groupnorm_out_channels
    assert group[1].dep.trigger == tp.prune_conv_out_channels and group[1].dep.source.module is net.conv1
    assert pruner.get_target_pruning_ratio(None, step=1) == pytest.approx(0.3)  # a module without its own ratio


# --------------------------------------------------------------------------- the Taylor baseline
def test_taylor_baseline_uses_every_timestep_and_multivariable_scores():
    model = tiny_dit(in_channels=1)  # digits-shaped: real calibration data
    ctx = Context(steps=2, batch_size=4, progress=False)
    out = wb.taylor_width(copy.deepcopy(model), 0.5, ctx, stride=500)
    entry = out.slimdiff_meta["method"]["chain"][-1]
    assert entry["name"] == "taylor" and entry["settings"]["importance"] == "taylor-multivariable"
    assert out.slimdiff_meta["extras"]["taylor"]["timesteps"]["timesteps_used"] == 2  # no threshold: all of them
    paper = wb.taylor_width(copy.deepcopy(model), 0.5, ctx, stride=500, importance="paper")
    assert paper.slimdiff_meta["method"]["chain"][-1]["settings"]["importance"] == "taylor-paper"
    assert {k: v.shape for k, v in out.state_dict().items()} == {k: v.shape for k, v in paper.state_dict().items()}
    assert any(not torch.equal(a, b) for a, b in zip(out.state_dict().values(), paper.state_dict().values()))
    with pytest.raises(UsageError, match="importance"):
        wb.taylor_width(copy.deepcopy(model), 0.5, ctx, importance="fisher")


# --------------------------------------------------------------------------- calibration
def test_text_model_without_captions_gets_the_null_prompt():
    model = tiny_pixart()
    bb = as_backbone(model)
    data = [(torch.randn(4, 8, 8), -1)] * 3  # latents without captions
    _, cond, _ = calibration_batch(model, Context(batch_size=3), dataset=data)
    assert torch.equal(cond, bb.null_cond(None, 3)) and not cond.any()


def test_non_epsilon_objective_warns():
    from slimdiff.diffusion.schedulers import DiffusionConfig
    from slimdiff.result import record_of, set_record

    model = tiny_dit()
    v_prediction = DiffusionConfig(objective="v_prediction").to_dict()
    set_record(model, dataclasses.replace(record_of(model), diffusion=v_prediction))
    x, _, y = as_backbone(model).example_inputs(2, torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="epsilon loss.*'v_prediction'"):
        dp.accumulate_gradients(model, x, y, threshold=0.05, stride=500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dp.accumulate_gradients(tiny_dit(), x, y, threshold=0.05, stride=500)  # epsilon: silent


# --------------------------------------------------------------------------- residual width (DiT)
def test_residual_width_option_reaches_the_pruner():
    pytest.importorskip("slimdiff.compression.residual_width")
    model = tiny_dit()
    x, _, y = as_backbone(model).example_inputs(4, torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner = dp.diff_pruning(copy.deepcopy(model), 0.5, Context(steps=2, progress=False), stride=250,
                                calibration=(x, y))
        wide = dp.diff_pruning(copy.deepcopy(model), 0.5, Context(steps=2, progress=False), stride=250,
                               calibration=(x, y), residual_width=True)
    assert inner.x_embedder.proj.out_channels == 32 and wide.x_embedder.proj.out_channels < 32
    assert wide.slimdiff_meta["method"]["chain"][-1]["settings"]["residual"] is True
    assert as_backbone(wide)(x, torch.zeros(4, dtype=torch.long), y).shape == x.shape
