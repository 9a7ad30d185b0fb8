"""Paged KV predicted from an injected schedule: who was running at each sample, at which length, block-rounded.

Expected values by hand from the KV formula: the tiny Llama caches 2 (K, V) × 4 layers × 2 KV heads × 64 head_dim
× 4 B (fp32) = 4,096 B per token; with blocks of 16 tokens a block is 65,536 B.
"""

from __future__ import annotations

from kvray.backends.base import BackendRun
from kvray.measure.kv_timeline import (
    BASIS_ALL_RESIDENT,
    BASIS_TIMELINE,
    KVSample,
    kv_at_peak,
    predicted_used_bytes,
    running_set,
    timeline_prediction,
)
from kvray.measure.trace import RunTrace
from kvray.model.resolve import resolve_geometry
from kvray.runner.run import _memory
from kvray.spec import Cell, Workload

G = resolve_geometry("kvray/tiny-llama")
BLOCK = 16 * 4096  # 65,536 B: one 16-token block of the tiny Llama in fp32

# A: admitted at 0, 20-token prompt, tokens at 1, 2, …, 10 s.  B: admitted at 5, 30-token prompt, tokens at 6 … 13 s.
A = RunTrace(0, 0, 0.0, 0.0, [float(i) for i in range(1, 11)], 10.0, 20, 10)
B = RunTrace(1, 0, 0.0, 5.0, [float(i) for i in range(6, 14)], 13.0, 30, 8)


def predicted(t_s: float, running: int | None = None) -> int:
    return predicted_used_bytes([A, B], KVSample(t_s, None, running), G, "fp32", 16)


def test_positions_follow_each_requests_own_tokens_and_blocks_round_per_request():
    # t=3: only A, 3 tokens → 20 + 3 = 23 positions (the third token's slot, fed in the step in flight) → 2 blocks
    assert predicted(3.0) == 2 * BLOCK
    # t=5.5: B admitted, still in prefill → its 30 prompt positions (2 blocks); A 5 tokens → 25 (2 blocks)
    assert [(t.request_id, n) for t, n in running_set([A, B], 5.5)] == [(0, 25), (1, 30)]
    assert predicted(5.5) == 4 * BLOCK
    # t=7.5: A 7 tokens → 27 (2 blocks); B 2 tokens → 32 (2 blocks, exactly full)
    assert predicted(7.5) == 4 * BLOCK
    # t=12: A ended at its last token (10 s); B 7 tokens → 37 positions = 30 + 8 − 1, its final length → 3 blocks
    assert predicted(12.0) == 3 * BLOCK
    # after both: nothing held
    assert predicted(20.0) == 0


def test_the_engines_running_count_trims_and_fills_the_set():
    # the engine runs only one at 5.5 s: A (it has tokens, so it is in the engine for sure), not B (waiting)
    assert [t.request_id for t, _ in running_set([A, B], 5.5, running=1)] == [0]
    assert predicted(5.5, running=1) == 2 * BLOCK
    # at 10.5 s the engine still counts A (it frees blocks a moment after stamping the last token): A at its final
    # 20 + 10 − 1 = 29 positions (2 blocks) beside B at 30 + 5 = 35 (3 blocks)
    assert predicted(10.5) == 3 * BLOCK
    assert predicted(10.5, running=2) == 5 * BLOCK


def test_the_prediction_at_the_measured_peak_is_within_one_block_per_running_request():
    samples = [
        KVSample(3.0, 2 * BLOCK, 1),
        KVSample(7.5, 5 * BLOCK, 2),  # the peak: one block above the prediction (B's next slot, a block boundary)
        KVSample(12.0, 3 * BLOCK, 1),
        KVSample(12.5, 3 * BLOCK, 1),
    ]
    peak = kv_at_peak([A, B], samples, G, "fp32", 16)
    assert peak is not None
    assert (peak.t_s, peak.measured_bytes, peak.predicted_bytes) == (7.5, 5 * BLOCK, 4 * BLOCK)
    assert peak.positions == (27, 32) and peak.running == 2 and peak.tolerance_bytes == 2 * BLOCK
    assert abs(peak.measured_bytes - peak.predicted_bytes) <= peak.tolerance_bytes
    # every request at P + G − 1 together: A 29 (2 blocks) + B 37 (3 blocks) = 5 blocks, never resident at once
    assert peak.predicted_bytes < 5 * BLOCK
    # samples of an idle engine are not the workload's peak
    assert kv_at_peak([A, B], [KVSample(30.0, 9 * BLOCK, 0)], G, "fp32", 16) is None


def test_timeline_points_get_the_prediction_beside_the_measurement_and_the_basis_is_stated():
    points = [
        {"t_s": 3.0, "kv_used_bytes": 2 * BLOCK, "running": 1.0},  # Prometheus gauges are floats
        {"t_s": 7.5, "kv_used_bytes": 4 * BLOCK, "running": 2.0},
    ]
    memory = timeline_prediction(points, [A, B], G, "fp32", 16, all_resident_bytes=5 * BLOCK)
    assert [p["kv_predicted_bytes"] for p in points] == [2 * BLOCK, 4 * BLOCK]
    assert memory["kv_predicted_bytes"] == 4 * BLOCK and memory["kv_predicted_basis"] == BASIS_TIMELINE
    assert memory["kv_predicted_all_resident_bytes"] == 5 * BLOCK and memory["kv_peak_running"] == 2
    none_caught = timeline_prediction(
        [{"t_s": 30.0, "kv_used_bytes": 0, "running": 0}], [A, B], G, "fp32", 16, all_resident_bytes=5 * BLOCK
    )
    assert none_caught["kv_predicted_bytes"] == 5 * BLOCK and none_caught["kv_predicted_basis"] == BASIS_ALL_RESIDENT


def test_the_row_pairs_the_peak_repeats_measurement_with_that_repeats_prediction():
    """Repeat 0 peaked higher measured, repeat 1 predicted higher: a max over repeats of each would pair them."""
    cell = Cell(model="kvray/tiny-llama", workload=Workload.uniform(2, 20, 10), backend="hf-paged", dtype="fp32")
    runs = [
        BackendRun([], kv_measured_bytes=5 * BLOCK, memory={"kv_predicted_bytes": 4 * BLOCK, "kv_peak_running": 2}),
        BackendRun([], kv_measured_bytes=3 * BLOCK, memory={"kv_predicted_bytes": 6 * BLOCK, "kv_peak_running": 3}),
    ]
    memory = _memory(cell, runs, None, None)
    assert (memory["kv_measured_bytes"], memory["kv_predicted_bytes"], memory["kv_peak_running"]) == (
        5 * BLOCK,
        4 * BLOCK,
        2,
    )
    assert memory["kv_rel_error"] == 0.25
