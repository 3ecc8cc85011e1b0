"""Train a data set's judge and write the shipped files in slimdiff/weights/<data>-judge/.

Reproduce with (from the repository root; digits about 10 s, mnist a few minutes on 2 CPU cores):

    python scripts/train_judge.py [--data mnist]

Options: ``--data digits --seed 0 --epochs 40 --out slimdiff/weights/<data>-judge``. Writes
``model.safetensors`` and ``judge.json`` (test accuracy, seed, epochs, this command, and
the FD floor of real train vs. real test measured with the new judge).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from slimdiff.eval.judge import DEFAULT_EPOCHS, judge_dir, load_judge, train_judge
from slimdiff.eval.quality import fd_floor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("digits", "mnist"), default="digits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or judge_dir(args.data)
    _, acc = train_judge(seed=args.seed, epochs=args.epochs, out=out, data=args.data)
    judge = load_judge(out, data=args.data)  # measure the floor with the weights as shipped
    meta = out / "judge.json"
    info = json.loads(meta.read_text())
    info["fd_floor"] = fd_floor(judge, data=args.data)
    meta.write_text(json.dumps(info, indent=2) + "\n")
    print(f"test accuracy {acc:.4f}; FD floor {info['fd_floor']['fd_train_test']:.4f} "
          f"({info['fd_floor']['subsample_size']}-sample subsets: {info['fd_floor']['subsample_mean']:.4f} +- {info['fd_floor']['subsample_std']:.4f})")
    print(f"wrote {out}/model.safetensors and judge.json")


if __name__ == "__main__":
    main()
