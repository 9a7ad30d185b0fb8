"""The synthetic backend emits a known schedule with real sleeps; the metric code must recover it.

Tolerances are absolute and generous enough for a loaded 2-core machine: a sleep can only overshoot,
so every measured latency sits at or above its injected value and within a few tens of ms of it.
"""

import pytest

from kvray.backends import get_backend
from kvray.runner.run import run_cell
from kvray.spec import Cell, RequestSpec, Workload, make_options

SLACK_S = 0.04  # scheduling slack a busy 2-core machine may add to one sleep


def cell(workload, warmup=0, repeats=1, **options):
    return Cell(
        model="kvray/tiny-llama",
        backend="synthetic",
        workload=workload,
        warmup=warmup,
        repeats=repeats,
        options=make_options(**options),
    )


@pytest.fixture(scope="module")
def backend():
    return get_backend("synthetic")


def test_recovers_injected_ttft_tpot_itl_with_chunks(backend):
    ttft, tpot = 0.06, 0.02
    r = run_cell(backend, cell(Workload.uniform(3, 32, 7), ttft_s=ttft, tpot_s=tpot, chunk_toks=3))
    assert r.status == "ok", r.reason
    m = r.metrics
    assert ttft - 0.002 <= m["ttft_s_p50"] <= ttft + SLACK_S
    assert m["tpot_s_p50"] == pytest.approx(tpot, abs=SLACK_S / 6)  # one sleep's error spread over 6 gaps
    assert m["itl_s_p50"] == pytest.approx(tpot, abs=SLACK_S / 3)  # a 3-token chunk splits its gap in three
    assert m["queue_s_max"] < SLACK_S  # unlimited slots: nobody waits
    for t in r.traces:
        assert t.output_toks == 7 and len(t.token_times_s) == 7
        assert len(set(t.token_times_s)) == 3  # first token, then two chunks of 3
        assert t.token_times_s == sorted(t.token_times_s)


def test_queueing_shows_in_ttft_and_queue(backend):
    ttft, tpot, gen = 0.03, 0.01, 3
    service = ttft + (gen - 1) * tpot
    r = run_cell(backend, cell(Workload.uniform(3, 8, gen), ttft_s=ttft, tpot_s=tpot, max_batch=1))
    assert r.status == "ok", r.reason
    traces = sorted(r.traces, key=lambda t: t.start_s)
    for i, t in enumerate(traces):
        queue = t.start_s - t.arrival_s
        assert i * service - 0.002 <= queue <= i * service + (i + 1) * SLACK_S
        assert t.token_times_s[0] - t.arrival_s == pytest.approx(queue + ttft, abs=SLACK_S)
    for prev, nxt in zip(traces, traces[1:], strict=False):
        assert nxt.start_s >= prev.end_s  # one slot: served strictly one after another
    assert r.metrics["queue_s_max"] >= 2 * service - 0.002
    assert r.metrics["ttft_s_max"] >= 2 * service + ttft - 0.002


def test_arrival_offsets_are_honoured(backend):
    wl = Workload("uniform", tuple(RequestSpec(i, 8, 2, arrival_s=0.05 * i) for i in range(3)))
    r = run_cell(backend, cell(wl, ttft_s=0.01, tpot_s=0.01))
    for t in r.traces:
        assert t.start_s >= t.arrival_s - 0.002
        assert t.start_s - t.arrival_s < SLACK_S


def test_warmup_excluded_and_repeats_pooled(backend):
    r = run_cell(backend, cell(Workload.uniform(2, 8, 3), warmup=2, repeats=3, ttft_s=0.01, tpot_s=0.005))
    assert r.status == "ok"
    assert sorted({t.repeat for t in r.traces}) == [0, 1, 2]
    assert r.metrics["requests"] == 6 and r.metrics["output_toks_total"] == 18
    expected_tps = 2 * 3 / (0.01 + 2 * 0.005)
    assert 0.4 * expected_tps < r.metrics["output_tps"] <= expected_tps * 1.05


def test_injected_failures_become_statuses(backend):
    wl = Workload.uniform(4, 100, 10)
    oom = run_cell(backend, cell(wl, oom_above_tokens=4 * 110 - 1))
    assert oom.status == "oom" and "4 requests × 110 tokens" in oom.reason and not oom.traces
    assert run_cell(backend, cell(wl, oom_above_tokens=4 * 110, ttft_s=0, tpot_s=0)).status == "ok"
    err = run_cell(backend, cell(wl, fail="error"))
    assert err.status == "error" and "injected failure" in err.reason
