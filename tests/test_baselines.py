"""The paper baselines of issue 20 on tiny real models: TinyFusion's Oracle (keep-by-index) and
ShortGPT Block Influence as its reference scores it (slimdiff.methods.depth_baselines), and
Diff-Pruning's reinit and scratch (slimdiff.methods.retrain)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODELS, tiny_diffusers_dit, tiny_dit

import slimdiff
from slimdiff.compression.calibration import calibration_batches
from slimdiff.compression.depth import masked_blocks
from slimdiff.errors import UsageError
from slimdiff.methods import depth_baselines as db
from slimdiff.methods import get_method, retrain
from slimdiff.methods.base import Context, compress, recover
from slimdiff.models.backbone import as_backbone

FACTORIES = {  # depth 4, one input channel: the digits data calibrates and trains them
    "dit": lambda seed=0: tiny_dit(seed, depth=4, in_channels=1),
    "diffusers-dit": lambda seed=0: tiny_diffusers_dit(seed, num_layers=4, in_channels=1, out_channels=2),
}


def _ctx(tmp_path: Path, **kw) -> Context:
    return Context(**{"steps": 2, "batch_size": 4, "work_dir": tmp_path, "progress": False, **kw})


def _out(model, inputs):
    with torch.no_grad():
        return as_backbone(model)(*inputs)


def _inputs(model):
    return as_backbone(model).example_inputs(3, torch.Generator().manual_seed(1))


def _kept(model, name):
    return model.slimdiff_meta["extras"][name]["kept_blocks"]


# --------------------------------------------------------------------------- oracle
def test_bk_sdm_oracle_is_the_readme_scheme():
    # TinyFusion README (fixed in 574ee78): DiT-XL/2 28 -> 14 keeps these
    assert db.bk_sdm_blocks(28, 14) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]
    assert db.bk_sdm_blocks(12, 6) == [0, 2, 4, 7, 9, 11]
    assert db.bk_sdm_blocks(8, 8) == list(range(8))
    with pytest.raises(UsageError, match="pass keep_blocks"):
        db.bk_sdm_blocks(12, 3)  # groups of 4 do not tile a half of 6


@pytest.mark.parametrize("text, msg", [("0,12", "out of range"), ("1,1,2", "more than once"), ("3,1", "write 1,3"),
                                       ("a,b", "separated by commas"), (" ", "names no block"), ("-1,2", "out of range")])
def test_keep_blocks_are_checked(text, msg):
    with pytest.raises(UsageError, match=msg):
        db.parse_keep_blocks(text, 12)
    assert db.parse_keep_blocks("[0, 2, 4]", 12) == [0, 2, 4]  # the reference's --kept-indices spelling


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_oracle_keeps_exactly_the_given_blocks(kind, tmp_path):
    model = FACTORIES[kind]()
    x = _inputs(model)
    with masked_blocks(model, [1, 0, 1, 1]):
        want = _out(model, x)
    # explicit indices override the budget (as prune_by_index.py / TinyFusion's keep)
    result = get_method("oracle-depth")(copy.deepcopy(model), 1.0, _ctx(tmp_path), keep_blocks="0,2,3")
    assert len(as_backbone(result).blocks) == 3 and _kept(result, "oracle-depth") == [0, 2, 3]
    assert torch.allclose(_out(result, x), want, atol=1e-6)
    assert result.slimdiff_meta["method"]["chain"][0]["settings"]["keep_from"] == "keep_blocks"


def test_oracle_default_is_bk_sdm_at_the_budget_depth(tmp_path):
    result = compress(FACTORIES["dit"](), "oracle-depth", 0.5, _ctx(tmp_path))
    assert _kept(result, "oracle-depth") == [0, 3]  # 4 -> 2: first of the encoder pair, last of the decoder pair
    with pytest.raises(UsageError, match="out of range"):
        compress(FACTORIES["dit"](), "oracle-depth", 0.5, _ctx(tmp_path), {"keep_blocks": "0,4"})


# --------------------------------------------------------------------------- block influence
def _identity_last_block(model):
    with torch.no_grad():  # zero adaLN: the last block returns its input (BI = 0, the lowest)
        model.blocks[-1].adaLN_modulation[1].weight.zero_()
        model.blocks[-1].adaLN_modulation[1].bias.zero_()
    return model


def test_bi_reference_never_removes_the_last_block(tmp_path):
    model = _identity_last_block(FACTORIES["dit"]())
    scores = db.block_influence(model, _ctx(tmp_path), samples=16)
    assert scores[3] == pytest.approx(0.0, abs=1e-6) and min(scores[:3]) > 1e-3
    ref = compress(model, "bi-depth", 0.5, _ctx(tmp_path), {"keep": "1:2"})
    assert 3 in _kept(ref, "bi-depth") and len(_kept(ref, "bi-depth")) == 2
    settings = ref.slimdiff_meta["method"]["chain"][0]["settings"]
    assert settings["bi_variant"] == "reference" and settings["keep_last"] is True
    noised = compress(model, "bi-depth", 0.5, _ctx(tmp_path), {"keep": "1:2", "bi_variant": "noised"})
    assert 3 not in _kept(noised, "bi-depth")  # the deviation may drop it
    assert db.select_blocks("bi", 4, 3, scores=[0.5, 0.1, 0.3, 0.0], keep_last=True) == [0, 2, 3]
    assert db.select_blocks("bi", 4, 3, scores=[0.5, 0.1, 0.3, 0.0]) == [0, 1, 2]


@pytest.mark.parametrize("variant", ["reference", "noised"])
def test_bi_inputs(variant, tmp_path):
    """reference: the model sees the clean calibration samples at t uniform in [0, 250);
    noised: forward-process samples at t over all training steps."""
    model, ctx = FACTORIES["dit"](), _ctx(tmp_path)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((args[0].clone(), args[1].clone())))
    db.block_influence(model, ctx, samples=64, batch=16, variant=variant)
    clean = torch.cat([x for x, _ in calibration_batches(model, ctx, 64, 16, generator=torch.Generator().manual_seed(
        ctx.seed), missing="null")])
    xs, ts = torch.cat([x for x, _ in seen]), torch.cat([t for _, t in seen])
    assert xs.shape == clean.shape and ts.dtype == torch.long
    if variant == "reference":
        assert torch.equal(xs, clean) and 0 <= ts.min() and ts.max() < db.REFERENCE_T_END
        assert len(ts.unique()) > 20  # drawn, not one fixed step
    else:
        assert not torch.allclose(xs, clean) and ts.max() >= db.REFERENCE_T_END
    with pytest.raises(UsageError, match="bi_variant"):
        compress(model, "bi-depth", 0.5, ctx, {"bi_variant": "clean"})


def test_depth_baseline_configs():
    assert get_method("bi-depth").make_config() == db.BIDepthConfig(None, "reference")
    assert get_method("oracle-depth").options == ("keep_blocks",)
    assert get_method("first-depth").options == ("keep",)


# --------------------------------------------------------------------------- reinit
@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_reinitialize_redraws_every_parameter(kind):
    model = TINY_MODELS[kind]()  # randomize_: no parameter has its construction value
    before = {n: p.clone() for n, p in model.named_parameters()}
    a = retrain.reinitialize(copy.deepcopy(model), seed=1)
    b = retrain.reinitialize(copy.deepcopy(model), seed=1)
    c = retrain.reinitialize(copy.deepcopy(model), seed=2)
    for name, p in a.named_parameters():
        assert not torch.equal(p, before[name]), name
        assert torch.equal(p, dict(b.named_parameters())[name]), name
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    if kind == "dit":  # the model's own init ran after reset_parameters: adaLN-Zero
        assert all(not blk.adaLN_modulation[1].weight.any() for blk in a.blocks)
    want = {"dit": ["reset_parameters", "initialize_weights"],
            "pixart": ["reset_parameters", "from_config: scale_shift_table, transformer_blocks.0.scale_shift_table, "
                       + "transformer_blocks.1.scale_shift_table"]}
    assert retrain.init_steps(model) == want.get(kind, ["reset_parameters"])


def test_reinit_has_diff_pruning_architecture_with_new_weights(tmp_path, monkeypatch):
    model, ctx = tiny_dit(depth=2, in_channels=1), _ctx(tmp_path, steps=1)
    pruned = compress(model, "diff-pruning", 0.5, ctx, {"stride": 250}).state_dict()
    before_recovery = {}

    def spy(student, ctx, tag, **kw):  # the shared recovery, seeing the re-initialised student
        before_recovery.update({k: v.clone() for k, v in student.state_dict().items()})
        return recover(student, ctx, tag, **kw)

    monkeypatch.setattr(retrain, "recover", spy)
    fresh = compress(model, "reinit", 0.5, _ctx(tmp_path, steps=1, recover_steps=2),
                     {"architecture_options": "stride=250"})
    f = fresh.state_dict()
    assert {k: v.shape for k, v in pruned.items()} == {k: v.shape for k, v in f.items()}
    assert f["blocks.0.mlp.fc1.weight"].shape[0] < model.state_dict()["blocks.0.mlp.fc1.weight"].shape[0]
    init = before_recovery
    assert not torch.equal(pruned["blocks.0.mlp.fc1.weight"], init["blocks.0.mlp.fc1.weight"])
    assert not init["blocks.0.adaLN_modulation.1.weight"].any()  # DiT's own init (adaLN-Zero) after the reset
    assert list(tmp_path.glob("recover-reinit-diff-pruning-*"))  # the same recovery as every method
    assert any(not torch.equal(f[k], init[k]) for k in f)
    chain = fresh.slimdiff_meta["method"]["chain"]
    assert [e["name"] for e in chain] == ["reinit"] and chain[0]["settings"]["architecture"] == "diff-pruning"
    assert chain[0]["settings"]["architecture_settings"]["stride"] == 250
    assert chain[0]["settings"]["init"] == ["reset_parameters", "initialize_weights"]
    assert chain[0]["measured"]["recover_steps"] == 2 and "widths" in fresh.slimdiff_meta["extras"]["reinit"]


def test_reinit_of_a_depth_architecture(tmp_path):
    result = compress(FACTORIES["diffusers-dit"](), "reinit", 0.5, _ctx(tmp_path, recover_steps=1, kd="hidden"),
                      {"architecture": "stride-depth", "architecture_options": "keep=1:2"})
    assert len(as_backbone(result).blocks) == 2
    assert result.slimdiff_meta["extras"]["reinit"]["kept_blocks"] == [1, 3]
    for bad, msg in (("dipgo", "static"), ("scratch", "static"), ("nope", "unknown method")):
        with pytest.raises(UsageError, match=msg):
            compress(FACTORIES["dit"](), "reinit", 0.5, _ctx(tmp_path), {"architecture": bad})
    with pytest.raises(UsageError, match="NAME=VALUE"):
        compress(FACTORIES["dit"](), "reinit", 0.5, _ctx(tmp_path), {"architecture_options": "stride"})


# --------------------------------------------------------------------------- scratch
def test_scratch_recipe_comes_from_the_teacher_record():
    shipped = Path(slimdiff.__file__).parent / "weights" / "digits-dit" / "slimdiff.json"
    training = json.loads(shipped.read_text())["other_meta"]["training"]
    values, sources = retrain.teacher_recipe(training, retrain.ScratchConfig())
    assert values == {"steps": 8000, "batch_size": 64, "lr": 5e-4, "warmup_steps": 200, "lr_schedule": "cosine",
                      "ema_decay": 0.999, "cfg_dropout": 0.1}
    assert sources["steps"] == "record" and sources["warmup_steps"] == "command" and sources["lr_schedule"] == "default"
    values, sources = retrain.teacher_recipe(training, retrain.ScratchConfig(scratch_steps=100))
    assert values["steps"] == 100 and sources["steps"] == "option"
    assert values["warmup_steps"] == 200 * 100 // 8000 and sources["warmup_steps"] == "command x 100/8000"
    with pytest.raises(UsageError, match="scratch_steps"):
        retrain.teacher_recipe(None, retrain.ScratchConfig())


class Interrupted(Exception):
    pass


def _scratch(tmp_path, **kw):
    opts = {"architecture": "first-depth", "architecture_options": "keep=1:2", "scratch_steps": 4, "scratch_batch_size": 4, "scratch_lr": 1e-3,
            "scratch_checkpoint_every": 2}
    return compress(FACTORIES["dit"](), "scratch", 0.5, _ctx(tmp_path, recover_steps=3), {**opts, **kw})


def test_scratch_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    from slimdiff.train import trainer

    whole = _scratch(tmp_path / "a")
    entry = whole.slimdiff_meta["method"]["chain"][0]
    assert entry["measured"]["train_steps"] == 4 and entry["measured"]["recover_steps"] == 0
    assert entry["settings"]["recipe_source"]["steps"] == "option"

    save, saved = trainer.save_checkpoint, []

    def interrupt_after_first(out, *, step, **kw):
        save(out, step=step, **kw)
        saved.append(step)
        if step == 2:
            raise Interrupted

    monkeypatch.setattr(trainer, "save_checkpoint", interrupt_after_first)
    with pytest.raises(Interrupted):
        _scratch(tmp_path / "b")
    resumed = _scratch(tmp_path / "b")
    assert saved == [2, 4]  # the rerun started from the step-2 checkpoint
    assert list((tmp_path / "b").glob("scratch-first-depth-n4-*"))
    for (n, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), n
    untrained = compress(FACTORIES["dit"](), "reinit", 0.5, _ctx(tmp_path / "c"),
                         {"architecture": "first-depth", "architecture_options": "keep=1:2"})
    assert untrained.state_dict().keys() == whole.state_dict().keys()
    assert any(not torch.equal(p, q) for p, q in zip(untrained.state_dict().values(), whole.state_dict().values()))
