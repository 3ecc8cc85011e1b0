"""Methods compose: a chain runs in kind order, meets the end-to-end budget, and saves/loads whole."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_dit
from typer.testing import CliRunner

import slimdiff
from slimdiff.cli import app
from slimdiff.diffusion.sampling import sample
from slimdiff.eval.compute import macs_sampling
from slimdiff.methods.base import Context, compress

STEPS = 4


def _digits_dit(depth: int = 4):
    return tiny_dit(input_size=8, in_channels=1, learn_sigma=False, depth=depth)


def _ctx(tmp_path, **kw) -> Context:
    return Context(steps=STEPS, batch_size=8, progress=False, work_dir=tmp_path / "work", **kw)


@pytest.mark.parametrize("chain, budget, order, options", [
    ("dipgo,tinyfusion", 0.25, ["tinyfusion", "dipgo"], {"search_steps": 2, "opt_steps": 2}),
    ("deepcache-style,magnitude-width,first-depth", 0.3, ["first-depth", "magnitude-width", "deepcache-style"], {}),
])
def test_chain_meets_the_budget_end_to_end_and_loads_whole(chain, budget, order, options, tmp_path):
    model = _digits_dit()
    result = compress(model, chain, budget, _ctx(tmp_path, recover_steps=1), options)
    names = [c["name"] for c in result.slimdiff_meta["method"]["chain"]]
    assert names == order  # static depth, then width, then step reuse, whatever order they were given in
    ratio = macs_sampling(result, steps=STEPS) / macs_sampling(model, steps=STEPS)
    assert ratio <= budget * 1.03
    assert result.slimdiff_meta["measured"]["macs_ratio"] == pytest.approx(ratio)
    slimdiff.save(result, tmp_path / "out")
    loaded = slimdiff.load(str(tmp_path / "out"))
    assert [c["name"] for c in loaded.slimdiff_meta["method"]["chain"]] == names
    assert macs_sampling(loaded, steps=STEPS) == macs_sampling(result, steps=STEPS)
    kw = dict(steps=STEPS, classes=[1, 7], seed=3)
    torch.testing.assert_close(sample(loaded, **kw), sample(result, **kw), rtol=0, atol=0)


def test_cli_compress_chain(tmp_path):
    teacher = tmp_path / "teacher"
    slimdiff.save(_digits_dit(), teacher)
    out = CliRunner().invoke(app, ["compress", "--method", "tinyfusion,dipgo", "--model", str(teacher), "--budget", "0.25",
                                   "--steps", str(STEPS), "--search-steps", "2", "--opt-steps", "2", "--batch-size", "8",
                                   "-o", str(tmp_path / "tf-dipgo"), "--json"])
    assert out.exit_code == 0, out.output
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["macs_ratio"] <= 0.25 * 1.03 and row["params"] < row["original_params"]
    loaded = slimdiff.load(row["output"])
    assert loaded.slimdiff_meta["method"]["name"] == "tinyfusion+dipgo"


def test_cli_compress_exports_a_depth_pruned_dit_to_diffusers(tmp_path):
    """Depth pruning fits a diffusers config: plain diffusers loads the export and gives the same output."""
    from diffusers import DiTTransformer2DModel

    from slimdiff.models.backbone import as_backbone

    teacher = tmp_path / "teacher"
    slimdiff.save(tiny_dit(input_size=8, in_channels=1, learn_sigma=False, depth=4, freq_shift=1), teacher)
    out = CliRunner().invoke(app, ["compress", "--method", "first-depth", "--model", str(teacher), "--budget", "0.5",
                                   "--steps", str(STEPS), "-o", str(tmp_path / "d"), "--export-diffusers",
                                   str(tmp_path / "hf"), "--json"])
    assert out.exit_code == 0, out.output
    ours = slimdiff.load(str(tmp_path / "d"))
    theirs = DiTTransformer2DModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert theirs.config.num_layers == len(as_backbone(ours).blocks) == 2
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([3, 7])
    with torch.no_grad():
        torch.testing.assert_close(as_backbone(theirs)(x, t, y), as_backbone(ours)(x, t, y), rtol=1e-4, atol=1e-5)


def test_cli_compress_refuses_an_export_that_does_not_fit(tmp_path):
    teacher = tmp_path / "teacher"
    slimdiff.save(_digits_dit(), teacher)
    out = CliRunner().invoke(app, ["compress", "--method", "magnitude-width", "--model", str(teacher), "--budget", "0.5",
                                   "--steps", str(STEPS), "-o", str(tmp_path / "w"), "--export-diffusers",
                                   str(tmp_path / "hf")])
    assert out.exit_code != 0 and "cannot write magnitude-width's per-layer widths" in str(out.exception or out.output)
    assert not (tmp_path / "w").exists() and not (tmp_path / "hf").exists()  # refused before any work
