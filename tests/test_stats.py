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
    assert verdict("B", "A", paired(b, a, "fd")) == verdict("A", "B", pair)  # told from the winner's side
    assert verdict("A", "B", pair).endswith(": fd lower by 1.98 +- 0.15 (95%), on 4/4 seeds.")
    noisy = paired([1.0, 3.0, 2.0], [2.0, 1.0, 2.5], "fd")
    assert "not distinguishable at 3 seeds" in verdict("A", "B", noisy)
    assert "`A` better on 2/3 seeds, `B` on 1/3" in verdict("A", "B", noisy)
    assert "not distinguishable at 1 seed" in verdict("A", "B", paired([1.0], [2.0]))
    higher = paired([0.9, 0.8], [0.5, 0.45], "ssim")  # higher SSIM is better
    assert higher["a_wins"] == 2
    assert verdict("A", "B", higher).startswith("`A` beats `B`: ssim higher by 0.375")
    with pytest.raises(ValueError):
        paired([1.0], [1.0, 2.0])


def test_pareto_labels_do_not_overlap_and_intervals_are_drawn(tmp_path, monkeypatch):
    """Points at nearly the same place (bi-depth, first-depth and tinyfusion printed over each
    other before) get label boxes that do not overlap; a given interval becomes an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slimdiff.eval import report
    from slimdiff.eval.report import pareto, place_labels

    fig, ax = plt.subplots(figsize=(8, 5.5))
    names = ["bi-depth@0.5", "first-depth@0.5", "tinyfusion@0.5", "stride-depth@0.5", "oracle-depth@0.5"]
    for i, _ in enumerate(names):
        ax.scatter(0.5 + 0.001 * i, 7.0 + 0.01 * i)
    texts = place_labels(ax, [(n, 0.5 + 0.001 * i, 7.0 + 0.01 * i) for i, n in enumerate(names)])
    boxes = [t.get_window_extent(fig.canvas.get_renderer()) for t in texts]
    assert [t.get_text() for t in texts] == names
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)

    drawn = {}
    real_save = report._save

    def keep(fig, path, layout=True):  # the figure as saved: labels apart after the final layout
        ax = fig.axes[0]
        drawn["errorbars"] = len(ax.containers)
        boxes = [t.get_window_extent(fig.canvas.get_renderer()) for t in ax.texts]
        drawn["overlaps"] = sum(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        return real_save(fig, path, layout)

    monkeypatch.setattr(report, "_save", keep)
    points = {n: (0.5 + 0.001 * i, 7.0 + 0.01 * i, 1.2 if i else None) for i, n in enumerate(names)}
    out = pareto({**points, "teacher": (1.0, 6.7)}, tmp_path / "p.png")
    assert out.exists() and drawn == {"errorbars": len(names) - 1, "overlaps": 0}
