"""The step-time model's terms, each checked against a case worked by hand (kvray/sim/costs.py).

Figures: the H100 SXM datasheet (3,350 GB/s HBM3, 989 TFLOP/s dense bf16), Meta-Llama-3-8B's config (hidden 4,096,
32 layers, 32 heads and 8 KV heads of 128, vocabulary 128,256, untied; 8,030,261,248 parameters), η 0.7 / 0.9.
"""

import pytest

from kvray.hardware.gpus import get_gpu
from kvray.model.resolve import resolve_geometry
from kvray.sim.costs import Efficiency, StepRequests, StepTimer, pass_time_s, step_roofs
from kvray.sim.passes import step_cost
from kvray.sim.serving import serve
from kvray.sim.simulate import Costing, predict_cell, simulate

BW, BF16 = 3.35e12 * 0.9, 989e12 * 0.7  # bytes/s and FLOP/s at η
PARAMS, VOCAB, HIDDEN, LAYERS = 8_030_261_248, 128_256, 4_096, 32
BODY, HEAD = PARAMS - 2 * VOCAB * HIDDEN, VOCAB * HIDDEN  # matmul parameters per token; the LM head
KV = LAYERS * 2 * 8 * 128 * 2  # bytes per cached position: 131,072
WIDTH = 32 * 2 * 128  # heads × (d_qk + d_v): a query-key pair costs 2 × WIDTH FLOPs per layer
EFF = Efficiency(0.7, 0.9)


@pytest.fixture(scope="module")
def llama():
    return resolve_geometry("meta-llama/Meta-Llama-3-8B")


H100 = get_gpu("H100-SXM")


def weights_bytes(tokens: int) -> int:
    """A pass reads every weight once, less the embedding rows its tokens do not look up."""
    return (PARAMS - (VOCAB - tokens) * HIDDEN) * 2


def test_linear_layers_read_the_weights_once_per_step_and_compute_per_token(llama):
    """4 decodes at context 1,024: linear FLOPs 4 × 2 × (body + head) = 6.0e10 → 86.7 µs of compute; the weights
    (all but 128,252 embedding rows) 15.01 GB → 4.978 ms: memory-bound. Decode attention apart: 4 × 1,024 × 131,072
    B = 537 MB → 178.1 µs (its 4 × 32 × 2 × 8,192 × 1,024 FLOPs are 3.1 µs). Step: 4.978 + 0.178 ms."""
    linear = max(4 * 2 * (BODY + HEAD) / BF16, weights_bytes(4) / BW)
    attention = max(4 * LAYERS * 2 * WIDTH * 1024 / BF16, 4 * 1024 * KV / BW)
    assert linear == pytest.approx(4.978e-3, rel=1e-3) and attention == pytest.approx(178.07e-6, rel=1e-3)
    cost = step_cost(llama, [(1023, 1)] * 4, "bf16", "bf16")
    roofs = step_roofs(cost, llama, H100, "bf16")
    assert roofs.parts[0][1] * 3.35e12 == pytest.approx(weights_bytes(4), rel=1e-12)
    assert roofs.parts[1] == (0.0, 0.0)  # no prefill in the step
    assert pass_time_s(cost, llama, H100, "bf16", EFF) == pytest.approx(linear + attention, rel=1e-9)
    # 64 decodes read the same weights once (64 embedding rows instead of 4), not 16 times as much
    many = step_roofs(step_cost(llama, [(1023, 1)] * 64, "bf16", "bf16"), llama, H100, "bf16")
    assert many.parts[0][1] * 3.35e12 == pytest.approx(weights_bytes(64), rel=1e-12)


