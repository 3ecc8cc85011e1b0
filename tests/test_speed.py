"""The speed bench (slimdiff.eval.speed, `slimdiff bench-speed`) on tiny models, and the
runtime changes made for speed (aligned pruned widths, host-side timesteps)."""
from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn as nn
from conftest import linear_conv_macs

from slimdiff.errors import UsageError
from slimdiff.eval import speed as sp
from slimdiff.eval.models import build_model

TINY = dict(models=("DiT-M/2", "UNet-tiny"), latent_size=8, repeats=1, warmup=0, batch=2, steps=3)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One float32 run of every method on the tiny models, written to a folder."""
    out = tmp_path_factory.mktemp("speed")
    res = sp.run_speed(sp.SpeedSettings(**TINY), log=lambda line: None)
    sp.write_outputs(res, out)
    return res, out


def test_every_applicable_method_is_measured(bench):
    res, _ = bench
    got = {(e["model"], e["method"]) for e in res["entries"]}
    assert got == {("DiT-M/2", m) for m in sp.METHODS} | {("UNet-tiny", "diff-pruning"), ("UNet-tiny", "dipgo")}
    units = {e["method"]: e["unit"] for e in res["entries"]}
    assert units == {"diff-pruning": "forward", "tinyfusion": "forward", "dydit": "sampling", "dipgo": "sampling"}


def test_methods_come_from_the_registry():
    """The speed bench times every registered method with a speed student (a method of your own
    too); what is timed follows its kind, its target defaults to DEFAULT_TARGET."""
    from slimdiff.methods import MethodSpec, register, unregister

    assert sp.METHODS == sp.speed_methods() == sp.SpeedSettings().methods == ("diff-pruning", "tinyfusion", "dydit",
                                                                               "dipgo")
    toy = MethodSpec("toy-width", "width", "toy", lambda model, budget, ctx, config: model,
                     speed_student=lambda model, settings: model)
    register(toy)
    try:
        assert sp.speed_methods()[-1] == "toy-width" and sp.timed_unit("toy-width") == "forward"
        settings = sp.SpeedSettings(**{**TINY, "methods": ("toy-width",)}).validate()
        (entry,) = sp.bench_model("DiT-M/2", settings, log=lambda line: None)
        assert entry["unit"] == "forward" and entry["target"] == sp.DEFAULT_TARGET and entry["macs_ratio"] == 1.0
    finally:
        unregister("toy-width")
    with pytest.raises(UsageError, match="unknown method"):
        sp.SpeedSettings(methods=("toy-width",)).validate()


def test_quick_model_factory():
    """One factory for random models: the speed bench's woken-up DiT, other inits and DiT options."""
    import slimdiff
    from slimdiff.eval.models import build_model as build

    torch.manual_seed(0)
    plain = slimdiff.load("DiT-M/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
    same = build("DiT-M/2", 8, init="none", in_channels=1, num_classes=10, learn_sigma=False)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), same.state_dict().values()))
    woken = build("DiT-M/2", 8)
    assert woken.x_embedder.proj.in_channels == 4 and all(p.any() for p in woken.parameters() if p.ndim >= 2)
    assert not woken.training
    with pytest.raises(UsageError, match="unknown init"):
        build("DiT-M/2", 8, init="zeros")
    with pytest.raises(UsageError, match="takes no options"):
        build("UNet-tiny", in_channels=1)


def test_realisation_is_computed_from_the_measured_numbers(bench):
    res, _ = bench
    for e in res["entries"]:
        assert e["theoretical_speedup"] == pytest.approx(e["macs_teacher"] / e["macs_student"])
        assert e["measured_speedup"] == pytest.approx(e["teacher_median_s"] / e["student_median_s"])
        assert e["realisation"] == pytest.approx(e["measured_speedup"] / e["theoretical_speedup"])
        assert e["met"] == (e["realisation"] >= sp.TARGETS[e["method"]])
        assert len(e["teacher_times_s"]) == len(e["student_times_s"]) == TINY["repeats"]
        assert 0.2 < e["macs_ratio"] < 0.6, e  # compressed to about the budget (0.5), and really cheaper
    assert res["summary"]["met"] == sum(e["met"] for e in res["entries"])


