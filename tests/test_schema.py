"""``slimdiff.json`` is untrusted: :mod:`slimdiff.schema` validates it whole before anything is built.

The cases the reliability issue measured (each a one-line :class:`UsageError` naming the field),
the schema's tables checked against what :func:`slimdiff.io.save` writes, a fuzz test that
mutates every field of real saved files (a tiny DiT, a pruned one and a tiny ``UNet2DModel``)
and requires a one-line error or a correct load within a time and memory bound, and the CLI.
"""
from __future__ import annotations

import copy
import json
import math
import random
import resource
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from conftest import cli_main, randomize_, tiny_diffusers_dit, tiny_dit, tiny_unet

from slimdiff import io, schema
from slimdiff.errors import UsageError


def _pruned_dit() -> nn.Module:
    """A DiT with every kind of structure entry: a shorter block list, narrower layers, fewer heads."""
    model = tiny_dit(depth=3)
    b0, b1 = model.blocks[0], model.blocks[1]
    b0.mlp.fc1, b0.mlp.fc2 = nn.Linear(32, 40), nn.Linear(40, 32)
    b1.attn.qkv, b1.attn.proj, b1.attn.num_heads = nn.Linear(32, 3 * 16), nn.Linear(16, 32), 1
    del model.blocks[2]
    return randomize_(model, seed=3)


MODELS = {"dit": tiny_dit, "pruned-dit": _pruned_dit, "unet2d": tiny_unet}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("schema")
    return {name: io.save(make(), root / name) for name, make in MODELS.items()}


def _crafted(saved: Path, tmp: Path, edit) -> Path:
    d = Path(shutil.copytree(saved, tmp / "crafted", dirs_exist_ok=True))
    doc = json.loads((d / io.JSON_NAME).read_text())
    edit(doc)
    (d / io.JSON_NAME).write_text(json.dumps(doc))
    return d


