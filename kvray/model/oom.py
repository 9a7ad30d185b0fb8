"""OOM risk before running: weights + KV + an activation estimate against the memory available.

Used by ``kvray check`` and by every runner before a cell starts (the seed's safety feature).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kvray.errors import KvrayInputError
from kvray.hardware.gpus import GPUS, GpuSpec, get_gpu
from kvray.model.geometry import ModelGeometry
from kvray.model.kvmath import dtype_bytes, kv_bytes_batch, kv_bytes_per_token, normalize_dtype
from kvray.model.parallel import TP_DEGREES, check_tensor_parallel, kv_heads_per_gpu, shard_geometry
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


@dataclass(frozen=True)
class OomRisk:
    """One OOM estimate, per GPU of a TP group: the memory budget in GiB, its fraction of what is available, the
    verdict and what to do about it. ``to_dict`` gives ``kvray check --json``'s object (the field names)."""

    model: str
    tensor_parallel: int
    per_gpu: bool  # figures are one rank's (tp > 1)
    concurrency: int
    seq_len: int  # cached tokens per sequence
    dtype: str
    kv_dtype: str
    layout: str
    device: str  # the GPU named, this machine's first GPU, "cpu" (free RAM) or "given"
    risk_level: str  # low | medium | high
    weights_gb: float
    kv_gb: float
    activation_gb: float
    overhead_gb: float
    total_estimated_gb: float
    available_gb: float
    fraction_of_available: float
    max_concurrency: int  # sequences of seq_len that stay below the medium line
    recommendations: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_oom_risk(
    model: str | ModelGeometry,
    concurrency: int,
    seq_len: int,
    *,
    dtype: str = "bf16",
    gpu: str | None = None,
    kv_dtype: str | None = None,
    layout: str = "hf",
    available_bytes: int | None = None,
    tp: int = 1,
) -> OomRisk:
    """Estimate memory for ``concurrency`` sequences of ``seq_len`` cached tokens, per GPU of a TP=``tp`` group.

    ``available_gb`` is the named GPU's capacity, else the first NVML device's total memory, else
    this machine's free RAM (the run would happen on the CPU). Under TP every figure is one rank's:
    its share of the weights, its KV heads (kvray.model.parallel), its activations; the runtime overhead
    is paid on every GPU.
    """
    if concurrency <= 0 or seq_len <= 0:
        raise KvrayInputError(f"concurrency and seq_len must be positive, got {concurrency} and {seq_len}")
    full = resolve_geometry(model) if isinstance(model, str) else model
    g = shard_geometry(full, tp)  # one rank (the model itself at tp 1)
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
        more_tp = [n for n in TP_DEGREES if n > tp and _tp_ok(full, n)]
        if more_tp:
            recommendations.append(
                f"tensor parallelism splits weights and KV heads over GPUs: try --tp {' or '.join(map(str, more_tp))}"
            )
        if roomy:
            recommendations.append(f"GPUs with room for this cell: {', '.join(roomy)}")
    return OomRisk(
        model=g.name,
        tensor_parallel=tp,
        per_gpu=tp > 1,
        concurrency=concurrency,
        seq_len=seq_len,
        dtype=dtype,
        kv_dtype=kv_dtype,
        layout=layout,
        device=device,
        risk_level=risk,
        weights_gb=weights / GIB,
        kv_gb=kv / GIB,
        activation_gb=act / GIB,
        overhead_gb=RUNTIME_OVERHEAD_BYTES / GIB,
        total_estimated_gb=total / GIB,
        available_gb=available_bytes / GIB,
        fraction_of_available=fraction,
        max_concurrency=max_concurrency,
        recommendations=recommendations,
    )


def kv_tokens_that_fit(
    g: ModelGeometry,
    gpu: str | GpuSpec,
    dtype: str = "bf16",
    kv_dtype: str | None = None,
    layout: str = "hf",
    memory_fraction: float = KV_FIT_MEMORY_FRACTION,
    tp: int = 1,
) -> int:
    """Cached tokens (summed over all sequences) that fit on ``gpu`` beside the weights and the runtime.

    The capacity question a reader asks before any workload exists; 0 when the weights alone do not fit.
    ``memory_fraction`` leaves the allocator's fragmentation room, as a serving engine's
    ``gpu_memory_utilization`` does. Under TP the count is per GPU (one rank's weights share and KV heads); a
    group of ``tp`` GPUs serves that many tokens, since every rank holds its heads of the same tokens.
    """
    g = shard_geometry(g, tp)
    spec = get_gpu(gpu) if isinstance(gpu, str) else gpu
    dtype = normalize_dtype(dtype)
    weights = g.weights_bytes(dtype_bytes(dtype))
    per_token = kv_bytes_per_token(g, normalize_dtype(kv_dtype or dtype), layout)
    room = memory_fraction * spec.memory_bytes - weights - RUNTIME_OVERHEAD_BYTES
    return max(int(room // per_token), 0)


def model_summary(g: ModelGeometry, dtype: str = "bf16", tp: int = 1) -> dict[str, Any]:
    """What ``kvray info`` reports: the geometry, weight bytes, KV bytes per token in both layouts and the
    KV tokens that fit beside the weights on every GPU kvray knows, whole-model and per GPU at TP ``tp``, and
    the per-GPU figures for TP 1/2/4/8 (the degrees the model's heads allow). Plain values, ready for JSON."""
    dtype = normalize_dtype(dtype)
    check_tensor_parallel(g, tp)
    rank = shard_geometry(g, tp)
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
        "tensor_parallel": tp,
        "kv_heads_per_gpu": kv_heads_per_gpu(g, tp),
        "kv_bytes_per_token_per_gpu": kv_bytes_per_token(rank, dtype, "hf"),
        "weights_bytes_per_gpu": rank.weights_bytes(dtype_bytes(dtype)),
        "kv_tokens_fitting_per_gpu": {name: kv_tokens_that_fit(g, spec, dtype, tp=tp) for name, spec in GPUS.items()},
        "per_tp": [_tp_row(g, n, dtype) for n in TP_DEGREES if _tp_ok(g, n)],
    }


def _tp_ok(g: ModelGeometry, tp: int) -> bool:
    try:
        check_tensor_parallel(g, tp)
    except KvrayInputError:
        return False
    return True


def _tp_row(g: ModelGeometry, tp: int, dtype: str) -> dict[str, Any]:
    """Per-GPU weights, KV per token and tokens that fit at one TP degree (``info``'s TP table)."""
    rank = shard_geometry(g, tp)
    return {
        "tensor_parallel": tp,
        "kv_heads_per_gpu": kv_heads_per_gpu(g, tp),
        "weights_bytes_per_gpu": rank.weights_bytes(dtype_bytes(dtype)),
        "kv_bytes_per_token_per_gpu": kv_bytes_per_token(rank, dtype, "hf"),
        "kv_tokens_fitting_per_gpu": {name: kv_tokens_that_fit(g, spec, dtype, tp=tp) for name, spec in GPUS.items()},
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
