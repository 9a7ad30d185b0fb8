"""hf-paged: transformers' continuous batching over a paged KV cache, in-process on a tiny Llama (CPU)."""

from __future__ import annotations

import math

import pytest

from kvray.backends.hf_paged import HFPagedBackend
from kvray.model.kvmath import kv_bytes_per_token
from kvray.model.resolve import resolve_geometry
from kvray.runner.run import run_cell
from kvray.spec import Cell, Workload, make_options

MODEL = "kvray/tiny-llama"  # 4 layers × 2 KV heads × 64: 4,096 B per token in fp32


@pytest.fixture(scope="module")
def backend():
    b = HFPagedBackend()
    yield b
    b.close()


def paged_cell(workload, warmup=1, repeats=1, **options):
    return Cell(
        model=MODEL,
        workload=workload,
        backend="hf-paged",
        dtype="fp32",
        device="cpu",
        warmup=warmup,
        repeats=repeats,
        options=make_options(**options),
    )


def test_exact_counts_admission_times_and_paged_kv_that_matches_the_prediction(backend):
    # arrivals 2 ms apart: all four are in before the first has its 12 tokens on any CPU, so the measured peak holds
    # the four of them (at 20 ms a quiet machine finished the first before the last arrived: a 4-block peak)
    cell = paged_cell(Workload.uniform(4, 40, 12, arrival_gap_s=0.002), repeats=2, block_size=32)
    result = run_cell(backend, cell)
    assert result.status == "ok", result.reason
    assert len(result.traces) == 8
    for t in result.traces:
        assert (t.prompt_toks, t.output_toks, len(t.token_times_s)) == (40, 12, 12)
        assert t.arrival_s <= t.start_s <= t.token_times_s[0] <= t.end_s  # admitted after it arrived
        assert t.token_times_s == sorted(t.token_times_s)
    info = result.extra["paged_cache"]
    per_token = kv_bytes_per_token(resolve_geometry(MODEL), "fp32", "paged")
    assert info["block_size"] == 32 and info["bytes_per_block"] == 32 * per_token
    row = result.to_row()  # the row says how its KV was laid out: nothing downstream re-derives it
    assert (row["kv_layout"], row["kv_block_size"]) == ("paged", 32)
    # 40 + 12 - 1 = 51 positions per request → 2 blocks of 32 each; 4 requests → 8 blocks at the peak
    assert result.memory["kv_predicted_bytes"] == 4 * 2 * 32 * per_token
    assert result.memory["kv_measured_bytes"] == result.memory["kv_predicted_bytes"]
    assert result.memory["kv_rel_error"] == 0.0
    # the pool is reserved up front whatever the load: default 256 MiB on CPU, far above what was used
    assert info["kv_cache_memory_bytes"] == 256 * 2**20
    assert (
        result.memory["kv_reserved_bytes"] >= info["kv_cache_memory_bytes"] > 100 * result.memory["kv_used_peak_bytes"]
    )
    timeline = result.extra["kv_timeline"]
    assert {p["repeat"] for p in timeline} == {0, 1}  # measured repeats only, warmup left out
    assert max(p["running"] for p in timeline) >= 2 and max(p["kv_usage"] for p in timeline) > 0


def test_requests_wait_for_a_slot_when_the_batch_is_full(backend):
    """max_num_seqs=1: continuous batching admits one request at a time; the others queue (real queue_s)."""
    cell = paged_cell(Workload.uniform(3, 16, 8), warmup=1, max_num_seqs=1, block_size=32)
    result = run_cell(backend, cell)
    assert result.status == "ok", result.reason
    traces = sorted(result.traces, key=lambda t: t.start_s)
    for earlier, later in zip(traces, traces[1:], strict=False):
        assert later.start_s >= earlier.end_s - 1e-3  # admitted once the previous one finished
    assert result.metrics["queue_s_max"] > result.metrics["tpot_s_p50"] * 6
    assert max(p["waiting"] for p in result.extra["kv_timeline"]) >= 1


def test_the_manager_and_its_cache_persist_across_cells_with_the_same_knobs(backend):
    first = run_cell(backend, paged_cell(Workload.uniform(2, 16, 4), block_size=32))
    manager = backend.manager
    second = run_cell(backend, paged_cell(Workload.uniform(3, 24, 4), block_size=32))
    assert first.status == second.status == "ok" and backend.manager is manager
    run_cell(backend, paged_cell(Workload.uniform(2, 16, 4), block_size=64))
    assert backend.manager is not manager and backend.cache_info()["block_size"] == 64


