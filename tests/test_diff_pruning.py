"""Diff-Pruning (slimdiff.methods.diff_pruning), its width baselines (slimdiff.methods.width_baselines) and the
shared width pruner (slimdiff.compression.width) on tiny real models."""
from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import TINY_MODELS, tiny_diffusers_dit, tiny_dit

from slimdiff.errors import UsageError
from slimdiff.eval.compute import macs_sampling
from slimdiff.compression import width
from slimdiff.compression.calibration import calibration_batch
from slimdiff.methods import diff_pruning as dp
from slimdiff.methods import width_baselines as wb
from slimdiff.methods.base import Context, compress
from slimdiff.models.backbone import as_backbone

STRIDE = 250  # 4 timesteps per gradient pass keeps every test fast


def ctx(**kw) -> Context:
    base = dict(steps=2, batch_size=4, progress=False)
    base.update(kw)
    return Context(**base)


def inputs(model: nn.Module, n: int = 3, seed: int = 1):
    return as_backbone(model).example_inputs(n, torch.Generator().manual_seed(seed))


def run(model: nn.Module, *args):
    with torch.no_grad():
        return as_backbone(model)(*args)


def prune(model: nn.Module, budget: float = 0.5, **kw) -> nn.Module:
    x, _, c = inputs(model, 4, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dp.diff_pruning(model, budget, ctx(), 0.05, stride=STRIDE, calibration=(x, c), **kw)


# --------------------------------------------------------------------------- timesteps
LOSSES = [1.0, 4.0, 2.0, 0.3, 0.1, 5.0]  # L_max = 4 from t=1; 0.3 < 0.1 * 4 at t=3


def controlled(threshold: float, backprop_stop_step: bool = False):
    """Loss ``w * LOSSES[t]`` with w = 1: the gradient of w is the sum of the used losses."""
    w = nn.Parameter(torch.ones(()))
    trace = dp.taylor_timesteps(lambda t: w * LOSSES[t], range(len(LOSSES)), threshold,
                                backprop_stop_step=backprop_stop_step)
    return trace, float(w.grad)


@pytest.mark.parametrize("threshold, stop_step, used, stop_t", [
    (0.1, False, [0, 1, 2], 3),  # paper / ddpm_exp: the stopping step adds nothing
    (0.1, True, [0, 1, 2, 3], 3),  # ddpm_prune.py: back-propagated before the check
    (0.0, False, [0, 1, 2, 3, 4, 5], None),  # threshold 0: every timestep
    (1.0, False, [0, 1], 2),  # threshold 1: stop at the first loss below the maximum
    (0.02, False, [0, 1, 2, 3, 4, 5], None),  # 0.1 >= 0.02 * 4: never stops
])
def test_which_timesteps_contribute(threshold, stop_step, used, stop_t):
    trace, grad = controlled(threshold, stop_step)
    assert trace.used == used and trace.stop_t == stop_t
    assert trace.loss_max == max(LOSSES[: (stop_t if stop_t is not None else len(LOSSES) - 1) + 1])
    assert grad == pytest.approx(sum(LOSSES[t] for t in used))


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_threshold_out_of_range(bad):
    with pytest.raises(UsageError, match="threshold"):
        controlled(bad)
    with pytest.raises(UsageError, match="threshold"):
        dp.diff_pruning(tiny_dit(), 0.5, ctx(), bad)


def test_gradient_pass_sums_per_timestep_gradients():
    """accumulate_gradients == the sum of the per-timestep gradients on the same x0, noise, cond."""
    from slimdiff.diffusion.losses import ForwardProcess, diffusion_loss
    from slimdiff.diffusion.schedulers import DiffusionConfig

    model = tiny_dit()
    x0, _, y = inputs(model, 4)
    trace = dp.accumulate_gradients(model, x0, y, threshold=0.0, stride=400, seed=3)
    assert trace.used == [0, 400, 800] and trace.stop_t is None
    got = model.x_embedder.proj.weight.grad.clone()

    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    fp = ForwardProcess(DiffusionConfig())
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    losses = []
    for t in (0, 400, 800):
        b = fp.noisy(x0, noise, torch.full((4,), t))
        loss = diffusion_loss(as_backbone(ref)(b.x_t, b.t, y), b)
        loss.backward()
        losses.append(float(loss.detach()))
    assert trace.losses == pytest.approx(losses)
    torch.testing.assert_close(got, ref.x_embedder.proj.weight.grad)


# --------------------------------------------------------------------------- every backbone
@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_prune_every_backbone(kind, tmp_path):
    """Forward works, the budget is met in sampling MACs, the result is smaller and saves/loads exactly."""
    from slimdiff.io import load, save

    model = TINY_MODELS[kind]()
    pruned = prune(copy.deepcopy(model), 0.5)
    entry = pruned.slimdiff_meta["method"]["chain"][-1]
    assert entry["name"] == "diff-pruning"
    ratio = macs_sampling(pruned, steps=2) / macs_sampling(model, steps=2)
    assert ratio == pytest.approx(entry["measured"]["macs_ratio"])
    assert abs(ratio / 0.5 - 1) <= width.TOLERANCE
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    extras = pruned.slimdiff_meta["extras"]["diff-pruning"]
    assert extras["widths"] and all(kept < orig for orig, kept in extras["widths"].values())
    assert extras["timesteps"]["timesteps_used"] >= 1
    args = inputs(model)
    out = run(pruned, *args)
    assert out.shape == run(model, *args).shape and torch.isfinite(out).all()
    loaded = load(save(pruned, tmp_path / kind))
    torch.testing.assert_close(run(loaded, *args), out, rtol=0, atol=0)
    assert loaded.slimdiff_meta["method"]["name"] == "diff-pruning"


def test_budget_one_is_identity():
    model = tiny_dit()
    out = dp.diff_pruning(copy.deepcopy(model), 1.0, ctx())
    assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), model.state_dict().values()))
    args = inputs(model)
    torch.testing.assert_close(run(out, *args), run(model, *args), rtol=0, atol=0)
    assert all(p.grad is None for p in out.parameters())  # no gradient pass at all


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5, "half"])
def test_budget_outside_unit_interval(budget):
    for fn in (dp.diff_pruning, wb.random_width):
        with pytest.raises(UsageError, match="budget"):
            fn(tiny_dit(), budget, ctx())


