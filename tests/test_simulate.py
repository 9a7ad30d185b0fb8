"""The roofline predictor: closed-form checks, the OOM boundary, the batching schedule and its properties."""

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvray.hardware.gpus import GPUS, get_gpu
from kvray.model.kvmath import kv_bytes_sequence
from kvray.model.resolve import resolve_geometry
from kvray.sim.passes import expected_experts_touched
from kvray.sim.simulate import Efficiency, predict_cell, simulate
from kvray.spec import RequestSpec

EFF = Efficiency(0.7, 0.9)
LLAMA = resolve_geometry("meta-llama/Meta-Llama-3-8B")
MODELS = {
    name: resolve_geometry(name)
    for name in ("gpt2", "meta-llama/Meta-Llama-3-8B", "mistralai/Mistral-7B-v0.1", "deepseek-ai/DeepSeek-V2-Lite")
}


@pytest.fixture(autouse=True)
def no_calibration_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRAY_CALIBRATION", str(tmp_path / "absent.json"))


# Hand-checked geometry, written out so a defect in the geometry or KV code cannot move the expectations.
# Meta-Llama-3-8B: 8,030,261,248 parameters (the published exact count), 32 layers, hidden 4,096, 32 heads of
# 128, 8 KV heads, MLP 14,336, untied vocabulary 128,256. KV per token: 32 layers × 8 heads × 128 × 2 (K, V)
# × 2 bytes = 131,072 B.
LLAMA_PARAMS, LLAMA_KV_PER_TOKEN = 8_030_261_248, 131_072
LLAMA_EMBEDDING = 128_256 * 4_096  # the untied input embedding: a lookup, one row read per token
H100_BANDWIDTH = 3350e9 * 0.9  # bytes/s at η_memory 0.9
H100_BF16 = 989e12 * 0.7  # FLOP/s at η_compute 0.7


def test_batch1_decode_is_memory_bound_at_weights_over_bandwidth():
    gpu = get_gpu("H100-SXM")
    p = predict_cell(LLAMA, gpu, 1, 128, 33, eff=EFF)
    assert p.decode_bound == "memory"
    assert p.weights_bytes == 2 * LLAMA_PARAMS  # resident: every parameter
    # Read per step: every weight but the input embedding, of which one row (4,096 values) is looked up.
    read = 2 * (LLAMA_PARAMS - LLAMA_EMBEDDING + 4_096)  # 15.01 GB, not the 16.06 GB resident
    assert p.tpot_s == pytest.approx(read / H100_BANDWIDTH, rel=0.01)  # KV of 160 tokens is < 0.2 % of it
    # Exactly: each step reads those weights and the whole cache at its context (129 … 160 positions).
    steps = [(read + LLAMA_KV_PER_TOKEN * (128 + k)) / H100_BANDWIDTH for k in range(1, 33)]
    assert p.tpot_s == pytest.approx(sum(steps) / 32, rel=1e-9)
    assert p.e2e_s == pytest.approx(p.ttft_s + sum(steps), rel=1e-9)
    assert p.output_tps == pytest.approx(33 / p.e2e_s)