def test_results_json_and_report(bench):
    res, out = bench
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["batch"] == 2 and data["settings"]["dtype"] == "float32"
    env = data["environment"]
    for key in ("torch", "diffusers", "platform", "cpu_count", "torch_threads", "git_commit", "command"):
        assert key in env
    assert len(data["load_average_start"]) == 3 and len(data["load_average_end"]) == 3
    report = (out / "report.md").read_text()
    assert f"Written by `{env['command']}` at commit" in report
    for e in res["entries"]:
        assert f"| {e['model']} | {e['method']} |" in report
        assert f"**{e['realisation']:.3f}**" in report
    assert f"{res['summary']['met']} of {res['summary']['entries']} entries meet their target" in report


def _linear_conv_attention_macs(model: nn.Module, x, t, y) -> int:
    """MACs of one forward of our DiT from layer shapes (hooks) plus attention ``2 N^2 inner``
    per block and sample -- independent of FlopCounterMode."""
    total = linear_conv_macs(model, x, t, y)
    n = model.x_embedder.num_patches
    attention = sum(2 * n * n * (b.attn.qkv.out_features // 3) for b in model.blocks) * len(x)
    return total + attention


@pytest.mark.parametrize("method", ["diff-pruning", "tinyfusion"])
def test_theoretical_speedup_matches_an_independent_count(bench, method):
    res, _ = bench
    s = sp.SpeedSettings(**TINY)
    teacher = build_model("DiT-M/2", s.latent_size, s.seed)
    student, _ = sp.make_student(teacher, method, s)
    from slimdiff.models.backbone import as_backbone

    x, t, y = as_backbone(teacher).example_inputs(s.batch, torch.Generator().manual_seed(s.seed + 1))
    want = _linear_conv_attention_macs(teacher, x, t, y) / _linear_conv_attention_macs(student, x, t, y)
    entry = next(e for e in res["entries"] if e["model"] == "DiT-M/2" and e["method"] == method)
    assert entry["theoretical_speedup"] == pytest.approx(want, rel=1e-9)


def test_pruned_widths_are_aligned():
    from slimdiff.compression.width import ALIGN, ALIGN_MIN_WIDTH, HEAD_ALIGN

    s = sp.SpeedSettings(**TINY)
    teacher = build_model("DiT-M/2", s.latent_size, s.seed)
    student, _ = sp.make_student(teacher, "diff-pruning", s)
    for old, new in zip(teacher.blocks, student.blocks):
        assert new.mlp.fc1.out_features < old.mlp.fc1.out_features  # pruned ...
        if old.mlp.fc1.out_features >= ALIGN_MIN_WIDTH:
            assert new.mlp.fc1.out_features % ALIGN == 0  # ... to a kernel-friendly width
        if old.attn.qkv.out_features >= ALIGN_MIN_WIDTH:
            assert (new.attn.qkv.out_features // 3 // new.attn.num_heads) % HEAD_ALIGN == 0


def test_aligned_ratios_round_kept_widths():
    from slimdiff.compression.width import GroupInfo, aligned_ratios

    table = [GroupInfo("mlp", 1536, 1, False), GroupInfo("attn", 64, 6, True), GroupInfo("small", 32, 1, False)]
    ratios = aligned_ratios(table, 0.505, heads="dims", align=8)
    kept = {g.root: int(g.size * (1 - ratios[g.root])) for g in table if g.root in ratios}
    assert kept["mlp"] % 8 == 0 and abs(kept["mlp"] - int(1536 * 0.495)) <= 4
    assert kept["attn"] % 8 == 0 and abs(kept["attn"] - int(64 * 0.495)) <= 4  # per head: flash attention
    xl = aligned_ratios([GroupInfo("attn", 72, 16, True)], 0.5, heads="dims", align=8)  # DiT-XL/2's heads
    assert int(72 * (1 - xl["attn"])) in (32, 40)  # not 36
    assert "small" not in ratios  # narrow layers keep torch-pruning's own count
    assert aligned_ratios(table, 0.505, heads="whole", align=8).keys() == {"mlp"}


def test_bfloat16_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from slimdiff.cli import app

    out = tmp_path / "bf16"
    result = CliRunner().invoke(app, ["bench-speed", "--models", "DiT-M/2", "--latent-size", "8", "--repeats", "1",
                                      "--warmup", "0", "--batch", "2", "--steps", "3", "--dtype", "bfloat16",
                                      "--methods", "tinyfusion,dydit,dipgo", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert {e["method"] for e in line["entries"]} == {"tinyfusion", "dydit", "dipgo"}
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["dtype"] == "bfloat16"
    assert all(math.isfinite(e["realisation"]) and e["realisation"] > 0 for e in data["entries"])


@pytest.mark.parametrize("bad, fragment", [
    (dict(methods=("nope",)), "unknown method"),
    (dict(models=("ResNet",)), "unknown bench model"),
    (dict(dtype="float8"), "unknown --dtype"),
    (dict(repeats=0), "--repeats"),
])
def test_bad_settings_are_usage_errors(bad, fragment):
    with pytest.raises(UsageError, match=fragment):
        sp.SpeedSettings(**bad).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown without a GPU")
def test_cuda_without_a_gpu_is_a_usage_error():
    with pytest.raises(UsageError, match="no CUDA device"):
        sp.SpeedSettings(device="cuda").validate()


def test_sampling_passes_the_host_timestep_to_runtimes():
    from slimdiff.diffusion.sampling import current_timestep, sample

    model = build_model("DiT-M/2", 8)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((current_timestep(), float(args[1][0]))))
    sample(model, steps=3, num_samples=2)
    assert len(seen) == 3 and all(h == t for h, t in seen)
    assert current_timestep() is None


@pytest.mark.parametrize("name", ["DiT-M/2", "UNet-tiny"])
def test_flat_memory_checkpointing_gives_the_same_gradients(name):
    """DiP-GO's nested (log-memory) checkpoints recompute the same trajectory: equal gradients
    (UNets too: their nested-tuple caches travel as flat tensor lists)."""
    from slimdiff.methods import dipgo as D
    from slimdiff.runtime.reuse import ReusePlan, apply_block_reuse, reuse_blocks

    model = build_model(name, 8).requires_grad_(False)
    steps = 5
    apply_block_reuse(model, ReusePlan.full("ddim", steps, model))
    noise, labels, target = D.teacher_batch(model, 2, 0, sampler="ddim", steps=steps, cfg=1.0)
    grads = []
    for kw in (dict(memory="flat"), dict(memory="steps"), dict(use_checkpoint=False)):
        keep = torch.full((steps, len(reuse_blocks(model)[0])), 0.6, requires_grad=True)
        x = D.supernet_sample(model, keep, noise, labels, sampler="ddim", steps=steps, **kw)
        D.consistency_loss(x, target, "l2").backward()
        grads.append(keep.grad)
    assert grads[0][1:].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[2])
    torch.testing.assert_close(grads[1], grads[2])


def test_residual_width_through_the_cli(tmp_path):
    """--residual-width prunes a DiT's hidden size too (parameters follow MACs), while the UNet is
    pruned as usual."""
    from typer.testing import CliRunner

    from slimdiff.cli import app

    def run(out, *extra):
        result = CliRunner().invoke(app, ["bench-speed", "--models", "DiT-M/2,UNet-tiny", "--latent-size", "8",
                                          "--repeats", "1", "--warmup", "0", "--batch", "2", "--methods",
                                          "diff-pruning", "-o", str(out), *extra])
        assert result.exit_code == 0, result.output
        return {e["model"]: e for e in json.loads((out / "results.json").read_text())["entries"]}

    inner, residual = run(tmp_path / "inner"), run(tmp_path / "residual", "--residual-width")
    params = {k: {m: e["params_student"] / e["params_teacher"] for m, e in d.items()}
              for k, d in (("inner", inner), ("residual", residual))}
    assert params["residual"]["DiT-M/2"] < params["inner"]["DiT-M/2"] - 0.05
    assert params["residual"]["UNet-tiny"] == params["inner"]["UNet-tiny"]
    assert json.loads((tmp_path / "residual" / "results.json").read_text())["settings"]["residual_width"] is True
