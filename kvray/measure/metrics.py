"""Every latency and throughput metric, defined once for all backends (see docs/metrics.md).

Per request (from a RunTrace):
  queue_s = start − arrival                       time spent waiting for the engine
  ttft_s  = first token − arrival                 includes queueing
  tpot_s  = (end − first token) / (output − 1)    undefined for a single output token
  e2e_s   = end − arrival
  itl_s   = gaps between consecutive *tokens*: a chunk of k tokens arriving Δ after the previous chunk
            contributes k gaps of Δ/k; extra tokens in the first chunk contribute gaps of 0. So there are
            always output − 1 gaps, summing to last token − first token, and mean(itl) = tpot per request.
A stream whose tokens were stamped faster than any engine emits them (``tokens_bunched``: ≥ 4 tokens, mean gap
< 0.25 ms) was read by a client that stalled, not timed: its TPOT and ITL are left out of the cell's TPOT and
ITL columns, and counted in ``tpot_bunched_n``.
Per repeat: makespan = last end − first arrival; output_tps = Σ output tokens / makespan;
total_tps = Σ (prompt + output) / makespan; rps = requests / makespan. Cell throughput is the mean over
repeats. Latency percentiles pool the successful requests of all repeats, so every distribution carries its
sample count (``{metric}_n``) and the cell its ``failure_rate``: a p99 of 9 requests is not a p99 of 1,000,
and a p99 that silently dropped the requests that timed out is no p99 at all.

Uncertainty (docs/metrics.md, "How sure is a number"): each percentile carries a 95 % bootstrap interval over
the pooled values (``{metric}_p{p}_ci_low`` / ``_ci_high``; seeded, so a rerun of the analysis gives the same
interval), left NaN where the sample is too small to hold that percentile at all (p99 needs 100 values, see
``min_samples``); each throughput carries a 95 % Student-t interval over its repeats (``{key}_ci_low`` /
``_ci_high``, NaN for one repeat) and its repeat count (``{key}_n``). The interval helpers live here, in the
stage that computes the numbers, and kvray.analysis.stats builds the two-sample tests on them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from kvray.measure.trace import RunTrace

PERCENTILES = (50, 90, 95, 99)
LATENCY_METRICS = ("ttft_s", "tpot_s", "itl_s", "e2e_s", "queue_s")
THROUGHPUT_KEYS = ("makespan_s", "output_tps", "total_tps", "rps")
CI_LEVEL = 0.95  # every interval kvray writes is a 95 % interval
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 20260  # fixed: the same values always give the same interval
# Above this many pooled values the bootstrap draws proportionally fewer resamples (bootstrap_stats): a c=64 ×
# 512-token cell pools 32,704 ITL gaps, ~1 s per metric at 1,000 resamples.
BOOTSTRAP_MAX_N = 5000
# Several repeats of at most this many values each are resampled outright (1,000 sorted rows of a few tens of
# integers) instead of drawn from the mixture of the drawn repeats: exact where the mixture's error is largest
# (a few values a repeat), and no dearer there (bootstrap_percentile_ci).
EXACT_RESAMPLE_MAX_VALUES = 32
_BOOTSTRAP_CHUNK = 2_000_000  # values resampled at once (memory bound: 16 MB of indices)


# ---------------------------------------------------------------- intervals


def min_samples(percentile: float) -> int:
    """The fewest values that can hold a percentile: one value beyond it, i.e. ⌈100 / (100 − p)⌉ — p50 needs 2,
    p90 10, p95 20, p99 100. Below that the "p99" is the sample's maximum, and kvray says so ("max of 9")."""
    return math.ceil(100 / (100 - percentile) - 1e-9)


def supported_percentile(n: int, candidates: Sequence[float] = (99, 95, 90)) -> float | None:
    """The highest of ``candidates`` a sample of ``n`` values holds; None when it holds none of them."""
    return next((p for p in sorted(candidates, reverse=True) if n >= min_samples(p)), None)


