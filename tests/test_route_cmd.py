"""``kvray route`` without a server: bad input is one line and exit 2 before any replica starts, and the pieces
its measurement is judged by — which requests should miss, the load's order — worked by hand. The measured run
itself (two vLLM CPU replicas) is tests/test_router_vllm.py, vllm tier."""

from __future__ import annotations

import pytest
from cli_calls import kvray

from kvray.capacity.replicas import expected_misses, ttft_differences
from kvray.capacity.routing import predict_routed_hits
from kvray.plan.reuse import shared_prefix_workload
from kvray.runner.routed import VLLMReplicas


@pytest.fixture
def no_replica_starts(monkeypatch):
    def refuse(self):
        raise AssertionError("a vLLM replica was started")

    monkeypatch.setattr(VLLMReplicas, "__enter__", refuse)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--replicas", "0"), "--replicas must be at least 1"),
        (("--policies", "round_robin", "sticky"), "unknown routing policy 'sticky'"),
        (("--policies", "round_robin,round_robin"), "a policy given twice"),
        (("--vllm-python", "/no/such/python"), "is not an executable file"),
        (("--replicas", "64"), "64 vLLM replicas need at least 64 CPUs"),
        (("--cpu-binds", "0"), "2 replicas need 2 '|'-separated CPU lists"),
        (("--order", "random"), "--order must be one of grouped, interleaved"),
        (("--groups", "9", "--per-group", "0"), "--per-group must be a positive integer"),
        (("--prefix-toks", "0"), "prefix_toks must be a positive integer"),
        (("--block-size", "0"), "--block-size must be positive"),
        (("--dtype", "int3"), "unknown dtype 'int3'"),
    ],
    ids=lambda a: a[0] if isinstance(a, tuple) else "",
)
def test_bad_input_is_one_line_and_exit_2_before_any_replica(args, says, capsys, no_replica_starts):
    one = () if {"--replicas", "--cpu-binds"} & set(args) else ("--replicas", "1")  # any host has one CPU
    assert kvray("route", *one, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvray: error: ") and says in err and err.count("\n") == 1, err


def test_an_unwritable_output_is_refused_before_any_replica(tmp_path, capsys, no_replica_starts):
    blocker = tmp_path / "file"
    blocker.write_text("")
    python = "/bin/true"  # an executable: the output check is what must stop it
    assert kvray("route", "--replicas", "1", "--vllm-python", python, "--output", str(blocker / "out")) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_grouped_and_interleaved_loads_route_as_worked_by_hand():
    grouped = shared_prefix_workload(16, 4, 256, 32, 4, grouped=True, one_at_a_time=True).requests
    assert [r.prefix_group for r in grouped] == [g for g in range(4) for _ in range(4)]
    assert [r.after for r in grouped] == [None, *range(15)]  # each sent when the one before ends
    # round-robin over 2 replicas alternates inside a group: each replica's first of each group misses
    assert expected_misses(grouped, "round_robin", 2) == {0, 1, 4, 5, 8, 9, 12, 13}
    assert len(expected_misses(grouped, "prefix_affinity", 2)) == 4  # each prefix once in all
    # interleaved (group i % 4): round-robin sends group g to replica g % 2 every time, as affinity would
    interleaved = shared_prefix_workload(16, 4, 256, 32, 4, one_at_a_time=True).requests
    assert expected_misses(interleaved, "round_robin", 2) == {0, 1, 2, 3}
    assert predict_routed_hits(interleaved, "round_robin", 2, 32).hit_rate == pytest.approx(3 / 4 * 256 / 288)


def test_the_ttft_difference_is_against_round_robin_when_measured():
    results = {"prefix_affinity": {"ttft_ms_p50": 40.0}, "round_robin": {"ttft_ms_p50": 70.0}}
    assert ttft_differences(results) == ("round_robin", {"prefix_affinity": -30.0, "round_robin": 0.0})
    assert ttft_differences({"least_loaded": {"ttft_ms_p50": 50.0}}) == ("least_loaded", {"least_loaded": 0.0})


def _result(p50: float, hit_rate: float) -> dict:
    return {
        "requests_sent": 64,
        "requests_ok": 64,
        "forwarded_per_replica": [32, 32],
        "hit_rate_measured": hit_rate,
        "hit_rate_predicted": hit_rate,
        "ttft_ms_p50": p50,
        "ttft_ms_p90": 2 * p50,
        "n_ttft": 64,
        "ttft_ms_p50_expected_hits": p50 - 5,
        "n_expected_hits": 56,
        "ttft_ms_p50_expected_misses": p50 + 40,
        "n_expected_misses": 8,
    }


def test_the_table_gives_each_policy_and_the_ttft_difference(capsys):
    from kvray.cli.route_cmd import show

    record = {
        "model": "kvray/tiny-llama",
        "replicas": 2,
        "block_size": 32,
        "workload": {"groups": 8, "requests": 64},
        "policies": {"round_robin": _result(70.0, 0.667), "prefix_affinity": _result(40.0, 0.778)},
        "ttft_baseline": "round_robin",
        "ttft_p50_difference_ms": {"round_robin": 0.0, "prefix_affinity": -30.0},
    }
    show(record)
    out = capsys.readouterr().out
    assert "prefix_affinity" in out and "0.778" in out and "32 / 32" in out
    # by hand: 30 ms less than round-robin's 70 ms is 43 % less
    assert "TTFT p50 prefix_affinity − round_robin: -30.0 ms (-43% of round_robin's 70.0 ms)" in out
    record["policies"]["least_loaded"] = {"error": "ConnectionRefusedError: [Errno 111] Connection refused"}
    show(record)
    assert "error: ConnectionRefusedError" in capsys.readouterr().out
