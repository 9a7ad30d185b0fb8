"""Figures of sweeps with many x values (a 10,000-cell folder of 1,000 prompt lengths): the lines are binned to
medians and the x axis ticked at powers of two, so a figure costs what 120 points cost (issue #31)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kvray.figures import common


def test_a_line_of_1000_x_values_becomes_120_bin_medians_on_the_same_line() -> None:
    """y = 3x + 1 exactly: the median of a bin's y is 3 × the median of its x + 1 (a monotone map keeps the
    median), so every binned point lies on the same line, and each x stays inside the swept range."""
    x = np.arange(8, 1008, dtype=float)
    pts = pd.DataFrame({"prompt_toks": np.repeat(x, 2), "ttft_s_p50": np.repeat(3 * x + 1, 2)})  # 2 cells an x
    drawn, per_point = common.binned(pts, "prompt_toks")
    assert len(drawn) == common.MAX_POINTS == 120
    assert np.allclose(drawn["ttft_s_p50"], 3 * drawn["prompt_toks"] + 1)
    assert drawn["prompt_toks"].is_monotonic_increasing and drawn["prompt_toks"].between(8, 1007).all()
    assert per_point == 2 * 9  # 1,000 values in 120 bins of 8 or 9 consecutive values, 2 cells each
    assert common.binned_note(per_point, "prompt_toks")[0].startswith("many prompt toks values")


def test_a_sweep_of_few_values_is_drawn_point_by_point() -> None:
    pts = pd.DataFrame({"concurrency": [1, 2, 4, 8] * 3, "tps": range(12)})
    drawn, per_point = common.binned(pts, "concurrency")
    assert drawn is pts and per_point == 1 and common.binned_note(per_point, "concurrency") == []


def test_the_log2_axis_ticks_every_value_of_a_short_sweep_and_powers_of_two_of_a_long_one() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (few, many, linear) = plt.subplots(1, 3)
    try:
        common.log2_axis(few, [1, 2, 4, 8, 16], "concurrency")
        assert list(few.get_xticks()) == [1, 2, 4, 8, 16]
        common.log2_axis(many, range(8, 1008), "prompt tokens")
        lo, hi = many.get_xlim()
        shown = [t for t in many.get_xticks() if lo <= t <= hi]
        assert shown == [8, 16, 32, 64, 128, 256, 512, 1024]  # 1,000 values, 8 ticks
        common.log2_axis(linear, range(100, 300), "prompt tokens")  # spans < 4×: linear, matplotlib's ticks
        assert len(linear.get_xticks()) <= common.MAX_TICKS + 2
    finally:
        plt.close(fig)
