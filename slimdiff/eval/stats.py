"""Seed statistics for the bench (issue: the bench as evidence).

Every bench entry is scored on several seeds, each seed's samples paired with the teacher's
samples from the same noise and labels. A difference between two entries is judged on the
per-seed differences (paired: most of the sampling noise is shared by two models sampled from
the same noises), with a Student-t 95% interval; a claim is made only when that interval
excludes zero.
"""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["LEVEL", "mean_interval", "summary", "paired", "better", "verdict"]

LEVEL = 0.95
LOWER_IS_BETTER = {"fd": True, "class_acc": False, "ssim": False, "psnr": False}


def mean_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float | None]:
    """The mean of ``values`` and the half-width of its two-sided Student-t interval (``None``
    with fewer than two values: one seed gives no interval)."""
    from scipy.stats import t

    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n))


def summary(values: Sequence[float]) -> dict:
    """``{"mean", "ci95", "n"}`` of per-seed values (``ci95``: the interval's half-width)."""
    mean, half = mean_interval(values)
    return {"mean": mean, "ci95": half, "n": len(values)}


def paired(a: Sequence[float], b: Sequence[float], metric: str = "fd") -> dict:
    """Per-seed differences ``a - b`` (same seeds, same order), their mean and interval, and
    how many seeds ``a`` wins (lower FD, or higher accuracy/SSIM/PSNR)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds: {len(a)} vs {len(b)}")
    diff = [x - y for x, y in zip(a, b)]
    lower = LOWER_IS_BETTER.get(metric, True)
    wins = sum(1 for d in diff if (d < 0 if lower else d > 0))
    mean, half = mean_interval(diff)
    return {"metric": metric, "diff_seeds": diff, "mean": mean, "ci95": half, "n": len(diff), "a_wins": wins}


def better(pair: dict) -> str | None:
    """``"a"`` or ``"b"``: the side of :func:`paired`'s ``a - b`` that is better, when the paired
    interval excludes zero; ``None`` when the two are not distinguishable (or one seed gives no interval)."""
    mean, half = pair["mean"], pair["ci95"]
    if half is None or abs(mean) <= half:
        return None
    return "a" if (mean < 0) == LOWER_IS_BETTER.get(pair["metric"], True) else "b"


def verdict(a: str, b: str, pair: dict) -> str:
    """One line: "W beats L: fd lower by X +- h (95%), on k/N seeds" only when the paired
    interval excludes zero, told from the winner's side; otherwise "not distinguishable at N
    seeds" with the difference ``a - b`` and how many seeds each side wins."""
    metric, mean, half, n = pair["metric"], pair["mean"], pair["ci95"], pair["n"]
    if half is None:
        return f"`{a}` vs `{b}`: not distinguishable at {n} seed (no interval; run more seeds)."
    lower = LOWER_IS_BETTER.get(metric, True)
    b_wins = sum(1 for d in pair["diff_seeds"] if (d > 0 if lower else d < 0))
    side = better(pair)
    if side is None:
        return (f"`{a}` vs `{b}`: not distinguishable at {n} seeds ({metric} `{a}` - `{b}` {mean:+.3g} +- {half:.2g} "
                f"(95%); `{a}` better on {pair['a_wins']}/{n} seeds, `{b}` on {b_wins}/{n}).")
    winner, loser, wins = (a, b, pair["a_wins"]) if side == "a" else (b, a, b_wins)
    direction = "lower" if lower else "higher"
    return f"`{winner}` beats `{loser}`: {metric} {direction} by {abs(mean):.3g} +- {half:.2g} (95%), on {wins}/{n} seeds."
