"""Write the README's bench section from a bench directory's results.json (default bench/digits).

    python scripts/readme_bench.py [bench/digits]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from slimdiff.eval.report import update_readme

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    directory = sys.argv[1] if len(sys.argv) > 1 else "bench/digits"
    results = json.loads((ROOT / directory / "results.json").read_text())
    changed = update_readme(ROOT / "README.md", results, directory)
    print("README.md updated" if changed else "README.md already up to date")