def test_nothing_prunable():
    with pytest.raises(UsageError, match="nothing width pruning can remove"):
        wb.magnitude_width(tiny_dit(depth=0), 0.5, ctx())


def test_budget_out_of_reach():
    with pytest.raises(UsageError, match="below what width pruning reaches"):
        wb.magnitude_width(tiny_dit(), 0.02, ctx())


def test_calibration_of_wrong_shape(tmp_path):
    model = tiny_dit()  # 4 x 8 x 8
    with pytest.raises(UsageError, match=r"shape \(1, 8, 8\).*\(4, 8, 8\)"):
        dp.diff_pruning(model, 0.5, ctx(), calibration=(torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)))
    path = tmp_path / "lat.npz"
    np.savez(path, latents=np.zeros((5, 3, 8, 8), np.float32), labels=np.zeros(5, np.int64))
    with pytest.raises(UsageError, match=r"shape \(3, 8, 8\)"):
        dp.diff_pruning(model, 0.5, ctx(data=str(path)))


def test_calibration_from_digits_uses_real_labelled_data():
    model = tiny_dit(in_channels=1)
    x0, y, source = calibration_batch(model, ctx(batch_size=6))
    assert source == "digits" and x0.shape == (6, 1, 8, 8) and y.dtype == torch.long
    assert x0.min() >= -1 and x0.max() <= 1 and len(set(x0.flatten().tolist())) > 2
    with pytest.raises(UsageError, match=r"'digits'.*\(1, 8, 8\).*\(4, 8, 8\).*pass --data"):
        calibration_batch(tiny_dit(), ctx())  # a latent model: an error naming the fix, never random inputs
    with pytest.raises(UsageError, match="pass --data"):
        dp.diff_pruning(tiny_dit(), 0.5, ctx())


# --------------------------------------------------------------------------- equivalences
def masked_like(original: nn.Module, history) -> nn.Module:
    """The original with the pruned channels zeroed: output rows (+ bias) or input columns."""
    masked = copy.deepcopy(original)
    layers = dict(masked.named_modules())
    with torch.no_grad():
        for name, is_out, idxs in history:
            layer = layers[name]
            if is_out:
                layer.weight[idxs] = 0
                if layer.bias is not None:
                    layer.bias[idxs] = 0
            else:
                layer.weight[:, idxs] = 0
    return masked


