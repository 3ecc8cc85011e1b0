"""scripts/measure_fidelity.py: its groups name real methods and options, and its cross-group
verdicts and cost table are generated from the groups' results files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import measure_fidelity as mf  # noqa: E402

from slimdiff.methods import get_method  # noqa: E402


@pytest.mark.parametrize("group", sorted(mf.GROUPS))
def test_every_group_names_registered_methods_and_options_they_declare(group):
    methods, options = mf.GROUPS[group]
    specs = [get_method(m) for m in methods]
    for name, value in options.items():
        takers = [s for s in specs if name in s.options]
        assert takers, f"{group}: option {name} applies to none of {methods}: it would silently do nothing"
        for spec in takers:
            spec.make_config({name: value})  # a wrong value is refused here, not hours into the run


def test_cross_pairs_name_groups_and_their_methods():
    for a, b in mf.CROSS:
        for side in (a, b):
            group, method = side.split("/")
            assert method in mf.GROUPS[group][0], side


def _results(out: Path, group: str, entries: dict) -> None:
    (out / group).mkdir(parents=True)
    (out / group / "results.json").write_text(json.dumps({"entries": entries}))


def test_cross_verdicts_pair_groups_seed_by_seed_and_state_the_cost(tmp_path, monkeypatch):
    def entry(fds, wall):
        return {"seeds": [0, 1, 2, 3], "fd_seeds": fds, "compress_wall_s": wall, "eval_wall_s": 1800.0}

    _results(tmp_path, "dydit", {"dydit@0.5": entry([10.0, 11.0, 12.0, 10.5], 1800.0)})
    _results(tmp_path, "dydit-old", {"dydit@0.5": entry([12.0, 13.1, 13.9, 12.4], 5400.0),
                                     "dydit@0.25": {"skipped": "cannot"}})
    monkeypatch.setattr(mf, "CROSS", [("dydit/dydit", "dydit-old/dydit"), ("width/scratch", "dydit/dydit")])
    mf.cross_verdicts(tmp_path, [0.5, 0.25])
    record = json.loads((tmp_path / "cross.json").read_text())
    assert list(record["pairs"]) == ["dydit/dydit@0.5 vs dydit-old/dydit@0.5"]  # missing sides are left out
    assert record["pairs"]["dydit/dydit@0.5 vs dydit-old/dydit@0.5"]["a_wins"] == 4
    assert record["wall_hours"] == {"dydit": {"entries": 1, "hours": 1.0}, "dydit-old": {"entries": 1, "hours": 2.0}}
    md = (tmp_path / "cross.md").read_text()
    assert "`dydit/dydit@0.5` beats `dydit-old/dydit@0.5`: fd lower by 1.98" in md
    assert "| all | 2 | 3.00 |" in md and "Written by" in md


def test_the_readme_table_is_generated_from_the_committed_fidelity_results():
    """Every number of the README's bench table comes from bench/fidelity/<group>/results.json."""
    root = Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text()
    block = text[text.index(mf.FIDELITY_START): text.index(mf.FIDELITY_END) + len(mf.FIDELITY_END)]
    assert block == mf.readme_block(root / "bench" / "fidelity"), "rerun scripts/measure_fidelity.py --readme"
    assert "| width/diff-pruning@0.5 |" in block and "| depth/tinyfusion@0.25 |" in block


def test_recovery_flips_pair_each_entry_across_lengths_and_list_the_rankings_that_change(tmp_path):
    def entry(budget, fds):
        return {"budget": budget, "seeds": [0, 1, 2, 3], "fd_seeds": fds, "fd": sum(fds) / 4, "fd_ci95": 0.1}

    def write(root, steps, entries):
        (root / "depth").mkdir(parents=True)
        (root / "depth" / "results.json").write_text(json.dumps({"config": {"recover_steps": steps}, "entries": entries}))

    short, long = tmp_path / "short", tmp_path / "long"
    write(short, 300, {"tinyfusion@0.5": entry(0.5, [80.0, 81, 79, 80.5]), "bi-depth@0.5": entry(0.5, [12.0, 13, 12.5, 12]),
                       "first-depth@0.5": entry(0.5, [11.0, 12, 11.5, 11]), "stride-depth@0.25": entry(0.25, [9.0] * 4)})
    write(long, 3000, {"tinyfusion@0.5": entry(0.5, [10.0, 10.5, 9.5, 10]), "bi-depth@0.5": entry(0.5, [11.0, 12, 11.4, 11]),
                       "first-depth@0.5": entry(0.5, [10.6, 10.9, 10.1, 11.1]), "oracle-depth@0.5": entry(0.5, [1.0] * 4)})
    (short / "depth-scratch").mkdir()
    (short / "depth-scratch" / "results.json").write_text(json.dumps(
        {"config": {"recover_steps": 300}, "entries": {"scratch@0.5": entry(0.5, [8.0, 8.5, 8.2, 8.1])}}))
    record = mf.recovery_flips(long, short)
    assert [v.split(": fd")[0] for v in record["scratch"]] == [  # every long entry with a scratch namesake
        "`depth-scratch/scratch@0.5` beats `depth/tinyfusion@0.5 at 3000`",
        "`depth-scratch/scratch@0.5` beats `depth/bi-depth@0.5 at 3000`",
        "`depth-scratch/scratch@0.5` beats `depth/first-depth@0.5 at 3000`",
        "`depth/oracle-depth@0.5 at 3000` beats `depth-scratch/scratch@0.5`"]
    assert "fd lower by 1.8 +- " in record["scratch"][0]  # 10 - 8.2, seed by seed
    assert [r["entry"] for r in record["entries"]] == ["depth/tinyfusion@0.5", "depth/bi-depth@0.5", "depth/first-depth@0.5"]
    assert record["entries"][0]["mean"] == pytest.approx(-70.125)  # long - short, seed by seed
    flips = {(f["a"], f["b"]): (f["winner_at_short"], f["winner_at_long"]) for f in record["flips"]}
    assert flips == {("depth/tinyfusion@0.5", "depth/bi-depth@0.5"): ("depth/bi-depth@0.5", "depth/tinyfusion@0.5"),
                     ("depth/tinyfusion@0.5", "depth/first-depth@0.5"): ("depth/first-depth@0.5", "depth/tinyfusion@0.5"),
                     ("depth/bi-depth@0.5", "depth/first-depth@0.5"): ("depth/first-depth@0.5", None)}
    md = (long / "recovery.md").read_text()
    assert "# Recovery length: 3000 steps against 300" in md and "| depth/tinyfusion@0.5 | 80.1 +- 0.1 | 10 +- 0.1 |" in md
