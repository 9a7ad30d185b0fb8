"""Replicas behind a router, measured against the prediction: N vLLM replicas and kvray's router
(kvray/runner/routed.py), the same load through each policy, each policy's measured prefix-cache hit rate set
against what kvray/capacity/routing.py predicts for it, and the TTFT each policy buys.

Measured hit rate = the growth of ``vllm:prefix_cache_hits`` over ``vllm:prefix_cache_queries`` summed over the
replicas' own /metrics during the policy's run (tokens). TTFT is the client's (request sent → first streamed
token through the router), over the run's ok requests, with its sample count; it is also split by what the
prediction's routing says each request should do: the first request of a prefix on a replica should miss, every
later one should hit — so the split shows the prefill the cache saved, apart from the machine's noise. The TTFT
difference is each policy's p50 less the baseline's (round-robin when measured, else the first policy).

``kvray route`` (kvray/cli/route_cmd.py) and benchmarks/router_hit_rate.py call ``measure_routing``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from kvray.capacity.routing import predict_routed_hits, route
from kvray.errors import KvrayInputError
from kvray.runner.routed import PolicyRun, ReplicaSettings, VLLMReplicas
from kvray.servers.router import DEFAULT_PREFIX_CHARS, POLICIES
from kvray.spec import RequestSpec

BASELINE = "round_robin"


def check_policies(policies: Sequence[str]) -> None:
    """At least one policy, each one the router has: one line otherwise, before any replica starts."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise KvrayInputError(
            f"unknown routing policy {', '.join(map(repr, unknown)) or '(none given)'} (known: {', '.join(POLICIES)})"
        )
    if len(set(policies)) != len(policies):
        raise KvrayInputError(f"a policy given twice: {', '.join(policies)}")


def expected_misses(requests: Sequence[RequestSpec], policy: str, replicas: int) -> set[int]:
    """Ids of the requests that should miss: the first of each prefix group on the replica the prediction routes
    it to (kvray/capacity/routing.py); every other request should hit its group's prefix."""
    return {
        next(r.id for r in share if r.prefix_group == g)
        for share in route(requests, policy, replicas)
        for g in {r.prefix_group for r in share}
    }


def _p50(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _p90(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=10)[-1]


def policy_result(run: PolicyRun, requests: Sequence[RequestSpec], replicas: int, block_size: int) -> dict[str, Any]:
    """One policy's measured numbers beside its prediction (module docstring: where each comes from)."""
    predicted = predict_routed_hits(requests, run.policy, replicas, block_size)
    misses = expected_misses(requests, run.policy, replicas)
    ttft = list(run.ttft_ms.values())
    hit_ttft = [v for k, v in run.ttft_ms.items() if k not in misses]
    miss_ttft = [v for k, v in run.ttft_ms.items() if k in misses]
    return {
        "requests_sent": run.requests_sent,
        "requests_ok": run.requests_ok,
        "forwarded_per_replica": run.forwarded_per_replica,  # the router's count
        "hit_rate_measured": run.hits / run.queries if run.queries else None,
        "hits": run.hits,  # tokens, summed over the replicas' /metrics
        "queries": run.queries,
        "prefix_cache_per_replica": run.prefix_cache,  # each replica's counter growth, in replica order
        "hit_rate_predicted": predicted.hit_rate,
        # prefix affinity: the prediction knows a group stays on one replica, not which (the prompt's hash): None
        "requests_per_replica_predicted": None if run.policy == "prefix_affinity" else predicted.requests_per_replica,
        "ttft_ms_p50": _p50(ttft),  # client clock, over n_ttft ok requests
        "ttft_ms_p90": _p90(ttft),
        "n_ttft": len(ttft),
        "ttft_ms_p50_expected_hits": _p50(hit_ttft),
        "ttft_ms_p50_expected_misses": _p50(miss_ttft),
        "n_expected_hits": len(hit_ttft),
        "n_expected_misses": len(miss_ttft),
        "wall_s": run.wall_s,
    }


def ttft_differences(results: dict[str, dict[str, Any]]) -> tuple[str | None, dict[str, float | None]]:
    """(the baseline policy, each policy's TTFT p50 less the baseline's, ms); negative: faster than it."""
    measured = {p: r["ttft_ms_p50"] for p, r in results.items() if r.get("ttft_ms_p50") is not None}
    if not measured:
        return None, {}
    baseline = BASELINE if BASELINE in measured else next(iter(measured))
    return baseline, {p: v - measured[baseline] for p, v in measured.items()}


def describe_requests(requests: Sequence[RequestSpec]) -> dict[str, Any]:
    """The load as a reader needs it to redo the prediction by hand."""
    groups = sorted({r.prefix_group for r in requests if r.prefix_group is not None})
    return {
        "requests": len(requests),
        "groups": len(groups),
        "prompt_toks": sorted({r.prompt_toks for r in requests}),
        "shared_prefix_toks": sorted({r.shared_prefix_toks for r in requests}),
        "gen_toks": sorted({r.gen_toks for r in requests}),
        "one_at_a_time": all(r.after == r.id - 1 for r in requests[1:]),
    }


def measure_routing(
    settings: ReplicaSettings,
    requests: Sequence[RequestSpec],
    policies: Sequence[str] = POLICIES,
    *,
    prefix_chars: int = DEFAULT_PREFIX_CHARS,
    log: Callable[[str], None] | None = None,
    on_policy: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Start ``settings.replicas`` vLLM replicas, send ``requests`` through the router once per policy (each its own
    repeat: cold caches), stop them; the record: the setup, each policy's result, the TTFT differences.

    ``on_policy`` gets the record so far after each policy, so a caller can write it as results arrive. A replica
    that stops answering ends the run: that policy's entry is its ``error``, ``stopped`` says where, and the
    policies measured before it are kept."""
    check_policies(policies)
    if not requests:
        raise KvrayInputError("no requests to send through the router")
    settings.check()
    record: dict[str, Any] = {
        "model": settings.model,
        "replicas": settings.replicas,
        "dtype": settings.dtype,
        "block_size": settings.block_size,
        "cpu_binds": settings.binds(),
        "vllm_args": settings.extra_args,
        "prefix_chars": prefix_chars,
        "workload": describe_requests(requests),
        "ttft_clock": "client: request sent to first streamed token, through the router",
        "hit_counts_from": "growth of each replica's vllm:prefix_cache_hits / _queries (/metrics) over the run",
        "policies": {},
    }
    with VLLMReplicas(settings, log) as replicas:
        record["replica_startup_s"] = replicas.startup_s
        for repeat, policy in enumerate(policies):
            try:
                run = replicas.run(policy, requests, repeat, prefix_chars)
            except OSError as exc:  # a replica stopped answering (its /metrics): keep what the others measured
                record["policies"][policy] = {"error": f"{type(exc).__name__}: {exc}"}
                record["stopped"] = f"during {policy}: {exc}"
                if on_policy is not None:
                    on_policy(record)
                break
            record["policies"][policy] = policy_result(run, requests, settings.replicas, settings.block_size)
            record["ttft_baseline"], record["ttft_p50_difference_ms"] = ttft_differences(record["policies"])
            if on_policy is not None:
                on_policy(record)
    return record