def _refused(d: Path, *needles: str) -> str:
    with pytest.raises(UsageError) as info:
        io.load(d)
    msg = str(info.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


# --------------------------------------------------------------------------- the measured cases
def _set(path: str, value: Any):
    *parents, last = path.split("/")

    def edit(doc: dict) -> None:
        node = doc
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


def _drop(key: str):
    return lambda doc: doc.pop(key)


MEASURED = {  # the inputs: edit -> what the one-line message must name
    "depth 1e9": (_set("architecture/config/depth", 1_000_000_000), "architecture.config.depth = 1000000000"),
    "hidden 1e12": (_set("architecture/config/hidden_size", 1e12), "architecture.config.hidden_size = 1000000000000.0"),
    "timesteps -5": (_set("diffusion/num_train_timesteps", -5), "diffusion.num_train_timesteps = -5", "[1, 100000]"),
    "timesteps 1e15": (_set("diffusion/num_train_timesteps", 1e15),
                       "diffusion.num_train_timesteps = 1000000000000000.0"),
    "heads 0": (_set("architecture/config/num_heads", 0), "architecture.config.num_heads = 0"),
    "heads 3": (_set("architecture/config/num_heads", 3), "architecture.config.num_heads = 3",
                "divisor of hidden_size 32"),
    "attr forward": (_set("structure/attrs", {"blocks.0": {"forward": None}}), "structure.attrs['blocks.0'].forward",
                     "no such attribute"),
    "attr training": (_set("structure/attrs", {"blocks.0": {"training": True}}), "structure.attrs['blocks.0'] key"),
    "attr private": (_set("structure/attrs", {"blocks.0": {"_forward_hooks": {}}}), "_forward_hooks"),
    "beta NaN": (_set("diffusion/beta_start", math.nan), "diffusion.beta_start = nan", "finite number in (0, 1)"),
    "betas swapped": (_set("diffusion/beta_start", 0.5), "diffusion.beta_start = 0.5", "below diffusion.beta_end"),
    "schedule": (_set("diffusion/beta_schedule", "cosine"), "diffusion.beta_schedule = 'cosine'", "squaredcos_cap_v2"),
    "no diffusion": (_drop("diffusion"), "slimdiff.json.diffusion", "a required key"),
    "unknown method": (_set("method", {"name": "bogus", "chain": [{"name": "bogus"}]}),
                       "method.chain[0].name = 'bogus'", "not a registered method"),
    "unknown key": (_set("surprise", 1), "slimdiff.json.surprise", "unknown key"),
    "weights elsewhere": (_set("weights/file", "../../etc/passwd"), "weights.file = '../../etc/passwd'"),
    "provenance overrides": (_set("other_meta", {"diffusion": {}}), "other_meta.diffusion"),
    "structure tensor": (_set("structure/tensors", {"pos_embed": {"shape": [1, 10**9, 32], "kind": "buffer"}}),
                         "structure.tensors['pos_embed'].shape"),
}


@pytest.mark.parametrize("case", sorted(MEASURED))
def test_measured_inputs_are_one_line_errors(case, saved, tmp_path):
    edit, *needles = MEASURED[case]
    start = time.perf_counter()
    _refused(_crafted(saved["dit"], tmp_path, edit), *needles)
    assert time.perf_counter() - start < 5


def test_structure_entries_are_checked_against_the_weights(saved, tmp_path):
    d = saved["pruned-dit"]
    _refused(_crafted(d, tmp_path, _set("structure/attrs/blocks.1.attn/num_heads", 3)), "num_heads = 3",
             "divisor of blocks.1.attn.qkv's 48 outputs / 3")
    _refused(_crafted(d, tmp_path, _set("structure/layers/blocks.0.mlp.fc1/out_features", 10**9)),
             "structure.layers['blocks.0.mlp.fc1'].out_features = 1000000000")
    _refused(_crafted(d, tmp_path, _set("structure/layers/blocks.0.mlp.fc1/type", "Bilinear")), "one of Linear")
    _refused(_crafted(d, tmp_path, _set("structure/lengths/blocks", 10**9)), "structure.lengths['blocks']")
    # the attribute exists but holds another type: refused at build time, before any weight is read
    _refused(_crafted(d, tmp_path, _set("structure/attrs/blocks.0.attn", {"num_heads": 2, "qkv": 1})),
             "structure.attrs['blocks.0.attn'].qkv", "no such attribute")


def test_diffusers_counts_are_bounded_by_the_blocks_present(saved, tmp_path):
    d = saved["unet2d"]
    _refused(_crafted(d, tmp_path, _set("architecture/config/layers_per_block", 10**6)),
             "architecture.config.layers_per_block = 1000000")
    _refused(_crafted(d, tmp_path, _set("architecture/config/block_out_channels", [32] * 60)),
             "architecture.config.block_out_channels")
    _refused(_crafted(d, tmp_path, _set("architecture/config/not_an_argument", 1)), "unknown key")
    _refused(_crafted(d, tmp_path, _set("architecture/config/downsample_padding", [])),
             "architecture.config.downsample_padding = []", "int, as the argument's type says")


def test_diffusers_dit_positional_table_is_bounded_by_the_weights(tmp_path):
    d = io.save(tiny_diffusers_dit(), tmp_path / "m")
    start = time.perf_counter()
    _refused(_crafted(d, tmp_path, _set("architecture/config/sample_size", 10**5)),
             "architecture.config.sample_size = 100000", "exceeds the model's weights")
    _refused(_crafted(d, tmp_path, _set("architecture/config/num_layers", 10**5)), "architecture.config.num_layers")
    assert time.perf_counter() - start < 5


def test_the_tables_match_what_save_writes():
    layers = [nn.Linear(2, 3), nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.Embedding(3, 2)]
    for layer in layers:
        spec = io._layer_spec(layer)
        assert set(spec) - {"type"} == set(schema.LAYER_PARAMS[spec["type"]]), spec
    assert set(schema.LAYER_PARAMS) == set(io._LAYERS)
    for model in (tiny_dit(), tiny_unet()):
        recorded = {k for m in model.modules() for k in (io._fixed_attrs(m) or {})}
        assert recorded and recorded <= set(schema.FIXED_ATTRS)


def test_save_refuses_what_load_would_refuse(tmp_path):
    model = tiny_dit()
    bad = {"objective": "epsilon", "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": math.nan,
           "beta_end": 0.02, "clip_sample": False}
    with pytest.raises(UsageError, match=r"diffusion\.beta_start = nan .* would not load back"):
        io.save(model, tmp_path / "m", meta={"diffusion": bad})
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


def test_cli_info_on_a_crafted_file_exits_2_with_one_line(saved, tmp_path, monkeypatch, capsys):
    d = _crafted(saved["dit"], tmp_path, _set("architecture/config/depth", 10**9))
    assert cli_main(monkeypatch, "info", str(d)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "architecture.config.depth = 1000000000" in lines[0], lines


# --------------------------------------------------------------------------- fuzz
MISSING = object()
SECONDS = 5.0  # per load
HEADROOM = 1 << 30  # address space a load may add (RLIMIT_AS); a blow-up fails with MemoryError instead
PER_FIELD = 99  # mutations tried per field (sampled with a fixed seed when fewer than all)


def _paths(node: Any, path: tuple = ()) -> list[tuple]:
    """Every node of the JSON tree (containers and leaves), as key paths."""
    out = [path] if path else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*path, i))
    return out


