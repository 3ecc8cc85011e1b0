"""slimdiff.reproducible.Spent: a resumed job's time is summed over its attempts, a killed one included."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from slimdiff.reproducible import Spent


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_killed_attempt_keeps_its_seconds_and_the_next_attempt_adds_to_them(tmp_path):
    path = tmp_path / "work" / "spent.json"
    script = textwrap.dedent(f"""
        import os, signal, time
        from slimdiff.reproducible import Spent
        with Spent({str(path)!r}, every=0.05):
            end = time.process_time() + 0.6
            while time.process_time() < end:
                pass
            os.kill(os.getpid(), signal.SIGKILL)  # killed inside the job: no exit code runs
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr
    killed = json.loads(path.read_text())
    assert 0.4 <= killed["cpu_s"] and killed["wall_s"] >= killed["cpu_s"] * 0.5, killed  # at most `every` lost
    with Spent(path) as spent:
        assert spent.prior == killed
        _burn(0.2)
    assert spent.cpu_s >= killed["cpu_s"] + 0.2 and spent.wall_s > killed["wall_s"]
    assert json.loads(path.read_text()) == {"cpu_s": spent.cpu_s, "wall_s": spent.wall_s}
    frozen = spent.cpu_s
    _burn(0.05)
    assert spent.cpu_s == frozen  # totals stop at exit


def test_a_first_attempt_or_a_damaged_record_counts_from_zero(tmp_path):
    path = tmp_path / "spent.json"
    with Spent(path) as spent:
        _burn(0.05)
    assert 0.05 <= spent.cpu_s < 5
    path.write_text("{not json")
    with Spent(path) as again:
        pass
    assert again.prior == {"cpu_s": 0.0, "wall_s": 0.0} and again.cpu_s < 1
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), os.listdir(tmp_path)  # no temp files left
