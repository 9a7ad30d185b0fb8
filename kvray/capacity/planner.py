"""The plan: for each candidate deployment (GPU type × TP × KV dtype × prefix caching), the highest rate one
replica serves within the SLOs (kvray/capacity/search.py), the replicas the target rate needs, what they cost,
and the cheapest one that meets the SLOs. docs/capacity.md states the arithmetic:

    replicas               = ⌈R ÷ max_rps_per_replica⌉
    cost_per_hour          = replicas × TP × $/GPU-hour
    cost_per_mtok_output   = cost_per_hour ÷ (R × mean output tokens × 3600) × 10⁶
    cost_per_mtok_total    = cost_per_hour ÷ (R × mean (prompt + output) tokens × 3600) × 10⁶

Searching every candidate costs ~1 s of simulation each, so the plan searches them cheapest-possible first and
stops early (branch and bound): a candidate's **throughput ceiling** — no replica completes more requests per
second than its GPUs' peak FLOP/s over a request's FLOPs, nor more than its largest batch (the KV pool's or
``max_num_seqs``) over a request's decode steps each reading the weights and that batch's KV — gives a lowest
possible cost; once a searched candidate meets the SLOs at a cost no higher, the rest lose as "more expensive"
without a search (``exhaustive`` searches them all anyway). With no shared prefixes in the traffic, prefix
caching on and off serve alike: one search answers both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvray.capacity.prices import Price
from kvray.capacity.search import (
    PRECISION,
    Probe,
    Replica,
    ReplicaCapacity,
    routed_probe,
    slo_capacity,
    weight_read_s,
)
from kvray.capacity.traffic import Traffic
from kvray.capacity.whatif import Deployment, HostMemory, best_what_ifs
from kvray.errors import KvrayInputError
from kvray.hardware.gpus import GpuSpec, get_gpu
from kvray.model.geometry import ModelGeometry
from kvray.model.kvmath import kv_bytes_per_token
from kvray.model.parallel import check_tensor_parallel, shard_geometry
from kvray.sim.serving import EngineConfig, PoolTooSmall, kv_pool
from kvray.sim.simulate import efficiency_for

DEFAULT_GPUS = ("H100-SXM", "A100-80GB-SXM", "L4")
DEFAULT_TPS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Candidate:
    gpu: str
    tp: int
    kv_dtype: str
    prefix_caching: bool

    @property
    def label(self) -> str:
        return f"{self.gpu} TP{self.tp} KV {self.kv_dtype}{' +prefix cache' if self.prefix_caching else ''}"


@dataclass
class CandidateResult:
    """One candidate's row of the plan (``to_dict`` is its JSON)."""

    gpu: str
    tp: int
    kv_dtype: str
    prefix_caching: bool
    replicas: int | None
    gpus: int | None  # replicas × TP
    price_per_gpu_hour: float | None
    cost_per_hour: float | None
    cost_per_mtok_output: float | None
    cost_per_mtok_total: float | None
    max_rps_per_replica: float | None  # None: not searched (its ceiling already costs more than the best)
    max_rps_ceiling: float  # the throughput ceiling: no replica of it serves more (module docstring)
    meets_slo: bool
    reason: str  # "" for the best; why the others lose
    searched: bool
    at_max: dict[str, Any] | None = None  # the probe at the highest passing rate: its latencies and sample size
    weight_read_ms: float = 0.0
    kv_pool_tokens: int = 0
    # the search's last bracket (highest passing, lowest failing offered rate): up to 25 % wide where the replica
    # count was decided (a plan refines no further than it needs), to 5 % for candidates tied on cost and GPUs
    # (their headroom ranks them) and with --exhaustive
    max_rps_bracket: tuple[float, float | None] | None = None
    probes: list[Probe] = field(default_factory=list)
    routing: dict[str, Any] | None = None  # replicas behind the router checked on the routed traffic (prefixes only)

    def to_dict(self, probes: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["probes"] = [p.to_dict() for p in self.probes] if probes else len(self.probes)
        return d


@dataclass
class Plan:
    model: str
    rate_rps: float
    slo: dict[str, float]
    percentile: float
    traffic: str
    mean_prompt_toks: float
    mean_gen_toks: float
    best: CandidateResult | None
    candidates: list[CandidateResult]
    prices: dict[str, dict[str, Any]]
    elapsed_s: float
    searched: int
    notes: list[str] = field(default_factory=list)
    what_ifs: dict[str, Any] = field(default_factory=dict)  # the best deployment's (kvray/capacity/whatif.py)

    def to_dict(self, probes: bool = False) -> dict[str, Any]:
        return {
            "what_ifs": self.what_ifs,
            "model": self.model,
            "rate_rps": self.rate_rps,
            "slo": self.slo,
            "percentile": self.percentile,
            "traffic": self.traffic,
            "mean_prompt_toks": self.mean_prompt_toks,
            "mean_gen_toks": self.mean_gen_toks,
            "best": self.best.to_dict(probes) if self.best else None,
            "candidates": [c.to_dict(probes) for c in self.candidates],
            "prices": self.prices,
            "elapsed_s": round(self.elapsed_s, 3),
            "searched": self.searched,
            "notes": self.notes,
        }


def costs(
    rate_rps: float, max_rps: float, tp: int, price: float, mean_prompt: float, mean_gen: float
) -> dict[str, float | int]:
    """The module docstring's arithmetic for one candidate serving ``rate_rps``."""
    replicas = max(1, math.ceil(rate_rps / max_rps - 1e-9))
    per_hour = replicas * tp * price
    return {
        "replicas": replicas,
        "gpus": replicas * tp,
        "cost_per_hour": per_hour,
        "cost_per_mtok_output": per_hour / (rate_rps * mean_gen * 3600) * 1e6,
        "cost_per_mtok_total": per_hour / (rate_rps * (mean_prompt + mean_gen) * 3600) * 1e6,
    }


def throughput_ceiling(
    g: ModelGeometry, gpu: GpuSpec, traffic: Traffic, *, dtype: str, kv_dtype: str, tp: int, cfg: EngineConfig
) -> float:
    """Requests/s no replica exceeds (module docstring); 0 when the model leaves no KV pool."""
    try:
        pool = kv_pool(shard_geometry(g, tp), gpu, dtype, kv_dtype, cfg)
    except PoolTooSmall:
        return 0.0
    p, n = traffic.mean_prompt_toks, traffic.mean_gen_toks
    compute = tp * gpu.tflops(dtype) * 1e12 / (2 * g.params * (p + n))
    batch = max(1, min(cfg.max_num_seqs, pool.tokens // max(1, round(p + n))))
    kv_read = batch * (p + n / 2) * kv_bytes_per_token(shard_geometry(g, tp), kv_dtype, "paged")
    step = weight_read_s(g, gpu, dtype, tp) + kv_read / (gpu.bandwidth_gbps * 1e9)
    return min(compute, batch / (n * step))


def plan_capacity(
    g: ModelGeometry,
    traffic: Traffic,
    rate_rps: float,
    slo: Mapping[str, float],
    *,
    gpus: Sequence[str] = DEFAULT_GPUS,
    tps: Sequence[int] = DEFAULT_TPS,
    kv_dtypes: Sequence[str] = ("bf16",),
    prefix_caching: Sequence[bool] = (False,),
    prices: Mapping[str, Price],
    percentile: float = 99,
    dtype: str = "bf16",
    calibration: str | Path | None = None,
    exhaustive: bool = False,
    seed: int = 0,
    router: str = "prefix_affinity",
    host: HostMemory = HostMemory(),
) -> Plan:
    """The plan (module docstring): every candidate's row, the cheapest meeting the SLOs first."""
    if not rate_rps > 0 or not math.isfinite(rate_rps):
        raise KvrayInputError(f"--rate must be a positive number of requests/s, got {rate_rps}")
    if not 0 < percentile <= 100:
        raise KvrayInputError(f"--percentile must be in (0, 100], got {percentile}")
    started = time.perf_counter()
    specs = {name: get_gpu(name) for name in gpus}
    notes: list[str] = list(traffic.notes)
    candidates = [
        Candidate(spec.name, tp, kv, cache)
        for spec in specs.values()
        for tp in tps
        for kv in kv_dtypes
        for cache in prefix_caching
    ]
    if not traffic.has_prefixes and len(set(prefix_caching)) > 1:
        notes.append("the traffic shares no prefixes: prefix caching on and off serve it alike (one search each)")
    rows: dict[Candidate, CandidateResult] = {}
    ceilings: dict[Candidate, float] = {}
    for c in candidates:
        spec = specs[c.gpu]
        cfg = EngineConfig(prefix_caching=c.prefix_caching)
        price = prices.get(c.gpu)
        blank = _row(c, price, 0.0)
        try:
            check_tensor_parallel(g, c.tp)
        except KvrayInputError as exc:
            blank.reason = f"TP {c.tp} not possible: {str(exc).split(': ', 1)[-1]}"
            rows[c] = blank
            continue
        ceilings[c] = blank.max_rps_ceiling = throughput_ceiling(
            g, spec, traffic, dtype=dtype, kv_dtype=c.kv_dtype, tp=c.tp, cfg=cfg
        )
        if price is None:
            blank.reason = f"no price for {c.gpu} (give one with --prices)"
            rows[c] = blank
    # cheapest possible first: the ceiling's cost is a floor on the candidate's cost
    order = sorted(
        (c for c in candidates if c not in rows),
        key=lambda c: _floor_cost(rate_rps, ceilings[c], c.tp, prices[c.gpu].usd_per_gpu_hour),
    )
    best_cost = math.inf
    answers: dict[tuple[str, int, str, bool], ReplicaCapacity] = {}
    searched = 0
    for c in order:
        usd = prices[c.gpu].usd_per_gpu_hour
        row = _row(c, prices[c.gpu], ceilings[c])
        rows[c] = row
        floor_cost = _floor_cost(rate_rps, ceilings[c], c.tp, usd)
        if not exhaustive and floor_cost > best_cost and ceilings[c] > 0:  # no ceiling: it does not fit; say so
            row.reason = (
                f"more expensive (at least ${floor_cost:.2f}/h even at its throughput ceiling of "
                f"{ceilings[c]:.3g} req/s per replica; not searched)"
            )
            continue
        key = (c.gpu, c.tp, c.kv_dtype, c.prefix_caching and traffic.has_prefixes)
        replica = Replica(
            g,
            specs[c.gpu],
            tp=c.tp,
            dtype=dtype,
            kv_dtype=c.kv_dtype,
            cfg=EngineConfig(prefix_caching=c.prefix_caching),
            eff=efficiency_for(specs[c.gpu], "paged", calibration),
        )
        if key not in answers:
            target_rps = None if exhaustive else rate_rps
            answers[key] = slo_capacity(replica, traffic, slo, percentile=percentile, seed=seed, target_rps=target_rps)
            searched += 1
        cap = answers[key]
        row.searched, row.probes, row.kv_pool_tokens = True, cap.probes, cap.kv_pool_tokens
        row.weight_read_ms = cap.weight_read_s * 1e3
        if cap.max_rps <= 0:
            row.reason = cap.reason
            continue
        row.max_rps_per_replica = cap.max_rps
        row.max_rps_bracket = cap.bracket_rps
        top = cap.at_max
        row.at_max = _at_max(top) if top else None
        got = costs(rate_rps, cap.max_rps, c.tp, usd, traffic.mean_prompt_toks, traffic.mean_gen_toks)
        row.replicas, row.gpus = int(got["replicas"]), int(got["gpus"])
        row.cost_per_hour = float(got["cost_per_hour"])
        row.cost_per_mtok_output = float(got["cost_per_mtok_output"])
        row.cost_per_mtok_total = float(got["cost_per_mtok_total"])
        row.meets_slo = True
        if c.prefix_caching and traffic.has_prefixes and row.replicas > 1:
            _route_replicas(row, replica, traffic, slo, rate_rps, router, usd, percentile=percentile, seed=seed)
        if row.meets_slo and row.cost_per_hour is not None:
            best_cost = min(best_cost, row.cost_per_hour)
    _narrow_ties([r for r in rows.values() if r.meets_slo], answers, traffic.has_prefixes)
    ranked = sorted(rows.values(), key=_rank)
    best = ranked[0] if ranked and ranked[0].meets_slo else None
    for row in ranked:
        if row.meets_slo and row is not best and best is not None and row.cost_per_hour is not None:
            row.reason = _why_not_best(row, best)
    if best is None:
        notes.append("no candidate meets the SLOs: relax them, add GPU types or TP degrees")
    what_ifs = {}
    if best is not None:
        assert best.cost_per_hour is not None and best.replicas is not None and best.price_per_gpu_hour is not None
        deployment = Deployment(
            best.gpu,
            best.tp,
            best.kv_dtype,
            best.kv_pool_tokens,
            best.replicas,
            best.cost_per_hour,
            best.price_per_gpu_hour,
            dtype,
        )
        what_ifs = best_what_ifs(g, deployment, traffic, rate_rps, slo, calibration=calibration, host=host)
    used = {c.gpu for c in candidates}
    return Plan(
        model=g.name,
        rate_rps=rate_rps,
        slo=dict(slo),
        percentile=percentile,
        traffic=traffic.source,
        mean_prompt_toks=traffic.mean_prompt_toks,
        mean_gen_toks=traffic.mean_gen_toks,
        best=best,
        candidates=ranked,
        elapsed_s=time.perf_counter() - started,
        searched=searched,
        notes=notes,
        prices={n: asdict(p) for n, p in prices.items() if n in used},
        what_ifs=what_ifs,
    )


MAX_EXTRA_REPLICAS = 3


def _narrow_ties(
    meeting: list[CandidateResult], answers: Mapping[tuple[str, int, str, bool], ReplicaCapacity], shared: bool
) -> None:
    """Candidates of equal cost on as many GPUs are ranked by headroom — but a plan's search stops once the
    replica count is decided, so their rates are lower bounds up to 25 % below the top: each tied candidate's
    bracket is bisected on to PRECISION first, so the ranking compares bounds known equally well."""
    groups: dict[tuple[float, int], list[CandidateResult]] = {}
    for row in meeting:
        if row.cost_per_hour is not None:
            groups.setdefault((round(row.cost_per_hour, 6), row.gpus or 0), []).append(row)
    for tied in groups.values():
        if len(tied) < 2:
            continue
        for row in tied:
            cap = answers[(row.gpu, row.tp, row.kv_dtype, row.prefix_caching and shared)]
            cap.refine(PRECISION)
            row.max_rps_per_replica, row.max_rps_bracket, row.probes = cap.max_rps, cap.bracket_rps, cap.probes
            top = cap.at_max
            row.at_max = _at_max(top) if top else None


def _route_replicas(
    row: CandidateResult,
    replica: Replica,
    traffic: Traffic,
    slo: Mapping[str, float],
    rate_rps: float,
    router: str,
    usd: float,
    **kw: Any,
) -> None:
    """Replicas behind ``router`` see their share of each prefix (kvray/capacity/routing.py): serve the busiest
    replica's share of the routed traffic and add replicas (up to MAX_EXTRA_REPLICAS) until it meets the SLOs."""
    assert row.replicas is not None
    for replicas in range(row.replicas, row.replicas + MAX_EXTRA_REPLICAS + 1):
        probe = routed_probe(replica, traffic, slo, rate_rps, replicas, router, **kw)
        row.routing = {
            "policy": router,
            "replicas": replicas,
            "meets_slo": probe.meets_slo,
            "prefix_hit_rate": probe.prefix_hit_rate,
            "window_requests": probe.window_requests,
        }
        if probe.meets_slo:
            if replicas != row.replicas:
                got = costs(rate_rps, rate_rps / replicas, row.tp, usd, traffic.mean_prompt_toks, traffic.mean_gen_toks)
                row.replicas, row.gpus = replicas, replicas * row.tp
                row.cost_per_hour = float(got["cost_per_hour"])
                row.cost_per_mtok_output = float(got["cost_per_mtok_output"])
                row.cost_per_mtok_total = float(got["cost_per_mtok_total"])
            return
    row.meets_slo = False
    row.reason = (
        f"SLO missed behind the {router} router even at {row.replicas + MAX_EXTRA_REPLICAS} replicas "
        f"(a replica sees only its share of each prefix)"
    )


def _row(c: Candidate, price: Price | None, ceiling: float) -> CandidateResult:
    return CandidateResult(
        gpu=c.gpu,
        tp=c.tp,
        kv_dtype=c.kv_dtype,
        prefix_caching=c.prefix_caching,
        replicas=None,
        gpus=None,
        price_per_gpu_hour=price.usd_per_gpu_hour if price else None,
        cost_per_hour=None,
        cost_per_mtok_output=None,
        cost_per_mtok_total=None,
        max_rps_per_replica=None,
        max_rps_ceiling=ceiling,
        meets_slo=False,
        reason="",
        searched=False,
    )


def _floor_cost(rate_rps: float, ceiling: float, tp: int, price: float) -> float:
    return math.inf if ceiling <= 0 else max(1, math.ceil(rate_rps / ceiling - 1e-9)) * tp * price


def _at_max(p: Probe) -> dict[str, Any]:
    return {
        k: getattr(p, k)
        for k in (
            "rate_rps",
            "sent_rps",
            "window_requests",
            "ttft_ms",
            "tpot_ms",
            "itl_ms",
            "e2e_ms",
            "tpot_ms_mean",
            "output_tps",
            "prefix_hit_rate",
        )
    }


def _headroom_rps(row: CandidateResult) -> float:
    """What the deployment serves in all: replicas × the rate one replica sustains within the SLOs."""
    return (row.replicas or 0) * (row.max_rps_per_replica or 0.0)


def _rank(row: CandidateResult) -> tuple[Any, ...]:
    """Meeting the SLOs first: cheapest, then fewer GPUs, then more headroom, then bf16 KV (no accuracy risk);
    then the rest, searched ones first."""
    if row.meets_slo and row.cost_per_hour is not None:
        return (
            0,
            round(row.cost_per_hour, 6),
            row.gpus or 0,
            -round(_headroom_rps(row), 6),
            row.kv_dtype != "bf16",
            row.gpu,
            row.tp,
            row.prefix_caching,
        )
    return (1, 0 if row.searched else 1, row.gpu, row.tp, row.kv_dtype, row.prefix_caching)


def _why_not_best(row: CandidateResult, best: CandidateResult) -> str:
    assert row.cost_per_hour is not None and best.cost_per_hour is not None
    if row.cost_per_hour > best.cost_per_hour + 1e-9:
        extra = (row.cost_per_hour / best.cost_per_hour - 1) * 100
        return f"more expensive (${row.cost_per_hour:.2f}/h, +{extra:.0f} % over the best)"
    if (row.gpus or 0) > (best.gpus or 0):
        return f"as cheap as the best, on more GPUs ({row.gpus} vs {best.gpus})"
    mine, theirs = _headroom_span(row), _headroom_span(best)
    if mine[0] < theirs[0] - 1e-9:
        known = f"{_span(mine)} vs {_span(theirs)} req/s in all, each bracket within {PRECISION:.0%}"
        if mine[1] is not None and mine[1] > theirs[0]:  # the brackets overlap: not shown to be less
            return f"as cheap as the best; headroom alike within the search's precision ({known}): ranked after it"
        return f"as cheap as the best, less headroom ({known})"
    return "as cheap as the best (a tie, ranked after it)"


def _headroom_span(row: CandidateResult) -> tuple[float, float | None]:
    """The deployment's headroom as its search knows it: replicas × (highest passing, lowest failing) rate."""
    n = row.replicas or 0
    top = row.max_rps_bracket[1] if row.max_rps_bracket else None
    return _headroom_rps(row), None if top is None else n * top


def _span(span: tuple[float, float | None]) -> str:
    return f"≥ {span[0]:.3g}" if span[1] is None else f"{span[0]:.3g}–{span[1]:.3g}"