def test_prefill_attention_is_causal_compute_added_to_the_linear_layers(llama):
    """One 2,048-token prompt: linear 2 × body × 2,048 + 2 × head FLOPs = 2.86e13 → 41.3 ms (compute-bound: the
    weights are 5.0 ms); causal attention 32 × 2 × 8,192 × 2,048 · 2,049 / 2 = 1.10e12 → 1.59 ms (its KV,
    2,048 × 131,072 B, is 0.09 ms). The step is their sum."""
    linear = max((2 * BODY * 2048 + 2 * HEAD) / BF16, weights_bytes(2048) / BW)
    attention = max(LAYERS * 2 * WIDTH * (2048 * 2049 // 2) / BF16, 2048 * KV / BW)
    assert linear == pytest.approx(41.30e-3, rel=1e-3) and attention == pytest.approx(1.5897e-3, rel=1e-3)
    cost = step_cost(llama, [(0, 2048)], "bf16", "bf16")
    assert pass_time_s(cost, llama, H100, "bf16", EFF) == pytest.approx(linear + attention, rel=1e-9)


def test_a_mixed_step_adds_its_three_parts_each_on_its_own_roof(llama):
    """A 512-token prefill chunk after 1,536 computed positions plus 32 decodes at context 4,096: linear over 544
    tokens (compute), the chunk's attention over its 1,536 + 1..512 keys (compute), the decodes' KV (memory)."""
    linear = max((2 * BODY * 544 + 2 * HEAD * 33) / BF16, weights_bytes(544) / BW)
    pairs = (2048 * 2049 - 1536 * 1537) // 2
    prefill = max(LAYERS * 2 * WIDTH * pairs / BF16, 2048 * KV / BW)
    decode = max(32 * LAYERS * 2 * WIDTH * 4096 / BF16, 32 * 4096 * KV / BW)
    assert decode == 32 * 4096 * KV / BW  # memory-bound: 5.70 ms
    cost = step_cost(llama, [(1536, 512)] + [(4095, 1)] * 32, "bf16", "bf16")
    assert pass_time_s(cost, llama, H100, "bf16", EFF) == pytest.approx(linear + prefill + decode, rel=1e-9)


def test_tensor_parallel_adds_its_all_reduces(llama):
    """TP 2 over NVLink (450 GB/s each way): 2 all-reduces × 32 layers × (8 µs + 2 · 1/2 · 8 tokens × 4,096 × 2 B
    / 450 GB/s) on top of one rank's step."""
    cost = step_cost(llama, [(1023, 1)] * 8, "bf16", "bf16")
    one = step_roofs(cost, llama, H100, "bf16", tp=2)
    assert one.allreduce_s == pytest.approx(2 * 32 * (8e-6 + 8 * 4096 * 2 / 450e9), rel=1e-9)
    assert one.time_s(EFF) == pytest.approx(step_roofs(cost, llama, H100, "bf16").time_s(EFF) + one.allreduce_s)


def test_the_roofline_floor_holds_when_launches_outlast_the_parts(llama):
    """Launches of 10 µs per layer (32 × 10 µs = 0.32 ms) hide under a one-decode step's 4.98 ms of parts; at 1 ms
    per layer the 32 ms launch floor sets the step."""
    cost = step_cost(llama, [(1023, 1)], "bf16", "bf16")
    parts = weights_bytes(1) / BW + 1024 * KV / BW
    assert pass_time_s(cost, llama, H100, "bf16", Efficiency(0.7, 0.9, 10e-6)) == pytest.approx(parts, rel=1e-9)
    slow = Efficiency(0.7, 0.9, 1e-3)
    assert pass_time_s(cost, llama, H100, "bf16", slow) == pytest.approx(32e-3, rel=1e-12)
    assert step_roofs(cost, llama, H100, "bf16").bound(slow) == "overhead"


def test_cpu_costs_per_step_running_request_admission_and_finish(llama):
    """A burst of 4 requests of 64 → 8 tokens through the continuous engine, CPU costs s = 1 ms per step,
    r = 0.5 ms per running request per step, a = 2 ms per admission, f = 3 ms per finish, against the same run
    without them (the GPU part cancels): TTFT later by s + 4r + 4a = 11 ms; the end by 8 (s + 4r) + 4a + 4f = 44 ms."""
    reqs = [type("R", (), {"prompt_toks": 64, "gen_toks": 8, "arrival_s": 0.0})() for _ in range(4)]
    cpu = Efficiency(0.7, 0.9, step_overhead_s=1e-3, request_step_s=0.5e-3, admit_s=2e-3, finish_s=3e-3)
    base, slow = serve(llama, H100, reqs, eff=EFF), serve(llama, H100, reqs, eff=cpu)
    for b, s in zip(base.timings, slow.timings, strict=True):
        assert s.token_times_s[0] - b.token_times_s[0] == pytest.approx(1e-3 + 4 * 0.5e-3 + 4 * 2e-3, rel=1e-9)
        assert s.end_s - b.end_s == pytest.approx(8 * (1e-3 + 4 * 0.5e-3) + 4 * 2e-3 + 4 * 3e-3, rel=1e-9)
    # the static batch (simulate, predict_cell) costs its passes the same way
    static = predict_cell(llama, H100, 4, 64, 8, eff=cpu, layout="paged")
    plain = predict_cell(llama, H100, 4, 64, 8, eff=EFF, layout="paged")
    assert static.ttft_s - plain.ttft_s == pytest.approx(11e-3, rel=1e-9)
    assert static.e2e_s - plain.e2e_s == pytest.approx(44e-3, rel=1e-9)


def test_the_serving_timer_is_the_step_roofs_arithmetic(llama):
    """StepTimer (the serving model's fast path) and StepRoofs give the same time and bound."""
    cpu = Efficiency(0.3, 0.5, 2e-6, step_overhead_s=1e-4, request_step_s=3e-5, admit_s=1e-4, finish_s=2e-4)
    for tp in (1, 2):
        timer = StepTimer(llama, H100, "bf16", cpu, tp)
        for chunks in ([(0, 700)], [(4095, 1)] * 20, [(100, 300)] + [(50, 1)] * 7, [(9, 1)]):
            work = StepRequests(len(chunks), 1, 2)
            cost = step_cost(llama, chunks, "bf16", "bf16")
            roofs = step_roofs(cost, llama, H100, "bf16", tp, requests=work)
            dt, bound = timer.time_s(cost, work)
            assert dt == pytest.approx(roofs.time_s(cpu), rel=1e-12) and bound == roofs.bound(cpu)


def test_simulate_takes_one_costing_or_its_fields(llama):
    reqs = [type("R", (), {"prompt_toks": 32, "gen_toks": 4, "arrival_s": 0.0})()]
    a = simulate(llama, H100, reqs, costing=Costing(layout="paged", eff=EFF))
    b = simulate(llama, H100, reqs, layout="paged", eff=EFF)
    assert a.timings[0].token_times_s == b.timings[0].token_times_s


@pytest.mark.parametrize(
    "model", ["meta-llama/Meta-Llama-3-8B", "google/gemma-2-2b", "deepseek-ai/DeepSeek-V2-Lite", "facebook/opt-125m"]
)
def test_the_serving_engines_step_costs_are_step_cost(model):
    """The serving engine prices a step with ``StepCosts`` (one-token chunks from tables over the context, built per
    layer with NumPy). It must be ``step_cost`` exactly — full attention, a sliding window (Gemma 2: 4,096, both sides
    of it), MLA (DeepSeek-V2-Lite), learned positions (OPT) — for decodes, prefill chunks and a mix; the tables grow
    when a context passes their end."""
    import random

    import numpy as np

    from kvray.sim.passes import StepCosts

    g = resolve_geometry(model)
    costs = StepCosts(g, "bf16", "fp8", "paged", 16)
    rng = random.Random(0)
    for size in (1, 7, 256):
        chunks = [(rng.randrange(0, 9000), 1 if rng.random() < 0.8 else rng.randrange(2, 3000)) for _ in range(size)]
        pasts, queries = (np.array(c, dtype=np.int64) for c in zip(*chunks, strict=True))
        assert costs.step(pasts, queries) == step_cost(g, chunks, "bf16", "fp8", "paged", 16)
    assert len(costs.attention) >= 9000  # grown past the first 4,096 contexts
