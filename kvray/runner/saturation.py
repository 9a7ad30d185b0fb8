"""Find where an engine saturates: a bracketing search over open-loop rates, then a curve below the knee.

A rate is **sustainable** when the engine keeps up with it: the achieved rate follows the rate the probe's
schedule really offered (``achieved_rps ≥ FOLLOW_FRACTION × offered_rps_realised``: below capacity the two
agree up to the completions' jitter, past it achieved falls to μ / λ of offered) and the queue does not grow
through the probe's window (``queue_growth``: the median wait of the last quarter of its requests, by arrival,
is not above the first quarter's by more than ``QUEUE_GROWTH_FRACTION`` of a request's service time — the wait
is the engine's admission wait in-process, and on an HTTP server its ``num_requests_waiting`` gauge where
scraped, else TTFT, since there ``queue_s`` is only the client's own send delay). The search starts from the
rate one request alone sustains (1 ÷ its E2E), doubles until a rate is not sustainable, then bisects (in log
space) between the last sustainable and the first unsustainable rate until they are within 10 % — the same
search as the simulator's (``kvray.sim.saturation.knee_search``), on measured probes. The **knee** is the
highest sustainable rate found, reported as the rate that probe's schedule realised (``knee_rps``, the rate its
verdict was judged against; the nominal rate the search asked for is ``knee_rps_nominal``). Where the probe just
above the knee was judged on a client that fell behind its schedule (``client_behind``: on a 2-core host, vLLM's
CPU threads starve the load generator), the rate was never offered and the knee is the client's, a lower bound
for the engine's: ``knee_client_bound`` says so and ``search_stopped`` names the lag. The **saturation
rate** the highest achieved rate any probe measured (what the engine delivers when pushed). Then
``CURVE_FRACTIONS`` of the nominal knee are measured, so a latency-vs-throughput curve has points below it.

Every probe is a cell of its own (its concrete rate is in its workload, so in its id and row); the search
cell's own row summarises (``knee_rps``, ``knee_rps_nominal``, ``saturation_rps``, the probes' nominal, realised
and achieved rates).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvray.measure.metrics import request_metrics
from kvray.measure.trace import CellResult
from kvray.sim.saturation import knee_search
from kvray.spec import Cell, RequestSpec, Workload

FOLLOW_FRACTION = 0.90
QUEUE_GROWTH_FRACTION = 0.5
MAX_DOUBLINGS = 8
PRECISION = 0.1  # bisect until the bracket is within 10 %: three bisections of a factor 2
CURVE_FRACTIONS = (0.25, 0.5, 0.75, 0.9)
PROBE_SERVICE_TIMES = 20  # a probe lasts at least this many single-request service times …
MAX_PROBE_REQUESTS = 2000  # … up to this many requests
MIN_STEADY = 8  # a probe with fewer steady-state requests cannot be judged


def at_rate(cell: Cell, rate_rps: float, service_s: float | None = None) -> Cell:
    """The probe cell: the search cell's requests (their lengths, cycled) arriving at ``rate_rps``.

    A probe sends at least the cell's ``requests``, and enough to last ``PROBE_SERVICE_TIMES`` service times
    of one request alone, so a fast rate is not judged on a run shorter than its own ramp-up and drain."""
    from kvray.plan.loads import arrival_offsets

    wl = cell.workload
    assert wl.load is not None
    n = len(wl.requests)
    if service_s is not None and service_s > 0:
        n = min(max(n, math.ceil(rate_rps * PROBE_SERVICE_TIMES * service_s)), MAX_PROBE_REQUESTS)
    load = dataclasses.replace(wl.load, rate_rps=round(rate_rps, 6), requests=n, search=None)
    offsets = arrival_offsets(load, n)
    requests = tuple(
        dataclasses.replace(wl.requests[i % len(wl.requests)], id=i, arrival_s=offsets[i]) for i in range(n)
    )
    return dataclasses.replace(cell, workload=dataclasses.replace(wl, requests=requests, load=load))


def single_request(cell: Cell) -> Cell:
    """One request of the cell alone (a burst of one): its E2E sets the search's first rate."""
    wl = cell.workload
    first: RequestSpec = dataclasses.replace(wl.requests[0], arrival_s=0.0, after=None)
    return dataclasses.replace(cell, workload=Workload(wl.kind, (first,), slo=wl.slo), repeats=1)


