"""Tensor parallelism as vLLM does it: what one of N ranks holds of a model, as a geometry of its own.

``shard_geometry(g, tp)`` returns the geometry of one rank, so every other formula in kvray (KV bytes, weight
bytes, FLOPs and bytes of a pass, activation memory) applies to it unchanged and gives per-GPU figures. The
split follows vLLM's Megatron-style layers (vllm/model_executor/layers/linear.py,
vocab_parallel_embedding.py):

- **Attention heads** are split: ``num_attention_heads / tp`` query heads per rank; vLLM refuses a TP degree
  that does not divide them (vllm/config/model.py, ``ModelConfig.verify_with_parallel_config``: "Total number
  of attention heads (…) must be divisible by tensor parallel size").
- **KV heads** are split while there are enough, and **replicated** once ``tp`` exceeds them: every rank keeps
  at least one KV head. vllm/config/model.py, ``ModelConfig.get_num_kv_heads``:
  ``return max(1, total_num_kv_heads // parallel_config.tensor_parallel_size)``; the matching weights in
  vllm/model_executor/layers/linear.py, ``QKVParallelLinear.__init__``: ``if tp_size >= total_num_kv_heads:
  num_kv_heads = 1; num_kv_head_replicas = divide(tp_size, total_num_kv_heads)`` (``divide`` asserts exact
  division, so e.g. 8 KV heads allow TP 1, 2, 4, 8, 16 but not 12).
- **MLA** (DeepSeek-V2/V3) caches one compressed latent per token and layer that every rank needs whole:
  ``get_num_kv_heads`` returns 1 for MLA whatever the TP degree, so the latent cache is not split at all. Its
  down-projections (``q_a_proj``, ``kv_a_proj_with_mqa``) are ``ReplicatedLinear`` in
  vllm/model_executor/models/deepseek_v2.py; its up-projections and ``o_proj`` are split by head.
- **MLP** (gate/up column-parallel, down row-parallel) and routed/shared **experts** (FusedMoE splits each
  expert's intermediate dimension under TP) are split along the intermediate dimension; the MoE router is
  replicated.
- **Embedding and LM head** are vocab-parallel (``VocabParallelEmbedding``, ``ParallelLMHead``): ``vocab / tp``
  rows per rank (vLLM pads the vocabulary to a multiple of 64 per shard; kvray rounds up to whole rows only).
- **Replicated** on every rank: the norms, learned position tables (OPT, GPT-2), the MLA down-projections and
  the router. Row-parallel biases (rare: OPT, GPT-2) are counted as split, a few kB off.

An intermediate size that does not divide by ``tp`` is rounded up per rank (vLLM would refuse it).
"""

from __future__ import annotations

import dataclasses
import math

from kvray.errors import KvrayInputError
from kvray.model.geometry import ModelGeometry

TP_DEGREES = (1, 2, 4, 8)  # what ``kvray info`` tabulates


def check_tensor_parallel(g: ModelGeometry, tp: int) -> None:
    """vLLM's rules for a TP degree, as one clear line: heads must divide, KV heads divide or be divided."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise KvrayInputError(f"tensor parallel degree must be a positive integer, got {tp!r}")
    if g.num_attention_heads % tp:
        raise KvrayInputError(
            f"{g.name}: {g.num_attention_heads} attention heads are not divisible by tensor parallel size {tp} "
            "(vLLM refuses it too)"
        )
    kv = g.num_kv_heads
    if g.kv_lora_rank is None and (tp % kv if tp >= kv else kv % tp):
        raise KvrayInputError(
            f"{g.name}: {kv} KV heads cannot be split or replicated evenly over tensor parallel size {tp} "
            f"(one of the two must divide the other)"
        )


def kv_heads_per_gpu(g: ModelGeometry, tp: int) -> int:
    """KV heads one rank caches: ``max(1, kv_heads // tp)`` (vLLM's ``get_num_kv_heads``); 1 latent for MLA."""
    check_tensor_parallel(g, tp)
    if g.kv_lora_rank is not None:
        return 1
    return max(1, g.num_kv_heads // tp)


def kv_head_replicas(g: ModelGeometry, tp: int) -> int:
    """How many ranks hold a copy of each KV head (vLLM's ``num_kv_head_replicas``); MLA's latent: all ``tp``."""
    if g.kv_lora_rank is not None:
        return tp
    return max(1, tp // g.num_kv_heads) if tp >= g.num_kv_heads else 1


def shard_geometry(g: ModelGeometry, tp: int) -> ModelGeometry:
    """The geometry one rank of a TP=``tp`` group holds (``g`` itself for tp 1)."""
    check_tensor_parallel(g, tp)
    if tp == 1:
        return g
    cfg = dict(g.config)
    if g.model_type in ("opt", "gpt2"):
        # These families count attention as 4 × hidden² (count_params reads no head count): record the split
        # so the per-rank count divides it, the only family-specific rule left.
        cfg["_kvray_attention_shards"] = tp
    return dataclasses.replace(
        g,
        num_attention_heads=g.num_attention_heads // tp,
        num_kv_heads=kv_heads_per_gpu(g, tp) if g.kv_lora_rank is None else g.num_kv_heads,
        intermediate_size=math.ceil(g.intermediate_size / tp),
        moe_intermediate_size=math.ceil(g.moe_intermediate_size / tp) if g.moe_intermediate_size else None,
        vocab_size=math.ceil(g.vocab_size / tp),
        config=cfg,
    )


def weights_bytes_per_gpu(g: ModelGeometry, dtype_bytes: float, tp: int) -> int:
    """Weight bytes one rank holds: the split tensors' share plus every replicated tensor in full."""
    return shard_geometry(g, tp).weights_bytes(dtype_bytes)
