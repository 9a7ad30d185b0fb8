"""The statistics behind intervals and verdicts, against published values and seeded simulation.

Known answers: Student's t quantiles from a printed table; every interval by coverage: a 95 % interval must
cover the true value in about 95 % of seeded trials drawn from a distribution whose true percentile (or mean,
ratio, exponent) is known in closed form. Holm's adjustment against R's
``p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm")``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvray.analysis.stats import bootstrap_ratio, holm, power_fit_ci, welch_log_ratio
from kvray.measure.metrics import (
    bootstrap_percentile_ci,
    mean_ci,
    min_samples,
    student_t_cdf,
    student_t_ppf,
    supported_percentile,
)

TRIALS = 300
# 300 trials of a 95 % interval: the covered count is Binomial(300, 0.95), sd 3.8 trials (1.3 %). The band
# allows the bootstrap's known small-sample shortfall below 95 % and four binomial sds on either side.
COVERAGE = (0.88, 0.99)


@pytest.mark.parametrize(("df", "table"), [(1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042)])
def test_student_t_quantiles_match_the_table(df, table):
    assert student_t_ppf(0.975, df) == pytest.approx(table, abs=1e-3)
    assert student_t_cdf(table, df) == pytest.approx(0.975, abs=1e-4)
    assert student_t_ppf(0.025, df) == pytest.approx(-table, abs=1e-3)


def test_min_samples_per_percentile():
    assert [min_samples(p) for p in (50, 90, 95, 99)] == [2, 10, 20, 100]
    assert supported_percentile(9) is None and supported_percentile(10) == 90
    assert supported_percentile(99) == 95 and supported_percentile(100) == 99


def test_holm_matches_r():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm([0.01, math.nan])
    assert out[0] == pytest.approx(0.01) and math.isnan(out[1])  # NaN is not a question asked


def test_bootstrap_median_interval_covers_the_true_median():
    """Exponential(1) latencies: true median ln 2. 120 values in 3 repeats of 40, as a cell pools them."""
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(TRIALS):
        x = rng.exponential(1.0, size=120)
        low, high = bootstrap_percentile_ci([x[:40], x[40:80], x[80:]], [50], seed=trial)[50]
        covered += low <= math.log(2) <= high
    assert COVERAGE[0] <= covered / TRIALS <= COVERAGE[1], covered / TRIALS


def test_bootstrap_p90_interval_covers_the_true_p90():
    rng = np.random.default_rng(2)
    covered = 0
    for trial in range(TRIALS):
        x = rng.exponential(1.0, size=200)
        low, high = bootstrap_percentile_ci([x], [90], seed=trial)[90]
        covered += low <= math.log(10) <= high
    assert COVERAGE[0] <= covered / TRIALS <= COVERAGE[1], covered / TRIALS


def test_t_interval_of_throughput_covers_the_true_mean_with_three_repeats():
    """Three repeats of a normal throughput (mean 100, sd 10): the t interval is exact, so ~95 %."""
    rng = np.random.default_rng(3)
    covered = sum(
        (lambda lo_hi: lo_hi[0] <= 100 <= lo_hi[1])(mean_ci(rng.normal(100, 10, size=3))) for _ in range(1000)
    )
    assert 0.93 <= covered / 1000 <= 0.97  # sd of the rate over 1,000 trials: 0.7 %


def test_ratio_interval_covers_the_true_ratio():
    """base Exponential(1), new Exponential(1.3): the true ratio of medians (and of p90s) is 1.3."""
    rng = np.random.default_rng(4)
    covered = 0
    for trial in range(150):
        a, b = rng.exponential(1.0, size=100), rng.exponential(1.3, size=100)
        ch = bootstrap_ratio([a], [b], 50, resamples=400, seed=trial)
        covered += ch.ci_low <= 1.3 <= ch.ci_high
    assert 0.86 <= covered / 150 <= 1.0, covered / 150  # 150 trials: sd 1.8 %


def test_ratio_test_false_positive_rate_is_at_most_alpha():
    """The same distribution on both sides: p < 0.05 in about 5 % of trials, not more."""
    rng = np.random.default_rng(5)
    hits = sum(
        bootstrap_ratio([rng.exponential(1, 80)], [rng.exponential(1, 80)], 50, resamples=300, seed=t).p_value < 0.05
        for t in range(200)
    )
    assert hits / 200 <= 0.10  # 5 % expected; sd 1.5 %


def test_ratio_by_repeat_is_wider_when_repeats_disagree():
    """Two runs whose repeats scatter (a shared stall per repeat): the by-repeat bootstrap sees the scatter,
    a bootstrap over the pooled requests does not."""
    rng = np.random.default_rng(6)
    base = [rng.normal(1.0 + shift, 0.01, 30) for shift in (0.0, 0.05, 0.1)]
    new = [rng.normal(1.0 + shift, 0.01, 30) for shift in (0.0, 0.05, 0.1)]
    by_repeat = bootstrap_ratio(base, new, 50)
    pooled = bootstrap_ratio([np.concatenate(base)], [np.concatenate(new)], 50)
    assert by_repeat.ci_high - by_repeat.ci_low > 1.5 * (pooled.ci_high - pooled.ci_low)
    assert bootstrap_ratio(base, new, 50) == by_repeat  # seeded: the same answer twice


def test_welch_on_log_throughput():
    ch = welch_log_ratio([100, 102, 98], [80, 81, 79])
    assert ch.ratio == pytest.approx(80 / 100) and ch.ci_low < 0.8 < ch.ci_high and ch.p_value < 0.001
    same = welch_log_ratio([100, 110, 90], [95, 105, 100])
    assert same.p_value > 0.3 and same.ci_low < 1 < same.ci_high
    assert math.isnan(welch_log_ratio([100], [90, 91]).p_value)  # one repeat: no test


def test_exponent_interval_covers_the_true_exponent():
    """latency = 1e-4 · L^1.3 × lognormal noise (σ 0.1) at 5 lengths: the t interval of the slope is exact."""
    rng = np.random.default_rng(7)
    lengths = np.array([128, 256, 512, 1024, 2048])
    covered = 0
    for _ in range(TRIALS):
        y = 1e-4 * lengths**1.3 * np.exp(rng.normal(0, 0.1, lengths.size))
        _, _, _, low, high = power_fit_ci(lengths, y)
        covered += low <= 1.3 <= high
    assert 0.90 <= covered / TRIALS <= 0.99