def sustainable(result: CellResult, service_s: float | None = None) -> tuple[bool, str]:
    """Whether the probe kept up with its rate, and why not (a phrase for the summary).

    ``service_s``: one request alone, start to end (the search's first measurement); estimated from the
    probe's own requests when not given (``queue_growth``)."""
    m = result.metrics
    if result.status not in ("ok", "partial") or not m:
        return False, f"status {result.status}"
    if m.get("requests_steady", 0) < MIN_STEADY:
        return False, f"only {m.get('requests_steady', 0)} measured requests: too short to judge"
    offered = m.get("offered_rps_realised", math.nan)  # the seeded schedule's own rate, not the nominal one
    achieved = m.get("achieved_rps", math.nan)
    if achieved != achieved or achieved < FOLLOW_FRACTION * offered:
        return False, f"achieved {achieved:.3g} of {offered:.3g} req/s offered"
    growth = queue_growth(result, service_s)
    if growth is not None and growth.grew:
        return False, growth.phrase()
    return True, "kept up"


@dataclass(frozen=True)
class QueueGrowth:
    """How much the wait grew from the first to the last quarter of a probe's window, judged on ``signal``."""

    signal: str  # "queue_s" (an in-process engine's admission wait) | "ttft_s" | "num_requests_waiting"
    growth_s: float  # seconds of wait gained (a gauge's requests are turned into seconds: Δwaiting ÷ achieved)
    limit_s: float  # QUEUE_GROWTH_FRACTION × a request's service time

    @property
    def grew(self) -> bool:
        return self.growth_s > self.limit_s

    def phrase(self) -> str:
        return (
            f"queue grew {self.growth_s * 1e3:.3g} ms through the run (on {self.signal}; limit "
            f"{self.limit_s * 1e3:.3g} ms)"
        )


def queue_growth(result: CellResult, service_s: float | None = None) -> QueueGrowth | None:
    """Did the queue grow through the probe's measured window? None when the probe has too few requests.

    Past capacity μ a queue gains λ − μ requests a second and each request waits longer than the one before,
    so the wait of the last quarter of the window's requests (by arrival) exceeds the first quarter's; below
    it the wait only fluctuates. The signal is what this backend measures of the wait:

    - in-process engines (``ttft_basis`` "engine": hf, hf-paged, synthetic, sim): ``queue_s`` = start − arrival,
      the engine's own admission wait;
    - servers over HTTP (openai, vllm, ollama): ``queue_s`` there is the client's send delay (start = sent), blind
      to the server's queue, so the server's ``num_requests_waiting`` gauge where /metrics was scraped (≥ 8 points
      in the window), its growth turned into seconds by Little's law (Δwaiting ÷ achieved_rps); else TTFT, which
      holds the server's queueing (TTFT = wait + prefill, the prefill the same early and late).

    Medians of each quarter, so one slow request does not decide; the growth is judged against
    QUEUE_GROWTH_FRACTION of a request's service time (``service_s``, else the median start → end in-process,
    the median E2E − TTFT plus the smallest TTFT over HTTP)."""
    from kvray.measure.serving import split_steady

    by_repeat: dict[int, list[Any]] = {}
    for t in result.traces:
        by_repeat.setdefault(t.repeat, []).append(t)
    measured = [t for ts in by_repeat.values() for t in split_steady(result.cell.workload, ts)[0]]
    done = sorted((t for t in measured if t.status == "ok"), key=lambda t: t.arrival_s)
    quarter = len(done) // 4
    if quarter < 2:
        return None
    over_http = result.extra.get("ttft_basis") == "client-http"
    metrics = [request_metrics(t) for t in done]
    if service_s is None or not service_s > 0:
        if over_http:
            service_s = float(
                np.median([m["e2e_s"] - m["ttft_s"] for m in metrics]) + min(m["ttft_s"] for m in metrics)
            )
        else:
            service_s = float(np.median([t.end_s - t.start_s for t in done]))
    limit = QUEUE_GROWTH_FRACTION * service_s
    if over_http:
        gauge = _gauge_growth(result, by_repeat, measured)
        if gauge is not None:
            return QueueGrowth("num_requests_waiting", gauge, limit)
    signal = "ttft_s" if over_http else "queue_s"
    values = [m[signal] for m in metrics]
    growth = float(np.median(values[-quarter:]) - np.median(values[:quarter]))
    return QueueGrowth(signal, growth, limit)


