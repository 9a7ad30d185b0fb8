"""KV bytes: the formula must equal what transformers' cache really holds after generate."""

import pytest
import torch
from tiny_models import build_model, tiny_config

from kvray.errors import KvrayInputError
from kvray.model.geometry import geometry_from_config
from kvray.model.kvmath import (
    cached_positions,
    kv_bytes_batch,
    kv_bytes_per_token,
    kv_bytes_per_token_per_gpu,
    kv_bytes_sequence,
    max_tokens_in,
    normalize_dtype,
)
from kvray.model.parallel import kv_head_replicas, kv_heads_per_gpu, weights_bytes_per_gpu
from kvray.model.resolve import resolve_geometry


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("kind", ["opt", "llama-gqa", "mistral-swa", "deepseek-mla"])
@pytest.mark.parametrize(("batch", "prompt", "gen"), [(1, 5, 1), (2, 12, 4), (3, 20, 9)])
def test_formula_equals_real_cache_after_generate(kind, batch, prompt, gen):
    cfg = tiny_config(kind)
    model = build_model(cfg)
    ids = torch.randint(3, cfg["vocab_size"] - 1, (batch, prompt))
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=gen,
            min_new_tokens=gen,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    assert out.sequences.shape[1] == prompt + gen
    g = geometry_from_config(cfg)
    predicted = kv_bytes_batch(g, [cached_positions(prompt, gen)] * batch, "fp32", "hf")
    assert predicted == _cache_bytes(out.cache)


def test_sliding_window_caps_the_cache():
    g = geometry_from_config(tiny_config("mistral-swa"))  # window 16, 2 layers, 1 KV head × 16
    per_layer_token = 2 * 1 * 16 * 4
    assert kv_bytes_sequence(g, 10, "fp32") == 10 * 2 * per_layer_token
    assert kv_bytes_sequence(g, 100, "fp32") == 15 * 2 * per_layer_token  # window − 1 kept
    assert kv_bytes_sequence(g, 100, "fp32", "paged", block_size=16) == 16 * 2 * per_layer_token


def test_published_per_token_figures():
    assert kv_bytes_per_token(resolve_geometry("meta-llama/Meta-Llama-3-8B"), "bf16") == 131_072
    assert kv_bytes_per_token(resolve_geometry("facebook/opt-1.3b"), "fp16") == 196_608
    # MLA: (512 + 64) × 2 bytes = 1,152 B per layer-token, 27 layers, the same in both layouts.
    ds = resolve_geometry("deepseek-ai/DeepSeek-V2-Lite")
    assert kv_bytes_per_token(ds, "bf16", "paged") == kv_bytes_per_token(ds, "bf16", "hf") == 27 * 1152
    assert kv_bytes_per_token(resolve_geometry("meta-llama/Meta-Llama-3-8B"), "fp8") == 65_536


def test_paged_rounds_each_request_up_to_blocks_and_hf_pads_to_longest():
    g = geometry_from_config(tiny_config("llama-gqa"))  # 2 layers × 2 heads × 16 dims
    per_token = kv_bytes_per_token(g, "fp16")
    assert kv_bytes_batch(g, [1, 17], "fp16", "paged", block_size=16) == (16 + 32) * per_token
    assert kv_bytes_batch(g, [1, 17], "fp16", "hf") == 2 * 17 * per_token


def test_vllm_cpu_reference_point():
    # The model the vLLM CPU tests serve: 2 layers, 1 KV head × 64 dims, fp32. Per token: 2 layers × 2 (K, V)
    # × 1 head × 64 × 4 B = 1,024 B; a 1 GiB pool holds 2^30 / 1,024 = 1,048,576 tokens = 8,192 of vLLM's
    # 128-token CPU blocks (tests/test_vllm_backend.py checks the live server against the same arithmetic).
    g = geometry_from_config(tiny_config("llama-gqa", num_key_value_heads=1, head_dim=64))
    assert (g.num_layers, g.num_kv_heads, g.head_dim) == (2, 1, 64)
    assert kv_bytes_per_token(g, "fp32", "paged") == 1024
    assert max_tokens_in(g, 2**30, "fp32", "paged") == 1_048_576
    assert max_tokens_in(g, 2**30 - 1, "fp32", "paged") == 1_048_575  # a partial token does not fit
    assert kv_bytes_sequence(g, 1_048_576, "fp32", "paged", block_size=128) == 2**30  # 8,192 whole blocks
    assert kv_bytes_sequence(g, 1_048_577, "fp32", "paged", block_size=128) == 2**30 + 128 * 1024  # one more


def test_dtype_names():
    assert normalize_dtype("bfloat16") == "bf16" and normalize_dtype("torch.float16") == "fp16"
    with pytest.raises(KvrayInputError, match="known: fp32, fp16, bf16, fp8"):
        normalize_dtype("int4")


