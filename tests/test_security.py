"""Security: no load path executes code from a file.

slimdiff's own files are safetensors + JSON; official DiT ``.pt`` checkpoints go through
``torch.load(weights_only=True)``; diffusers directories load safetensors only. The unit
cases of :func:`slimdiff.io.load` are in ``tests/test_io.py``; here every user-facing entry
(``slimdiff.load``, ``slimdiff info`` / ``sample``, ``--data``, training resume) meets a
planted malicious pickle, and the package source is checked for calls that could unpickle
or run foreign code.
"""
from __future__ import annotations

import ast
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Evil, cli_main, evil_pickle, tiny_dit, tiny_unet

import slimdiff
from slimdiff.data.datasets import digits, get_dataset
from slimdiff.errors import UsageError
from slimdiff.train.trainer import TrainConfig, train

PACKAGE = Path(slimdiff.__file__).parent


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return slimdiff.save(tiny_dit(in_channels=1, learn_sigma=False), tmp_path_factory.mktemp("sec") / "dit")


# --------------------------------------------------------------------------- planted pickles
def _next_to_weights(saved: Path, tmp: Path, marker: Path) -> Path:
    d = Path(shutil.copytree(saved, tmp / "m"))
    (d / "extra.pkl").write_bytes(evil_pickle(marker))
    return d


def _as_weights(saved: Path, tmp: Path, marker: Path) -> Path:
    d = Path(shutil.copytree(saved, tmp / "m"))
    (d / "model.safetensors").write_bytes(evil_pickle(marker))
    return d


def _torch_save_as_weights(saved: Path, tmp: Path, marker: Path) -> Path:
    d = Path(shutil.copytree(saved, tmp / "m"))
    torch.save({"w": Evil(marker)}, d / "model.safetensors")
    return d


def _official_pt(saved: Path, tmp: Path, marker: Path) -> Path:
    torch.save({"ema": {"x_embedder.proj.weight": Evil(marker)}}, tmp / "DiT-XL-2-256.pt")
    return tmp / "DiT-XL-2-256.pt"