def _mutations(value: Any) -> list[Any]:
    """Wrong types, signs, zero, huge values, NaN/inf and a missing key, for one field."""
    out: list[Any] = [MISSING, "x", [], {}, None, True, 0, -1, 1e12, 10**9, math.nan, math.inf, -math.inf]
    if type(value) in (int, float) and value:
        out.append(-value)
    if isinstance(value, str):
        out.append(value + "x")
    return [m for m in out if not (type(m) is type(value) and m == value)]


def _mutated(doc: dict, path: tuple, value: Any) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for k in path[:-1]:
        node = node[k]
    if value is MISSING:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


def _cases(doc: dict, rng: random.Random, per_field: int) -> list[tuple[str, dict]]:
    """Up to ``per_field`` sampled mutations of every field, and an unknown key in every object."""
    cases = []
    for path in _paths(doc):
        node = doc
        for k in path:
            node = node[k]
        muts = _mutations(node)
        for m in rng.sample(muts, min(per_field, len(muts))):
            if m is MISSING and isinstance(path[-1], int):
                continue  # list entries: a missing element is a shorter list, covered by the wrong types
            cases.append((f"{'/'.join(map(str, path))} = {'<missing>' if m is MISSING else repr(m)}",
                          _mutated(doc, path, m)))
        if isinstance(node, dict):
            cases.append((f"{'/'.join(map(str, path))} + unknown key", _mutated(doc, (*path, "zz_unknown"), 1)))
    cases.append(("top level + unknown key", {**doc, "zz_unknown": 1}))
    return cases


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout


@torch.no_grad()
def _check_load(d: Path, reference: dict[str, torch.Tensor], inputs: tuple) -> str:
    """'refused' (one-line UsageError) or 'loaded' (same weights, finite output); raise otherwise."""
    try:
        model = io.load(d)
    except UsageError as e:
        assert "\n" not in str(e), str(e)
        return "refused"
    state = model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    out = model(*inputs)
    out = out.sample if hasattr(out, "sample") else out
    assert torch.isfinite(out).all()
    return "loaded"


def test_fuzz_every_field_gives_a_one_line_error_or_a_correct_load(saved, tmp_path):
    rng = random.Random(0)
    inputs = {"dit": (torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.tensor([1])),
              "unet2d": (torch.randn(1, 3, 8, 8), torch.tensor([5]))}
    plan = []
    for name, src in saved.items():
        doc = json.loads((src / io.JSON_NAME).read_text())
        reference = io.load(src).state_dict()  # also imports what loading needs before the memory limit
        plan += [(name, src, reference, label, case) for label, case in _cases(doc, rng, PER_FIELD)]

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * resource.getpagesize()
    limit = used + HEADROOM if hard == resource.RLIM_INFINITY else min(hard, used + HEADROOM)
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    counts: dict[str, int] = {"refused": 0, "loaded": 0}
    problems = []
    start = time.perf_counter()
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        with pytest.raises(MemoryError):  # the bound is live
            bytearray(2 * HEADROOM)
        for name, src, reference, label, case in plan:
            d = tmp_path / name  # the weights stay as saved; only slimdiff.json is crafted
            if not d.exists():
                shutil.copytree(src, d)
            (d / io.JSON_NAME).write_text(json.dumps(case))
            signal.setitimer(signal.ITIMER_REAL, SECONDS)
            try:
                counts[_check_load(d, reference, inputs["unet2d" if name == "unet2d" else "dit"])] += 1
            except _Timeout:
                problems.append(f"{name}: {label}: took over {SECONDS} s")
            except Exception as e:  # noqa: BLE001 -- any other outcome (MemoryError included) is a finding
                problems.append(f"{name}: {label}: {type(e).__name__}: {str(e)[:200]}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, old_handler)
    assert not problems, f"{len(problems)} of {len(plan)} mutations:\n" + "\n".join(problems[:40])
    assert counts["refused"] > 0.8 * len(plan) and counts["loaded"] > 0, counts  # most mutations break the file
    assert time.perf_counter() - start < 60
