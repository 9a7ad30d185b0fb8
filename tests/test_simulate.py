"""The roofline predictor: closed-form checks, the OOM boundary, the batching schedule and its properties."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvray.hardware.gpus import GPUS, get_gpu
from kvray.model.kvmath import kv_bytes_sequence
from kvray.model.oom import RUNTIME_OVERHEAD_BYTES, activation_bytes
from kvray.model.resolve import resolve_geometry
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


def test_batch1_decode_is_memory_bound_at_weights_over_bandwidth():
    gpu = get_gpu("H100-SXM")
    p = predict_cell(LLAMA, gpu, 1, 128, 33, eff=EFF)
    assert p.decode_bound == "memory"
    weights = 2 * LLAMA.params
    assert p.weights_bytes == weights
    bandwidth = 3350e9 * 0.9
    assert p.tpot_s == pytest.approx(weights / bandwidth, rel=0.01)  # KV of 160 tokens is < 0.2 % of 16 GB
    # Exactly: each step reads the weights and the whole cache at its context (129 … 160 positions).
    steps = [(weights + kv_bytes_sequence(LLAMA, 128 + k, "bf16")) / bandwidth for k in range(1, 33)]
    assert p.tpot_s == pytest.approx(sum(steps) / 32, rel=1e-9)
    assert p.e2e_s == pytest.approx(p.ttft_s + sum(steps), rel=1e-9)
    assert p.output_tps == pytest.approx(33 / p.e2e_s)


def test_long_prefill_is_compute_bound_with_quadratic_attention():
    p_toks, h, layers, vocab = 8192, LLAMA.hidden_size, LLAMA.num_layers, LLAMA.vocab_size
    pred = predict_cell(LLAMA, "H100-SXM", 1, p_toks, 2, eff=EFF)
    assert pred.prefill_bound == "compute"
    body = LLAMA.params - 2 * vocab * h  # untied embedding (a lookup) and LM head (last token only)
    flops = 2 * body * p_toks + 2 * vocab * h + 4 * layers * p_toks**2 * h
    assert pred.ttft_s == pytest.approx(flops / (989e12 * 0.7), rel=1e-9)
    # The P² term makes TTFT superlinear in the prompt.
    half = predict_cell(LLAMA, "H100-SXM", 1, p_toks // 2, 2, eff=EFF)
    assert pred.ttft_s > 2 * half.ttft_s


def test_short_prefill_on_slow_memory_is_memory_bound():
    pred = predict_cell(LLAMA, "L4", 1, 8, 2, eff=EFF)
    assert pred.prefill_bound == "memory"


@pytest.mark.parametrize(
    ("gpu", "prompt", "gen"), [("L4", 2048, 64), ("H100-SXM", 4096, 128), ("A100-40GB-SXM", 1000, 24)]
)
def test_oom_boundary_is_the_kv_math_capacity(gpu, prompt, gen):
    spec = get_gpu(gpu)
    weights = 2 * LLAMA.params
    per_sequence = kv_bytes_sequence(LLAMA, prompt + gen - 1, "bf16") + activation_bytes(LLAMA, 1, prompt, "bf16")
    capacity = (spec.memory_bytes - weights - RUNTIME_OVERHEAD_BYTES) // per_sequence
    assert capacity > 0
    at = predict_cell(LLAMA, gpu, capacity, prompt, gen, eff=EFF)
    over = predict_cell(LLAMA, gpu, capacity + 1, prompt, gen, eff=EFF)
    assert at.fits and not over.fits
    assert at.kv_bytes == capacity * kv_bytes_sequence(LLAMA, prompt + gen - 1, "bf16")
    assert at.total_bytes <= spec.memory_bytes < over.total_bytes


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