def _gauge_growth(result: CellResult, by_repeat: dict[int, list[Any]], measured: list[Any]) -> float | None:
    """The server's ``num_requests_waiting`` growth over the window's arrivals, in seconds of wait (Δwaiting ÷
    achieved_rps, Little's law), mean over repeats; None without enough scraped points."""
    achieved = float(result.metrics.get("achieved_rps", math.nan))
    points = [p for p in result.extra.get("kv_timeline") or [] if p.get("waiting") is not None]
    if not points or not achieved > 0:
        return None
    growths = []
    for repeat in by_repeat:
        arrivals = [t.arrival_s for t in measured if t.repeat == repeat]
        if not arrivals:
            continue
        lo, hi = min(arrivals), max(arrivals)
        waiting = [
            float(p["waiting"])
            for p in sorted(points, key=lambda p: p["t_s"])
            if p.get("repeat", repeat) == repeat and lo <= p["t_s"] <= hi
        ]
        quarter = len(waiting) // 4
        if quarter < 2:
            continue
        growths.append((np.median(waiting[-quarter:]) - np.median(waiting[:quarter])) / achieved)
    return float(np.mean(growths)) if growths else None


@dataclass(frozen=True)
class Probe:
    """One probe as the search saw it: the rate it asked for, the rate its schedule offered, what it achieved."""

    offered_rps: float  # nominal: the rate the search chose (the probe cell's rate, so its id)
    offered_rps_realised: float  # (measured arrivals − 1) ÷ their span: what the seeded schedule really offered
    achieved_rps: float
    sustainable: bool
    client_behind: bool = False  # the client's p99 send lag passed its limit: the rate it judged was not offered

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SearchOutcome:
    """What the search found; ``probes`` in the order they ran.

    ``knee_rps`` is the offered rate the knee probe actually realised (the rate its verdict judged the achieved
    one against), ``knee_rps_nominal`` the rate the search asked for there (the probe cell's ``offered_rps``)."""

    knee_rps: float
    saturation_rps: float
    knee_rps_nominal: float = math.nan
    knee_client_bound: bool = False  # the first rate above the knee was judged on a client that fell behind
    probes: list[Probe] = field(default_factory=list)
    results: list[CellResult] = field(default_factory=list)
    stopped: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            "knee_rps": self.knee_rps,
            "knee_rps_nominal": self.knee_rps_nominal,
            "knee_client_bound": self.knee_client_bound,
            "saturation_rps": self.saturation_rps,
            "probes": len(self.probes),
            "probe_offered_rps": ",".join(f"{p.offered_rps:.4g}" for p in self.probes),
            "probe_offered_rps_realised": ",".join(f"{p.offered_rps_realised:.4g}" for p in self.probes),
            "probe_achieved_rps": ",".join(f"{p.achieved_rps:.4g}" for p in self.probes),
            "search_stopped": self.stopped or None,
        }


