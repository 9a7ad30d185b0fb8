"""OOM risk before running: weights + KV + an activation estimate against the memory available.

Used by ``kvray check`` and by every runner before a cell starts (the seed's safety feature).
"""

from __future__ import annotations

from typing import Any

from kvray.errors import KvrayInputError
from kvray.hardware.gpus import GPUS, GpuSpec, get_gpu
from kvray.model.geometry import ModelGeometry
from kvray.model.kvmath import dtype_bytes, kv_bytes_batch, kv_bytes_per_token, normalize_dtype
from kvray.model.resolve import resolve_geometry
from kvray.units import GIB

RUNTIME_OVERHEAD_BYTES = int(0.5 * GIB)  # CUDA context, allocator slack, kernels' workspaces
LOW_RISK, MEDIUM_RISK = 0.70, 0.90  # fraction of available memory
KV_FIT_MEMORY_FRACTION = 0.9  # of a GPU's memory, what ``kvray info`` lets weights + KV + runtime fill


def activation_bytes(g: ModelGeometry, concurrency: int, prompt_toks: int, dtype: str) -> int:
    """Peak transient memory of a prefill pass, beside weights and KV.

    The widest layer-local tensors live at once: hidden states and QKV (~4·hidden) and the MLP's
    up/gate projections (2·intermediate) for every prompt token, plus last-token logits in fp32.
    SDPA/flash attention never materialises the P×P score matrix, so it is not counted.
    """
    per_token = (4 * g.hidden_size + 2 * g.intermediate_size) * dtype_bytes(dtype)
    return int(concurrency * prompt_toks * per_token + concurrency * g.vocab_size * 4)


