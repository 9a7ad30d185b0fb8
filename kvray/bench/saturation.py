"""Find where an engine saturates: a bracketing search over open-loop rates, then a curve below the knee.

A rate is **sustainable** when the engine keeps up with it: the steady-state achieved rate follows the offered
one (``achieved_rps ≥ FOLLOW_FRACTION × offered_rps``) and the queue does not grow through the run (the mean
queueing time of the last quarter of steady requests is not above the first quarter's by more than
``QUEUE_GROWTH_FRACTION`` of a request's service time). The search starts from the rate one request alone
sustains (1 ÷ its E2E), doubles until a rate is not sustainable, then bisects (in log space) between the last
sustainable and the first unsustainable rate until they are within 10 % — the same search as the simulator's
(``kvray.sim.saturation.knee_search``), on measured probes. The **knee** is the highest sustainable offered rate found; the
**saturation rate** the highest achieved rate any probe measured (what the engine delivers when pushed).
Then ``CURVE_FRACTIONS`` of the knee are measured, so a latency-vs-throughput curve has points below it.

Every probe is a cell of its own (its concrete rate is in its workload, so in its id and row); the search
cell's own row summarises (``knee_rps``, ``saturation_rps``, the probes' offered and achieved rates).
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


def sustainable(result: CellResult) -> tuple[bool, str]:
    """Whether the probe kept up with its rate, and why not (a phrase for the summary)."""
    m = result.metrics
    if result.status not in ("ok", "partial") or not m:
        return False, f"status {result.status}"
    if m.get("requests_steady", 0) < MIN_STEADY:
        return False, f"only {m.get('requests_steady', 0)} steady-state requests: too short to judge"
    offered = m.get("offered_rps_realised", math.nan)  # the seeded schedule's own rate, not the nominal one
    achieved = m.get("achieved_rps", math.nan)
    if achieved != achieved or achieved < FOLLOW_FRACTION * offered:
        return False, f"achieved {achieved:.3g} of {offered:.3g} req/s offered"
    steady = sorted((t for t in result.traces if t.status == "ok"), key=lambda t: t.arrival_s)
    quarter = len(steady) // 4
    if quarter >= 2:
        queue = [request_metrics(t)["queue_s"] for t in steady]
        service = float(np.median([t.end_s - t.start_s for t in steady]))
        growth = float(np.mean(queue[-quarter:]) - np.mean(queue[:quarter]))
        if growth > QUEUE_GROWTH_FRACTION * service:
            return False, f"queue grew {growth * 1e3:.3g} ms through the run (service {service * 1e3:.3g} ms)"
    return True, "kept up"


@dataclass
class SearchOutcome:
    """What the search found; ``probes`` are (offered, achieved, sustainable) in the order they ran."""

    knee_rps: float
    saturation_rps: float
    probes: list[tuple[float, float, bool]] = field(default_factory=list)
    results: list[CellResult] = field(default_factory=list)
    stopped: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            "knee_rps": self.knee_rps,
            "saturation_rps": self.saturation_rps,
            "probes": len(self.probes),
            "probe_offered_rps": ",".join(f"{o:.4g}" for o, _, _ in self.probes),
            "probe_achieved_rps": ",".join(f"{a:.4g}" for _, a, _ in self.probes),
            "search_stopped": self.stopped or None,
        }


def find_saturation(
    cell: Cell, measure: Callable[[Cell], CellResult], start_rps: float | None = None, curve: bool = True
) -> SearchOutcome:
    """Run the search for ``cell`` (a load with ``search: saturation``); ``measure`` runs and records a cell."""
    outcome = SearchOutcome(math.nan, math.nan)

    service: list[float] = []

    def probe(rate: float) -> bool:
        result = measure(at_rate(cell, rate, service[0] if service else None))
        outcome.results.append(result)
        ok, why = sustainable(result)
        achieved = float(result.metrics.get("achieved_rps", math.nan)) if result.metrics else math.nan
        outcome.probes.append((rate, achieved, ok))
        if not ok:
            outcome.stopped = f"{rate:.4g} req/s: {why}"
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
    outcome.knee_rps = low if low is not None else math.nan
    achieved = [a for (_, a, _), r in zip(outcome.probes, outcome.results[-len(outcome.probes):], strict=True)
                if a == a and r.metrics.get("requests_steady", 0) >= MIN_STEADY]  # fmt: skip
    outcome.saturation_rps = max(achieved) if achieved else math.nan
    if curve and low is not None:
        for fraction in CURVE_FRACTIONS:
            rate = fraction * low
            if all(abs(rate - o) > 1e-6 * rate for o, _, _ in outcome.probes):
                probe(rate)
    return outcome


def search_result(cell: Cell, outcome: SearchOutcome, started_at: str, duration_s: float) -> CellResult:
    """The search cell's own row: the knee and saturation rate, the probes listed (their rows are their own)."""
    status = "ok" if outcome.knee_rps == outcome.knee_rps else "error"
    reason = None if status == "ok" else f"no sustainable rate found: {outcome.stopped}"
    result = CellResult(cell=cell, status=status, reason=reason, started_at=started_at, duration_s=duration_s)
    result.metrics = {"load": cell.workload.load_kind, **outcome.summary()}
    result.extra["saturation_search"] = {
        "probes": [{"offered_rps": o, "achieved_rps": a, "sustainable": s} for o, a, s in outcome.probes],
        "probe_cell_ids": [r.cell_id for r in outcome.results],
    }
    if outcome.results:
        last = outcome.results[-1]
        result.hardware, result.versions, result.simulated = last.hardware, last.versions, last.simulated
    return result


def run_search(
    backend: Any, cell: Cell, record: Callable[[CellResult], object], check_oom: bool = True,
    on_measure: Callable[[bool], None] | None = None,
) -> CellResult:  # fmt: skip
    """Run a search cell on a loaded ``backend``: each probe is measured, then ``record``-ed (a dataset append)
    as soon as it ends; returns the search's own row. The caller records that row last, so a search cut short
    is run again on resume (its probes already written are kept, not measured twice by a resumed sweep)."""
    import time
    from datetime import UTC, datetime

    from kvray.bench.runner import run_cell

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
