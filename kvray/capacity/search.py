"""The highest rate one replica serves within the SLOs: a bracketing + bisection search over simulated open loops.

One probe serves ``Traffic.requests(rate, n)`` on one replica (kvray.sim.serving.serve: a vLLM-like
continuous-batching engine on ``tp`` GPUs) and judges it over the second half of its arrival window, as
kvray/sim/saturation.py does: the engine must keep up (``measure_point``'s sustainable verdict), and the
``percentile``-th percentile of each SLO metric over the window's requests must be within its threshold:

    ttft_ms  first token − arrival          tpot_ms  (end − first token) / (output − 1), per request
    e2e_ms   end − arrival                  itl_ms   every gap between consecutive tokens, pooled

Latency grows with the rate, so the rates that pass form an interval from 0: ``knee_search`` (the simulator's own
bracketing search) finds its top within ``precision``. It starts from an estimate so it brackets in a step or
two: the largest static batch B whose predicted TPOT meets the SLO (and whose KV fits the pool) completes B
requests per E2E of that batch — B / E2E(B) requests per second.

Before any search a candidate is refused when the model does not fit (no KV pool left beside the weights, or one
request longer than the pool) or when a request alone misses the SLO: its TPOT floor is one read of the weights
per token (``weight_read_s``, bytes ÷ bandwidth), its TTFT floor the prefill of its prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from kvray.capacity.routing import route
from kvray.capacity.traffic import PlanRequest, Traffic
from kvray.hardware.gpus import GpuSpec
from kvray.model.geometry import ModelGeometry
from kvray.model.kvmath import dtype_bytes
from kvray.model.parallel import shard_geometry
from kvray.sim.saturation import OpenLoopRequest, knee_search, measure_point
from kvray.sim.serving import EngineConfig, PoolTooSmall, ServingRun, kv_pool, serve
from kvray.sim.simulate import Efficiency, predict_cell

FOLLOW = 0.97  # achieved ≥ 97 % of sent: kvray.sim.saturation's default
PRECISION = 0.05  # bisect until the bracket is within 5 %
MIN_REQUESTS = 240  # a probe's requests: its measured half holds ~120, so a p99 is near its maximum — said so
SPAN_E2E = 8  # … and its arrivals last at least 8 E2Es of a request alone, so its measured half is past ramp-up
MAX_REQUESTS = 4000
MAX_STEPS = 12  # doublings or halvings before the search gives up
COARSE = 0.25  # a plan's first bracket: refined only while it leaves the replica count open


@dataclass
class Probe:
    """One simulated open loop at ``rate_rps``: what it achieved and its latencies at the plan's percentile."""

    rate_rps: float
    sent_rps: float
    achieved_rps: float
    sustainable: bool
    meets_slo: bool
    window_requests: int  # the percentiles' sample: requests that arrived in the measured half
    ttft_ms: float
    tpot_ms: float
    itl_ms: float
    e2e_ms: float
    tpot_ms_mean: float  # the window's mean TPOT: 1000 / it is tokens/s per user (interactivity)
    output_tps: float  # generated tokens/s the replica completed over the window
    prefix_hit_rate: float  # prefix-cache hit tokens / prompt tokens over the whole probe
    running_mean: float  # requests in the running set, mean over steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReplicaCapacity:
    """One replica's answer: the highest rate within the SLOs (0 with a reason when none)."""

    max_rps: float
    reason: str = ""  # why no rate meets the SLOs ("" when one does)
    probes: list[Probe] = field(default_factory=list)
    weight_read_s: float = 0.0  # one read of a GPU's weights at peak bandwidth: the TPOT floor's core
    alone: dict[str, float] = field(default_factory=dict)  # one request alone: ttft_ms, tpot_ms (the floors)
    kv_pool_tokens: int = 0
    bracket_rps: tuple[float, float | None] | None = None  # (highest passing, lowest failing) offered rates
    # the search's verdict at one rate, kept so a plan can narrow the bracket later (``refine``)
    passes: _Prober | None = field(default=None, repr=False, compare=False)

    def refine(self, precision: float = PRECISION) -> None:
        """Bisect the bracket on until it is within ``precision``: a plan's search stops once the replica count is
        decided, so ``max_rps`` is then only a lower bound up to 25 % below the top — too loose to rank two
        candidates of equal cost by headroom."""
        if self.passes is None or self.bracket_rps is None or self.bracket_rps[1] is None:
            return
        lo, hi = bisect_rate(self.passes, self.bracket_rps[0], self.bracket_rps[1], precision)
        self.max_rps, self.bracket_rps = lo, (lo, hi)
        self.probes = sorted(self.passes.probes.values(), key=_rate)

    @property
    def at_max(self) -> Probe | None:
        passing = [p for p in self.probes if p.meets_slo]
        return max(passing, key=lambda p: p.rate_rps) if passing else None