def find_saturation(
    cell: Cell, measure: Callable[[Cell], CellResult], start_rps: float | None = None, curve: bool = True
) -> SearchOutcome:
    """Run the search for ``cell`` (a load with ``search: saturation``); ``measure`` runs and records a cell."""
    outcome = SearchOutcome(math.nan, math.nan)

    service: list[float] = []
    judged: list[bool] = []  # per probe: whether it had enough measured requests to count towards saturation_rps

    def probe(rate: float) -> bool:
        result = measure(at_rate(cell, rate, service[0] if service else None))
        outcome.results.append(result)
        ok, why = sustainable(result, service[0] if service else None)
        m = result.metrics or {}
        realised = float(m.get("offered_rps_realised", math.nan))
        behind = bool(m.get("client_behind"))
        outcome.probes.append(Probe(rate, realised, float(m.get("achieved_rps", math.nan)), ok, behind))
        judged.append(m.get("requests_steady", 0) >= MIN_STEADY)
        if not ok:
            outcome.stopped = f"{rate:.4g} req/s ({realised:.4g} realised): {why}"
            if behind:
                outcome.stopped += (
                    f"; the client fell behind its schedule (p99 send lag {m.get('client_lag_s_p99', math.nan):.3g} s"
                    f" > {m.get('client_lag_limit_s', math.nan):.3g} s), so the engine's knee may be higher"
                )
        return ok

    if start_rps is None:
        alone = measure(single_request(cell))
        outcome.results.append(alone)
        e2e = alone.metrics.get("e2e_s_p50", math.nan) if alone.metrics else math.nan
        if not (e2e == e2e and e2e > 0):
            outcome.stopped = f"one request alone did not complete ({alone.status}: {alone.reason})"
            return outcome
        start_rps = 1.0 / e2e
        service.append(e2e)
    low, high = knee_search(probe, start_rps, PRECISION, MAX_DOUBLINGS)
    if high is None:
        outcome.stopped = f"still sustainable at {low:.4g} req/s after {MAX_DOUBLINGS} doublings"
    if low is not None:
        knee = next((p.offered_rps_realised for p in outcome.probes if p.offered_rps == low and p.sustainable), low)
        outcome.knee_rps_nominal = low
        outcome.knee_rps = knee if knee == knee else low  # NaN realised (cannot be: it was judged sustainable)
        # the knee's upper bracket: judged on a client that did not offer its rate, the knee is a lower bound
        above = [p for p in outcome.probes if high is not None and p.offered_rps == high and not p.sustainable]
        outcome.knee_client_bound = any(p.client_behind for p in above)
    achieved = [
        p.achieved_rps for p, ok in zip(outcome.probes, judged, strict=True) if ok and p.achieved_rps == p.achieved_rps
    ]
    outcome.saturation_rps = max(achieved) if achieved else math.nan
    if curve and low is not None:
        for fraction in CURVE_FRACTIONS:  # of the nominal knee: the rates the search itself steps through
            rate = fraction * low
            if all(abs(rate - p.offered_rps) > 1e-6 * rate for p in outcome.probes):
                probe(rate)
    return outcome


def search_result(cell: Cell, outcome: SearchOutcome, started_at: str, duration_s: float) -> CellResult:
    """The search cell's own row: the knee and saturation rate, the probes listed (their rows are their own)."""
    status = "ok" if outcome.knee_rps == outcome.knee_rps else "error"
    reason = None if status == "ok" else f"no sustainable rate found: {outcome.stopped}"
    result = CellResult(cell=cell, status=status, reason=reason, started_at=started_at, duration_s=duration_s)
    result.metrics = {"load": cell.workload.load_kind, **outcome.summary()}
    result.extra["saturation_search"] = {
        "probes": [p.to_dict() for p in outcome.probes],
        "probe_cell_ids": [r.cell_id for r in outcome.results],
    }
    if outcome.results:
        last = outcome.results[-1]
        result.hardware, result.versions, result.simulated = last.hardware, last.versions, last.simulated
    return result


def run_search(
    backend: Any,
    cell: Cell,
    record: Callable[[CellResult], object],
    check_oom: bool = True,
    on_measure: Callable[[bool], None] | None = None,
) -> CellResult:
    """Run a search cell on a loaded ``backend``: each probe is measured, then ``record``-ed (a dataset append)
    as soon as it ends; returns the search's own row. The caller records that row last, so a search cut short
    is run again on resume (its probes already written are kept, not measured twice by a resumed sweep)."""
    import time
    from datetime import UTC, datetime

    from kvray.runner.run import run_cell

    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()

    def measure(probe: Cell) -> CellResult:
        result = run_cell(backend, probe, check_oom=check_oom, on_measure=on_measure)
        record(result)
        return result

    return search_result(cell, find_saturation(cell, measure), started_at, time.perf_counter() - t0)


def is_search(cell: Cell) -> bool:
    load = cell.workload.load
    return load is not None and load.search is not None
