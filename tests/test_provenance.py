"""Every results file names the command and the commit that wrote it (issue 22: "every committed
benchmark file names the commit and command that produced it")."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from slimdiff.eval.report import provenance_line
from slimdiff.eval.speed import command, environment

ROOT = Path(__file__).resolve().parent.parent

LEGACY = {
    "bench/digits/results.json": "the README's one-seed table, written before commands were recorded; `make bench` "
                                 "writes its successor, bench/digits-seeds",
    "bench/gpu/e2e.json": "GPU run (scripts/gpu_run.sh): reruns only where a GPU is lent",
    "bench/gpu/speed_small/results.json": "GPU run (scripts/gpu_run.sh): reruns only where a GPU is lent",
    "bench/gpu/speed_xl/results.json": "GPU run (scripts/gpu_run.sh): reruns only where a GPU is lent",
}
"""Committed results files older than the recorded command, each with the reason it stays."""


def test_command_is_what_a_reader_retypes(tmp_path, monkeypatch):
    assert command(["/opt/venv/bin/slimdiff", "bench", "-o", "my dir"]) == "slimdiff bench -o 'my dir'"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scripts").mkdir()
    assert command([str(tmp_path / "scripts" / "x.py"), "--k", "1"]) == "python scripts/x.py --k 1"
    assert command(["/elsewhere/y.py"]) == "python /elsewhere/y.py"
    assert environment()["command"] == command()


def test_report_line_names_command_and_commit():
    line = provenance_line({"command": "slimdiff bench -o x", "git_commit": "0123456789abcdef"})
    assert line == "Written by `slimdiff bench -o x` at commit `0123456789ab`."
    assert "not recorded" in provenance_line({})


def _results_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "bench"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git work tree")
    return [f for f in out.stdout.split() if f.endswith(".json") and "/entries/" not in f
            and not f.endswith("/bench.json")]  # entries and bench.json are parts of a results.json


def _provenance(data: dict) -> tuple[str | None, str | None]:
    """(commit, command) where the writers put them: top level, ``environment`` or ``provenance``."""
    for where in (data, data.get("environment") or {}, data.get("provenance") or {}):
        commit = where.get("git_commit") or where.get("commit")
        if commit and where.get("command"):
            return commit, where["command"]
    return None, None


def test_committed_bench_files_name_their_command_and_commit():
    files = _results_files()
    missing = [f for f in files if f not in LEGACY and None in _provenance(json.loads((ROOT / f).read_text()))]
    assert not missing, f"results files without command and commit (rerun their command, or remove them): {missing}"
    stale = [f for f in LEGACY if f not in files]
    assert not stale, f"LEGACY names files that are gone; drop them from the list: {stale}"
