"""Contract test of the Ollama backend: no Ollama server is part of the test environment, so a local server
(servers_fixtures.OllamaContractServer) replays the response shapes Ollama documents for /api/generate and
/api/ps, on a known schedule — the backend's counts, timings and errors are checked against that schedule."""

from __future__ import annotations

import pytest
from servers_fixtures import OllamaContractServer

from kvray.backends.ollama import OllamaBackend
from kvray.runner.run import run_cell
from kvray.spec import Cell, Workload, make_options

MODEL = "llama3.2:1b"


@pytest.fixture(scope="module")
def backend():
    b = OllamaBackend()
    yield b
    b.close()


def ollama_cell(host, workload, **options):
    return Cell(
        model=MODEL,
        workload=workload,
        backend="ollama",
        warmup=0,
        repeats=1,
        options=make_options(host=host, **options),
    )


def test_counts_and_timings_follow_ollamas_own_fields(backend):
    with OllamaContractServer(MODEL, prefill_s=0.08, token_s=0.02) as server:
        result = run_cell(backend, ollama_cell(server.url, Workload.uniform(3, 12, 6), num_ctx=2048))
        sent = server.requests
    assert result.status == "ok", result.reason
    for t in result.traces:
        assert (t.prompt_toks, t.output_toks, len(t.token_times_s)) == (12, 6, 6)  # prompt_eval_count, eval_count
    m = result.metrics
    assert 0.08 <= m["ttft_s_p50"] < 0.5  # the schedule's prefill, plus HTTP
    assert 0.015 < m["itl_s_p50"] < 0.08  # one token every 20 ms
    assert all(b["options"]["num_ctx"] == 2048 and b["options"]["num_predict"] == 6 and b["raw"] for b in sent)
    assert result.extra["kv_context_tokens"] == 2048
    timings = result.extra["ollama_requests"]
    assert len(timings) == 3
    for timing in timings:
        assert timing["eval_count"] == 6 and timing["prompt_eval_count"] == 12
        assert 0.08 <= timing["prompt_eval_duration_s"] < 0.5  # nanoseconds turned into seconds
        assert 0.09 <= timing["eval_duration_s"] < 0.6  # five 20 ms gaps
        assert timing["total_duration_s"] <= timing["client_e2e_s"] + 0.05
    assert result.memory["server_vram_bytes"] == 5137025024 and result.extra["ollama_ps"]["context_length"] == 4096


def test_waiting_for_a_parallel_slot_shows_as_queue_time(backend):
    with OllamaContractServer(MODEL, prefill_s=0.05, token_s=0.01, parallel=1) as server:
        result = run_cell(backend, ollama_cell(server.url, Workload.uniform(3, 8, 5)))
    assert result.status == "ok", result.reason
    queues = sorted(t.start_s - t.arrival_s for t in result.traces)
    # one slot: each request waits for the ones before it (about 0.09 s each)
    assert queues[0] < 0.05 and queues[1] > 0.06 and queues[2] > 0.14


def test_early_stops_are_kept_with_their_real_counts_or_refused_on_request(backend):
    with OllamaContractServer(MODEL, stop_after=3) as server:
        kept = run_cell(backend, ollama_cell(server.url, Workload.uniform(2, 8, 6)))
        strict = run_cell(backend, ollama_cell(server.url, Workload.uniform(2, 8, 6), allow_short_output=False))
    assert kept.status == "ok" and [t.output_toks for t in kept.traces] == [3, 3]
    assert kept.extra["ollama_requests"][0]["done_reason"] == "stop"
    assert strict.status == "error" and all("returned 3 of 6 tokens" in t.error for t in strict.traces)


def test_unknown_model_and_unreachable_server_are_recorded_errors(backend):
    with OllamaContractServer("another:7b") as server:
        missing = run_cell(backend, ollama_cell(server.url, Workload.uniform(1, 8, 4)))
    assert missing.status == "error"
    assert missing.traces[0].error == f"HTTP 404: model '{MODEL}' not found, try pulling it first"
    gone = run_cell(backend, ollama_cell(server.url, Workload.uniform(1, 8, 4)))  # the server has stopped
    assert gone.status == "error" and gone.traces[0].error.startswith("connection refused")


def test_a_host_is_required(backend):
    result = run_cell(backend, Cell(model=MODEL, workload=Workload.uniform(1, 8, 4), backend="ollama", warmup=0))
    assert result.status == "error" and "--host" in (result.reason or "")