def _pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else math.nan


def judge(run: ServingRun, reqs: list[PlanRequest], rate: float, slo: Mapping[str, float], q: float) -> Probe:
    """The probe's verdict over the second half of its arrivals (module docstring)."""
    point = measure_point(run, cast(list[OpenLoopRequest], reqs), rate, FOLLOW)
    lo = reqs[0].arrival_s + (reqs[-1].arrival_s - reqs[0].arrival_s) / 2
    window = [t for t in run.timings if lo <= t.arrival_s <= reqs[-1].arrival_s]
    ttft = [(t.token_times_s[0] - t.arrival_s) * 1e3 for t in window]
    tpot = [
        (t.end_s - t.token_times_s[0]) / (len(t.token_times_s) - 1) * 1e3 for t in window if len(t.token_times_s) > 1
    ]
    itl = [(b - a) * 1e3 for t in window for a, b in zip(t.token_times_s, t.token_times_s[1:], strict=False)]
    e2e = [(t.end_s - t.arrival_s) * 1e3 for t in window]
    got = {"ttft_ms": _pct(ttft, q), "tpot_ms": _pct(tpot, q), "itl_ms": _pct(itl, q), "e2e_ms": _pct(e2e, q)}
    within = all(got[k] <= v for k, v in slo.items() if not math.isnan(got[k]))
    prompt = sum(r.prompt_toks for r in reqs)
    steps = [s for s in run.steps if s.dt_s > 0]
    return Probe(
        rate_rps=rate,
        sent_rps=point.sent_rps,
        achieved_rps=point.achieved_rps,
        sustainable=point.sustainable,
        meets_slo=point.sustainable and within,
        window_requests=len(window),
        ttft_ms=got["ttft_ms"],
        tpot_ms=got["tpot_ms"],
        itl_ms=got["itl_ms"],
        e2e_ms=got["e2e_ms"],
        tpot_ms_mean=sum(tpot) / len(tpot) if tpot else math.nan,
        output_tps=point.achieved_rps * sum(len(t.token_times_s) for t in window) / max(len(window), 1),
        prefix_hit_rate=run.prefix_hit_tokens / prompt if prompt else 0.0,
        running_mean=sum(s.running for s in steps) / len(steps) if steps else 0.0,
    )


def weight_read_s(g: ModelGeometry, gpu: GpuSpec, dtype: str, tp: int) -> float:
    """Seconds to read one GPU's share of the weights once at the datasheet bandwidth: no decode step is faster."""
    return shard_geometry(g, tp).weights_bytes(dtype_bytes(dtype)) / (gpu.bandwidth_gbps * 1e9)


@dataclass(frozen=True)
class Replica:
    """One replica as the simulator serves it: the model on ``tp`` × ``gpu``, its weight and KV dtypes, the
    engine's config (prefix caching) and the efficiency its steps run at."""

    g: ModelGeometry
    gpu: GpuSpec
    tp: int = 1
    dtype: str = "bf16"
    kv_dtype: str = "bf16"
    cfg: EngineConfig = field(default_factory=EngineConfig)
    eff: Efficiency | None = None  # None: Efficiency()'s defaults (the serving model), the GPU's (predict_cell)

    def serve(self, requests: list[PlanRequest]) -> ServingRun:
        eff = self.eff or Efficiency()
        return serve(self.g, self.gpu, requests, self.dtype, self.kv_dtype, self.cfg, eff, tp=self.tp)


