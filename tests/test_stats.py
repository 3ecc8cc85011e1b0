"""Seed statistics of the bench: Student-t intervals and paired verdicts, checked by hand."""
from __future__ import annotations

import math

import pytest

from slimdiff.eval.stats import mean_interval, paired, verdict


def test_mean_interval_is_the_student_t_interval():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean, half = mean_interval(values)
    sd = math.sqrt(sum((v - 3.0) ** 2 for v in values) / 4)  # 1.5811
    assert mean == 3.0 and half == pytest.approx(2.7764451 * sd / math.sqrt(5), rel=1e-6)  # t(0.975, 4)
    assert mean_interval([7.0]) == (7.0, None)


def test_paired_differences_and_verdicts():
    a, b = [10.0, 11.0, 12.0, 10.5], [12.0, 13.1, 13.9, 12.4]
    pair = paired(a, b, "fd")
    assert pair["diff_seeds"] == pytest.approx([-2.0, -2.1, -1.9, -1.9]) and pair["a_wins"] == 4
    assert "`A` beats `B`" in verdict("A", "B", pair)
    assert "`A` beats `B`" in verdict("B", "A", paired(b, a, "fd"))  # same claim, other order
    noisy = paired([1.0, 3.0, 2.0], [2.0, 1.0, 2.5], "fd")
    assert "not distinguishable at 3 seeds" in verdict("A", "B", noisy)
    assert "not distinguishable at 1 seed" in verdict("A", "B", paired([1.0], [2.0]))
    higher = paired([0.9, 0.8], [0.5, 0.45], "ssim")  # higher SSIM is better
    assert higher["a_wins"] == 2
    with pytest.raises(ValueError):
        paired([1.0], [1.0, 2.0])