def check_oom_risk(
    model: str | ModelGeometry,
    concurrency: int,
    seq_len: int,
    dtype: str = "bf16",
    gpu: str | None = None,
    kv_dtype: str | None = None,
    layout: str = "hf",
    available_bytes: int | None = None,
) -> dict[str, Any]:
    """Estimate memory for ``concurrency`` sequences of ``seq_len`` cached tokens.

    ``available_gb`` is the named GPU's capacity, else the first NVML device's total memory, else
    this machine's free RAM (the run would happen on the CPU).
    """
    if concurrency <= 0 or seq_len <= 0:
        raise KvrayInputError(f"concurrency and seq_len must be positive, got {concurrency} and {seq_len}")
    g = resolve_geometry(model) if isinstance(model, str) else model
    dtype = normalize_dtype(dtype, allow_fp8=False)
    kv_dtype = normalize_dtype(kv_dtype or dtype)
    device = "given"
    if available_bytes is None:
        available_bytes, device = _available_bytes(gpu)
    weights = g.weights_bytes(dtype_bytes(dtype))
    kv = kv_bytes_batch(g, [seq_len] * concurrency, kv_dtype, layout)
    act = activation_bytes(g, concurrency, seq_len, dtype)
    total = weights + kv + act + RUNTIME_OVERHEAD_BYTES
    fraction = total / available_bytes if available_bytes > 0 else float("inf")
    risk = "low" if fraction < LOW_RISK else "medium" if fraction < MEDIUM_RISK else "high"

    per_seq = kv_bytes_batch(g, [seq_len], kv_dtype, layout) + activation_bytes(g, 1, seq_len, dtype)
    room = MEDIUM_RISK * available_bytes - weights - RUNTIME_OVERHEAD_BYTES
    max_concurrency = max(int(room // per_seq), 0) if per_seq else 0

    recommendations: list[str] = []
    if risk != "low":
        if max_concurrency == 0:
            recommendations.append(
                f"even one sequence of {seq_len} tokens does not fit: shorten it or use a bigger GPU"
            )
        elif max_concurrency < concurrency:
            recommendations.append(f"reduce concurrency to {max_concurrency} or fewer at {seq_len} tokens")
        if dtype == "fp32":
            recommendations.append("use bf16 or fp16 weights: half the weight and KV bytes")
        if kv_dtype != "fp8":
            recommendations.append("an fp8 KV cache (vLLM --kv-cache-dtype fp8) halves the KV bytes")
        if layout == "hf":
            recommendations.append("a paged-KV engine (vLLM) allocates KV per request instead of per padded batch")
        roomy = [name for name, spec in GPUS.items() if total < LOW_RISK * spec.memory_bytes]
        if roomy:
            recommendations.append(f"GPUs with room for this cell: {', '.join(roomy)}")
    return {
        "model": g.name,
        "concurrency": concurrency,
        "seq_len": seq_len,
        "dtype": dtype,
        "kv_dtype": kv_dtype,
        "layout": layout,
        "device": device,
        "risk_level": risk,
        "weights_gb": weights / GIB,
        "kv_gb": kv / GIB,
        "activation_gb": act / GIB,
        "overhead_gb": RUNTIME_OVERHEAD_BYTES / GIB,
        "total_estimated_gb": total / GIB,
        "available_gb": available_bytes / GIB,
        "fraction_of_available": fraction,
        "max_concurrency": max_concurrency,
        "recommendations": recommendations,
    }


def kv_tokens_that_fit(
    g: ModelGeometry,
    gpu: str | GpuSpec,
    dtype: str = "bf16",
    kv_dtype: str | None = None,
    layout: str = "hf",
    memory_fraction: float = KV_FIT_MEMORY_FRACTION,
) -> int:
    """Cached tokens (summed over all sequences) that fit on ``gpu`` beside the weights and the runtime.

    The capacity question a reader asks before any workload exists; 0 when the weights alone do not fit.
    ``memory_fraction`` leaves the allocator's fragmentation room, as a serving engine's
    ``gpu_memory_utilization`` does.
    """
    spec = get_gpu(gpu) if isinstance(gpu, str) else gpu
    dtype = normalize_dtype(dtype)
    weights = g.weights_bytes(dtype_bytes(dtype))
    per_token = kv_bytes_per_token(g, normalize_dtype(kv_dtype or dtype), layout)
    room = memory_fraction * spec.memory_bytes - weights - RUNTIME_OVERHEAD_BYTES
    return max(int(room // per_token), 0)


def model_summary(g: ModelGeometry, dtype: str = "bf16") -> dict[str, Any]:
    """What ``kvray info`` reports: the geometry, weight bytes, KV bytes per token in both layouts and the
    KV tokens that fit beside the weights on every GPU kvray knows. Plain values, ready for JSON."""
    dtype = normalize_dtype(dtype)
    per_token = kv_bytes_per_token(g, dtype, "hf")
    return {
        "model": g.name,
        "model_type": g.model_type,
        "dtype": dtype,
        "num_layers": g.num_layers,
        "hidden_size": g.hidden_size,
        "num_attention_heads": g.num_attention_heads,
        "num_kv_heads": g.num_kv_heads,
        "head_dim": g.head_dim,
        "attention": g.attention,
        "sliding_window": g.sliding_window,
        "num_sliding_layers": g.num_sliding_layers,
        "kv_lora_rank": g.kv_lora_rank,
        "max_position_embeddings": g.max_position_embeddings,
        "vocab_size": g.vocab_size,
        "params": g.params,
        "active_params": g.active_params,
        "weights_bytes": g.weights_bytes(dtype_bytes(dtype)),
        "kv_bytes_per_token": per_token,
        "kv_bytes_per_token_paged": kv_bytes_per_token(g, dtype, "paged"),
        "kv_bytes_per_1k_tokens": per_token * 1000,
        "kv_tokens_fitting_beside_weights": {name: kv_tokens_that_fit(g, spec, dtype) for name, spec in GPUS.items()},
    }


def _available_bytes(gpu: str | None) -> tuple[int, str]:
    if gpu:
        spec = get_gpu(gpu)
        return spec.memory_bytes, spec.name
    from kvray.hardware.env import nvml_gpus

    gpus, _, _ = nvml_gpus()
    if gpus:
        return gpus[0].memory_bytes, gpus[0].name
    import psutil

    return int(psutil.virtual_memory().available), "cpu"