@pytest.mark.parametrize("factory", [tiny_dit, tiny_diffusers_dit], ids=["dit", "diffusers-dit"])
def test_whole_heads_and_mlp_channels_equal_the_masked_model(factory):
    """Removing whole heads and MLP hidden channels == zeroing them (exact identities);
    with the head count left stale the forward silently differs."""
    model = factory(num_heads=4) if factory is tiny_dit else factory(num_attention_heads=4, attention_head_dim=8)
    pruned, history = width.prune_with_ratio(model, 0.5, "magnitude", heads="whole")
    attn = as_backbone(pruned).attention_layouts()
    assert {a.heads for a in attn} == {2}  # 4 -> 2 heads, head width unchanged
    assert any("mlp" in n or "ff" in n for n, _, _ in history)
    args = inputs(model)
    want = run(masked_like(model, history), *args)
    assert not torch.allclose(want, run(model, *args), atol=1e-3)  # something was removed
    torch.testing.assert_close(run(pruned, *args), want, rtol=1e-4, atol=1e-5)

    stale = copy.deepcopy(pruned)
    for a in (layout.module for layout in as_backbone(stale).attention_layouts()):
        if hasattr(a, "num_heads"):
            a.num_heads = 4
        else:
            a.heads = 4
    assert not torch.allclose(run(stale, *args), want, atol=1e-3)


