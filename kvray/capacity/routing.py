"""Each routing policy's prefix-cache hit rate, predicted from the workload: route the requests as the router
(kvray/servers/router.py) would, then replay each replica's share through the ideal block prefix cache of
kvray/sim/reuse.py (vLLM's rule: full blocks, a hit stops at prompt − 1, nothing evicted).

Requests are taken in id order, one at a time, as a sequential client sends them: ``least_loaded`` then always
sees empty replicas and rotates, as ``round_robin`` does. ``prefix_affinity`` hashes the prompt's leading text;
here a group's label stands for it — a group lands on one replica either way, and with nothing evicted which
replica does not change the hit rate. Worked: 8 groups × 8 requests sent group by group to 2 replicas — prefix
affinity misses each prefix once (7 of 8 requests hit it), round-robin alternates inside a group and misses it once
per replica (6 of 8 hit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvray.servers.router import POLICIES, Policy
from kvray.sim.reuse import ReuseRequest, predict_hits


def route(requests: Sequence[ReuseRequest], policy: str, replicas: int) -> list[list[ReuseRequest]]:
    """Each replica's requests under ``policy`` (module docstring), in id order."""
    chooser = Policy(policy, replicas)
    out: list[list[ReuseRequest]] = [[] for _ in range(replicas)]
    for r in sorted(requests, key=lambda r: r.id):
        group = getattr(r, "prefix_group", None)
        i = chooser.pick(f"group {group}" if group is not None else f"request {r.id}")
        chooser.done(i)
        out[i].append(r)
    return out


@dataclass
class RoutedReuse:
    policy: str
    replicas: int
    hit_tokens: int
    prompt_tokens: int
    hit_rate: float  # hit tokens / prompt tokens: vLLM's prefix_cache_hits / prefix_cache_queries over all replicas
    requests_per_replica: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def predict_routed_hits(
    requests: Sequence[ReuseRequest], policy: str, replicas: int, block_size: int = 16
) -> RoutedReuse:
    """The hit rate ``requests`` should see through ``policy`` over ``replicas`` replicas (module docstring)."""
    shares = route(requests, policy, replicas)
    hits = sum(sum(predict_hits(share, block_size).values()) for share in shares if share)
    prompt = sum(r.prompt_toks for r in requests)
    return RoutedReuse(policy, replicas, hits, prompt, hits / prompt if prompt else 0.0, [len(s) for s in shares])


def predict_every_policy(requests: Sequence[ReuseRequest], replicas: int, block_size: int = 16) -> dict[str, float]:
    """{policy: predicted hit rate} for every policy the router has."""
    return {p: predict_routed_hits(requests, p, replicas, block_size).hit_rate for p in POLICIES}
