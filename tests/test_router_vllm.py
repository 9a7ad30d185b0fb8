"""Two vLLM CPU replicas behind kvray's router: each policy's measured prefix-cache hit rate equals its prediction
(kvray/capacity/routing.py) within 2 points, and prefix affinity hits more than round-robin. The measurement is
benchmarks/router_hit_rate.py's, on a smaller load: 4 prefixes × 4 requests, sent group by group."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "router_hit_rate.py"


def test_each_policys_measured_hit_rate_is_its_prediction():
    spec = importlib.util.spec_from_file_location("router_hit_rate", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    got = bench.measure(
        bench.requests(groups=4, per_group=4, prefix=256, suffix=32, gen=4),
        ("round_robin", "prefix_affinity"),
        log=False,
    )
    for policy, r in got.items():
        assert r["requests_ok"] == 16, policy
        assert abs(r["hit_rate_measured"] - r["hit_rate_predicted"]) <= 0.02, (policy, r)
    # by hand: 256 of 288 prompt tokens shared; affinity 3 of 4 requests hit, round-robin 2 of 4
    assert got["prefix_affinity"]["hit_rate_predicted"] == pytest.approx(3 / 4 * 256 / 288)
    assert got["round_robin"]["hit_rate_predicted"] == pytest.approx(2 / 4 * 256 / 288)
    assert got["prefix_affinity"]["hit_rate_measured"] > got["round_robin"]["hit_rate_measured"]