def test_long_prefill_is_compute_bound_with_causal_attention():
    p_toks, h, layers, vocab = 8192, 4_096, 32, 128_256
    pred = predict_cell(LLAMA, "H100-SXM", 1, p_toks, 2, eff=EFF)
    assert pred.prefill_bound == "compute"
    body = LLAMA_PARAMS - 2 * vocab * h  # untied embedding (a lookup) and LM head (last token only)
    # Causal: query i scores i keys, P(P+1)/2 pairs per layer; each pair costs QKᵀ + AV =
    # 2 × 32 heads × (128 + 128) = 16,384 FLOPs = 4·hidden.
    attention = layers * 4 * h * p_toks * (p_toks + 1) // 2
    flops = 2 * body * p_toks + 2 * vocab * h + attention
    assert pred.ttft_s == pytest.approx(flops / H100_BF16, rel=1e-9)
    full_square = 2 * body * p_toks + 2 * vocab * h + 4 * layers * p_toks**2 * h
    assert full_square / flops == pytest.approx(1.134, abs=0.001)  # what counting P² overstated at 8k
    # The P² term still makes TTFT superlinear in the prompt.
    half = predict_cell(LLAMA, "H100-SXM", 1, p_toks // 2, 2, eff=EFF)
    assert pred.ttft_s > 2 * half.ttft_s


def test_sliding_window_prefill_counts_only_the_band():
    # Mistral-7B-v0.1: 7,241,732,096 parameters, 32 layers, hidden 4,096, 32 heads of 128, untied vocabulary
    # 32,000, every layer a 4,096-token sliding window.
    mistral = MODELS["mistralai/Mistral-7B-v0.1"]
    p_toks, h, window, vocab = 8192, 4_096, 4_096, 32_000
    pred = predict_cell(mistral, "H100-SXM", 1, p_toks, 2, eff=EFF)
    assert pred.prefill_bound == "compute"
    # Queries 1 … 4096 score 1 … 4096 keys; the 4,096 queries after that score 4,096 keys each.
    pairs = window * (window + 1) // 2 + (p_toks - window) * window  # 25,167,872, not 33,558,528
    flops = 2 * (7_241_732_096 - 2 * vocab * h) * p_toks + 2 * vocab * h + 32 * 4 * h * pairs
    assert pred.ttft_s == pytest.approx(flops / H100_BF16, rel=1e-9)


def test_short_prefill_on_slow_memory_is_memory_bound():
    pred = predict_cell(LLAMA, "L4", 1, 8, 2, eff=EFF)
    assert pred.prefill_bound == "memory"


# Capacity by hand: (GPU memory − weights − 0.5 GiB runtime) // (KV + activations per sequence), with
# weights 2 × 8,030,261,248 = 16,060,522,496 B; KV (P + G − 1) × 131,072 B; activations (kvray.model.oom's
# estimate) P × (4 × 4,096 + 2 × 14,336) × 2 B + 128,256 fp32 logits × 4 B. GPU memory is what the driver
# reports: L4 23,034 MiB, H100 80GB HBM3 81,559 MiB, A100-SXM4-40GB 40,960 MiB. E.g. L4 at 2048 + 64:
# (24,152,899,584 − 16,060,522,496 − 536,870,912) // (276,692,992 + 184,549,376 + 513,024) = 16 (19 against
# a marketed 24 GiB).
@pytest.mark.parametrize(
    ("gpu", "memory_mib", "prompt", "gen", "expected"),
    [("L4", 23_034, 2048, 64, 16), ("H100-SXM", 81_559, 4096, 128, 74), ("A100-40GB-SXM", 40_960, 1000, 24, 117)],
)
def test_oom_boundary_is_the_kv_math_capacity(gpu, memory_mib, prompt, gen, expected):
    memory = memory_mib * 2**20
    kv_per_sequence = (prompt + gen - 1) * LLAMA_KV_PER_TOKEN
    per_sequence = kv_per_sequence + prompt * (4 * 4_096 + 2 * 14_336) * 2 + 128_256 * 4
    capacity = (memory - 2 * LLAMA_PARAMS - 2**29) // per_sequence
    assert capacity == expected
    assert get_gpu(gpu).memory_bytes == memory
    at = predict_cell(LLAMA, gpu, capacity, prompt, gen, eff=EFF)
    over = predict_cell(LLAMA, gpu, capacity + 1, prompt, gen, eff=EFF)
    assert at.fits and not over.fits
    assert at.kv_bytes == capacity * kv_per_sequence
    assert at.total_bytes == 2 * LLAMA_PARAMS + capacity * per_sequence + 2**29
    assert at.total_bytes <= memory < over.total_bytes


def test_weights_alone_can_exceed_the_gpu():
    big = resolve_geometry("meta-llama/Llama-3.1-70B")
    assert not predict_cell(big, "H100-SXM", 1, 16, 2, eff=EFF).fits  # 141 GB of bf16 weights
    assert predict_cell(big, "H100-SXM", 1, 16, 2, dtype="fp8", eff=EFF).fits  # fp8 weights: 71 GB
    assert predict_cell(big, "H200", 1, 16, 2, eff=EFF).fits


def test_fp8_kv_halves_kv_and_fp8_compute_is_faster():
    bf16 = predict_cell(LLAMA, "H100-SXM", 8, 4096, 16, eff=EFF)
    fp8_kv = predict_cell(LLAMA, "H100-SXM", 8, 4096, 16, kv_dtype="fp8", eff=EFF)
    assert fp8_kv.kv_bytes * 2 == bf16.kv_bytes
    assert fp8_kv.tpot_s < bf16.tpot_s
    fp8 = predict_cell(LLAMA, "H100-SXM", 1, 8192, 2, dtype="fp8", eff=EFF)
    assert fp8.ttft_s < predict_cell(LLAMA, "H100-SXM", 1, 8192, 2, eff=EFF).ttft_s


def test_moe_uses_active_params_for_flops_and_all_params_for_weights():
    ds = MODELS["deepseek-ai/DeepSeek-V2-Lite"]
    assert ds.active_params < ds.params / 3
    pred = predict_cell(ds, "H100-SXM", 1, 8192, 2, eff=EFF)
    assert pred.weights_bytes == 2 * ds.params
    dense_flops = 2 * ds.params * 8192
    assert pred.ttft_s < dense_flops / (989e12 * 0.7) / 2  # far below what all params would cost


# DeepSeek-V2-Lite: 15,706,484,224 parameters; 27 layers, the first dense, 26 with 64 routed experts (top-6)
# of 3 × 2,048 × 1,408 = 8,650,752 parameters each, plus shared experts; untied vocabulary 102,400 × 2,048.
# Routed experts: 26 × 64 × 8,650,752 = 14,394,851,328; everything else 1,311,632,896. MLA caches
# (512 + 64) × 2 B per layer and token: 27 × 1,152 = 31,104 B.
DS_OTHER, DS_EXPERT, DS_MOE_LAYERS, DS_EMBEDDING, DS_KV_PER_TOKEN = (
    1_311_632_896,
    8_650_752,
    26,
    102_400 * 2_048,
    31_104,
)


def _ds_read_bytes(tokens: int, experts_touched: float) -> float:
    """bf16 bytes a pass reads: non-expert weights less the embedding rows no token looks up, plus the experts."""
    return 2 * (DS_OTHER - DS_EMBEDDING + tokens * 2_048 + DS_MOE_LAYERS * experts_touched * DS_EXPERT)


def test_expected_experts_touched_matches_random_top_k_routing():
    assert expected_experts_touched(64, 6, 1) == pytest.approx(6)  # one token visits exactly its k
    assert expected_experts_touched(64, 6, 0) == 0
    rng = random.Random(12)
    for tokens, by_hand in ((1, 6.0), (4, 20.831), (16, 50.71), (64, 63.882)):
        # by hand: 64 × (1 − (58/64)^T); e.g. (58/64)^64 = e^(64 · ln 0.90625) = e^−6.300 = 0.00184
        assert expected_experts_touched(64, 6, tokens) == pytest.approx(by_hand, rel=1e-3)
        trials = [len({e for _ in range(tokens) for e in rng.sample(range(64), 6)}) for _ in range(3000)]
        assert sum(trials) / len(trials) == pytest.approx(by_hand, rel=0.02)


def test_moe_decode_reads_only_the_experts_the_batch_routes_to():
    ds = MODELS["deepseek-ai/DeepSeek-V2-Lite"]
    one = predict_cell(ds, "H100-SXM", 1, 128, 9, eff=EFF)
    assert one.decode_bound == "memory"
    # Batch 1: 6 experts per MoE layer, one embedding row: 2,451,437,056 parameters (DeepSeek publishes
    # 2.4 B activated), 4.90 GB a step → 1.63 ms; reading all 31.4 GB of weights would take 10.4 ms.
    steps = [(_ds_read_bytes(1, 6) + DS_KV_PER_TOKEN * (128 + k)) / H100_BANDWIDTH for k in range(1, 9)]
    assert one.tpot_s == pytest.approx(sum(steps) / 8, rel=1e-9)
    assert one.tpot_s == pytest.approx(1.63e-3, abs=0.01e-3)
    # Batch 64: 64 × (1 − (58/64)^64) = 63.88 experts per layer, nearly all of them.
    many = predict_cell(ds, "H100-SXM", 64, 128, 9, eff=EFF)
    assert many.decode_bound == "memory"
    touched = 64 * (1 - (58 / 64) ** 64)
    steps = [(_ds_read_bytes(64, touched) + 64 * DS_KV_PER_TOKEN * (128 + k)) / H100_BANDWIDTH for k in range(1, 9)]
    assert many.tpot_s == pytest.approx(sum(steps) / 8, rel=1e-9)
    assert many.tpot_s > 6 * one.tpot_s


def test_moe_prefill_touches_experts_for_all_its_tokens():
    ds = MODELS["deepseek-ai/DeepSeek-V2-Lite"]
    # 2 rows × 4 tokens = 8 tokens route: 64 × (1 − (58/64)^8) = 34.88 experts per MoE layer.
    pred = predict_cell(ds, "H100-SXM", 2, 4, 2, eff=EFF)
    assert pred.prefill_bound == "memory"
    touched = 64 * (1 - (58 / 64) ** 8)
    written = 2 * 4 * DS_KV_PER_TOKEN
    assert pred.ttft_s == pytest.approx((_ds_read_bytes(8, touched) + written) / H100_BANDWIDTH, rel=1e-9)


def test_static_batch_pads_and_paged_does_not():
    gpu = get_gpu("H100-SXM")
    reqs = [RequestSpec(0, 100, 8), RequestSpec(1, 100, 8), RequestSpec(2, 4000, 8)]
    hf = simulate(LLAMA, gpu, reqs, layout="hf", eff=EFF)
    paged = simulate(LLAMA, gpu, reqs, layout="paged", eff=EFF)
    assert len(hf.batches) == len(paged.batches) == 1
    per_token = kv_bytes_sequence(LLAMA, 1, "bf16")
    assert hf.memory[0].kv_bytes == 3 * 4007 * per_token  # every row padded to the longest prompt
    blocks = 2 * math.ceil(107 / 16) + math.ceil(4007 / 16)
    assert paged.memory[0].kv_bytes == blocks * 16 * per_token  # own lengths, whole blocks
    # Short requests wait for the long prompt's prefill in both, but the padded prefill costs more.
    short_hf, short_paged = hf.timings[0], paged.timings[0]
    assert short_hf.token_times_s[0] == hf.timings[2].token_times_s[0]
    assert short_paged.token_times_s[0] < short_hf.token_times_s[0]


def test_paged_block_rounding_costs_memory():
    gpu = get_gpu("H100-SXM")
    reqs = [RequestSpec(0, 17, 1)]
    paged = simulate(LLAMA, gpu, reqs, layout="paged", eff=EFF)
    hf = simulate(LLAMA, gpu, reqs, layout="hf", eff=EFF)
    assert paged.memory[0].kv_bytes == 32 * kv_bytes_sequence(LLAMA, 1, "bf16")
    assert hf.memory[0].kv_bytes == 17 * kv_bytes_sequence(LLAMA, 1, "bf16")


def test_schedule_forms_batches_from_arrived_requests():
    gpu = get_gpu("H100-SXM")
    reqs = [
        RequestSpec(0, 64, 4, 0.0),
        RequestSpec(1, 64, 8, 0.0),
        RequestSpec(2, 64, 4, 0.001),
        RequestSpec(3, 64, 4, 9.0),
    ]
    s = simulate(LLAMA, gpu, reqs, eff=EFF)
    assert s.batches == [[0, 1], [2], [3]]
    first, second, late, last = s.timings
    assert first.start_s == second.start_s == 0.0
    assert len(first.token_times_s) == 4 and len(second.token_times_s) == 8  # each keeps its own tokens
    assert first.token_times_s == second.token_times_s[:4]
    assert first.end_s == first.token_times_s[-1] < second.end_s
    assert late.start_s == pytest.approx(second.end_s)  # arrived while the engine was busy: waits for it
    assert last.start_s == 9.0  # the engine was idle: starts on arrival
    assert all(t.token_times_s == sorted(t.token_times_s) for t in s.timings)


def test_calibration_file_is_used_and_named(tmp_path, monkeypatch):
    path = tmp_path / "cal.json"
    entry = {"eta_compute": 0.35, "eta_memory": 0.45, "layer_overhead_s": 0.0, "rows": 7}
    path.write_text(json.dumps({"version": 1, "entries": {"H100-SXM": {"hf": entry}}}))
    monkeypatch.setenv("KVRAY_CALIBRATION", str(path))
    calibrated = predict_cell(LLAMA, "H100-SXM", 1, 128, 16)
    assert calibrated.eta_memory == 0.45 and "calibrated from 7 rows" in calibrated.efficiency_source
    default = predict_cell(LLAMA, "H100-SXM", 1, 128, 16, eff=EFF)
    assert calibrated.tpot_s == pytest.approx(default.tpot_s * 0.9 / 0.45, rel=1e-9)
    assert predict_cell(LLAMA, "L4", 1, 128, 16).efficiency_source == "defaults"  # no entry for L4
    assert predict_cell(LLAMA, "H100-SXM", 1, 128, 16, layout="paged").efficiency_source == "defaults"
    path.write_text("{not json")
    assert predict_cell(LLAMA, "H100-SXM", 1, 128, 16).efficiency_source == "defaults"


# --- properties ---------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 4096), st.integers(2, 160), st.integers(1, 48))


@settings(max_examples=40, deadline=None)
@given(
    model=st.sampled_from(sorted(MODELS)),
    gpu=st.sampled_from(sorted(GPUS)),
    layout=st.sampled_from(["hf", "paged"]),
    shape=shapes,
    more=st.tuples(st.integers(0, 2048), st.integers(0, 64), st.integers(0, 32)),
)
def test_latency_never_decreases_with_more_tokens_or_concurrency(model, gpu, layout, shape, more):
    g = MODELS[model]
    (p, n, c), (dp, dn, dc) = shape, more
    base = predict_cell(g, gpu, c, p, n, layout=layout, eff=EFF)
    for bigger in ((c + dc, p, n), (c, p + dp, n), (c, p, n + dn), (c + dc, p + dp, n + dn)):
        other = predict_cell(g, gpu, *bigger, layout=layout, eff=EFF)
        for key in ("ttft_s", "tpot_s", "e2e_s"):
            assert getattr(other, key) >= getattr(base, key) * (1 - 1e-12), (key, bigger)
        assert other.total_bytes >= base.total_bytes


@settings(max_examples=30, deadline=None)
@given(
    model=st.sampled_from(sorted(MODELS)), shape=shapes, k=st.integers(2, 6), layout=st.sampled_from(["hf", "paged"])
)
def test_memory_is_linear_in_concurrency(model, shape, k, layout):
    g = MODELS[model]
    p, n, c = shape
    one = predict_cell(g, "H200", c, p, n, layout=layout, eff=EFF)
    many = predict_cell(g, "H200", k * c, p, n, layout=layout, eff=EFF)
    assert many.kv_bytes == k * one.kv_bytes
    assert many.peak_allocated_bytes - many.weights_bytes == pytest.approx(
        k * (one.peak_allocated_bytes - one.weights_bytes), rel=1e-9
    )


def _dominates(a, b, dtype):
    return a.bandwidth_gbps >= b.bandwidth_gbps and a.tflops(dtype) >= b.tflops(dtype)


@settings(max_examples=40, deadline=None)
@given(
    model=st.sampled_from(sorted(MODELS)),
    pair=st.tuples(st.sampled_from(sorted(GPUS)), st.sampled_from(sorted(GPUS))),
    shape=shapes,
    dtype=st.sampled_from(["bf16", "fp8", "fp32"]),
)
def test_faster_hardware_never_predicts_slower(model, pair, shape, dtype):
    fast, slow = (get_gpu(n) for n in pair)
    if not _dominates(fast, slow, dtype):
        fast, slow = slow, fast
    if not _dominates(fast, slow, dtype):
        return  # neither card is faster on both roofs
    g, (p, n, c) = MODELS[model], shape
    a = predict_cell(g, fast, c, p, n, dtype=dtype, eff=EFF)
    b = predict_cell(g, slow, c, p, n, dtype=dtype, eff=EFF)
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        assert getattr(a, key) <= getattr(b, key) * (1 + 1e-12)
    assert a.output_tps >= b.output_tps * (1 - 1e-12)
