"""Two vLLM CPU replicas behind kvray's router, through ``kvray route``: each policy's measured prefix-cache hit rate
equals its prediction (kvray/capacity/routing.py) within 2 points, and prefix affinity hits more than round-robin.
The measurement is benchmarks/router_hit_rate.py's (kvray/capacity/replicas.py), on a smaller load: 4 prefixes × 4
requests, sent group by group."""

from __future__ import annotations

import json

import pytest
from servers_fixtures import vllm_python

from kvray.cli import main

pytestmark = pytest.mark.vllm


def test_each_policys_measured_hit_rate_is_its_prediction(tmp_path, capsys):
    args = ["route", "--replicas", "2", "--policies", "round_robin", "prefix_affinity", "--groups", "4"]
    args += ["--per-group", "4", "--prefix-toks", "256", "--suffix-toks", "32", "--gen-toks", "4"]
    args += ["--vllm-python", vllm_python(), "--json", "--output", str(tmp_path / "route")]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    record = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "route" / "route.json").read_text()) == record  # written as it arrived
    got = record["policies"]
    assert list(got) == ["round_robin", "prefix_affinity"]
    for policy, r in got.items():
        assert r["requests_ok"] == 16 and r["n_ttft"] == 16, policy
        assert sum(r["forwarded_per_replica"]) == 16, policy
        assert abs(r["hit_rate_measured"] - r["hit_rate_predicted"]) <= 0.02, (policy, r)
    # by hand: 256 of 288 prompt tokens shared; affinity 3 of 4 requests hit, round-robin 2 of 4
    assert got["prefix_affinity"]["hit_rate_predicted"] == pytest.approx(3 / 4 * 256 / 288)
    assert got["round_robin"]["hit_rate_predicted"] == pytest.approx(2 / 4 * 256 / 288)
    assert got["prefix_affinity"]["hit_rate_measured"] > got["round_robin"]["hit_rate_measured"]
    # affinity: each prefix computed once in all (4 misses); round-robin: once per replica (8)
    assert (got["prefix_affinity"]["n_expected_misses"], got["round_robin"]["n_expected_misses"]) == (4, 8)
    diff = record["ttft_p50_difference_ms"]["prefix_affinity"]
    assert record["ttft_baseline"] == "round_robin"
    assert diff == pytest.approx(got["prefix_affinity"]["ttft_ms_p50"] - got["round_robin"]["ttft_ms_p50"])
