"""Attention over a flattened batch (kvray/sim/passes.py, ``attention="masked"``), worked by hand.

Transformers' continuous batching with sdpa concatenates a step's sequences and runs one attention over all of
them with a block-diagonal mask (transformers/generation/continuous_batching/utils.py ``build_attention_mask``):
every query token of the step scores every key position of the step. kvray/tiny-llama: 4 layers, 4 heads of 64,
full attention — a query-key pair costs 2 × 4 × (64 + 64) = 1,024 FLOPs per layer, 4,096 over the layers.
"""

import numpy as np
import pytest

from kvray.analysis.observations import engine_attention
from kvray.analysis.validate import engine_options
from kvray.backends.sim import SimBackend
from kvray.errors import KvrayInputError
from kvray.model.resolve import resolve_geometry
from kvray.sim.passes import StepCosts, batch_passes, masked_attention, step_cost, with_attention
from kvray.sim.serving import EngineConfig

PAIR_FLOPS = 2 * 4 * (64 + 64) * 4  # per query-key pair, all 4 layers


@pytest.fixture(scope="module")
def tiny():
    return resolve_geometry("kvray/tiny-llama")


def test_three_decodes_score_every_key_of_the_step(tiny):
    """Decodes at contexts 10, 20 and 30 (past 9, 19, 29): each alone scores its own 10 + 20 + 30 = 60 keys; masked,
    the 3 queries score all 60 positions: 180 pairs, 3 × the work — 737,280 FLOPs of attention, all of it decode."""
    chunks = [(9, 1), (19, 1), (29, 1)]
    own = step_cost(tiny, chunks, "fp32", "fp32")
    assert own.decode_attention_flops == 60 * PAIR_FLOPS
    masked = with_attention(own, tiny, chunks, "masked")
    assert masked.decode_attention_flops == 180 * PAIR_FLOPS == 737_280
    assert masked.prefill_attention_flops == 0
    assert masked.flops - own.flops == (180 - 60) * PAIR_FLOPS  # the matmuls are the same
    assert masked.bytes == own.bytes  # the cache read and written is the same


def test_a_mixed_step_splits_the_pairs_by_query(tiny):
    """An 8-token prompt (past 0) beside 2 decodes at context 16: Q = 10 queries, K = 8 + 16 + 16 = 40 keys, 400
    pairs; the 2 decode queries' share (80 pairs) is the decode attention, the 8 prompt queries' (320) the prefill's.
    Per sequence it would be 36 causal pairs of the prompt and 16 + 16 of the decodes."""
    chunks = [(0, 8), (15, 1), (15, 1)]
    own = step_cost(tiny, chunks, "fp32", "fp32")
    assert own.prefill_attention_flops == 36 * PAIR_FLOPS and own.decode_attention_flops == 32 * PAIR_FLOPS
    masked = with_attention(own, tiny, chunks, "masked")
    assert masked.decode_attention_flops == 80 * PAIR_FLOPS
    assert masked.prefill_attention_flops == 320 * PAIR_FLOPS
    assert masked_attention(own, tiny, 10, 40, 2) == masked


def test_the_serving_models_fast_path_and_a_burst_cost_the_same(tiny):
    """StepCosts (NumPy, the serving model's hot path) gives what step_cost + with_attention give; a burst of 2
    prompts of 8 and 24 → 3 tokens: its prefill scores (8 + 24)² = 1,024 pairs, each decode 2 × (9 + 25) = 68 then
    2 × (10 + 26) = 72."""
    chunks = [(0, 8), (15, 1), (40, 1), (3, 5)]
    fast = StepCosts(tiny, "fp32", "fp32", "paged", 16, "masked").step(
        np.array([p for p, _ in chunks]), np.array([q for _, q in chunks])
    )
    slow = with_attention(step_cost(tiny, chunks, "fp32", "fp32", "paged", 16), tiny, chunks, "masked")
    assert fast.flops == pytest.approx(slow.flops, rel=1e-12)
    assert fast.decode_attention_flops == pytest.approx(slow.decode_attention_flops, rel=1e-12)
    assert fast.prefill_attention_flops == pytest.approx(slow.prefill_attention_flops, rel=1e-12)
    passes = batch_passes(tiny, [8, 24], [3, 3], "fp32", "fp32", "paged", 16, "masked")
    assert [p.prefill_attention_flops + p.decode_attention_flops for p in passes] == [
        1_024 * PAIR_FLOPS,
        68 * PAIR_FLOPS,
        72 * PAIR_FLOPS,
    ]


def test_which_engines_attend_over_the_flattened_batch():
    """hf-paged runs sdpa (masked) unless its row recorded a flash implementation; vLLM's kernels are varlen."""
    assert engine_attention("hf-paged") == "masked"
    assert engine_attention("hf-paged", {"paged_cache": {"attn_implementation": "sdpa"}}) == "masked"
    assert engine_attention("hf-paged", {"paged_cache": {"attn_implementation": "flash_attention_2"}}) == "varlen"
    assert engine_attention("vllm") == "varlen"
    assert engine_options("hf-paged", True, {}, {}, 64.0)["attention"] == "masked"
    assert engine_options("vllm", True, {}, {}, 64.0)["attention"] == "varlen"


def test_an_unknown_attention_is_an_input_error():
    with pytest.raises(KvrayInputError, match="attention must be one of varlen, masked"):
        EngineConfig(attention="dense")
    with pytest.raises(KvrayInputError, match="sim backend: attention must be one of"):
        SimBackend.validate_options({"layout": "paged", "attention": "dense"})
