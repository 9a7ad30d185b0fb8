"""kvray's router in front of two real HTTP servers on 127.0.0.1, and each policy's predicted hit rate by hand."""

from __future__ import annotations

import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvray.capacity.routing import predict_every_policy, predict_routed_hits
from kvray.errors import KvrayInputError
from kvray.servers.router import Policy, Router
from kvray.spec import RequestSpec


@pytest.fixture
def replicas():
    """Two servers that answer with their own name and the prompt they got, streamed in two chunks."""
    servers = []
    for name in ("r0", "r1"):

        class Handler(BaseHTTPRequestHandler):
            me = name

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for part in (self.me, body["prompt"]):
                    self.wfile.write(f"data: {part}\n\n".encode())
                    self.wfile.flush()

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


def send(url: str, prompt: str) -> str:
    req = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps({"prompt": prompt}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        lines = [ln for ln in resp.read().decode().splitlines() if ln.startswith("data: ")]
    assert lines[1] == f"data: {prompt}"  # forwarded unchanged, streamed back whole
    return lines[0].removeprefix("data: ")


def test_round_robin_alternates_and_affinity_keeps_a_prefix_on_one_replica(replicas):
    prompts = [f"shared prefix {g} " * 20 + f"question {i}" for g in range(4) for i in range(4)]
    with Router(replicas, "round_robin") as router:
        got = [send(router.url, p) for p in prompts]
    assert got == ["r0", "r1"] * 8 and router.counts == [8, 8]
    with Router(replicas, "prefix_affinity", prefix_chars=100) as router:
        got = [send(router.url, p) for p in prompts]
    by_group = [set(got[g * 4 : g * 4 + 4]) for g in range(4)]
    assert all(len(s) == 1 for s in by_group)  # each prefix on one replica
    with Router(replicas, "least_loaded") as router:  # one at a time: nothing in flight, ties rotate
        got = [send(router.url, p) for p in prompts[:4]]
    assert got == ["r0", "r1", "r0", "r1"]


def test_least_loaded_avoids_the_busy_replica():
    policy = Policy("least_loaded", 2)
    first = policy.pick("a")
    assert policy.pick("b") != first  # the other one is idle
    assert policy.in_flight == [1, 1]
    policy.done(first)
    assert policy.pick("c") == first
    with pytest.raises(KvrayInputError, match="unknown routing policy"):
        Policy("random", 2)


def test_each_policys_hit_rate_by_hand():
    """8 prefixes × 8 requests sent group by group to 2 replicas, prompts 512 shared + 64 own tokens, blocks of 32:
    prefix affinity computes each prefix once — 7 of 8 requests hit its 512 tokens: 7/8 × 512/576 = 0.778 —;
    round-robin alternates inside a group, so each replica computes it once — 6 of 8: 6/8 × 512/576 = 0.667."""
    reqs = [RequestSpec(i, 576, 8, 0.0, prefix_group=i // 8, shared_prefix_toks=512) for i in range(64)]
    rates = predict_every_policy(reqs, 2, block_size=32)
    assert rates["prefix_affinity"] == pytest.approx(7 / 8 * 512 / 576)
    assert rates["round_robin"] == pytest.approx(6 / 8 * 512 / 576)
    assert rates["least_loaded"] == rates["round_robin"]
    one = predict_routed_hits(reqs, "round_robin", 1, 32)
    assert one.hit_rate == pytest.approx(7 / 8 * 512 / 576) and one.requests_per_replica == [64]


def test_a_replica_behind_round_robin_computes_every_prefix_once():
    """The planner's routed check (kvray/capacity/search.routed_probe) on the simulator: 400 requests in 16 prefix
    groups (512 shared + 64 own tokens) over 4 replicas. Round-robin gives a replica 100 requests of all 16 groups:
    16 misses, (100 − 16)/100 × 512/576 = 0.747 of its prompt tokens hit; prefix affinity gives it whole groups, so
    its share hits more."""
    from kvray.capacity.search import Replica, routed_probe
    from kvray.capacity.traffic import traffic_from_flags
    from kvray.hardware.gpus import get_gpu
    from kvray.model.resolve import resolve_geometry
    from kvray.sim.serving import EngineConfig

    g, gpu = resolve_geometry("facebook/opt-125m"), get_gpu("L4")
    traffic = traffic_from_flags(64, 4, groups=16, prefix_toks=512)
    replica = Replica(g, gpu, cfg=EngineConfig(prefix_caching=True))
    rr = routed_probe(replica, traffic, {"ttft_ms": 1000}, 20.0, 4, "round_robin", min_requests=100)
    affinity = routed_probe(replica, traffic, {"ttft_ms": 1000}, 20.0, 4, "prefix_affinity", min_requests=100)
    assert rr.prefix_hit_rate == pytest.approx((100 - 16) / 100 * 512 / 576)
    assert affinity.prefix_hit_rate > rr.prefix_hit_rate and rr.meets_slo and affinity.meets_slo