def test_a_request_larger_than_the_pool_is_an_oom_cell(backend):
    # 4 blocks of 32 tokens hold 128 positions; a 200-token request cannot fit
    result = run_cell(backend, paged_cell(Workload.uniform(1, 190, 10), warmup=0, num_blocks=4, block_size=32))
    assert result.status == "oom" and "needs 7 blocks, the cache has 4" in (result.reason or "")


def test_bad_knobs_are_input_errors(backend):
    result = run_cell(backend, paged_cell(Workload.uniform(1, 8, 2), warmup=0, block_size=2))
    assert result.status == "error" and "block_size must be at least 4" in (result.reason or "")
    assert math.isnan(result.metrics.get("ttft_s_p50", math.nan))


def test_a_request_is_admitted_by_its_cached_positions_p_plus_g_minus_1(backend):
    """60 + 5 − 1 = 64 cached positions fill 4 blocks of 16 exactly (the last token is sampled, never cached):
    the engine serves it in 4 blocks; counting P + G = 65 refused it as needing 5."""
    result = run_cell(backend, paged_cell(Workload.uniform(1, 60, 5), warmup=0, num_blocks=4, block_size=16))
    assert result.status == "ok", result.reason
    per_token = kv_bytes_per_token(resolve_geometry(MODEL), "fp32", "paged")
    assert result.memory["kv_measured_bytes"] == 4 * 16 * per_token  # all four blocks, no fifth
    too_long = run_cell(backend, paged_cell(Workload.uniform(1, 61, 5), warmup=0, num_blocks=4, block_size=16))
    assert too_long.status == "oom" and "65 cached positions needs 5 blocks" in (too_long.reason or "")


def test_the_pool_counts_as_allocated_in_the_window_only_when_a_measured_repeat_created_it(backend):
    """What the runner subtracts from peak − baseline for activation_peak_bytes (docs/metrics.md)."""
    cold = run_cell(backend, paged_cell(Workload.uniform(2, 16, 4), warmup=0, block_size=48))  # a new manager
    assert cold.status == "ok", cold.reason
    assert cold.memory["kv_allocated_in_window_bytes"] == cold.memory["kv_reserved_bytes"] > 0
    warm = run_cell(backend, paged_cell(Workload.uniform(2, 16, 4), warmup=0, block_size=48, max_num_seqs=None))
    assert warm.status == "ok" and warm.memory["kv_allocated_in_window_bytes"] == 0  # the pool was already there
    warmed = run_cell(backend, paged_cell(Workload.uniform(2, 16, 4), warmup=1, block_size=40))  # new pool in warmup
    assert warmed.status == "ok" and warmed.memory["kv_allocated_in_window_bytes"] == 0


def test_kv_is_predicted_from_the_running_set_not_every_request_at_once(backend):
    """4 requests, 2 running slots: the scheduler never holds more than 2. Each ends at 24 + 20 − 1 = 43 cached
    positions = 3 blocks of 16 (16 × 4,096 B = 65,536 B a block), so the peak is 2 × 3 = 6 blocks; every request
    resident at once (the old prediction) would be 12 — off by 6 blocks where one block per running request is
    the most a sample can be off by (one taken between two steps, before the newest token's slot is allocated)."""
    block = 16 * 4096
    cell = paged_cell(Workload.uniform(4, 24, 20), repeats=2, max_num_seqs=2, block_size=16)
    result = run_cell(backend, cell)
    assert result.status == "ok", result.reason
    memory = result.memory
    assert memory["kv_measured_bytes"] == 6 * block
    assert memory["kv_predicted_all_resident_bytes"] == 12 * block
    assert memory["kv_predicted_basis"] == "running set at the measured peak sample"
    assert memory["kv_peak_running"] == 2 and memory["kv_prediction_tolerance_bytes"] == 2 * block
    assert abs(memory["kv_measured_bytes"] - memory["kv_predicted_bytes"]) <= 2 * block
    assert abs(memory["kv_measured_bytes"] - memory["kv_predicted_all_resident_bytes"]) > 2 * block
    assert abs(memory["kv_rel_error"]) <= 2 * block / memory["kv_predicted_bytes"]  # the old figure gave −0.5
    assert result.to_row()["kv_predicted_all_resident_bytes"] == 12 * block
    timeline = [p for p in result.extra["kv_timeline"] if p["running"]]
    assert max(p["running"] for p in timeline) == 2 and any(p["waiting"] for p in timeline)
    # every sample, not only the peak: the prediction beside the measurement, within one block per running request
    for p in timeline:
        assert abs(p["kv_used_bytes"] - p["kv_predicted_bytes"]) <= p["running"] * block, p
