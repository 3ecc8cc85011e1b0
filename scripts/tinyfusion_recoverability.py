"""Does TinyFusion's search objective rank sub-networks the way the benchmark does?

TinyFusion picks the keep-option whose LoRA-adapted diffusion loss is lowest ("most
recoverable"). The benchmark ranks depth methods by FD after the shared recovery. This
script cuts ``digits-dit`` to several candidate block sets of the same depth (TinyFusion's
choice, its next most probable options, first-k = BI's choice on this teacher, the stride
set and seeded random sets), gives each the bench's recovery (fine-tuning, same steps,
optimiser and seed), and records for each:

- the held-out diffusion loss (digits test split, fixed timesteps and noise) before and
  after recovery: the quantity the search optimises, measured after real recovery;
- FD, class accuracy and SSIM to the teacher with the protocol's samples.

If the option with the lowest recovered loss is not the one with the lowest FD, the search
can be right about recoverability and still lose the benchmark; if first-k has both the lower
loss and the lower FD, the search failed to find the most recoverable option.

With a multi-group shape (``--keep 1:2``: six groups of two) only the search's choice is
ranked by TinyFusion; first-k may then lie outside the shape's search space, which tells
whether the shape or the objective loses. ``--sets`` adds explicit block sets.

The candidates are explicit block sets, not methods, so they are not bench entries: each is
cut and recovered with the package's depth machinery
(:func:`slimdiff.compression.depth.extract_blocks`, :func:`slimdiff.methods.base.recover`),
its loss measured in between, and scored with the protocol's
:func:`~slimdiff.eval.evaluate.generate` / :func:`~slimdiff.eval.evaluate.score`.

Writes ``bench/tinyfusion/recoverability_<k>of<depth>_r<recover steps>.json`` (one group) or
``recoverability_<N>of<M>_r<recover steps>.json`` (``--keep N:M`` over several groups).

Usage: ``OMP_NUM_THREADS=1 python scripts/tinyfusion_recoverability.py --keep 3:12 [--random 6]``
or ``... --keep 1:2 --top 1 --random 0 --sets 0,2,4,6,8,10 --recover-steps 3000``
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="digits-dit")
    ap.add_argument("--keep", default="3:12", help="an N:M shape, e.g. 3:12 (one group) or 1:2 (groups of 2)")
    ap.add_argument("--search-steps", type=int, default=500)
    ap.add_argument("--recover-steps", type=int, default=300, help="the bench's recovery (default 300)")
    ap.add_argument("--top", type=int, default=4, help="TinyFusion's most probable options to score")
    ap.add_argument("--random", type=int, default=6, help="seeded random block sets to score")
    ap.add_argument("--sets", nargs="*", default=[], help="more block sets to score, e.g. 0,2,4,6,8,10")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--loss-draws", type=int, default=32, help="noise/timestep draws per test image for the loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "runs" / "tf_recoverability"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "tinyfusion"))
    return ap.parse_args()


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, draws: int, seed: int) -> tuple[float, float]:
    """Mean epsilon-MSE over the digits test split with ``draws`` fixed (t, noise) pairs per
    image, and its standard error over the draws."""
    from slimdiff.data.datasets import digits
    from slimdiff.diffusion.losses import ForwardProcess, diffusion_loss
    from slimdiff.diffusion.schedulers import diffusion_config_of
    from slimdiff.models.backbone import as_backbone

    x0, y = digits("test").tensors
    fp = ForwardProcess(diffusion_config_of(model))
    gen = torch.Generator().manual_seed(seed)
    bb = as_backbone(model)
    losses = []
    for _ in range(draws):
        batch = fp.draw(x0, gen)
        losses.append(float(diffusion_loss(bb(batch.x_t, batch.t, y), batch)))
    t = torch.tensor(losses)
    return float(t.mean()), float(t.std() / len(losses) ** 0.5) if len(losses) > 1 else 0.0


def main() -> None:
    args = _args()
    import slimdiff
    from slimdiff.bench import write_json
    from slimdiff.compression.depth import extract_blocks, group_options, parse_keep
    from slimdiff.eval.evaluate import generate, score
    from slimdiff.methods.base import Context, recover
    from slimdiff.methods.depth_baselines import select_blocks
    from slimdiff.methods.tinyfusion import SearchConfig, search
    from slimdiff.models.backbone import as_backbone

    teacher = slimdiff.load(args.model).eval()
    depth = len(as_backbone(teacher).blocks)
    groups = parse_keep(args.keep, depth)
    k = sum(g.n for g in groups)
    ctx = Context(recover_steps=args.recover_steps, kd="none", seed=args.seed, work_dir=Path(args.work), progress=False,
                  teacher=teacher)

    start = time.process_time()
    found = search(teacher, groups, ctx, SearchConfig(steps=args.search_steps))
    candidates: dict[str, list[int]] = {}
    if len(groups) == 1:  # rank the single group's options by their learned probability
        options = [[int(i) for i in torch.nonzero(r).flatten()] for r in group_options(k, depth)]
        probs = found.probabilities[0]
        ranked = sorted(range(len(options)), key=lambda j: -probs[j])
        for r, j in enumerate(ranked[: args.top]):
            candidates[f"tinyfusion #{r + 1} (p={probs[j]:.3f})"] = options[j]
    else:
        candidates["tinyfusion"] = list(found.kept)
    sets = {f"set {s}": sorted(int(b) for b in s.split(",")) for s in args.sets}
    for name, kept in sets.items():
        if len(set(kept)) != k or not all(0 <= b < depth for b in kept):
            raise SystemExit(f"--sets {name[4:]}: give {k} distinct block indices in 0..{depth - 1} "
                             "(the depth --keep leaves)")
    rng = random.Random(args.seed)
    others = {"first-k": list(range(k)), "stride": select_blocks("stride", depth, k),
              **{f"random {i}": sorted(rng.sample(range(depth), k)) for i in range(args.random)}, **sets}
    for name, kept in others.items():  # a block set already listed (e.g. TinyFusion's = first-k) is scored once
        if kept not in candidates.values():
            candidates[name] = kept
    print(f"search: {time.process_time() - start:.0f} CPU s, picked {found.kept}", flush=True)

    shape = f"{k}of{depth}" if len(groups) == 1 else args.keep.replace(":", "of")
    dest = Path(args.out) / f"recoverability_{shape}_r{args.recover_steps}.json"
    head = {"model": args.model, "keep": args.keep, "search_steps": args.search_steps,
            "recover_steps": args.recover_steps, "samples": args.samples, "loss_draws": args.loss_draws,
            "seed": args.seed, "search_kept": found.kept}
    previous = json.loads(dest.read_text()) if dest.is_file() else {}
    done = {(r["name"], tuple(r["kept"])): r for r in previous.get("rows", [])
            if all(previous.get(key) == v for key, v in head.items())}  # resume: rows of the same settings
    ref, _ = generate(teacher, args.samples)
    rows = []
    for name, kept in candidates.items():
        if (name, tuple(kept)) in done:
            rows.append(done[(name, tuple(kept))])
            continue
        t0 = time.process_time()
        model = copy.deepcopy(teacher)
        extract_blocks(model, kept)
        before, _ = heldout_loss(model, args.loss_draws, args.seed)
        model.requires_grad_(True)
        model = recover(model, ctx, f"rec-{'-'.join(map(str, kept))}-n{args.recover_steps}").eval()
        after, after_se = heldout_loss(model, args.loss_draws, args.seed)
        x, y = generate(model, args.samples)
        s = score(model, x, y, teacher, reference_samples=ref)
        row = {"name": name, "kept": kept, "loss_before": before, "loss_after": after, "loss_after_se": after_se,
               "fd": s["fd"], "class_acc": s["class_acc"], "ssim": s["ssim"], "cpu_s": time.process_time() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json(dest, {**head, "complete": False, "rows": rows})  # after every row: an interrupted run resumes

    by_loss = min(rows, key=lambda r: r["loss_after"])
    by_fd = min(rows, key=lambda r: r["fd"])
    out = {**head, "complete": True, "rows": rows, "lowest_recovered_loss": by_loss["name"], "lowest_fd": by_fd["name"],
           "spearman_loss_fd": _spearman([r["loss_after"] for r in rows], [r["fd"] for r in rows])}
    write_json(dest, out)
    print(f"wrote {dest}: lowest recovered loss {by_loss['name']}, lowest FD {by_fd['name']}, "
          f"Spearman {out['spearman_loss_fd']:.2f}")


def _spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


if __name__ == "__main__":
    main()