def _diffusers_bin_only(saved: Path, tmp: Path, marker: Path) -> Path:
    d = tmp / "unet"
    tiny_unet().save_pretrained(d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    (d / "diffusion_pytorch_model.bin").write_bytes(evil_pickle(marker))
    return d


def _pipeline_bin_only(saved: Path, tmp: Path, marker: Path) -> Path:
    _diffusers_bin_only(saved, tmp / "pipe", marker)
    (tmp / "pipe" / "model_index.json").write_text('{"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]}')
    return tmp / "pipe"


PLANTED: dict[str, tuple[Callable[[Path, Path, Path], Path], str]] = {
    "pickle-next-to-weights": (_next_to_weights, r"pickle file\(s\) extra\.pkl"),
    "pickle-as-weights": (_as_weights, "is a pickle / torch.save file"),
    "torch-save-as-weights": (_torch_save_as_weights, "is a pickle / torch.save file"),
    "official-pt-with-code": (_official_pt, "refuses to unpickle"),
    "diffusers-bin-only": (_diffusers_bin_only, "no .safetensors weights"),
    "pipeline-bin-only": (_pipeline_bin_only, "no .safetensors weights"),
}


def _crafted_json(edit: Callable[[dict], None]) -> Callable[[Path, Path, Path], Path]:
    """A planter that copies the saved model and edits its slimdiff.json (the file is untrusted)."""
    def plant(saved: Path, tmp: Path, marker: Path) -> Path:
        d = Path(shutil.copytree(saved, tmp / "m"))
        doc = json.loads((d / "slimdiff.json").read_text())
        edit(doc)
        (d / "slimdiff.json").write_text(json.dumps(doc))
        return d
    return plant


PLANTED_JSON: dict[str, tuple[Callable[[Path, Path, Path], Path], str]] = {
    "attrs-set-forward": (_crafted_json(lambda d: d["structure"].update(attrs={"blocks.0": {"forward": None}})),
                          r"structure\.attrs\['blocks\.0'\]\.forward"),
    "attrs-set-class": (_crafted_json(lambda d: d["structure"].update(attrs={"": {"__class__": "Evil"}})),
                        r"structure\.attrs\[''\] key = '__class__'"),
    "weights-outside-directory": (_crafted_json(lambda d: d["weights"].update(file="/etc/passwd")), r"weights\.file"),
    "unbounded-depth": (_crafted_json(lambda d: d["architecture"]["config"].update(depth=10**9)),
                        r"architecture\.config\.depth = 1000000000"),
    "nan-schedule": (_crafted_json(lambda d: d["diffusion"].update(beta_start=float("nan"))), r"diffusion\.beta_start"),
}


@pytest.mark.parametrize("name", sorted(PLANTED_JSON))
def test_crafted_metadata_is_refused_everywhere_before_any_work(name, saved, tmp_path, monkeypatch, capsys):
    """A crafted slimdiff.json sets no attribute, reads no other file and allocates nothing
    unbounded: every entry point refuses it with one line (exit 2) and writes nothing."""
    plant, needle = PLANTED_JSON[name]
    target = str(plant(saved, tmp_path, tmp_path / "unused"))
    with pytest.raises(UsageError, match=needle):
        slimdiff.load(target)
    out = tmp_path / "g.png"
    for argv in (["info", target], ["sample", "--model", target, "--steps", "1", "-o", str(out)]):
        assert cli_main(monkeypatch, *argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and re.search(needle, lines[0]), lines
    assert not out.exists()


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_pickles_are_refused_everywhere(name, saved, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    plant, needle = PLANTED[name]
    target = str(plant(saved, tmp_path, marker))
    with pytest.raises(UsageError, match=needle):
        slimdiff.load(target)
    for argv in (["info", target], ["sample", "--model", target, "--steps", "1", "-o", str(tmp_path / "g.png")]):
        assert cli_main(monkeypatch, *argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and re.search(needle, lines[0]), lines
    assert not marker.exists(), "a planted pickle ran"


def test_diffusers_directory_loads_safetensors_and_ignores_a_planted_bin(tmp_path):
    marker = tmp_path / "pwned"
    model = tiny_unet()
    model.save_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(evil_pickle(marker))
    loaded = slimdiff.load(str(tmp_path / "unet"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert not marker.exists()


def test_latents_with_pickled_objects_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    np.savez(tmp_path / "latents.npz", latents=np.array([Evil(marker)], dtype=object))
    with pytest.raises(UsageError, match="cannot read latents file"):
        get_dataset(str(tmp_path / "latents.npz"))
    assert not marker.exists()


def test_resume_never_unpickles_a_planted_checkpoint(saved, tmp_path):
    marker = tmp_path / "pwned"
    cfg = TrainConfig(steps=1, batch_size=4, checkpoint_every=1, ema_decay=0.0)
    train(slimdiff.load(saved), digits("train"), cfg, tmp_path / "run", progress=False)
    ckpt = tmp_path / "run" / "checkpoint"
    (ckpt / "optimizer.safetensors").write_bytes(evil_pickle(marker))
    (ckpt / "extra.pt").write_bytes(evil_pickle(marker))
    with pytest.raises(UsageError, match="checkpoint .* is unreadable"):
        train(slimdiff.load(saved), digits("train"), TrainConfig(steps=2, batch_size=4, ema_decay=0.0), tmp_path / "run",
              resume=True, progress=False)
    assert not marker.exists()


def test_official_checkpoint_tensors_load_with_weights_only(tmp_path):
    """The safe path still loads real official checkpoints (plain tensors)."""
    model = tiny_dit(learn_sigma=True)
    torch.save({"ema": model.state_dict()}, tmp_path / "ckpt.pt")
    cfg = {k: getattr(model.config, k) for k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                                                 "num_heads", "num_classes")}
    loaded = slimdiff.load(str(tmp_path / "ckpt.pt"), **cfg)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


# --------------------------------------------------------------------------- the source
def _unsafe_calls(tree: ast.AST) -> list[str]:
    """Calls that could unpickle or run foreign code (``file:line what``)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, kw = node.func, {k.arg: k.value for k in node.keywords}
        attr = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        owner = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""

        def true(name: str, kw=kw) -> bool:
            return isinstance(kw.get(name), ast.Constant) and kw[name].value is True

        if owner in ("pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve") and attr in ("load", "loads", "open"):
            found.append(f"{node.lineno} {owner}.{attr}")
        elif owner == "torch" and attr == "load" and not true("weights_only"):
            found.append(f"{node.lineno} torch.load without weights_only=True")
        elif owner == "torch.hub" and attr == "load":
            found.append(f"{node.lineno} torch.hub.load")
        elif attr == "from_pretrained" and not re.search(r"(Processor|Tokenizer)$", owner) and not true("use_safetensors"):
            found.append(f"{node.lineno} {owner}.from_pretrained without use_safetensors=True")
        elif true("allow_pickle") or true("trust_remote_code"):
            found.append(f"{node.lineno} {attr}(allow_pickle/trust_remote_code=True)")
        elif isinstance(func, ast.Name) and func.id in ("eval", "exec"):
            found.append(f"{node.lineno} {func.id}()")
    return found


def test_no_unsafe_loading_in_the_package():
    problems = [f"{path.relative_to(PACKAGE)}:{p}" for path in sorted(PACKAGE.rglob("*.py"))
                for p in _unsafe_calls(ast.parse(path.read_text(), str(path)))]
    assert not problems, problems
    # the check itself finds what it must
    bad = "import torch, pickle\ntorch.load(f)\npickle.loads(b)\nM.from_pretrained(d)\nnp.load(f, allow_pickle=True)\n"
    assert len(_unsafe_calls(ast.parse(bad))) == 4
