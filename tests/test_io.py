"""slimdiff.io (save / load / export_diffusers) and slimdiff.models.registry.load_model."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import TINY_MODELS, evil_pickle, randomize_, tiny_diffusers_dit, tiny_dit, tiny_unet  # noqa: E402

import slimdiff  # noqa: E402
from slimdiff import atomic, io  # noqa: E402
from slimdiff.errors import UsageError  # noqa: E402
from slimdiff.models import registry  # noqa: E402
from slimdiff.models.dit import DiT, DiT_models  # noqa: E402
from slimdiff.result import ChainEntry, CompressionResult, ModelRecord, record_of, set_record  # noqa: E402


# --------------------------------------------------------------------------- helpers
def _inputs(kind: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([7, 600])
    if kind == "dit":
        return dict(x=torch.randn(2, 4, 8, 8, generator=g), t=t, y=torch.tensor([3, 10]))
    if kind == "diffusers-dit":
        return dict(x=torch.randn(2, 4, 8, 8, generator=g), t=t, y=torch.tensor([3, 10]))
    if kind == "pixart":
        return dict(x=torch.randn(2, 4, 8, 8, generator=g), t=t, c=torch.randn(2, 5, 16, generator=g))
    if kind == "unet2d":
        return dict(x=torch.randn(2, 3, 8, 8, generator=g), t=t)
    return dict(x=torch.randn(2, 4, 8, 8, generator=g), t=t, c=torch.randn(2, 5, 32, generator=g))


@torch.no_grad()
def _run(kind: str, m: nn.Module, inp: dict) -> torch.Tensor:
    x, t = inp["x"].to(next(m.parameters()).dtype), inp["t"]
    if kind == "dit":
        return m(x, t, inp["y"])
    if kind == "diffusers-dit":
        return m(x, timestep=t, class_labels=inp["y"]).sample
    if kind == "pixart":
        cond = {"resolution": None, "aspect_ratio": None}
        return m(x, encoder_hidden_states=inp["c"], timestep=t, added_cond_kwargs=cond).sample
    if kind == "unet2d":
        return m(x, t).sample
    return m(x, t, encoder_hidden_states=inp["c"]).sample


def _one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(UsageError, match=match) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def test_evil_payload_is_live(tmp_path):
    """The pickle tests below mean something only if unpickling really runs code."""
    marker = tmp_path / "pwned"
    f = pickle.loads(evil_pickle(marker))["state_dict"]
    f.close()
    assert marker.exists()


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_round_trip_is_bit_exact(kind, tmp_path):
    model = TINY_MODELS[kind]()
    # a hand-written method record (no chain) naming a registered method; its other keys are kept
    model.slimdiff_meta = {"name": kind, "method": {"name": "magnitude-width", "settings": {"k": [1, 2]}},
                           "measured": {"macs": 1.5}}
    inp = _inputs(kind)
    ref = _run(kind, model, inp)
    out_dir = slimdiff.save(model, tmp_path / kind)
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.safetensors", "slimdiff.json"]
    doc = json.loads((out_dir / "slimdiff.json").read_text())
    assert doc["format_version"] == 1 and doc["architecture"]["class"] == io.architecture_name(model)
    assert doc["weights"]["tensors"] == len(model.state_dict())
    assert list(tmp_path.iterdir()) == [out_dir]  # no temp dirs left behind

    loaded = io.load(out_dir)
    assert type(loaded) is type(model) and not loaded.training
    assert _same_state(model, loaded)
    assert torch.equal(_run(kind, loaded, inp), ref)
    assert loaded.slimdiff_meta["method"] == model.slimdiff_meta["method"]
    assert loaded.slimdiff_meta["measured"] == {"macs": 1.5} and loaded.slimdiff_meta["name"] == kind
    assert loaded.slimdiff_meta["diffusion"]["objective"] == "epsilon"


def test_meta_merge_and_unknown_keys_survive(tmp_path):
    model = tiny_dit()
    model.slimdiff_meta = {"name": "a", "reuse_plan": [[0, 1]], "extras": {"x": 1}}
    diffusion = {"objective": "v_prediction", "num_train_timesteps": 500, "beta_schedule": "scaled_linear",
                 "beta_start": 0.001, "beta_end": 0.012, "clip_sample": True}
    io.save(model, tmp_path / "m", meta={"name": "b", "diffusion": diffusion})
    meta = io.load(tmp_path / "m").slimdiff_meta
    assert meta["name"] == "b" and meta["diffusion"] == diffusion
    assert meta["extras"] == {"x": 1} and meta["reuse_plan"] == [[0, 1]] and "method" not in meta


@torch.no_grad()
def test_width_and_depth_pruned_dit_round_trips(tmp_path):
    model = tiny_dit(depth=3)
    b0, b1 = model.blocks[0], model.blocks[1]
    b0.mlp.fc1, b0.mlp.fc2 = nn.Linear(32, 40), nn.Linear(40, 32)
    b1.attn.qkv, b1.attn.proj, b1.attn.num_heads = nn.Linear(32, 3 * 16), nn.Linear(16, 32), 1
    del model.blocks[2]  # depth pruning without touching the config
    randomize_(model, seed=3)
    inp = _inputs("dit")
    ref = _run("dit", model, inp)

    out_dir = io.save(model, tmp_path / "pruned")
    structure = json.loads((out_dir / "slimdiff.json").read_text())["structure"]
    assert structure["lengths"] == {"blocks": 2}
    assert set(structure["layers"]) == {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.attn.qkv", "blocks.1.attn.proj"}
    assert structure["layers"]["blocks.0.mlp.fc1"]["out_features"] == 40
    assert structure["attrs"]["blocks.1.attn"] == {"num_heads": 1}

    loaded = io.load(out_dir)
    assert len(loaded.blocks) == 2 and loaded.blocks[1].attn.num_heads == 1
    assert loaded.blocks[0].mlp.fc1.out_features == 40
    assert torch.equal(_run("dit", loaded, inp), ref)


def test_torch_pruned_unet_round_trips(tmp_path):
    """torch-pruning output (GroupNorms, convs, Downsample2D channels) reloads exactly."""
    tp = pytest.importorskip("torch_pruning")
    from slimdiff.models.backbone import sync_attention_heads

    model = tiny_unet()
    inp = _inputs("unet2d")
    pruner = tp.pruner.BasePruner(
        model, {"sample": inp["x"], "timestep": inp["t"]}, importance=tp.importance.MagnitudeImportance(),
        pruning_ratio=0.5, ignored_layers=[model.conv_out],
    )  # fmt: skip
    pruner.step()
    sync_attention_heads(model)
    ref = _run("unet2d", model, inp)
    out_dir = io.save(model, tmp_path / "u")
    structure = json.loads((out_dir / "slimdiff.json").read_text())["structure"]
    assert any(s["type"] == "GroupNorm" for s in structure["layers"].values())
    assert structure["attrs"]["down_blocks.0.downsamplers.0"]["channels"] < 16
    assert torch.equal(_run("unet2d", io.load(out_dir), inp), ref)


@torch.no_grad()
def test_head_pruned_diffusers_dit_round_trips(tmp_path):
    from slimdiff.models.backbone import sync_attention_heads

    model = tiny_diffusers_dit()
    for blk in model.transformer_blocks:
        a = blk.attn1
        a.to_q, a.to_k, a.to_v = (nn.Linear(32, 16) for _ in range(3))
        a.to_out[0] = nn.Linear(16, 32)
    sync_attention_heads(model, {blk.attn1: 1 for blk in model.transformer_blocks})
    randomize_(model, seed=5)
    inp = _inputs("diffusers-dit")
    ref = _run("diffusers-dit", model, inp)
    loaded = io.load(io.save(model, tmp_path / "d"))
    assert all(blk.attn1.heads == 1 for blk in loaded.transformer_blocks)
    assert torch.equal(_run("diffusers-dit", loaded, inp), ref)


def test_low_precision_dtype_is_kept(tmp_path):
    model = tiny_dit().to(torch.bfloat16)
    inp = _inputs("dit")
    loaded = io.load(io.save(model, tmp_path / "bf16"))
    assert loaded.x_embedder.proj.weight.dtype == torch.bfloat16
    assert torch.equal(_run("dit", loaded, inp), _run("dit", model, inp))


# --------------------------------------------------------------------------- records and runtimes
DIFFUSION = {"objective": "epsilon", "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001,
             "beta_end": 0.02, "clip_sample": False}
COMPRESSED = {
    "name": "tiny", "diffusion": DIFFUSION,
    "method": {"name": "magnitude-width+toy-runtime", "chain": [
        {"name": "magnitude-width", "settings": {"align": 8}, "measured": {"macs_ratio": 0.8}},
        {"name": "toy-runtime", "settings": {"steps": 4}, "measured": {"plan_macs_ratio": 0.5}}]},
    "measured": {"budget": 0.5, "macs_ratio": 0.4}, "extras": {"toy-runtime": {"plan": [[0, 1]]}},
    "finetune": {"steps": 1}, "zeta": [1, 2],
}


def test_record_converts_exactly_to_and_from_the_meta_layout():
    record = ModelRecord.from_meta(COMPRESSED)
    assert record.name == "tiny" and record.provenance == {"finetune": {"steps": 1}, "zeta": [1, 2]}
    assert record.result.chain[1] == ChainEntry("toy-runtime", {"steps": 4}, {"plan_macs_ratio": 0.5})
    assert record.result.method == "magnitude-width+toy-runtime" and record.result.measured["budget"] == 0.5
    assert json.dumps(record.to_meta()) == json.dumps(COMPRESSED)  # same keys, values and order
    doc = record.to_doc()
    assert list(doc) == ["name", "diffusion", "method", "measured", "extras", "other_meta"]
    assert doc["other_meta"] == record.provenance and doc["method"] == COMPRESSED["method"]
    assert ModelRecord.from_doc(doc) == record
    plain = ModelRecord("digits", DIFFUSION)  # an uncompressed model: no method, no other_meta
    assert plain.to_meta() == {"name": "digits", "diffusion": DIFFUSION, "measured": {}, "extras": {}}
    assert plain.to_doc()["method"] is None and "other_meta" not in plain.to_doc()
    assert ModelRecord.from_doc(plain.to_doc()) == plain

    built = CompressionResult()  # what slimdiff.methods.base.record does, typed
    for entry in record.result.chain:
        built.add(entry.method, entry.settings, entry.measured, record.result.extras.get(entry.method))
    assert built.method_dict() == COMPRESSED["method"] and built.extras == COMPRESSED["extras"]

    model = set_record(tiny_dit(), record)
    assert model.slimdiff_meta == COMPRESSED and record_of(model) == record


def test_restorers_registered_from_above_run_on_load(tmp_path, monkeypatch):
    calls = []
    io.register_restorer("toy-runtime", lambda model, extras: calls.append((type(model), extras)))
    try:
        model = set_record(tiny_dit(), ModelRecord.from_meta(COMPRESSED))
        saved = io.save(model, tmp_path / "m")  # save rebuilds the model once to check it loads
        assert calls == [(DiT, {"plan": [[0, 1]]})]
        loaded = io.load(saved)
        assert calls[1:] == [(DiT, {"plan": [[0, 1]]})] and loaded.slimdiff_meta == COMPRESSED
        io.register_restorer("toy-runtime", None)  # still a known method, with nothing to restore
        assert io.load(saved).slimdiff_meta == COMPRESSED and not calls[2:]
    finally:
        io.unregister_method("toy-runtime")

    asked = []  # a chain naming an unknown method asks the layers above to register theirs, then is refused
    monkeypatch.setattr(slimdiff, "register_builtin_restorers", lambda: asked.append(1))
    _one_line_error(r"method\.chain\[1\]\.name = 'toy-runtime' is invalid \(not a registered method", io.load, saved)
    assert asked and not calls[2:]


def test_loading_a_plain_model_never_imports_the_methods(tmp_path):
    saved = io.save(tiny_dit(), tmp_path / "plain", meta={"name": "plain", "training": {"steps": 1}})
    code = (
        "import sys\n"
        "import slimdiff, slimdiff.io, slimdiff.models.registry\n"
        f"slimdiff.io.load({str(saved)!r}); slimdiff.models.registry.load_model({str(saved)!r})\n"
        f"slimdiff.load({str(saved)!r}); slimdiff.load('DiT-S/2', input_size=8)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('slimdiff.methods', 'slimdiff.compression'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.stdout.strip() == "[]", out.stdout


def test_atomic_write_dir_keeps_the_old_directory_until_the_new_one_is_in_place(tmp_path):
    target, backup = tmp_path / "ckpt", tmp_path / ".ckpt-old"

    def writer(text: str):
        return lambda tmp: (tmp / "f.txt").write_text(text)

    atomic.write_dir(target, writer("1"), backup=backup)
    backup.mkdir()  # a stale backup left by a crash between the two renames
    (backup / "f.txt").write_text("0")
    atomic.write_dir(target, writer("2"), backup=backup)
    assert (target / "f.txt").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    def fails(tmp):
        (tmp / "f.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic.write_dir(target, fails)
    assert (target / "f.txt").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(OSError):  # replace=False: the caller checked the target is absent
        atomic.write_dir(target, writer("3"), replace=False)
    assert (target / "f.txt").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# --------------------------------------------------------------------------- load failures
@pytest.fixture
def saved(tmp_path):
    return io.save(tiny_dit(), tmp_path / "model")


def _edit_json(d, fn):
    p = d / "slimdiff.json"
    doc = json.loads(p.read_text())
    fn(doc)
    p.write_text(json.dumps(doc))


def test_missing_directory_and_files(saved, tmp_path):
    _one_line_error("no such model directory", io.load, tmp_path / "nope")
    (saved / "model.safetensors").unlink()
    _one_line_error(r"model\.safetensors is missing", io.load, saved)
    (saved / "slimdiff.json").unlink()
    _one_line_error(r"slimdiff\.json is missing", io.load, saved)


def test_unparseable_json(saved):
    (saved / "slimdiff.json").write_text('{"format_version": 1, "architecture": ')
    msg = _one_line_error("not valid JSON", io.load, saved)
    assert "slimdiff.json" in msg


def test_newer_format_version(saved):
    _edit_json(saved, lambda d: d.update(format_version=2, slimdiff_version="9.0"))
    _one_line_error("written by a newer slimdiff.*upgrade", io.load, saved)


def test_unknown_architecture(saved):
    _edit_json(saved, lambda d: d["architecture"].update({"class": "SD3Transformer2DModel"}))
    _one_line_error("unknown architecture class 'SD3Transformer2DModel'", io.load, saved)


def test_truncated_weights(saved):
    p = saved / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])
    msg = _one_line_error("truncated", io.load, saved)
    assert "model.safetensors" in msg


def test_flipped_bytes_in_data_fail_the_checksum(saved):
    p = saved / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x40
    p.write_bytes(bytes(data))
    _one_line_error("model.safetensors: sha256 mismatch", io.load, saved)


def test_flipped_bytes_in_header_are_reported_as_corruption(saved):
    p = saved / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[12] ^= 0xFF
    p.write_bytes(bytes(data))
    _one_line_error("model.safetensors is corrupted", io.load, saved)


def test_weights_of_another_architecture(tmp_path):
    a = io.save(tiny_dit(), tmp_path / "a")
    b = io.save(tiny_dit(hidden_size=48), tmp_path / "b")
    doc_a = json.loads((a / "slimdiff.json").read_text())
    _edit_json(b, lambda d: d.update(architecture=doc_a["architecture"], structure=doc_a["structure"]))
    # the schema compares what the config builds first with the tensors file's header
    _one_line_error(r"builds pos_embed of shape \[1, 16, 32\], model\.safetensors holds \[1, 16, 48\]: the "
                    "weights belong to a different architecture", io.load, b)
    c = io.save(tiny_diffusers_dit(), tmp_path / "c")
    _edit_json(c, lambda d: d.update(architecture=doc_a["architecture"], structure=doc_a["structure"]))
    _one_line_error("builds pos_embed of shape .* holds no such tensor", io.load, c)

    # what the schema cannot see (per-block widths) is compared key by key after the build
    d = io.save(tiny_dit(mlp_ratio=2.0), tmp_path / "d")
    _edit_json(d, lambda doc: doc.update(architecture=doc_a["architecture"], structure=doc_a["structure"]))
    msg = _one_line_error("weights belong to a different architecture", io.load, d)
    assert "blocks.0.mlp.fc1.weight (64, 32) vs (128, 32)" in msg


def test_pickles_are_never_unpickled(saved, tmp_path):
    marker = tmp_path / "pwned"
    payload = evil_pickle(marker)
    # 1. a pickle planted next to valid weights
    (saved / "model.pt").write_bytes(payload)
    _one_line_error(r"pickle file\(s\) model\.pt", io.load, saved)
    (saved / "model.pt").unlink()
    # 2. pickle bytes under the safetensors name, raw and torch.save (zip) flavours
    good = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(payload)
    _one_line_error("is a pickle / torch.save file", io.load, saved)
    torch.save({"w": torch.zeros(2)}, saved / "model.safetensors")
    _one_line_error("is a pickle / torch.save file", io.load, saved)
    (saved / "model.safetensors").write_bytes(good)
    # 3. a diffusers-style pickle checkpoint instead of our weights, and a .pt path
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(payload)
    _one_line_error(r"pytorch_model\.bin", io.load, saved)
    (tmp_path / "ckpt.pt").write_bytes(payload)
    _one_line_error("never unpickles", io.load, tmp_path / "ckpt.pt")
    # 4. the registry's official-checkpoint path uses weights_only=True
    _one_line_error("refuses to unpickle", registry.load_model, tmp_path / "ckpt.pt")
    assert not marker.exists()


# --------------------------------------------------------------------------- save behaviour
def test_overwrite_rules(tmp_path):
    a, b = tiny_dit(seed=0), tiny_dit(seed=1)
    target = tmp_path / "out"
    io.save(a, target)
    io.save(a, target)  # the identical result again: fine
    _one_line_error("already holds a different slimdiff model; pass overwrite=True", io.save, b, target)
    assert _same_state(io.load(target), a)
    io.save(b, target, overwrite=True)
    assert _same_state(io.load(target), b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    _one_line_error("never replaces it", io.save, a, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    _one_line_error("is a file", io.save, a, tmp_path / "file")


def test_failed_save_leaves_nothing(tmp_path):
    model = tiny_dit()
    before = sorted(tmp_path.iterdir())
    _one_line_error("not JSON-serialisable", io.save, model, tmp_path / "new", meta={"extras": {"bad": object()}})
    assert sorted(tmp_path.iterdir()) == before  # no target, no temp directory

    existing = io.save(tiny_dit(seed=4), tmp_path / "old")
    with pytest.raises(UsageError):
        io.save(model, existing, meta={"extras": {"bad": object()}}, overwrite=True)
    assert _same_state(io.load(existing), tiny_dit(seed=4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_unsupported_models_are_refused(tmp_path):
    class MyDiT(DiT):
        pass

    _one_line_error("cannot save a torch.nn.modules.linear.Linear", io.save, nn.Linear(2, 2), tmp_path / "x")
    _one_line_error("MyDiT", io.save, MyDiT(input_size=8, hidden_size=32, depth=1, num_heads=2), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --------------------------------------------------------------------------- diffusers export
def test_export_diffusers_plain_model(tmp_path):
    from diffusers import DiTTransformer2DModel

    model = tiny_diffusers_dit()
    inp = _inputs("diffusers-dit")
    out = io.export_diffusers(model, tmp_path / "hf")
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    reloaded = DiTTransformer2DModel.from_pretrained(out).eval()
    assert torch.equal(_run("diffusers-dit", reloaded, inp), _run("diffusers-dit", model, inp))
    via_registry = registry.load_model(out)  # a local diffusers directory
    assert torch.equal(_run("diffusers-dit", via_registry, inp), _run("diffusers-dit", model, inp))


def test_export_our_dit_through_the_converter(tmp_path):
    from diffusers import DiTTransformer2DModel

    model = tiny_dit(freq_shift=1)  # diffusers' timestep convention: exact after export
    inp = _inputs("dit")
    out = io.export_diffusers(model, tmp_path / "hf")
    reloaded = DiTTransformer2DModel.from_pretrained(out).eval()
    torch.testing.assert_close(_run("diffusers-dit", reloaded, inp), _run("dit", model, inp), rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="downscale_freq_shift"):
        io.export_diffusers(tiny_dit(freq_shift=0), tmp_path / "hf0")


def test_export_refuses_per_layer_widths(tmp_path):
    model = tiny_unet()
    model.down_blocks[0].resnets[0].conv1 = nn.Conv2d(16, 8, 3, padding=1)
    model.down_blocks[0].resnets[0].norm2 = nn.GroupNorm(8, 8)
    model.down_blocks[0].resnets[0].conv2 = nn.Conv2d(8, 16, 3, padding=1)
    msg = _one_line_error("cannot export to diffusers.*down_blocks.0.resnets.0.conv1", io.export_diffusers, model, tmp_path / "hf")
    assert "slimdiff.save" in msg and not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------- registry
def test_dit_size_names():
    assert set(DiT_models) <= set(registry.available_names())
    m = registry.load_model("DiT-M/2", input_size=8, num_classes=10)
    assert isinstance(m, DiT) and len(m.blocks) == 6 and m.x_embedder.proj.out_channels == 64
    assert m.slimdiff_meta["name"] == "DiT-M/2" and m.slimdiff_meta["diffusion"]["objective"] == "epsilon"
    assert registry.load_model("DiT-M-4", input_size=8).patch_size == 4  # file-name spelling
    _one_line_error("bad options for DiT-M/2", registry.load_model, "DiT-M/2", width=3)


def test_unknown_names_suggest_close_ones(tmp_path):
    msg = _one_line_error("cannot load 'DiT-XXL/2'", registry.load_model, "DiT-XXL/2")
    assert "did you mean" in msg and "DiT-XL/2" in msg and "slimdiff.save" in msg
    _one_line_error("no such checkpoint file", registry.load_model, tmp_path / "missing.pt")


def test_official_checkpoint_loads_with_weights_only(tmp_path):
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    model = tiny_dit(**cfg)
    inp = _inputs("dit")
    torch.save(model.state_dict(), tmp_path / "DiT-tiny.pt")
    torch.save({"model": {}, "ema": model.state_dict()}, tmp_path / "train-ckpt.pt")
    for name in ("DiT-tiny.pt", "train-ckpt.pt"):
        loaded = registry.load_model(str(tmp_path / name), **cfg)
        assert torch.equal(_run("dit", loaded, inp), _run("dit", model, inp))
        assert loaded.slimdiff_meta["name"] == name[:-3]
    _one_line_error("does not fit a DiT built with", registry.load_model, tmp_path / "DiT-tiny.pt", **{**cfg, "hidden_size": 64})


def test_directories_and_shipped_names(tmp_path, monkeypatch):
    model = tiny_dit()
    inp = _inputs("dit")
    d = io.save(model, tmp_path / "w" / "digits-tiny")
    assert torch.equal(_run("dit", registry.load_model(d), inp), _run("dit", model, inp))
    assert torch.equal(_run("dit", slimdiff.load(str(d)), inp), _run("dit", model, inp))
    _one_line_error("takes no options", registry.load_model, d, input_size=8)

    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path / "w")
    assert registry.shipped_dir("digits-tiny") == d
    assert registry.available_names()[0] == "digits-tiny"
    loaded = registry.load_model("digits-tiny")
    assert loaded.slimdiff_meta["name"] == "digits-tiny" and torch.equal(_run("dit", loaded, inp), _run("dit", model, inp))
    msg = _one_line_error("did you mean", registry.load_model, "digits-tiy")
    assert "digits-tiny" in msg


def test_hub_names_need_opt_in(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error("Hugging Face Hub name.*hf download facebook/DiT-XL-2-256.*allow_hub=True",
                    registry.load_model, "facebook/DiT-XL-2-256")
    _one_line_error("HF_HUB_OFFLINE is set", registry.load_model, "facebook/DiT-XL-2-256", allow_hub=True)
