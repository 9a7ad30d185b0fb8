"""Two-sample statistics for "did it change?": tests, intervals of a relative change, and the correction for
asking many questions at once. numpy and the standard library only (scipy is not a kvray dependency).

What each is for (docs/metrics.md, "How sure is a number"):
  bootstrap_ratio   new / base of any latency percentile (exp3's mixed-batch penalty), resampling each side by repeat, then by request
                    (seeded; kvray.measure.metrics.bootstrap_stats): the interval of the change, and a bootstrap-z
                    p-value (log ratio over its bootstrap standard error) whose resolution is not capped at
                    1 / resamples, so it survives a correction over many questions. Not a rank test on requests:
                    the requests of one repeat are not independent (a static batch shares one TTFT; a stall
                    delays every request in flight), and a test that counts them as independent calls machine
                    noise a change — measured here: ±6 % ITL p99 "significant" between two identical runs.
  repeat_ratio      a latency percentile over ≥ 2 repeats a side (what ``kvray compare`` tests): pooled
                    percentiles as the change, Welch's t on the log of each repeat's own percentile as the test
                    — the repeats are the independent units, and a t with few degrees of freedom keeps its level
                    at 3 repeats, where the bootstrap-z above called 13–16 % of identical setups changed at
                    p < 0.05 (simulated: 5 % lognormal noise between repeats and within, 30 requests a repeat).
  welch_log_ratio   throughput over repeats (a handful of values per side): Welch's t on log tokens/s, so the
                    change and its interval are a ratio, as for latency.
  holm              Holm–Bonferroni step-down adjustment: with 40 comparisons, some p < 0.05 by chance alone.
The one-sample intervals (bootstrap of a percentile, t-interval of a mean) are in kvray.measure.metrics, the
stage that writes them into every dataset row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from kvray.measure.metrics import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CI_LEVEL,
    bootstrap_stats,
    student_t_cdf,
    student_t_ppf,
)


@dataclass
class Change:
    """new vs base of one statistic: ratio = new / base, its interval, and a two-sided p-value."""

    base: float
    new: float
    ratio: float
    ci_low: float  # of the ratio
    ci_high: float
    p_value: float  # NaN when the data cannot be tested
    test: str

    @property
    def rel_change(self) -> float:
        return self.ratio - 1


def _clean(values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    return arr[~np.isnan(arr)]


def _z_p(z: float) -> float:
    return 2 * (1 - NormalDist().cdf(abs(z)))


def bootstrap_ratio(
    base: Sequence[Sequence[float]],
    new: Sequence[Sequence[float]],
    percentile: float,
    level: float = CI_LEVEL,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Change:
    """new / base of the ``percentile`` of two samples, each given as its repeats' values: each side resampled
    independently (seeded); the interval is the central ``level`` of the resampled ratios, the p-value a
    bootstrap-z test of log ratio = 0."""
    ga, gb = [_clean(g) for g in base], [_clean(g) for g in new]
    a, b = np.concatenate([*ga, np.empty(0)]), np.concatenate([*gb, np.empty(0)])
    name = f"bootstrap p{percentile:g}" + (" (by repeat)" if min(len(ga), len(gb)) > 1 else " (1 repeat)")
    if a.size < 2 or b.size < 2:
        nan = math.nan
        return Change(nan, nan, nan, nan, nan, nan, name)
    base_p, new_p = float(np.percentile(a, percentile)), float(np.percentile(b, percentile))
    ratio = new_p / base_p if base_p > 0 else math.nan

    def stat(sample: np.ndarray) -> np.ndarray:
        return np.asarray(np.percentile(sample, percentile, axis=1))

    boot_a = bootstrap_stats(ga, stat, resamples, seed)
    boot_b = bootstrap_stats(gb, stat, resamples, seed + 1)
    tail = (1 - level) / 2 * 100
    if base_p <= 0 or (boot_a <= 0).any() or (boot_b <= 0).any():  # a ratio of zeros: no interval, no test
        return Change(base_p, new_p, ratio, math.nan, math.nan, math.nan, name)
    log_ratios = np.log(boot_b) - np.log(boot_a)
    low, high = np.exp(np.percentile(log_ratios, [tail, 100 - tail]))
    spread = float(log_ratios.std(ddof=1))
    observed = math.log(new_p / base_p)
    p = (1.0 if observed == 0 else 0.0) if spread == 0 else _z_p(observed / spread)
    return Change(base_p, new_p, ratio, float(low), float(high), p, name)


def welch_log_ratio(
    base: Sequence[float] | np.ndarray, new: Sequence[float] | np.ndarray, level: float = CI_LEVEL
) -> Change:
    """new / base of two means over repeats (throughput), by Welch's t on the logs: ratio = exp(mean log new −
    mean log base), its t interval, and the two-sided p-value. Needs 2 positive values a side (else NaN)."""
    a, b = _clean(base), _clean(new)
    a, b = a[a > 0], b[b > 0]
    name = "Welch t on log"
    base_m = float(a.mean()) if a.size else math.nan
    new_m = float(b.mean()) if b.size else math.nan
    ratio = new_m / base_m if base_m > 0 else math.nan
    if a.size < 2 or b.size < 2:
        return Change(base_m, new_m, ratio, math.nan, math.nan, math.nan, name)
    low, high, p = _welch_log(a, b, level)
    return Change(base_m, new_m, ratio, low, high, p, name)


def _welch_log(a: np.ndarray, b: np.ndarray, level: float) -> tuple[float, float, float]:
    """(interval of exp(mean log b − mean log a), two-sided p) by Welch's t; ≥ 2 positive values a side."""
    la, lb = np.log(a), np.log(b)
    va, vb = float(la.var(ddof=1)) / a.size, float(lb.var(ddof=1)) / b.size
    diff = float(lb.mean() - la.mean())
    se = math.sqrt(va + vb)
    if se == 0:
        return math.exp(diff), math.exp(diff), 1.0 if diff == 0 else 0.0
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = student_t_ppf(0.5 + level / 2, df) * se
    p = 2 * (1 - student_t_cdf(abs(diff) / se, df))
    return math.exp(diff - half), math.exp(diff + half), p


