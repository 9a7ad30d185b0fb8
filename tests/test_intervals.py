"""The percentile intervals drawn from order statistics (kvray.measure.metrics.bootstrap_percentile_ci) against
the bootstrap they replace: the direct resampling bootstrap (``resampled_percentile_ci``, the dataset's intervals
before issue #31) on fixed seeds, and the exact bootstrap distribution of a median worked out with binomials.
Coverage against known true values stays in tests/test_stats.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvray.measure.metrics import bootstrap_percentile_ci, resampled_percentile_ci

PERCENTILES = (50, 90, 95, 99)
SEEDS = 8


def mean_endpoints(fn: object, groups: list[np.ndarray], seeds: int = SEEDS) -> tuple[np.ndarray, np.ndarray]:
    """Each percentile's (low, high) averaged over ``seeds`` seeds, and their standard errors."""
    runs = np.array([[fn(groups, PERCENTILES, seed=s)[p] for p in PERCENTILES] for s in range(seeds)])  # type: ignore[operator]
    return runs.mean(axis=0), runs.std(axis=0, ddof=1) / math.sqrt(seeds)


@pytest.mark.parametrize(
    "shape",
    ["one repeat of 150", "three repeats that agree", "three repeats that disagree", "two repeats of 30 and 90"],
)
def test_intervals_match_the_resampling_bootstrap_within_monte_carlo_error(shape: str) -> None:
    """Averaged over 8 seeds each, every endpoint of every percentile agrees with the direct bootstrap's within
    four standard errors of the difference (the Monte-Carlo error of 1,000 resamples, measured here)."""
    rng = np.random.default_rng(31)
    groups = {
        "one repeat of 150": [rng.exponential(1.0, 150)],
        "three repeats that agree": [rng.lognormal(0, 0.5, 60) for _ in range(3)],
        "three repeats that disagree": [rng.normal(1.0 + shift, 0.05, 60) for shift in (0.0, 0.05, 0.1)],
        "two repeats of 30 and 90": [rng.exponential(1.0, 30), rng.exponential(1.3, 90)],
    }[shape]
    new, new_se = mean_endpoints(bootstrap_percentile_ci, groups)
    old, old_se = mean_endpoints(resampled_percentile_ci, groups)
    held = ~np.isnan(old)
    assert np.array_equal(held, ~np.isnan(new))  # the same percentiles held (p99 needs 100 values)
    se = np.sqrt(new_se**2 + old_se**2)[held]
    assert np.all(np.abs(new - old)[held] <= 4 * se + 1e-12), (new - old)[held] / se


def exact_median_bootstrap_cdf(sorted_values: np.ndarray) -> np.ndarray:
    """P(median of a bootstrap resample ≤ x_(j)) for an odd sample: the median is the (m+1)-th smallest of n
    draws, ≤ x_(j) when at least m + 1 draws land on x_(0..j) — Binomial(n, (j + 1) / n) ≥ m + 1."""
    n, m = sorted_values.size, sorted_values.size // 2
    return np.array(
        [sum(math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(m + 1, n + 1)) for q in (np.arange(n) + 1) / n]
    )


def test_one_repeat_median_interval_is_the_exact_bootstraps_quantiles() -> None:
    """21 values: the bootstrap distribution of the median is known exactly (binomials); the interval's ends sit
    at its 2.5 % and 97.5 % points — between its 1 % and 5 %, and its 95 % and 99 % quantiles, on every seed."""
    x = np.sort(np.random.default_rng(7).exponential(1.0, 21))
    cdf = exact_median_bootstrap_cdf(x)

    def quantile(q: float) -> float:
        return float(x[np.searchsorted(cdf, q)])

    for seed in range(10):
        low, high = bootstrap_percentile_ci([x], [50], seed=seed)[50]
        assert quantile(0.01) <= low <= quantile(0.05)
        assert quantile(0.95) <= high <= quantile(0.99)


def test_intervals_are_seeded_and_skip_what_the_sample_cannot_hold() -> None:
    rng = np.random.default_rng(3)
    groups = [rng.exponential(1.0, 40), np.array([0.5, math.nan, 0.7]), np.array([])]
    first = bootstrap_percentile_ci(groups, PERCENTILES)
    assert first == bootstrap_percentile_ci(groups, PERCENTILES)  # the same values, the same interval
    assert bootstrap_percentile_ci(groups[:1], [50]) != bootstrap_percentile_ci(groups[:1], [50], seed=1)
    assert all(math.isnan(v) for v in first[99])  # 42 values cannot hold a p99
    for p in (50, 90, 95):
        low, high = first[p]
        assert 0 < low < high <= max(float(g.max()) for g in groups if g.size)
    assert all(math.isnan(v) for v in bootstrap_percentile_ci([[1.0]], [50])[50])  # one value: no interval


def test_many_repeats_take_the_binary_search_and_agree_with_the_table_path() -> None:
    """Above 64 distinct draws of the repeats (here 10 repeats, of more than EXACT_RESAMPLE_MAX_VALUES values each:
    the mixture path) the inverse CDF is a binary search; the same bootstrap as the per-draw table, so the
    interval agrees with the direct bootstrap's as well."""
    from kvray.measure.metrics import EXACT_RESAMPLE_MAX_VALUES

    rng = np.random.default_rng(11)
    groups = [rng.exponential(1.0, EXACT_RESAMPLE_MAX_VALUES + 4) + 0.02 * i for i in range(10)]
    new, new_se = mean_endpoints(bootstrap_percentile_ci, groups)
    old, old_se = mean_endpoints(resampled_percentile_ci, groups)
    held = ~np.isnan(old)
    assert np.all(np.abs(new - old)[held] <= 4 * np.sqrt(new_se**2 + old_se**2)[held] + 1e-12)


@pytest.mark.parametrize("values", [4, 10])
def test_three_small_repeats_that_disagree_get_the_resampling_bootstraps_interval(values: int) -> None:
    """3 repeats of 4–10 values, 0.1 apart at a spread of 0.05 — where drawing the values from the mixture of the
    drawn repeats was furthest off (the p50's lower end 7 standard errors from the direct bootstrap's over 40
    seeds) — are resampled outright: the same two-stage draws as the direct bootstrap, in the same order from
    the same seed, so every endpoint is the direct bootstrap's on every seed (up to rounding)."""
    rng = np.random.default_rng(300 + values)
    groups = [rng.normal(1.0 + shift, 0.05, values) for shift in (0.0, 0.1, 0.2)]
    for seed in range(8):
        new = bootstrap_percentile_ci(groups, PERCENTILES, seed=seed)
        old = resampled_percentile_ci(groups, PERCENTILES, seed=seed)
        for p in PERCENTILES:
            if math.isnan(old[p][0]):  # 12 values hold no p95, 30 no p99
                assert all(math.isnan(v) for v in new[p])
            else:
                assert new[p] == pytest.approx(old[p], rel=1e-12, abs=0), (seed, p)
