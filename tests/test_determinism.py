"""Determinism: the same seed gives bit-identical samples and compressed models on CPU,
across runs in separate processes (same thread count: float reductions depend on it).

One recipe (:func:`recipe`) runs here and in a fresh interpreter; every tensor it writes
must match bit for bit.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import tiny_dit
from safetensors.torch import load_file, save_file

import slimdiff
from slimdiff.diffusion.sampling import sample
from slimdiff.diffusion.schedulers import DiffusionConfig
from slimdiff.methods.base import Context, compress

HERE = Path(__file__).resolve().parent


def recipe(out: Path) -> None:
    """Compress a tiny digits DiT with Diff-Pruning (+2 recovery steps) and DiP-GO, save both,
    and write samples of the original and of both results to ``out/samples.safetensors``."""
    model = tiny_dit(in_channels=1, learn_sigma=False, depth=3)
    model.slimdiff_meta = {"diffusion": DiffusionConfig(num_train_timesteps=100).to_dict()}  # short Taylor walk
    results = {
        "diff-pruning": compress(model, "diff-pruning", 0.7, Context(steps=3, recover_steps=2, batch_size=8,
                                                                      work_dir=out / "work", progress=False)),
        "dipgo": compress(model, "dipgo", 0.7, Context(steps=3, work_dir=out / "work", progress=False), {"opt_steps": 3}),
    }
    samples = {"original": sample(model, steps=3, seed=5)}
    for name, m in results.items():
        slimdiff.save(m, out / name)
        samples[name] = sample(m, steps=3, seed=5)
    save_file(samples, str(out / "samples.safetensors"))


def test_same_seed_same_bits_across_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "SLIMDIFF_TEST_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); from pathlib import Path; import test_determinism as t; " \
           f"t.recipe(Path({str(tmp_path / 'there')!r}))"
    there = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)  # runs while this process does the same
    recipe(tmp_path / "here")
    _, stderr = there.communicate()
    assert there.returncode == 0, stderr[-3000:]
    a, b = (load_file(str(tmp_path / d / "samples.safetensors")) for d in ("here", "there"))
    assert a.keys() == b.keys() == {"original", "diff-pruning", "dipgo"}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in ("diff-pruning", "dipgo"):
        assert (tmp_path / "here" / name / "model.safetensors").read_bytes() == \
            (tmp_path / "there" / name / "model.safetensors").read_bytes(), name
        here = slimdiff.load(tmp_path / "here" / name).slimdiff_meta
        assert here["extras"] == slimdiff.load(tmp_path / "there" / name).slimdiff_meta["extras"], name
    assert not torch.equal(a["original"], a["diff-pruning"])  # the methods really changed something
    assert not torch.equal(a["original"], sample(tiny_dit(in_channels=1, learn_sigma=False, depth=3), steps=3, seed=6))
