"""Every latency and throughput metric, defined once for all backends (see docs/metrics.md).

Per request (from a RunTrace):
  queue_s = start − arrival                       time spent waiting for the engine
  ttft_s  = first token − arrival                 includes queueing
  tpot_s  = (end − first token) / (output − 1)    undefined for a single output token
  e2e_s   = end − arrival
  itl_s   = gaps between consecutive *tokens*: a chunk of k tokens arriving Δ after the previous chunk
            contributes k gaps of Δ/k; extra tokens in the first chunk contribute gaps of 0. So there are
            always output − 1 gaps, summing to last token − first token, and mean(itl) = tpot per request.
Per repeat: makespan = last end − first arrival; output_tps = Σ output tokens / makespan;
total_tps = Σ (prompt + output) / makespan; rps = requests / makespan. Cell throughput is the mean over
repeats. Latency percentiles pool the successful requests of all repeats, so every distribution carries its
sample count (``{metric}_n``) and the cell its ``failure_rate``: a p99 of 9 requests is not a p99 of 1,000,
and a p99 that silently dropped the requests that timed out is no p99 at all.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from kvray.measure.trace import RunTrace

PERCENTILES = (50, 90, 95, 99)
LATENCY_METRICS = ("ttft_s", "tpot_s", "itl_s", "e2e_s", "queue_s")


def itl_gaps(token_times_s: Sequence[float]) -> list[float]:
    """Inter-token gaps, splitting multi-token chunks (equal timestamps) evenly."""
    if len(token_times_s) < 2:
        return []
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
    arr = np.asarray([v for v in values if v == v], dtype=float)  # drop NaN
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


def sample_count(values: Iterable[float]) -> int:
    """How many values a distribution of ``describe`` pools (NaN values are dropped there too)."""
    return sum(1 for v in values if v == v)


def describe_counted(values: Iterable[float], prefix: str) -> dict[str, float]:
    """``describe`` plus ``{prefix}_n``, the number of values its statistics were computed from."""
    kept = list(values)
    return {f"{prefix}_n": sample_count(kept), **describe(kept, prefix)}


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


def summarize(traces: Sequence[RunTrace]) -> dict[str, Any]:
    """The aggregate columns of a CellResult from all its (measured, non-warmup) traces."""
    ok = [t for t in traces if t.status == "ok"]
    per_request = [request_metrics(t) for t in ok]
    out: dict[str, Any] = {
        "requests": len(traces),
        "requests_ok": len(ok),
        "requests_failed": len(traces) - len(ok),
        "failure_rate": (len(traces) - len(ok)) / len(traces) if traces else float("nan"),
        "output_toks_total": sum(t.output_toks for t in ok),
    }
    for name in ("ttft_s", "tpot_s", "e2e_s", "queue_s"):
        out.update(describe_counted((m[name] for m in per_request), name))
    out.update(describe_counted((g for t in ok for g in itl_gaps(t.token_times_s)), "itl_s"))
    by_repeat: dict[int, list[RunTrace]] = defaultdict(list)
    for t in traces:
        by_repeat[t.repeat].append(t)
    per_repeat = [throughput(ts) for _, ts in sorted(by_repeat.items())]
    for key in ("makespan_s", "output_tps", "total_tps", "rps"):
        values = [r[key] for r in per_repeat]
        out[key] = float(np.mean(values)) if values else float("nan")
        out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return out