def test_head_dim_pruning_keeps_q_k_v_aligned():
    """Fused qkv: the same (head, dim) positions are kept in q, k and v of every head."""
    model = tiny_dit(num_heads=2)
    pruned, _ = width.prune_with_ratio(model, 0.5, "magnitude", heads="dims")
    for a0, a1 in zip(as_backbone(model).attention_layouts(), as_backbone(pruned).attention_layouts()):
        a0, a1 = a0.module, a1.module
        assert a1.num_heads == 2 and a1.qkv.out_features == 48
        w0, w1 = a0.qkv.weight, a1.qkv.weight
        rows = [int((w0 == r).all(1).nonzero()) for r in w1]  # each kept row is an original row
        kept = torch.tensor(rows).view(3, 2, -1) - torch.arange(3).view(3, 1, 1) * 32
        assert (kept == kept[0]).all()  # same positions in q, k and v
        assert ((kept[0] // 16) == torch.arange(2).view(2, 1)).all()  # each head keeps its own dims
    args = inputs(model)
    assert run(pruned, *args).shape == run(model, *args).shape


def test_baselines_share_the_pruner_shapes():
    """Equal compute: random, magnitude and Taylor importance reach the same shapes."""
    shapes = []
    for name in ("diff-pruning", "random-width", "magnitude-width"):
        model = tiny_dit()
        if name == "diff-pruning":
            out = prune(model, 0.6)
        else:
            out = getattr(wb, name.replace("-", "_"))(model, 0.6, ctx())
        assert out.slimdiff_meta["method"]["name"] == name
        shapes.append({k: v.shape for k, v in out.state_dict().items()})
    assert shapes[0] == shapes[1] == shapes[2]


def test_importances_differ():
    """Same shapes, different channels: Taylor, magnitude and random choose differently."""
    model = tiny_dit()
    x, _, y = inputs(model, 4)
    dp.accumulate_gradients(model, x, y, threshold=0.0, stride=STRIDE)
    kinds = ("taylor-paper", "taylor", "taylor-multivariable", "magnitude", "random")
    picks = [width.prune_with_ratio(model, 0.5, kind)[1] for kind in kinds]
    idx = [sorted(map(tuple, (sorted(i) for _, _, i in h))) for h in picks]
    assert all(idx[i] != idx[j] for i in range(len(kinds)) for j in range(i))


# --------------------------------------------------------------------------- recovery + CLI
def test_recovery_runs_through_the_shared_trainer(tmp_path):
    model = tiny_dit(in_channels=1)  # digits-shaped: real calibration and recovery data
    kw = dict(steps=2, batch_size=4, progress=False, work_dir=tmp_path)
    a = wb.random_width(copy.deepcopy(model), 0.6, Context(**kw))
    b = wb.random_width(copy.deepcopy(model), 0.6, Context(recover_steps=2, **kw))
    assert [d.is_dir() for d in tmp_path.glob("recover-random-width-*")] == [True]  # keyed by the model fingerprint
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert any(not torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_cli_compress_json(tmp_path):
    from typer.testing import CliRunner

    from slimdiff.cli import app
    from slimdiff.io import save

    src = save(tiny_dit(in_channels=1), tmp_path / "teacher")
    res = CliRunner().invoke(app, ["compress", "--method", "magnitude-width", "--model", str(src), "--budget", "0.5",
                                   "--steps", "2", "-o", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert abs(out["macs_ratio"] / 0.5 - 1) <= width.TOLERANCE and out["params"] < out["original_params"]
    bad = CliRunner().invoke(app, ["compress", "--method", "random-width", "--model", str(src), "--budget", "0.5",
                                   "--threshold", "0.1", "-o", str(tmp_path / "x")])
    assert isinstance(bad.exception, UsageError) and "threshold" in str(bad.exception)  # main() exits 2


def test_registered_through_compress():
    out = compress(tiny_dit(), "magnitude-width", 0.5, ctx())
    assert abs(out.slimdiff_meta["measured"]["macs_ratio"] / 0.5 - 1) <= width.TOLERANCE


# --------------------------------------------------------------------------- specs and calibration
def test_specs_hold_every_option_with_the_recipe_defaults():
    from slimdiff.methods import get_method

    spec = get_method("diff-pruning")
    assert spec is dp.DIFF_PRUNING and spec.kind == "width" and spec.speed_student is dp.speed_student
    assert spec.make_config() == dp.DiffPruningConfig(threshold=0.05, stride=1, backprop_stop_step=False, heads="dims",
                                                      importance="paper", residual_width=False)
    for name in ("random-width", "magnitude-width"):
        assert get_method(name).options == ("heads", "group_ranking", "residual_width")
        assert get_method(name).make_config() == wb.WidthBaselineConfig(heads="dims", group_ranking="separate")
    assert get_method("taylor").make_config() == wb.TaylorConfig(heads="dims", group_ranking="separate", stride=1,
                                                                 importance="multivariable")
    names = ("diff-pruning", "random-width", "magnitude-width", "taylor")
    assert {get_method(n).draw for n in names} == {width.draw_width}
    with pytest.raises(UsageError, match="stride must be an integer"):
        spec.make_config({"stride": 2.5})


def test_recorded_settings_are_the_methods_own():
    """Options reach the method through compress(); the settings recorded stay what they were."""
    model = tiny_dit(in_channels=1)
    out = compress(model, "diff-pruning", 0.5, ctx(), {"threshold": 0, "stride": 500})
    settings = out.slimdiff_meta["method"]["chain"][0]["settings"]
    common = {"ranking": "local", "group_ranking": "separate", "residual": False, "align": width.ALIGN}
    assert settings == {"threshold": 0.0, "stride": 500, "backprop_stop_step": False, "heads": "dims",
                        "importance": "taylor-paper", "calibration": "digits", "calibration_size": 4, **common}
    out = compress(model, "diff-pruning", 0.5, ctx(), {"stride": 500, "importance": "taylor-tp"})
    settings = out.slimdiff_meta["method"]["chain"][0]["settings"]
    assert settings["importance"] == "taylor" and settings["group_ranking"] == "shared"
    out = compress(model, "random-width", 0.5, ctx(seed=3), {"heads": "whole"})
    assert out.slimdiff_meta["method"]["chain"][0]["settings"] == {"seed": 3, "heads": "whole", "importance": "random",
                                                                  **common}


def test_calibration_batches_split_one_draw():
    """Batches of one draw equal the one-batch draw; missing labels become the null class with missing="null"."""
    from slimdiff.compression.calibration import calibration_batches

    model = tiny_dit(in_channels=1)
    x0, y, _ = calibration_batch(model, ctx(batch_size=7))
    parts = list(calibration_batches(model, ctx(), 7, 3))
    assert [len(x) for x, _ in parts] == [3, 3, 1]
    torch.testing.assert_close(torch.cat([x for x, _ in parts]), x0, rtol=0, atol=0)
    assert torch.equal(torch.cat([c for _, c in parts]), y)
    unlabelled = [(torch.zeros(1, 8, 8), -1)] * 5
    with pytest.raises(UsageError, match="no valid labels"):
        calibration_batch(model, ctx(), 2, dataset=unlabelled)
    _, null, _ = calibration_batch(model, ctx(), 2, dataset=unlabelled, missing="null")
    assert null.tolist() == [10, 10]
