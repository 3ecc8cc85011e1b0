"""The documented extension path (docs/ARCHITECTURE.md, "Adding a method"): a new method is one
file with a ``MethodSpec`` plus one ``register`` line, and then works through ``compress``, the
CLI (``--option``, ``slimdiff methods``) and the bench like the built-in ones."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch.nn as nn
from conftest import cli_main, tiny_dit

import slimdiff
from slimdiff.bench import BenchConfig, run_bench
from slimdiff.compression.depth import finish_depth
from slimdiff.errors import UsageError
from slimdiff.methods import MethodSpec, get_method, option, register, unregister
from slimdiff.methods.base import Context, compress
from slimdiff.models.backbone import as_backbone


# --------------------------------------------------------------------------- the toy method (one file's worth)
@dataclass(frozen=True)
class EveryOtherConfig:
    offset: int = option(0, "keep blocks offset, offset + 2, ...", choices=(0, 1))


def every_other(model: nn.Module, budget: float, ctx: Context, config: EveryOtherConfig) -> nn.Module:
    """Keep every other transformer block (a fixed depth pattern; the budget is only reported)."""
    kept = list(range(config.offset, len(as_backbone(model).blocks), 2))
    return finish_depth(model, kept, ctx, "every-other-depth", {"offset": config.offset}, {"kept_blocks": kept})


EVERY_OTHER = MethodSpec("every-other-depth", "depth", "toy: keep every other block", every_other, EveryOtherConfig)


# --------------------------------------------------------------------------- tests
@pytest.fixture
def registered():
    register(EVERY_OTHER)  # the registration line
    yield EVERY_OTHER
    unregister(EVERY_OTHER.name)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ext") / "teacher"
    slimdiff.save(tiny_dit(input_size=8, in_channels=1, learn_sigma=False, depth=4), path)
    return path


def test_registered_method_compresses_saves_and_loads(registered, tmp_path):
    teacher = tiny_dit(input_size=8, in_channels=1, learn_sigma=False, depth=4)
    out = compress(teacher, "every-other-depth", 0.5, Context(progress=False), {"offset": 1})
    assert len(as_backbone(out).blocks) == 2 and len(as_backbone(teacher).blocks) == 4
    chain = out.slimdiff_meta["method"]["chain"]
    assert [c["name"] for c in chain] == ["every-other-depth"] and chain[0]["settings"] == {"offset": 1}
    assert 0.4 < out.slimdiff_meta["measured"]["macs_ratio"] < 0.7
    slimdiff.save(out, tmp_path / "m")
    back = slimdiff.load(str(tmp_path / "m"))
    assert len(as_backbone(back).blocks) == 2


def test_options_come_from_the_config(registered):
    assert get_method("every-other-depth").options == ("offset",)
    assert registered.make_config({"offset": 1}).offset == 1
    with pytest.raises(UsageError, match="integer"):
        registered.make_config({"offset": "x"})
    with pytest.raises(UsageError, match="do not apply"):
        registered.make_config({"threshold": 0.1})


def test_cli_compress_and_methods_see_it(registered, teacher_dir, tmp_path, monkeypatch, capsys):
    assert cli_main(monkeypatch, "methods", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["every-other-depth"]["options"] == [
        {"name": "offset", "type": "int", "default": 0, "help": "keep blocks offset, offset + 2, ...",
         "allowed": "0 | 1"}]
    assert {"diff-pruning", "tinyfusion", "dydit", "dipgo"} <= set(listed)
    out = tmp_path / "cli"
    code = cli_main(monkeypatch, "compress", "--method", "every-other-depth", "--model", str(teacher_dir),
                    "--option", "offset=1", "-o", str(out), "--json")
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["macs_ratio"] < 0.7
    assert len(as_backbone(slimdiff.load(str(out))).blocks) == 2
    assert cli_main(monkeypatch, "compress", "--method", "every-other-depth", "--model", str(teacher_dir),
                    "--option", "offset=x", "-o", str(tmp_path / "bad")) == 2
    assert not (tmp_path / "bad").exists()


def test_bench_runs_it(registered, teacher_dir, tmp_path):
    config = BenchConfig(model=str(teacher_dir), methods=["every-other-depth"], budgets=[0.5], samples=20, steps=3,
                         recover_steps=2, batch_size=8, latency_batch=2, latency_repeats=1, progress=False,
                         options={"offset": 1})
    results = run_bench(config, tmp_path / "bench")
    entry = results["entries"]["every-other-depth@0.5"]
    assert not entry.get("skipped") and entry["macs_ratio"] < 0.7 and entry["fd"] is not None


def test_declared_choices_are_checked_before_any_work():
    with pytest.raises(UsageError, match="unknown offset 2; choose one of 0, 1"):
        EVERY_OTHER.make_config({"offset": 2})


def test_a_method_that_misses_its_budget_is_warned_about(registered):
    """compress checks every chain end to end: a (user's) method over its budget is warned about
    when the result is made (the toy method keeps half the blocks whatever the budget)."""
    teacher = tiny_dit(input_size=8, in_channels=1, learn_sigma=False, depth=4)
    with pytest.warns(UserWarning, match=r"costs 0\.\d+ .* more than 3% above the budget 0\.3: the budget is not met "
                                         r"\(every-other-depth"):
        out = compress(teacher, "every-other-depth", 0.3, Context(progress=False))
    assert out.slimdiff_meta["measured"]["macs_ratio"] > 0.3 * 1.03
