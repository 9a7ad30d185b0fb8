"""Serving-load metrics: the steady-state window, offered vs achieved rate, SLO goodput and the client's lag.

Defined once here for every backend (docs/metrics.md, "Serving load"). For a burst (every workload before
load models) the latency columns pool every request, as before. For closed and open loops they pool only the
**measured** (steady-state) requests of each repeat, chosen by when they were *sent*, never by when they ended:
choosing by end time keeps the fast requests and drops the slow ones exactly when the engine is overloaded.

  open loops   the requests that arrived in [first arrival + warmup_s, last arrival − cooldown_s] (0 and 0 by
               default: every request); the client waits for every one of them to end (each backend gathers
               every request it sent; a request that times out ends as a failure), and every one counts —
               failures in failure_rate and as SLO misses, their TTFT, inter-token gaps and queue time where
               they got that far (their E2E and TPOT are undefined: they never completed)
               — a trace's replay is one, its offered_rps the cut trace's mean rate (kvray/plan/replay.py)
  closed loop  ramp-up: each user's first request (the users start together on an idle engine: a burst) and
               any sent before the first end + warmup_s; drain: each user's last request (once one user is
               done, fewer keep the engine busy) and, with cooldown_s, any sent after the first user's last
               send − cooldown_s

  achieved_rps   open loops: (ok measured completions − 1) ÷ (their first → last completion): the rate the engine
                 completed the window's traffic at — the offered rate below capacity, the capacity above it (the
                 engine stays busy while the window's queue drains); closed loops: ok measured requests ÷
                 (first measured arrival → last measured end); mean over repeats
  offered_rps    the load's rate (open loops); NaN for closed loops and bursts, whose rate is the engine's
  offered_rps_realised  (measured arrivals − 1) ÷ their span: what the seeded schedule really offered
  steady_span_s  the window's duration: first measured arrival → last measured end (mean over repeats); with
                 warmup_s = cooldown_s = 0 it is vLLM bench's and AIPerf's benchmark duration
  slo_attainment fraction of measured requests (failed ones count as misses) meeting every SLO threshold
  goodput_rps    measured requests meeting every SLO ÷ steady_span_s, mean over repeats (vLLM's ``--goodput``
                 and AIPerf's goodput: good requests ÷ benchmark duration)
  client_lag_s   sent − due per request (all requests of the run): how late the client sent it; a loop
                 whose p99 lag exceeds ``lag_limit_s`` — 10 % of the mean gap between arrivals, within
                 [10 ms, 50 ms] — did not offer the rate it claims, and its row says so (``client_behind``)

Spread over K client actors (a cell's ``clients``, kvray/backends/http/clients.py), each trace knows its client
and the run its clocks; ``client_columns`` adds per-client lag p99 (so one overloaded client shows even when the
pooled p99 hides it) and how well the clients' clocks were tied to the caller's.

SLO thresholds per request: ttft_ms on TTFT, tpot_ms on TPOT (met when undefined: one output token),
itl_ms on the request's largest inter-token gap, e2e_ms on E2E.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kvray.measure.metrics import itl_gaps, request_metrics, summarize
from kvray.measure.trace import RunTrace
from kvray.spec import Workload

LAG_LIMIT_S = 0.05  # a lag p99 above 50 ms misstates any rate …
LAG_LIMIT_GAP_FRACTION = 0.10  # … and so does one above 10 % of the mean gap between arrivals …
LAG_FLOOR_S = 0.01  # … but below 10 ms it is a loaded machine's timer jitter, not a client falling behind


def lag_limit_s(workload: Workload) -> float:
    """The p99 client lag above which a loop is flagged ``client_behind`` (docs/metrics.md)."""
    load = workload.load
    if load is not None and load.rate_rps and load.kind in ("poisson", "gamma", "constant", "replay"):
        return min(LAG_LIMIT_S, max(LAG_FLOOR_S, LAG_LIMIT_GAP_FRACTION / float(load.rate_rps)))
    return LAG_LIMIT_S


def split_steady(workload: Workload, traces: Sequence[RunTrace]) -> tuple[list[RunTrace], int, int]:
    """One repeat's traces → (measured traces, how many fell in the ramp-up, how many in the drain).

    Chosen by when each request was sent (its ``arrival_s``, the schedule's due time), never by when it ended,
    and failures included: the window's requests are all of its requests (docs/metrics.md, "Serving load")."""
    load = workload.load
    if workload.load_kind == "burst" or load is None or not traces:
        return list(traces), 0, 0
    warmup, cooldown = float(load.warmup_s or 0.0), float(load.cooldown_s or 0.0)
    if load.kind == "closed":  # by position in each user's chain: exact, whatever the clock's jitter
        by_id = {r.id: r for r in workload.requests}
        users: dict[int, list[RunTrace]] = defaultdict(list)
        for t in traces:
            users[_user_of(t.request_id, by_id)].append(t)
        first = {min(ts, key=lambda t: t.arrival_s).request_id for ts in users.values()}
        last = {max(ts, key=lambda t: t.arrival_s).request_id for ts in users.values()}
        start = min(t.end_s for t in traces) + warmup
        stop = min(max(t.arrival_s for t in ts) for ts in users.values()) - cooldown
        ramp = [t for t in traces if t.request_id in first or t.arrival_s < start - 1e-9]
        drain = [t for t in traces if t not in ramp and (t.request_id in last or (cooldown and t.arrival_s > stop))]
    else:  # open loops: the requests that arrived in [first + warmup, last − cooldown], however long they took
        start = min(t.arrival_s for t in traces) + warmup
        stop = max(t.arrival_s for t in traces) - cooldown
        ramp = [t for t in traces if t.arrival_s < start]
        drain = [t for t in traces if t.arrival_s >= start and t.arrival_s > stop]
    excluded = {id(t) for t in ramp + drain}
    return [t for t in traces if id(t) not in excluded], len(ramp), len(drain)


def _user_of(request_id: int, by_id: Mapping[int, Any]) -> int:
    """The first request of ``request_id``'s closed-loop chain: its user."""
    r = by_id.get(request_id)
    while r is not None and r.after is not None:
        request_id = r.after
        r = by_id.get(request_id)
    return request_id


def _completion_rate(kind: str, ok: Sequence[RunTrace]) -> tuple[float, float]:
    """(requests/s, the span it was measured over) of one repeat's ok measured requests; NaN when undefined.

    Open loops: completions per second between the first and the last completion, (k − 1) ÷ span — exact
    for a steady stream, where the span from first arrival to last end would add one service time. The
    window's requests complete after it closes when the engine is behind: their completions then span
    longer than their arrivals, at the engine's own rate (the queue keeps it busy until the last of them),
    so this is the offered rate below capacity and the capacity above it. Closed loops complete in waves
    (every user at once), so there it is k ÷ (first arrival → last end)."""
    if kind == "closed" or kind == "burst":
        span = max((t.end_s for t in ok), default=0.0) - min((t.arrival_s for t in ok), default=0.0)
        return (len(ok) / span, span) if ok and span > 0 else (float("nan"), float("nan"))
    span = max((t.end_s for t in ok), default=0.0) - min((t.end_s for t in ok), default=0.0)
    return ((len(ok) - 1) / span, span) if len(ok) > 1 and span > 0 else (float("nan"), float("nan"))


def _arrival_rate(kind: str, steady: Sequence[RunTrace]) -> float:
    """Open loops: the rate the seeded schedule actually offered over the measured requests, mean over repeats."""
    if kind not in ("poisson", "gamma", "constant", "replay"):
        return float("nan")
    by_repeat: dict[int, list[float]] = defaultdict(list)
    for t in steady:
        by_repeat[t.repeat].append(t.arrival_s)
    rates = [(len(a) - 1) / (max(a) - min(a)) for a in by_repeat.values() if len(a) > 1 and max(a) > min(a)]
    return float(np.mean(rates)) if rates else float("nan")


def meets_slo(trace: RunTrace, slo: Mapping[str, float]) -> bool:
    """True when an ok request meets every threshold (milliseconds)."""
    if trace.status != "ok":
        return False
    m = request_metrics(trace)
    values = {
        "ttft_ms": m["ttft_s"],
        "tpot_ms": m["tpot_s"],
        "e2e_ms": m["e2e_s"],
        "itl_ms": max(itl_gaps(trace.token_times_s), default=float("nan")),
    }
    for name, limit_ms in slo.items():
        v = values[name]
        if v == v and v * 1000.0 > limit_ms:  # NaN (undefined for this request) counts as met
            return False
    return True


def window_span(measured: Sequence[RunTrace]) -> float:
    """One repeat's window duration: its measured requests' first arrival → last end, failures included (the
    client waited for each); NaN when there are none. Goodput's denominator."""
    if not measured:
        return float("nan")
    return max(t.end_s for t in measured) - min(t.arrival_s for t in measured)


def serving_summary(workload: Workload, traces: Sequence[RunTrace], *, simulated: bool = False) -> dict[str, Any]:
    """The cell's metric columns: ``summarize`` over the measured requests, plus the serving columns."""
    slo = dict(workload.slo)
    by_repeat: dict[int, list[RunTrace]] = defaultdict(list)
    for t in traces:
        by_repeat[t.repeat].append(t)
    steady: list[RunTrace] = []
    ramp = drain = 0
    achieved, goodput, windows = [], [], []
    for _, ts in sorted(by_repeat.items()):
        kept, ramped, drained = split_steady(workload, ts)
        steady += kept
        ramp, drain = ramp + ramped, drain + drained
        rate, _ = _completion_rate(workload.load_kind, [t for t in kept if t.status == "ok"])
        if rate == rate:
            achieved.append(rate)
        span = window_span(kept)
        if span > 0:
            windows.append(span)
            if slo:
                goodput.append(sum(meets_slo(t, slo) for t in kept) / span)
    met = sum(meets_slo(t, slo) for t in steady) if slo else 0
    loop = workload.load_kind != "burst"  # a loop counts what its failed requests observed (module docstring)
    out: dict[str, Any] = (
        summarize(steady, failed_observations=True, simulated=simulated)
        if loop
        else summarize(traces, simulated=simulated)
    )
    nan = float("nan")
    load = workload.load
    lags = [t.sent_s - t.arrival_s for t in traces if t.sent_s is not None]  # the client's, over the whole run
    out.update(
        {
            "load": workload.load_kind,
            "offered_rps": float(load.rate_rps) if load is not None and load.rate_rps else nan,
            "users": load.users if load is not None and load.kind == "closed" else None,
            "offered_rps_realised": _arrival_rate(workload.load_kind, steady),
            "achieved_rps": float(np.mean(achieved)) if achieved else nan,
            "steady_span_s": float(np.mean(windows)) if windows else nan,
            "requests_steady": len(steady),
            "requests_excluded_rampup": ramp,
            "requests_excluded_drain": drain,
            "requests_not_sent": max(len(workload.requests) * len(by_repeat) - len(traces), 0),
            "slo": ",".join(f"{k}={v:g}" for k, v in sorted(slo.items())) or None,
            "slo_attainment": met / len(steady) if slo and steady else nan,
            "goodput_rps": float(np.mean(goodput)) if goodput and slo else nan,
            "client_lag_s_n": len(lags),
            "client_lag_s_p50": float(np.percentile(lags, 50)) if lags else nan,
            "client_lag_s_p99": float(np.percentile(lags, 99)) if lags else nan,
            "client_lag_s_max": float(max(lags)) if lags else nan,
            "client_lag_limit_s": lag_limit_s(workload),
        }
    )
    out["client_behind"] = (
        bool(lags) and workload.load_kind != "burst" and out["client_lag_s_p99"] > out["client_lag_limit_s"]
    )
    return out


def client_columns(clients: int, traces: Sequence[RunTrace], clocks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The columns of a cell whose load came from ``clients`` client actors.

    ``clocks``: one record per measured run, ``offsets_s`` and ``rtts_s`` per client — each client's wall clock
    minus the caller's, and the round trip of the probe it was measured with (|error| ≤ rtt / 2). Per-client lag
    is sent − due of the requests each client sent, all repeats pooled; a list entry is null for a client that
    sent none (fewer chains than clients)."""
    nan = float("nan")
    lags: list[list[float]] = [[] for _ in range(clients)]
    for t in traces:
        if t.client is not None and 0 <= t.client < clients and t.sent_s is not None:
            lags[t.client].append(t.sent_s - t.arrival_s)
    p99 = [float(np.percentile(x, 99)) if x else nan for x in lags]
    offsets = [abs(float(o)) for c in clocks for o in c.get("offsets_s") or []]
    rtts = [float(r) for c in clocks for r in c.get("rtts_s") or []]
    known = [x for x in p99 if x == x]
    return {
        "client_offset_s_max": max(offsets) if offsets else nan,
        "client_rtt_s_max": max(rtts) if rtts else nan,
        "client_lag_s_p99_by_client": json.dumps([round(x, 6) if x == x else None for x in p99]),
        "client_lag_s_p99_worst": max(known) if known else nan,
        "client_requests_by_client": json.dumps([len(x) for x in lags]),
    }