def slo_capacity(
    replica: Replica,
    traffic: Traffic,
    slo: Mapping[str, float],
    *,
    percentile: float = 99,
    precision: float = PRECISION,
    min_requests: int = MIN_REQUESTS,
    seed: int = 0,
    target_rps: float | None = None,
) -> ReplicaCapacity:
    """The highest rate one replica of ``g`` on ``tp`` × ``gpu`` serves ``traffic`` within ``slo`` (module
    docstring); ``max_rps`` 0 and a ``reason`` when it fits nowhere or no rate meets the SLOs.

    ``target_rps``: a plan's rate. The search then stops bisecting once the bracket decides ⌈target ÷ rate⌉, the
    replicas the plan needs (``bracket_rps`` says how wide it stayed); without it, to ``precision``."""
    g, gpu, tp, dtype, kv_dtype, cfg = replica.g, replica.gpu, replica.tp, replica.dtype, replica.kv_dtype, replica.cfg
    floor = weight_read_s(g, gpu, dtype, tp)
    try:
        pool = kv_pool(shard_geometry(g, tp), gpu, dtype, kv_dtype, cfg)
    except PoolTooSmall:
        per_gpu = shard_geometry(g, tp).weights_bytes(dtype_bytes(dtype)) / 2**30
        return ReplicaCapacity(
            0.0,
            f"does not fit (weights {per_gpu:.1f} GiB per GPU leave no KV pool on {gpu.memory_gib:.0f} GiB)",
            weight_read_s=floor,
        )
    cap = ReplicaCapacity(0.0, weight_read_s=floor, kv_pool_tokens=pool.tokens)
    longest = max(p + n for p, n in traffic.lengths)
    if longest > pool.tokens:
        cap.reason = f"does not fit (a {longest}-token request exceeds the {pool.tokens}-token KV pool)"
        return cap
    prompt, gen = traffic.percentile_pair(percentile)
    alone = replica.serve([PlanRequest(0, prompt, max(gen, 2), 0.0)]).timings[0]
    times = alone.token_times_s
    cap.alone = {"ttft_ms": times[0] * 1e3, "tpot_ms": (times[-1] - times[0]) / (len(times) - 1) * 1e3}
    if "tpot_ms" in slo and slo["tpot_ms"] < floor * 1e3:
        cap.reason = (
            f"SLO unreachable on one replica (TPOT {slo['tpot_ms']:g} ms below one weight read: "
            f"{floor * 1e3:.1f} ms = weights ÷ {gpu.bandwidth_gbps:g} GB/s)"
        )
        return cap
    for key in ("ttft_ms", "tpot_ms"):
        if key in slo and cap.alone[key] > slo[key]:
            cap.reason = (
                f"SLO unreachable on one replica ({key[:4].upper()} of one request alone "
                f"{cap.alone[key]:.1f} ms > {slo[key]:g} ms; one weight read {floor * 1e3:.1f} ms)"
            )
            return cap
    passes = _Prober(replica, traffic, slo, percentile, seed, min_requests, alone.end_s)
    start = _estimate_rps(g, gpu, traffic, slo, pool.tokens, cfg, dtype, kv_dtype, replica.eff or Efficiency(), tp)
    coarse = precision if target_rps is None else max(precision, COARSE)
    lo, hi = knee_search(passes, start, coarse, max_steps=MAX_STEPS)
    if lo is not None and hi is not None:  # refine until the replica count is decided, or to ``precision``
        lo, hi = bisect_rate(passes, lo, hi, precision, target_rps)
    cap.probes, cap.passes = sorted(passes.probes.values(), key=_rate), passes
    if lo is None:
        cap.reason = f"SLO unreachable on one replica (missed at every rate down to {start / 2**MAX_STEPS:.3g} req/s)"
        return cap
    cap.max_rps = lo  # the offered rate the verdict passed (its probe's realised rate is in ``at_max``)
    cap.bracket_rps = (lo, hi)
    return cap


