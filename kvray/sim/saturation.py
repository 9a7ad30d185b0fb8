"""Where a continuous-batching engine saturates: a bracketing + bisection search over simulated open loops.

One probe serves a seeded open loop (Poisson or constant gaps) at an offered rate for ``span_s`` seconds of
arrivals with kvray/sim/serving.py and measures, over the **second half of the arrival window** (the first half
is ramp-up: the running set is still filling):

    sent_rps      requests that arrived in the window / its length (a Poisson draw is not exactly the rate)
    achieved_rps  requests that completed in the window shifted by the window's median E2E / its length (the
                  shift keeps the requests in flight at the window's ends from reading as lost throughput)

A probe is **sustainable** when achieved ≥ ``follow`` × sent (default 0.97) or the admission wait does not grow
(by less than 1 − ``follow`` seconds per second of arrivals): an engine past its capacity μ completes at μ
whatever arrives, so achieved / sent falls to μ / λ and each request waits 1 − μ / λ seconds longer than the one
a second before it; both tests fail together past λ = μ / follow. Below capacity the rates agree up to the
requests in flight at the window's ends, and the wait test keeps that noise from ending the search early.
The **knee** is the highest sustainable offered rate, reported as the rate that probe's arrivals realised over its
window (``knee_rps`` = its ``sent_rps``, the rate the verdict judged achieved against; the rate the search asked
for is ``knee_rps_nominal``), and the **saturation rate** the highest achieved rate any probe measured (the names
kvray/runner/saturation.py gives the measured search). The knee is found by doubling from
1 / single-request service time (a serial engine's capacity, a lower bound for any batching engine) until a
probe is not sustainable, then by geometric bisection until hi / lo ≤ 1 + ``precision``. So the knee lies in
[μ (1 − precision), μ / follow] for a deterministic (constant-rate, fixed-length) load.

The curve adds probes at fixed fractions of the knee, each with TTFT, TPOT and E2E percentiles over the window's
requests: latency vs achieved throughput, what docs/simulator.md draws per GPU.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvray.errors import KvrayInputError
from kvray.hardware.gpus import GpuSpec
from kvray.model.geometry import ModelGeometry
from kvray.sim.serving import EngineConfig, ServedRequest, ServingRun, serve
from kvray.sim.simulate import Efficiency

ARRIVALS = ("poisson", "constant")
CURVE_FRACTIONS = (0.1, 0.25, 0.5, 0.7, 0.85, 0.95, 1.0, 1.1, 1.25)


@dataclass(frozen=True)
class OpenLoopRequest:
    """What serving.serve reads of a request (kvray.spec.RequestSpec's fields, without the spec layer)."""

    id: int
    prompt_toks: int
    gen_toks: int
    arrival_s: float


def open_loop(
    rate_rps: float, span_s: float, mix: Sequence[tuple[int, int]], kind: str = "poisson", seed: int = 0
) -> list[OpenLoopRequest]:
    """Arrivals in [0, span_s] at ``rate_rps`` (exponential or equal gaps), lengths drawn from ``mix`` (seeded)."""
    if kind not in ARRIVALS:
        raise KvrayInputError(f"unknown arrival kind {kind!r} (known: {', '.join(ARRIVALS)})")
    if rate_rps <= 0 or span_s <= 0 or not mix:
        raise KvrayInputError(f"a load needs a positive rate, span and a length mix, got {rate_rps}, {span_s}, {mix}")
    rng = random.Random(seed)
    out: list[OpenLoopRequest] = []
    t = 0.0
    while t <= span_s:
        prompt, gen = mix[rng.randrange(len(mix))] if len(mix) > 1 else mix[0]
        out.append(OpenLoopRequest(len(out), prompt, gen, t))
        t += rng.expovariate(rate_rps) if kind == "poisson" else 1.0 / rate_rps
    return out


@dataclass
class LoadPoint:
    """One probe: what was offered and what the engine did with it, over the second half of the arrivals."""

    offered_rps: float
    sent_rps: float
    achieved_rps: float
    sustainable: bool
    requests: int  # requests in the probe
    window_requests: int  # requests that arrived in the measured window (the latency percentiles' sample)
    ttft_s_p50: float
    ttft_s_p99: float
    tpot_s_p50: float
    tpot_s_p99: float
    e2e_s_p50: float
    e2e_s_p99: float
    queue_s_p99: float
    preemptions: int
    running_peak: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else math.nan


def measure_point(run: ServingRun, requests: Sequence[OpenLoopRequest], offered_rps: float, follow: float) -> LoadPoint:
    """Rates and latencies of one simulated open loop over the second half of its arrival window."""
    first, last = requests[0].arrival_s, requests[-1].arrival_s
    lo = first + (last - first) / 2
    width = max(last - lo, 1e-12)
    window = [t for t in run.timings if lo <= t.arrival_s <= last]
    sent = len(window) / width
    e2e = [t.end_s - t.arrival_s for t in window]
    lag = _percentile(e2e, 50)
    achieved = sum(1 for t in run.timings if lo + lag <= t.end_s <= last + lag) / width
    ttft = [t.token_times_s[0] - t.arrival_s for t in window]
    tpot = [(t.end_s - t.token_times_s[0]) / (len(t.token_times_s) - 1) for t in window if len(t.token_times_s) > 1]
    queue = [t.start_s - t.arrival_s for t in window]
    return LoadPoint(
        offered_rps=offered_rps,
        sent_rps=sent,
        achieved_rps=achieved,
        sustainable=achieved >= follow * sent or _queue_flat(window, follow),
        requests=len(requests),
        window_requests=len(window),
        ttft_s_p50=_percentile(ttft, 50),
        ttft_s_p99=_percentile(ttft, 99),
        tpot_s_p50=_percentile(tpot, 50),
        tpot_s_p99=_percentile(tpot, 99),
        e2e_s_p50=_percentile(e2e, 50),
        e2e_s_p99=_percentile(e2e, 99),
        queue_s_p99=_percentile(queue, 99),
        preemptions=run.preemptions,
        running_peak=run.running_peak,
    )


def _queue_flat(window: Sequence[ServedRequest], follow: float) -> bool:
    """Whether admission waits grow slower than (1 − follow) s per second of arrivals across the window.

    Past capacity μ the queue gains λ − μ requests a second, so a request's wait grows by 1 − μ/λ seconds per
    second: at the rate where achieved falls to ``follow`` × sent, exactly 1 − follow. Medians of the window's
    first and last tenths keep one unlucky request from deciding.
    """
    tenth = max(len(window) // 10, 1)
    if len(window) < 2 * tenth or window[-1].arrival_s <= window[0].arrival_s:
        return False
    head, tail = window[:tenth], window[-tenth:]
    waited = _percentile([t.start_s - t.arrival_s for t in tail], 50) - _percentile(
        [t.start_s - t.arrival_s for t in head], 50
    )
    elapsed = _percentile([t.arrival_s for t in tail], 50) - _percentile([t.arrival_s for t in head], 50)
    return waited < (1 - follow) * elapsed


@dataclass
class SaturationCurve:
    """The knee and every probe that found it or drew the curve, by offered rate."""

    model: str
    gpu: str
    mix: list[tuple[int, int]]
    arrivals: str
    knee_rps: float  # the highest sustainable offered rate found, as its arrivals realised it (its sent_rps)
    knee_rps_nominal: float  # the rate the search asked for there (its probe's offered_rps)
    achieved_at_knee_rps: float
    saturation_rps: float  # the highest achieved rate of any probe: what the engine completes once pushed
    service_s: float  # one request alone, start to end: 1 / this is the serial capacity the search starts at
    points: list[LoadPoint] = field(default_factory=list)
    probes: int = 0  # simulated runs, search and curve together
    kv_pool_blocks: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["points"] = [p.to_dict() for p in self.points]
        return d


def find_saturation(
    g: ModelGeometry,
    gpu: GpuSpec,
    mix: Sequence[tuple[int, int]],
    dtype: str = "bf16",
    kv_dtype: str | None = None,
    cfg: EngineConfig | None = None,
    eff: Efficiency | None = None,
    arrivals: str = "poisson",
    seed: int = 0,
    span_s: float | None = None,
    follow: float = 0.97,
    precision: float = 0.02,
    curve: Sequence[float] = CURVE_FRACTIONS,
    min_requests: int = 400,
    max_probes: int = 40,
) -> SaturationCurve:
    """The predicted saturation rate of ``g`` on ``gpu`` for a length ``mix`` and its latency curve.

    ``span_s`` (seconds of arrivals per probe) defaults to 40 single-request service times, at least 20 s, and a
    probe always offers at least ``min_requests``, so the measured half holds many times the requests in flight.
    """
    if not 0 < follow < 1 or precision <= 0:
        raise KvrayInputError(f"follow must be in (0, 1) and precision positive, got {follow} and {precision}")
    cfg = cfg or EngineConfig()
    mix = [(int(p), int(n)) for p, n in mix]
    alone = {pair: serve(g, gpu, [OpenLoopRequest(0, *pair, 0.0)], dtype, kv_dtype, cfg, eff) for pair in set(mix)}
    service = max(sum(alone[pair].timings[0].end_s for pair in mix) / len(mix), 1e-9)  # the mix's mean, alone
    span = span_s if span_s is not None else max(40 * service, 20.0)
    probes: dict[float, LoadPoint] = {}

    def probe(rate: float) -> LoadPoint:
        if rate not in probes:
            if len(probes) >= max_probes:
                raise KvrayInputError(f"saturation search: no answer within {max_probes} simulated runs")
            reqs = open_loop(rate, max(span, min_requests / rate), mix, arrivals, seed)
            probes[rate] = measure_point(serve(g, gpu, reqs, dtype, kv_dtype, cfg, eff), reqs, rate, follow)
        return probes[rate]

    found, _ = knee_search(lambda rate: probe(rate).sustainable, 1.0 / service, precision)
    assert found is not None  # unbounded steps: probe() raises past max_probes instead
    lo = found
    for fraction in curve:  # of the nominal knee: the rates the search itself steps through
        probe(lo * fraction)
    return SaturationCurve(
        knee_rps=probes[lo].sent_rps,
        knee_rps_nominal=lo,
        achieved_at_knee_rps=probes[lo].achieved_rps,
        saturation_rps=max(p.achieved_rps for p in probes.values()),
        service_s=service,
        model=g.name,
        gpu=gpu.name,
        mix=mix,
        arrivals=arrivals,
        points=[probes[r] for r in sorted(probes)],
        probes=len(probes),
        kv_pool_blocks=next(iter(alone.values())).pool.blocks,
    )


def knee_search(
    sustainable: Callable[[float], bool], start: float, precision: float, max_steps: int | None = None
) -> tuple[float | None, float | None]:
    """The bracketing search both the simulator and ``kvray bench --rate auto`` run (kvray/runner/saturation.py).

    Steps from ``start`` by factors of 2 (up while sustainable, down while not) to a (sustainable, not
    sustainable) pair, then bisects in log space until they are within ``1 + precision``. Returns (lo, hi):
    lo is None when no rate within ``max_steps`` halvings was sustainable, hi None when every rate within
    ``max_steps`` doublings was (then lo is the last one tried)."""
    steps = 0

    def more() -> bool:
        nonlocal steps
        steps += 1
        return max_steps is None or steps <= max_steps

    rate = start
    if sustainable(rate):
        while True:
            if not more():
                return rate, None
            if not sustainable(rate * 2):
                lo, hi = rate, rate * 2
                break
            rate *= 2
    else:
        while True:
            if not more():
                return None, rate
            if sustainable(rate / 2):
                lo, hi = rate / 2, rate
                break
            rate /= 2
    while hi / lo > 1 + precision:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if sustainable(mid) else (lo, mid)
    return lo, hi
