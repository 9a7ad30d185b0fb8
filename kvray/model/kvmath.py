"""KV-cache bytes for a model geometry, in two layouts.

``hf``    — exactly what transformers' DynamicCache holds (checked against real caches in the tests):
            dense layers keep K and V of ``num_kv_heads × head_dim`` per token; sliding-window layers keep
            at most ``sliding_window − 1`` positions; DeepSeek-V2 MLA layers keep the compressed latent
            (``kv_lora_rank``) as keys and the rope key (``qk_rope_head_dim``) as values, one head.
``paged`` — vLLM's layout: blocks of ``block_size`` tokens per request, rounded up; MLA stores
            ``kv_lora_rank + qk_rope_head_dim`` once per layer (no ×2).

After ``generate`` with P prompt and G new tokens a request's cache holds P + G − 1 positions: the last
sampled token is never fed back through the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from kvray.errors import KvrayInputError
from kvray.model.geometry import ModelGeometry
from kvray.model.parallel import shard_geometry

DTYPE_BYTES: dict[str, float] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
_DTYPE_ALIASES = {
    "float32": "fp32", "float": "fp32", "fp32": "fp32",
    "float16": "fp16", "half": "fp16", "fp16": "fp16",
    "bfloat16": "bf16", "bf16": "bf16",
    "fp8": "fp8", "float8": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8",
}  # fmt: skip
LAYOUTS = ("hf", "paged")
DEFAULT_BLOCK_SIZE = 16  # vLLM's default on GPU; its CPU build uses 128


def normalize_dtype(dtype: str, allow_fp8: bool = True) -> str:
    """Canonical short dtype name ("bf16"), or a KvrayInputError listing the known ones."""
    key = _DTYPE_ALIASES.get(str(dtype).lower().replace("torch.", ""))
    if key is None or (key == "fp8" and not allow_fp8):
        known = [d for d in DTYPE_BYTES if allow_fp8 or d != "fp8"]
        raise KvrayInputError(f"unknown dtype {dtype!r} (known: {', '.join(known)})")
    return key


def dtype_bytes(dtype: str) -> float:
    return DTYPE_BYTES[normalize_dtype(dtype)]


def kv_bytes_per_token_per_layer(g: ModelGeometry, dtype: str, layout: str = "hf") -> float:
    """Bytes one token adds to one layer's cache (before any window cap or block rounding)."""
    if layout not in LAYOUTS:
        raise KvrayInputError(f"unknown KV layout {layout!r} (known: {', '.join(LAYOUTS)})")
    nbytes = dtype_bytes(dtype)
    if g.kv_lora_rank is not None:
        assert g.qk_rope_head_dim is not None
        return (g.kv_lora_rank + g.qk_rope_head_dim) * nbytes  # same latent in both layouts
    return 2 * g.num_kv_heads * g.head_dim * nbytes


def kv_bytes_per_token(g: ModelGeometry, dtype: str = "bf16", layout: str = "hf") -> float:
    """Bytes per cached token across all layers — the headline figure of ``kvray info``."""
    return g.num_layers * kv_bytes_per_token_per_layer(g, dtype, layout)


def kv_bytes_per_token_per_gpu(g: ModelGeometry, dtype: str = "bf16", layout: str = "hf", tp: int = 1) -> float:
    """Bytes per cached token on one GPU of a TP=``tp`` group.

    KV heads are split across ranks and replicated once ``tp`` exceeds them (each rank keeps
    ``max(1, kv_heads // tp)``, vLLM's ``ModelConfig.get_num_kv_heads`` in vllm/config/model.py); MLA's latent
    is held whole by every rank. See kvray.model.parallel for the rules and their sources.
    """
    return kv_bytes_per_token(shard_geometry(g, tp), dtype, layout)


def layer_positions(g: ModelGeometry, layer: int, tokens: int) -> int:
    """Positions layer ``layer`` keeps for a sequence of ``tokens`` positions in the hf layout."""
    if g.layer_types[layer] == "sliding_attention" and g.sliding_window:
        return min(tokens, g.sliding_window - 1)
    return tokens


def cached_positions(prompt_toks: int, gen_toks: int) -> int:
    """Positions in the cache after generating ``gen_toks`` tokens from a ``prompt_toks`` prompt."""
    return prompt_toks + max(gen_toks, 1) - 1


def kv_bytes_sequence(
    g: ModelGeometry, tokens: int, dtype: str = "bf16", layout: str = "hf", block_size: int = DEFAULT_BLOCK_SIZE
) -> int:
    """KV bytes of one sequence holding ``tokens`` positions."""
    if tokens < 0:
        raise KvrayInputError(f"token count must be >= 0, got {tokens}")
    per_layer = kv_bytes_per_token_per_layer(g, dtype, layout)
    total = 0.0
    for layer in range(g.num_layers):
        kept = layer_positions(g, layer, tokens)
        if layout == "paged":
            if g.layer_types[layer] == "sliding_attention" and g.sliding_window:
                kept = min(tokens, g.sliding_window)  # vLLM keeps the whole window
            kept = math.ceil(kept / block_size) * block_size
        total += kept * per_layer
    return int(total)


def layer_positions_array(
    g: ModelGeometry, layer: int, tokens: Any, layout: str = "hf", block_size: int = DEFAULT_BLOCK_SIZE
) -> Any:
    """The positions ``kv_bytes_sequence`` charges layer ``layer`` for each of a NumPy array of sequence lengths (the
    same rules, block rounding included): the simulator's cost tables over every context at once."""
    import numpy as np

    window = g.sliding_window if g.layer_types[layer] == "sliding_attention" else None
    kept = np.minimum(tokens, window - 1) if window else tokens  # layer_positions
    if layout == "paged":
        if window:
            kept = np.minimum(tokens, window)  # vLLM keeps the whole window
        kept = -(-kept // block_size) * block_size
    return kept


def kv_bytes_batch(
    g: ModelGeometry,
    sequence_tokens: Iterable[int],
    dtype: str = "bf16",
    layout: str = "hf",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> int:
    """KV bytes of several sequences.

    For the hf layout a static batch is padded to its longest member, so every row holds the
    longest length; for paged each request holds only its own blocks.
    """
    lengths = list(sequence_tokens)
    if not lengths:
        return 0
    if layout == "hf":
        return len(lengths) * kv_bytes_sequence(g, max(lengths), dtype, "hf")
    return sum(kv_bytes_sequence(g, n, dtype, "paged", block_size) for n in lengths)


def max_tokens_in(g: ModelGeometry, free_bytes: float, dtype: str = "bf16", layout: str = "hf") -> int:
    """How many tokens of KV (all layers, no window cap) fit in ``free_bytes``."""
    per_token = kv_bytes_per_token(g, dtype, layout)
    return max(int(free_bytes // per_token), 0)


def paged_blocks_in(
    g: ModelGeometry, pool_bytes: float, dtype: str = "bf16", block_size: int = DEFAULT_BLOCK_SIZE
) -> int:
    """Whole blocks of ``block_size`` tokens a paged KV pool of ``pool_bytes`` holds (vLLM's and transformers'
    sizing: the pool is cut into blocks and a partial block is never used)."""
    return int(pool_bytes // (block_size * kv_bytes_per_token(g, dtype, "paged")))