class _Prober:
    """A probe's verdict at one offered rate (``judge`` of a simulated open loop), each rate served once."""

    def __init__(
        self,
        replica: Replica,
        traffic: Traffic,
        slo: Mapping[str, float],
        percentile: float,
        seed: int,
        min_requests: int,
        alone_e2e_s: float,
    ) -> None:
        self.replica, self.traffic, self.slo, self.percentile = replica, traffic, slo, percentile
        self.seed, self.min_requests, self.alone_e2e_s = seed, min_requests, alone_e2e_s
        self.probes: dict[float, Probe] = {}

    def __call__(self, rate: float) -> bool:
        if rate not in self.probes:
            n = min(max(self.min_requests, math.ceil(rate * SPAN_E2E * self.alone_e2e_s)), MAX_REQUESTS)
            reqs = self.traffic.requests(rate, n, self.seed)
            self.probes[rate] = judge(self.replica.serve(reqs), reqs, rate, self.slo, self.percentile)
        return self.probes[rate].meets_slo


def _rate(p: Probe) -> float:
    return p.rate_rps


def bisect_rate(
    passes: Callable[[float], bool], lo: float, hi: float, precision: float, target_rps: float | None = None
) -> tuple[float, float]:
    """Geometric bisection of (passing ``lo``, failing ``hi``) until ``hi ÷ lo ≤ 1 + precision`` — or, given
    ``target_rps``, until ⌈target ÷ rate⌉ is the same at both ends."""
    while hi / lo > 1 + precision and (target_rps is None or _replicas(target_rps, lo) != _replicas(target_rps, hi)):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if passes(mid) else (lo, mid)
    return lo, hi


def _replicas(target_rps: float, per_replica_rps: float) -> int:
    return max(1, math.ceil(target_rps / per_replica_rps - 1e-9))


def _estimate_rps(
    g: ModelGeometry,
    gpu: GpuSpec,
    traffic: Traffic,
    slo: Mapping[str, float],
    pool_tokens: int,
    cfg: EngineConfig,
    dtype: str,
    kv_dtype: str,
    eff: Efficiency,
    tp: int,
) -> float:
    """B / E2E(B) of the largest static batch B whose TPOT meets the SLO and whose KV fits (module docstring)."""
    p, n = max(1, round(traffic.mean_prompt_toks)), max(2, round(traffic.mean_gen_toks))
    cap = max(1, min(cfg.max_num_seqs, pool_tokens // (p + n)))

    def batch(b: int) -> tuple[float, float]:
        pred = predict_cell(
            g, gpu, b, p, n, dtype=dtype, kv_dtype=kv_dtype, layout="paged", block_size=cfg.block_size, eff=eff, tp=tp
        )
        return pred.tpot_s * 1e3, pred.e2e_s

    limit = slo.get("tpot_ms", math.inf)
    lo, hi = 1, cap
    if batch(hi)[0] <= limit:
        lo = hi
    while hi - lo > max(1, lo // 8):  # an estimate: within 1/8 is plenty
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if batch(mid)[0] <= limit else (lo, mid)
    return lo / batch(lo)[1]


def routed_probe(
    replica: Replica,
    traffic: Traffic,
    slo: Mapping[str, float],
    rate_rps: float,
    replicas: int,
    policy: str,
    *,
    percentile: float = 99,
    seed: int = 0,
    min_requests: int = MIN_REQUESTS,
) -> Probe:
    """The whole traffic at ``rate_rps`` routed by ``policy`` (kvray/servers/router.py) over ``replicas``: the
    busiest replica's share served and judged — what the prefix cache of one replica sees behind that router."""
    n = min(MAX_REQUESTS, min_requests * replicas)
    reqs = traffic.requests(rate_rps, n, seed)
    shares = [list(s) for s in route(reqs, policy, replicas)]
    share = max(shares, key=len)
    mine = [r for r in reqs if r.id in {s.id for s in share}]
    return judge(replica.serve(mine), mine, rate_rps / replicas, slo, percentile)
