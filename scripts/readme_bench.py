"""Print a bench directory's table as the README shows tables (markdown, generated from its
results.json; never typed by hand). The README's own table is measure_fidelity's (``--readme``).

    python scripts/readme_bench.py [bench/digits-seeds]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from slimdiff.eval.report import readme_block

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    directory = sys.argv[1] if len(sys.argv) > 1 else "bench/digits-seeds"
    path = ROOT / directory / "results.json"
    if not path.exists():
        sys.exit(f"{path} does not exist: run the bench first (`make bench` writes bench/digits-seeds)")
    print(readme_block(json.loads(path.read_text()), directory))
