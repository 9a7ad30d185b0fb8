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
    kv_bytes_sequence,
    max_tokens_in,
    normalize_dtype,
)
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
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen, min_new_tokens=gen,
            do_sample=False, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
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