def bootstrap_percentile_ci(
    groups: Sequence[Sequence[float] | np.ndarray],
    percentiles: Sequence[float],
    level: float = CI_LEVEL,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[float, tuple[float, float]]:
    """Percentile-bootstrap interval of each percentile of the pooled ``groups`` (one group per repeat), at the
    cost of sorting the values once: (NaN, NaN) for a percentile the pooled sample cannot hold (``min_samples``).

    The bootstrap is the one ``resampled_percentile_ci`` draws — repeats with replacement, then values — but
    a resample is never built (but for a few small repeats, below): a percentile of a resample of W values needs only two of its order statistics
    (numpy's linear interpolation: h = (W − 1)·p/100, the (⌊h⌋+1)-th and (⌊h⌋+2)-th smallest), and those are
    drawn directly. The W values are W uniforms pushed through the inverse CDF of the drawn repeats' pooled
    values, so with r = ⌊h⌋ the two are U ~ Beta(r + 1, W − r) and U' = U + (1 − U)·Beta(1, W − r − 1) (the
    smallest of the W − r − 1 uniforms above U), pushed through that same inverse CDF (a binary search over
    the sorted values, for every resample at once). Cost: one sort, then O(resamples · log n) per percentile
    whatever n is — so every sample gets its full ``resamples`` (1,000), where resampling each value had to
    draw fewer above BOOTSTRAP_MAX_N values.

    One group: exactly the ordinary bootstrap's distribution of the percentile. Several repeats of at most
    EXACT_RESAMPLE_MAX_VALUES (32) values each: exactly the two-stage bootstrap's, each resample built and sorted
    (``_resampled_order_statistics``). Several larger ones: the second stage draws the W = repeats ×
    largest-repeat values from the equal-weight mixture of the drawn repeats instead of exactly as many from
    each; the spread of any count below a threshold then grows by a factor under (1 + 1/values-per-repeat):
    for 3 repeats of 4–10 values that disagree it moved the p50's lower end by up to 7 Monte-Carlo standard
    errors (0.9 % of the value at most), which is why those are resampled outright; past 32 values a repeat it
    is within the Monte-Carlo error of 1,000 resamples, and nothing when the repeats agree
    (tests/test_intervals.py checks every path against the direct bootstrap)."""
    clean = [a[~np.isnan(a)] for a in (np.asarray(g, dtype=float) for g in groups)]
    arrays = [a for a in clean if a.size]
    n = sum(a.size for a in arrays)
    out: dict[float, tuple[float, float]] = {p: (math.nan, math.nan) for p in percentiles}
    wanted = [p for p in percentiles if n >= max(min_samples(p), 2)]
    if not wanted:
        return out
    rng = np.random.default_rng(seed)
    sizes = np.asarray([a.size for a in arrays])
    width = len(arrays) * int(sizes.max())  # the pooled resample's size, as resampled_percentile_ci draws it
    h = (width - 1) * np.asarray(wanted, dtype=float) / 100
    r = np.floor(h)
    if len(arrays) > 1 and sizes.max() <= EXACT_RESAMPLE_MAX_VALUES:  # a few small repeats: resampled outright
        picks = rng.integers(0, len(arrays), size=(resamples, len(arrays)))
        pooled, index = _resampled_order_statistics(arrays, picks, np.concatenate([r, r + 1]).astype(np.int64), rng)
    else:
        u = rng.beta(r + 1, width - r, size=(resamples, len(wanted)))
        u_next = u + (1 - u) * rng.beta(1, width - r - 1, size=(resamples, len(wanted)))
        if len(arrays) == 1:  # the inverse CDF of n sorted values: the ⌊u·n⌋-th
            pooled = np.sort(arrays[0])
            index = np.minimum((np.concatenate([u, u_next], axis=1) * n).astype(np.int64), n - 1)
        else:  # stage one: each resample draws the repeats with replacement; a repeat weighs as often as drawn
            picks = rng.integers(0, len(arrays), size=(resamples, len(arrays)))
            drawn = (picks[:, :, None] == np.arange(len(arrays))).sum(axis=1)
            pooled, index = _mixture_quantiles(arrays, drawn, np.concatenate([u, u_next], axis=1))
    low_value = pooled[index[:, : len(wanted)]]
    stats = low_value + (h - r) * (pooled[index[:, len(wanted) :]] - low_value)
    tail = (1 - level) / 2 * 100
    lows, highs = np.percentile(stats, [tail, 100 - tail], axis=0)
    for p, lo, hi in zip(wanted, lows, highs, strict=True):
        out[p] = (float(lo), float(hi))
    return out


def _resampled_order_statistics(
    arrays: Sequence[np.ndarray], picks: np.ndarray, ranks: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, Any]:
    """(the pooled values sorted, index): index[k, i] is the position among them of the ranks[i]-th smallest
    (from 0) value of resample k, drawn as ``bootstrap_stats`` draws it — the repeats ``picks[k]``, and from each
    as many of its values, with replacement, as the largest repeat holds. Each resample is built (as positions
    among the sorted values, so sorting them sorts the values) and sorted: a few repeats of a few values make
    1,000 rows of tens of integers, cheaper to sort than the mixture's Beta draws are to make."""
    sizes = np.asarray([a.size for a in arrays])
    values = np.concatenate(arrays)
    order = np.argsort(values, kind="stable")
    position = np.empty(values.size, dtype=np.int64)
    position[order] = np.arange(values.size)
    within = (rng.random((*picks.shape, int(sizes.max()))) * sizes[picks][..., None]).astype(np.int64)
    drawn = position[(np.cumsum(sizes) - sizes)[picks][..., None] + within].reshape(picks.shape[0], -1)
    return values[order], np.sort(drawn, axis=1)[:, ranks]


def _mixture_quantiles(arrays: Sequence[np.ndarray], drawn: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, Any]:
    """(the pooled values sorted, index): index[k, i] is the first pooled value at which the CDF of resample k's
    mixture — repeat g weighing drawn[k, g] / repeats — exceeds u[k, i] (the discrete inverse CDF)."""
    sizes = np.asarray([a.size for a in arrays])
    values = np.concatenate(arrays)
    order = np.argsort(values, kind="stable")
    label = np.repeat(np.arange(len(arrays)), sizes)[order]
    # cdf[g, j]: the fraction of repeat g's values among the j + 1 smallest pooled values
    cdf = np.cumsum(label[None, :] == np.arange(len(arrays))[:, None], axis=1) / sizes[:, None]
    weights = drawn / len(arrays)
    first_rows: Any = range(65)
    if len(arrays) <= 15:  # each draw of the repeats as one integer (base repeats + 1: fits int64)
        keys = drawn @ (len(arrays) + 1) ** np.arange(len(arrays))
        _, first_rows, which = np.unique(keys, return_index=True, return_inverse=True)
    if len(first_rows) <= 64:  # few distinct draws of the repeats (10 for 3 repeats): one CDF each
        index = np.empty(u.shape, dtype=np.int64)
        for j, first in enumerate(first_rows):
            rows = which == j
            index[rows] = np.searchsorted(weights[first] @ cdf, u[rows], side="right")
    else:  # many repeats: a binary search over the pooled values, for every resample at once
        lo = np.zeros(u.shape, dtype=np.int64)
        hi = np.full(u.shape, cdf.shape[1] - 1, dtype=np.int64)
        while np.any(lo < hi):
            mid = (lo + hi) // 2
            below = (np.einsum("kg,gki->ki", weights, cdf[:, mid]) <= u) & (lo < hi)
            lo, hi = np.where(below, mid + 1, lo), np.where(below, hi, mid)
        index = lo
    return values[order], np.minimum(index, values.size - 1)


def resampled_percentile_ci(
    groups: Sequence[Sequence[float] | np.ndarray],
    percentiles: Sequence[float],
    *,
    seed: int = BOOTSTRAP_SEED,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[float, tuple[float, float]]:
    """The direct percentile bootstrap: ``bootstrap_stats`` builds ``resamples`` pooled samples (seeded), the
    interval is the central ``CI_LEVEL`` of their percentiles. What the dataset's intervals were before issue #31
    (100 ms of CPU a 64 × 32 cell, 0.6 of it sorting resamples), kept as the definition ``bootstrap_percentile_ci``
    is tested against (tests/test_intervals.py) and measured beside (benchmarks/cell_overhead.py)."""
    clean = [a[~np.isnan(a)] for a in (np.asarray(g, dtype=float) for g in groups)]
    n = sum(a.size for a in clean)
    out: dict[float, tuple[float, float]] = {p: (math.nan, math.nan) for p in percentiles}
    wanted = [p for p in percentiles if n >= max(min_samples(p), 2)]
    if not wanted:
        return out
    stats = bootstrap_stats(clean, lambda sample: np.percentile(sample, wanted, axis=1).T, resamples, seed)
    tail = (1 - CI_LEVEL) / 2 * 100
    lows, highs = np.percentile(stats, [tail, 100 - tail], axis=0)
    for p, lo, hi in zip(wanted, lows, highs, strict=True):
        out[p] = (float(lo), float(hi))
    return out


def bootstrap_stats(
    groups: Sequence[np.ndarray], stat: Any, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> Any:
    """``stat`` of bootstrap resamples of the pooled ``groups``: ``stat`` maps a (k, width) array of k resampled
    samples to (k, …); the results are concatenated over chunks (memory stays bounded for 50,000 ITL gaps).

    Two stages when there are several groups (repeats): draw the repeats with replacement, then each drawn
    repeat's values with replacement (as many as the largest repeat holds, so each repeat weighs the same). The
    repeats are the independent units — the requests of one repeat share its batches, its stalls and its
    machine — so the interval carries run-to-run noise, not only the spread inside one run. One group is the
    ordinary bootstrap over its values. Samples above BOOTSTRAP_MAX_N values get proportionally fewer resamples
    (at least 200): their intervals are narrow, and 1,000 × 32,000 values would cost a second per cell."""
    arrays = [a for a in (np.asarray(g, dtype=float) for g in groups) if a.size]
    sizes = np.asarray([a.size for a in arrays])
    total, widest = int(sizes.sum()), int(sizes.max())
    resamples = max(min(resamples, 200), resamples * BOOTSTRAP_MAX_N // max(total, BOOTSTRAP_MAX_N))
    rng = np.random.default_rng(seed)
    pooled = np.concatenate(arrays)
    offsets = np.cumsum(sizes) - sizes
    width = total if len(arrays) == 1 else len(arrays) * widest
    rows = max(1, _BOOTSTRAP_CHUNK // width)
    parts = []
    for start in range(0, resamples, rows):
        k = min(rows, resamples - start)
        if len(arrays) == 1:
            index = rng.integers(0, total, size=(k, total))
        else:
            pick = rng.integers(0, len(arrays), size=(k, len(arrays)))
            within = (rng.random((k, len(arrays), widest)) * sizes[pick][..., None]).astype(np.int64)
            index = (offsets[pick][..., None] + within).reshape(k, width)
        parts.append(np.asarray(stat(pooled[index])))
    return np.concatenate(parts, axis=0)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by Lentz's continued fraction (Numerical Recipes 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1) < 1e-14:
            break
    return front * f


def student_t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom (a normal for df = ∞)."""
    if math.isinf(df):
        return NormalDist().cdf(t)
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def student_t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (bisection on ``student_t_cdf``; 1e-10 absolute)."""
    if math.isinf(df):
        return NormalDist().inv_cdf(q)
    if q < 0.5:
        return -student_t_ppf(1 - q, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < q:
        hi *= 2
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: Sequence[float], level: float = CI_LEVEL) -> tuple[float, float]:
    """Student-t interval of the mean: mean ± t(level, n − 1) · s / √n. (NaN, NaN) for fewer than 2 values. For
    throughput over a handful of repeats this is the honest choice: a bootstrap of 3 repeats is far too narrow."""
    arr = np.asarray([v for v in values if v == v], dtype=float)
    if arr.size < 2:
        return math.nan, math.nan
    half = student_t_ppf(0.5 + level / 2, arr.size - 1) * float(arr.std(ddof=1)) / math.sqrt(arr.size)
    return float(arr.mean()) - half, float(arr.mean()) + half


def itl_gaps(token_times_s: Sequence[float]) -> list[float]:
    """Inter-token gaps, splitting multi-token chunks (equal timestamps) evenly."""
    if len(token_times_s) < 2:
        return []
    gaps = [b - a for a, b in zip(token_times_s, token_times_s[1:], strict=False)]
    if 0.0 not in gaps:  # every token stamped apart (no chunk of several): the gaps as they are
        return gaps
    chunks: list[tuple[float, int]] = []
    for t in token_times_s:
        if chunks and t == chunks[-1][0]:
            chunks[-1] = (t, chunks[-1][1] + 1)
        else:
            chunks.append((t, 1))
    gaps = [0.0] * (chunks[0][1] - 1)
    for (prev_t, _), (t, k) in zip(chunks, chunks[1:], strict=False):
        gaps.extend([(t - prev_t) / k] * k)
    return gaps


# A stream is *bunched* when its tokens were stamped faster than any engine produces them: at least
# BUNCHED_MIN_TOKS tokens whose stamps are on average less than BUNCHED_GAP_S apart (last − first token over
# the gaps between them). 0.25 ms a token is 4,000 tokens/s from one stream, every token a forward pass over
# every layer plus sampling (and, over HTTP, a streamed event): no engine kvray drives comes near it (vLLM on
# this machine's CPU 17–21 ms; on a GPU a decode step launches kernels for every layer, ~1 ms and up). What it
# is instead: the reader stalled (descheduled, a blocked event loop) while the engine streamed, then read
# every buffered token at once (docs/benchmarks.md: 8 tokens within 0.1 ms, "TPOT 0.08 ms"). Fewer than 4
# tokens are not judged: a first chunk may legitimately carry two. Simulated traces are computed, not read,
# so they are never bunched (a tiny model on the roofline decodes in microseconds).
BUNCHED_MIN_TOKS = 4
BUNCHED_GAP_S = 0.25e-3


def tokens_bunched(trace: RunTrace) -> bool:
    """True when a successful stream's tokens were stamped too close together to be timings (see above)."""
    times = trace.token_times_s
    if trace.status != "ok" or len(times) < BUNCHED_MIN_TOKS:
        return False
    return (times[-1] - times[0]) / (len(times) - 1) < BUNCHED_GAP_S


def request_metrics(trace: RunTrace) -> dict[str, float]:
    """The per-request figures of one trace (NaN where undefined)."""
    nan = float("nan")
    first = trace.first_token_s
    out = {
        "queue_s": trace.start_s - trace.arrival_s,
        "ttft_s": first - trace.arrival_s if first is not None else nan,
        "e2e_s": trace.end_s - trace.arrival_s,
        "tpot_s": (trace.end_s - first) / (trace.output_toks - 1)
        if first is not None and trace.output_toks > 1
        else nan,
    }
    return out


def describe(values: Iterable[float], prefix: str) -> dict[str, float]:
    """mean, std, min, max and p50/p90/p95/p99 of ``values`` as ``{prefix}_{stat}`` (NaN when empty)."""
    arr = np.asarray(values if hasattr(values, "__array__") else list(values), dtype=float)
    arr = arr[~np.isnan(arr)]
    stats = ("mean", "std", "min", "max", *(f"p{p}" for p in PERCENTILES))
    if arr.size == 0:
        return {f"{prefix}_{s}": float("nan") for s in stats}
    out = {
        f"{prefix}_mean": float(arr.mean()),
        f"{prefix}_std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        f"{prefix}_min": float(arr.min()),
        f"{prefix}_max": float(arr.max()),
    }
    for p, v in zip(PERCENTILES, np.percentile(arr, PERCENTILES), strict=True):
        out[f"{prefix}_p{p}"] = float(v)
    return out


def describe_counted(groups: Sequence[Sequence[float]], prefix: str) -> dict[str, float]:
    """``describe`` of the pooled ``groups`` (one per repeat) plus ``{prefix}_n``, the number of values its
    statistics were computed from, and each percentile's 95 % bootstrap interval ``{prefix}_p{p}_ci_low`` /
    ``_ci_high`` (over repeats, then values: ``bootstrap_percentile_ci``; NaN where ``n`` cannot hold it)."""
    arrays = [a[~np.isnan(a)] for a in (np.asarray(g, dtype=float) for g in groups)]
    kept = np.concatenate(arrays) if arrays else np.empty(0)
    out = {f"{prefix}_n": int(kept.size), **describe(kept, prefix)}
    for p, (low, high) in bootstrap_percentile_ci(arrays, PERCENTILES).items():
        out[f"{prefix}_p{p}_ci_low"], out[f"{prefix}_p{p}_ci_high"] = low, high
    return out


def throughput(traces: Sequence[RunTrace]) -> dict[str, float]:
    """Throughput of one repeat's traces (all requests, failed ones count in the makespan)."""
    if not traces:
        return {"makespan_s": float("nan"), "output_tps": float("nan"), "total_tps": float("nan"), "rps": float("nan")}
    makespan = max(t.end_s for t in traces) - min(t.arrival_s for t in traces)
    ok = [t for t in traces if t.status == "ok"]
    out_toks = sum(t.output_toks for t in ok)
    all_toks = out_toks + sum(t.prompt_toks for t in ok)
    span = makespan if makespan > 0 else float("nan")
    return {"makespan_s": makespan, "output_tps": out_toks / span, "total_tps": all_toks / span, "rps": len(ok) / span}


def repeat_samples(
    traces: Sequence[RunTrace], *, failed_observations: bool = False, simulated: bool = False
) -> dict[str, list[list[float]]]:
    """Each latency metric's values (NaN dropped) of the successful requests, one list per repeat, in
    LATENCY_METRICS order: what the percentiles pool, and what the bootstrap resamples repeat by repeat.

    With ``failed_observations`` (a serving load's measured window, kvray/measure/serving.py) a failed request
    adds what it observed before it failed, once its first token had arrived: its TTFT, its queue time and the
    gaps between the tokens it got. Its E2E and TPOT stay undefined: it never completed. A bunched stream
    (``tokens_bunched``; never a ``simulated`` one) gives no TPOT and no ITL gaps."""
    by_repeat: dict[int, list[RunTrace]] = defaultdict(list)
    for t in traces:
        if t.status == "ok" or (failed_observations and t.token_times_s):
            by_repeat[t.repeat].append(t)
    out: dict[str, list[list[float]]] = {m: [] for m in LATENCY_METRICS}
    for _, ts in sorted(by_repeat.items()):
        per_request = [(t.status == "ok", simulated or not tokens_bunched(t), request_metrics(t)) for t in ts]
        for name in ("ttft_s", "tpot_s", "e2e_s", "queue_s"):
            completed_only = name in ("tpot_s", "e2e_s")
            out[name].append(
                [
                    m[name]
                    for ok, timed, m in per_request
                    if m[name] == m[name] and (ok or not completed_only) and (timed or name != "tpot_s")
                ]
            )
        out["itl_s"].append(
            [g for t, (_, timed, _) in zip(ts, per_request, strict=True) if timed for g in itl_gaps(t.token_times_s)]
        )
    return out


def summarize(
    traces: Sequence[RunTrace], *, failed_observations: bool = False, simulated: bool = False
) -> dict[str, Any]:
    """The aggregate columns of a CellResult from all its (measured, non-warmup) traces; ``failed_observations``
    and ``simulated``: see ``repeat_samples``."""
    ok = [t for t in traces if t.status == "ok"]
    out: dict[str, Any] = {
        "requests": len(traces),
        "requests_ok": len(ok),
        "requests_failed": len(traces) - len(ok),
        "failure_rate": (len(traces) - len(ok)) / len(traces) if traces else float("nan"),
        "output_toks_total": sum(t.output_toks for t in ok),
        "tpot_bunched_n": 0 if simulated else sum(tokens_bunched(t) for t in ok),
    }
    for name, groups in repeat_samples(traces, failed_observations=failed_observations, simulated=simulated).items():
        out.update(describe_counted(groups, name))
    by_repeat: dict[int, list[RunTrace]] = defaultdict(list)
    for t in traces:
        by_repeat[t.repeat].append(t)
    per_repeat = [throughput(ts) for _, ts in sorted(by_repeat.items())]
    for key in THROUGHPUT_KEYS:
        values = [r[key] for r in per_repeat]
        out[key] = float(np.mean(values)) if values else float("nan")
        out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        out[f"{key}_n"] = len(values)
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = mean_ci(values)
    out["ci_level"] = CI_LEVEL
    return out
