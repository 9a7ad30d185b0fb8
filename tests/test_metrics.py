"""The metric definitions on hand-built traces whose answers are known by construction."""

import math

import numpy as np
import pytest

from kvray.measure.metrics import describe, itl_gaps, request_metrics, summarize, throughput
from kvray.measure.trace import RunTrace


def trace(rid=0, repeat=0, arrival=0.0, start=0.0, tokens=(1.0, 1.5, 2.0), prompt=10, status="ok"):
    tokens = list(tokens)
    return RunTrace(rid, repeat, arrival, start, tokens, tokens[-1] if tokens else start, prompt, len(tokens), status)


def test_ttft_includes_queue_and_queue_is_separate():
    m = request_metrics(trace(arrival=1.0, start=3.0, tokens=(4.0, 4.5, 5.0, 5.5)))
    assert m["queue_s"] == pytest.approx(2.0)
    assert m["ttft_s"] == pytest.approx(3.0)
    assert m["e2e_s"] == pytest.approx(4.5)
    assert m["tpot_s"] == pytest.approx(0.5)  # (5.5 − 4.0) / (4 − 1)


def test_single_token_has_no_tpot_and_no_gaps():
    m = request_metrics(trace(tokens=(0.7,)))
    assert math.isnan(m["tpot_s"]) and m["ttft_s"] == pytest.approx(0.7)
    assert itl_gaps([0.7]) == []


def test_chunk_of_k_tokens_contributes_k_gaps():
    # first chunk 2 tokens at 1.0, then a 3-token chunk at 1.6, then 1 token at 1.8
    times = [1.0, 1.0, 1.6, 1.6, 1.6, 1.8]
    gaps = itl_gaps(times)
    assert len(gaps) == len(times) - 1
    assert gaps == pytest.approx([0.0, 0.2, 0.2, 0.2, 0.2])
    assert sum(gaps) == pytest.approx(times[-1] - times[0])
    tpot = request_metrics(trace(tokens=times))["tpot_s"]
    assert np.mean(gaps) == pytest.approx(tpot)


def test_describe_uses_numpy_percentiles_and_drops_nan():
    values = [float(v) for v in range(1, 101)] + [float("nan")]
    d = describe(values, "x")
    assert d["x_p50"] == pytest.approx(50.5) and d["x_p99"] == pytest.approx(99.01)
    assert d["x_p90"] == pytest.approx(90.1) and d["x_p95"] == pytest.approx(95.05)
    assert d["x_min"] == 1 and d["x_max"] == 100 and d["x_mean"] == pytest.approx(50.5)
    assert d["x_std"] == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert all(math.isnan(v) for v in describe([], "y").values())


def test_throughput_over_makespan():
    traces = [
        trace(0, arrival=0.0, tokens=(0.5, 1.0, 1.5, 2.0), prompt=10),
        trace(1, arrival=1.0, tokens=(2.0, 3.0, 4.0), prompt=20),
    ]
    t = throughput(traces)
    assert t["makespan_s"] == pytest.approx(4.0)  # last end 4.0 − first arrival 0.0
    assert t["output_tps"] == pytest.approx(7 / 4)
    assert t["total_tps"] == pytest.approx((7 + 30) / 4)
    assert t["rps"] == pytest.approx(2 / 4)


def test_summary_pools_latency_and_averages_throughput_over_repeats():
    rep0 = [trace(0, 0, tokens=(1.0, 2.0)), trace(1, 0, tokens=(1.0, 3.0))]
    rep1 = [trace(0, 1, tokens=(2.0, 4.0)), trace(1, 1, tokens=(1.0, 2.0), status="error")]
    s = summarize(rep0 + rep1)
    assert s["requests"] == 4 and s["requests_ok"] == 3 and s["requests_failed"] == 1
    assert s["ttft_s_max"] == pytest.approx(2.0) and s["ttft_s_min"] == pytest.approx(1.0)
    assert s["tpot_s_mean"] == pytest.approx((1 + 2 + 2) / 3)
    # repeat 0: 4 tokens over 3 s; repeat 1: 2 tokens (failed request excluded) over 4 s
    assert s["output_tps"] == pytest.approx((4 / 3 + 2 / 4) / 2)
    assert s["output_tps_std"] == pytest.approx(np.std([4 / 3, 2 / 4], ddof=1))


def test_every_distribution_carries_its_sample_count_and_the_cell_its_failure_rate():
    """3 ok requests (one with a single token, so no TPOT) and 1 failed: percentiles pool 3 TTFTs, 2 TPOTs."""
    traces = [
        trace(0, tokens=(1.0, 1.5, 2.0)),
        trace(1, tokens=(1.2, 1.4)),
        trace(2, tokens=(1.1,)),
        trace(3, tokens=(0.9, 1.0), status="error"),
    ]
    s = summarize(traces)
    assert (s["requests"], s["requests_ok"], s["requests_failed"]) == (4, 3, 1)
    assert s["failure_rate"] == 0.25
    assert (s["ttft_s_n"], s["e2e_s_n"], s["queue_s_n"]) == (3, 3, 3)
    assert s["tpot_s_n"] == 2  # the one-token request has no TPOT
    assert s["itl_s_n"] == 2 + 1  # gaps: 2 of request 0, 1 of request 1
    assert s["ttft_s_p99"] == pytest.approx(np.percentile([1.0, 1.2, 1.1], 99))  # the failed 0.9 s is not in it


def test_percentile_intervals_and_counts_are_written_and_reproducible():
    """Every percentile carries a 95 % interval; a p99 of 12 values has none (it would be the maximum); the
    interval is seeded, so summarising the same traces twice gives the same numbers."""
    traces = [
        trace(rid=i, repeat=r, tokens=(0.1 + 0.01 * i + 0.003 * r, 0.2 + 0.02 * i)) for r in range(3) for i in range(4)
    ]
    m = summarize(traces)
    assert m["ttft_s_n"] == 12
    for p in (50, 90):
        low, high = m[f"ttft_s_p{p}_ci_low"], m[f"ttft_s_p{p}_ci_high"]
        assert low <= m[f"ttft_s_p{p}"] <= high  # a bootstrap of the median of 12 values brackets it
        assert m["ttft_s_min"] <= low and high <= m["ttft_s_max"]
    assert math.isnan(m["ttft_s_p95_ci_low"]) and math.isnan(m["ttft_s_p99_ci_high"])  # 12 < 20, 12 < 100
    assert summarize(traces) == pytest.approx(m, nan_ok=True)


def test_throughput_interval_is_students_t_over_repeats():
    # Three repeats, one request each of 4 tokens in 1.0, 2.0 and 4.0 s: 4, 2 and 1 tok/s.
    traces = [trace(rid=0, repeat=r, tokens=(0.25 * d, 0.5 * d, 0.75 * d, 1.0 * d)) for r, d in enumerate((1, 2, 4))]
    m = summarize(traces)
    values = [4.0, 2.0, 1.0]
    half = 4.302653 * np.std(values, ddof=1) / math.sqrt(3)  # t(0.975, 2 df) from a printed t table
    assert m["output_tps"] == pytest.approx(7 / 3)
    assert m["output_tps_n"] == 3
    assert m["output_tps_ci_low"] == pytest.approx(7 / 3 - half, rel=1e-5)
    assert m["output_tps_ci_high"] == pytest.approx(7 / 3 + half, rel=1e-5)
    one = summarize(traces[:1])
    assert one["output_tps_n"] == 1 and math.isnan(one["output_tps_ci_low"])  # one repeat: spread unknown