# --- per GPU under tensor parallelism (vLLM's split: kvray/model/parallel.py cites the source lines) ----------


def test_gqa_kv_heads_split_across_ranks():
    g = resolve_geometry("meta-llama/Llama-3.1-70B")  # 80 layers, 8 KV heads × 128, bf16
    assert kv_bytes_per_token_per_gpu(g, "bf16", tp=1) == 80 * 2 * 8 * 128 * 2 == 327_680
    assert kv_bytes_per_token_per_gpu(g, "bf16", tp=2) == 80 * 2 * 4 * 128 * 2 == 163_840
    assert kv_bytes_per_token_per_gpu(g, "bf16", tp=8) == 80 * 2 * 1 * 128 * 2 == 40_960
    assert kv_heads_per_gpu(g, 4) == 2 and kv_head_replicas(g, 4) == 1


def test_gqa_kv_heads_replicated_when_tp_exceeds_them():
    # Llama-3-8B: 32 layers, 32 query heads, 8 KV heads × 128. At TP 16 each rank still keeps one KV head
    # (vLLM's max(1, 8 // 16)): per GPU the same 16,384 B as TP 8, so the group holds 2× the model's KV.
    g = resolve_geometry("meta-llama/Meta-Llama-3-8B")
    assert kv_bytes_per_token_per_gpu(g, "bf16", tp=8) == 32 * 2 * 1 * 128 * 2 == 16_384
    assert kv_bytes_per_token_per_gpu(g, "bf16", tp=16) == 16_384
    assert kv_head_replicas(g, 16) == 2
    assert 16 * kv_bytes_per_token_per_gpu(g, "bf16", tp=16) == 2 * kv_bytes_per_token(g, "bf16") == 262_144
    # Gemma-2-2B: 26 layers, 8 query heads, 4 KV heads × 256. TP 8: one KV head per rank, each held twice.
    gemma = resolve_geometry("google/gemma-2-2b")
    assert kv_bytes_per_token_per_gpu(gemma, "bf16", tp=8) == 26 * 2 * 1 * 256 * 2 == 26_624


def test_mha_splits_evenly_and_mla_latent_is_not_split():
    opt = resolve_geometry("facebook/opt-1.3b")  # MHA: 24 layers × 32 heads × 64, 196,608 B per token in fp16
    assert kv_bytes_per_token_per_gpu(opt, "fp16", tp=4) == 24 * 2 * 8 * 64 * 2 == 49_152
    ds = resolve_geometry("deepseek-ai/DeepSeek-V2-Lite")  # MLA: 27 layers × (512 + 64) latent, 16 heads
    for tp in (1, 2, 4, 8, 16):
        assert kv_bytes_per_token_per_gpu(ds, "bf16", "paged", tp=tp) == 27 * 576 * 2 == 31_104


def test_weights_per_gpu_split_matmuls_and_replicate_norms():
    # Llama-3.1-70B by hand: embedding and LM head 128,256 × 8,192 each; per layer q and o 8,192², k and v
    # 8,192 × 1,024, MLP 3 × 8,192 × 28,672, two RMSNorms of 8,192; 80 layers and a final norm.
    embed = 128_256 * 8_192
    layer = 2 * 8_192**2 + 2 * 8_192 * 1_024 + 3 * 8_192 * 28_672 + 2 * 8_192
    total = 2 * embed + 80 * layer + 8_192
    assert total == 70_553_706_496
    g = resolve_geometry("meta-llama/Llama-3.1-70B")
    assert g.params == total
    norms = 80 * 2 * 8_192 + 8_192  # replicated on every rank; everything else (vocab included) is split
    for tp in (2, 4, 8):
        assert weights_bytes_per_gpu(g, 2, tp) == 2 * ((total - norms) // tp + norms)
    assert weights_bytes_per_gpu(g, 2, 8) == 17_640_734_720  # 16.4 GiB: fits an 80 GB GPU; TP 1's 131 GiB does not


def test_tp_degrees_vllm_refuses_are_refused():
    with pytest.raises(KvrayInputError, match="28 attention heads are not divisible by tensor parallel size 8"):
        kv_bytes_per_token_per_gpu(resolve_geometry("Qwen/Qwen2.5-7B"), "bf16", tp=8)
    with pytest.raises(KvrayInputError, match="2 KV heads cannot be split or replicated evenly"):
        kv_heads_per_gpu(resolve_geometry("Qwen/Qwen2.5-0.5B"), 7)  # 14 heads / 7 fine, 2 KV heads vs 7 not
    with pytest.raises(KvrayInputError, match="positive integer"):
        kv_heads_per_gpu(resolve_geometry("Qwen/Qwen2.5-0.5B"), 0)