def repeat_ratio(
    base: Sequence[Sequence[float]], new: Sequence[Sequence[float]], percentile: float, level: float = CI_LEVEL
) -> Change:
    """new / base of a latency percentile when each side has several repeats: the repeats are the units.

    ``base`` and ``new`` are each side's values, one list per repeat. base and new are the percentile of each
    side's pooled values (the number its dataset row shows); the interval and the p-value are Welch's t on the
    log of each repeat's own percentile — one value per repeat, so run-to-run noise (a slower machine state,
    a stall that hits every request of one repeat) is what the test measures, and its level holds with a
    handful of repeats (t with few degrees of freedom), where a bootstrap by repeat reads 3 repeats as 10
    resamples and calls noise a change. The interval is of the geometric mean of the per-repeat ratios.
    Every repeat must hold the percentile (``min_samples``); NaN p-value with fewer than 2 repeats a side or a
    repeat whose percentile is ≤ 0 (no ratio to take)."""
    from kvray.measure.metrics import min_samples

    ga = [g for g in (_clean(x) for x in base) if g.size]
    gb = [g for g in (_clean(x) for x in new) if g.size]
    name = f"Welch t on log per-repeat p{percentile:g}"
    nan = math.nan
    if not ga or not gb:
        return Change(nan, nan, nan, nan, nan, nan, name)
    base_p = float(np.percentile(np.concatenate(ga), percentile))
    new_p = float(np.percentile(np.concatenate(gb), percentile))
    ratio = new_p / base_p if base_p > 0 else nan
    need = min_samples(percentile)
    if min(len(ga), len(gb)) < 2 or min(g.size for g in ga + gb) < need:
        return Change(base_p, new_p, ratio, nan, nan, nan, name)
    a = np.array([np.percentile(g, percentile) for g in ga])
    b = np.array([np.percentile(g, percentile) for g in gb])
    if (a <= 0).any() or (b <= 0).any():
        return Change(base_p, new_p, ratio, nan, nan, nan, name)
    low, high, p = _welch_log(a, b, level)
    return Change(base_p, new_p, ratio, low, high, p, name)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (NaN stays NaN and is not counted): the k-th smallest of m p-values is
    multiplied by m − k + 1, kept monotone, capped at 1. Reject where the adjusted value < α: the chance of any
    false "changed" among all m is at most α."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if p == p)
    m = len(indexed)
    out = [math.nan] * len(p_values)
    running = 0.0
    for k, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - k) * p))
        out[i] = running
    return out


# ---------------------------------------------------------------- fits


def linear_fit(x: Any, y: Any) -> tuple[float, float, float]:
    """(slope, intercept, R²) of a least-squares line."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    slope, intercept = np.polyfit(xa, ya, 1)
    resid = ya - (slope * xa + intercept)
    total = float(((ya - ya.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / total if total > 0 else 1.0
    return float(slope), float(intercept), r2


def power_fit(x: Any, y: Any) -> tuple[float, float, float]:
    """(exponent b, coefficient a, R² in log space) of y = a·x^b, from a log-log least-squares line."""
    b, log_a, r2 = linear_fit(np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float)))
    return b, math.exp(log_a), r2


def power_fit_ci(x: Any, y: Any, level: float = 0.95) -> tuple[float, float, float, float, float]:
    """(b, a, R², b_low, b_high) of y = a·x^b: ``power_fit`` plus the t interval of the log-log slope,
    b ± t(level, n − 2) · √(SSR / (n − 2) / Σ(log x − mean)²). NaN bounds for fewer than 3 points (no residual
    is left to judge the fit by); zero width when the points lie exactly on the line."""
    from kvray.measure.metrics import student_t_ppf

    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    b, a, r2 = power_fit(x, y)
    n = lx.size
    if n < 3:
        return b, a, r2, math.nan, math.nan
    resid = ly - (b * lx + math.log(a))
    sxx = float(((lx - lx.mean()) ** 2).sum())
    se = math.sqrt(float((resid**2).sum()) / (n - 2) / sxx) if sxx > 0 else math.nan
    half = student_t_ppf(0.5 + level / 2, n - 2) * se
    return b, a, r2, b - half, b + half
