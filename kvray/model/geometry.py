"""Model geometry read from a Hugging Face ``config.json`` dict — no transformers import.

Everything kvray predicts (KV bytes, weight bytes, roofline times, OOM boundaries) starts here, so the
parser is strict: a config that lacks a key the family needs is a user error naming that key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvray.errors import KvrayInputError

# Config keys differ per family; each canonical field lists the aliases tried in order.
_ALIASES: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "max_sequence_length"),
}

SUPPORTED_FAMILIES = ("opt", "gpt2", "llama", "mistral", "qwen2", "gemma2", "deepseek_v2")


@dataclass(frozen=True)
class ModelGeometry:
    """The shape facts of a decoder-only LM that memory and speed depend on."""

    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    torch_dtype: str | None
    sliding_window: int | None
    layer_types: tuple[str, ...]  # "full_attention" | "sliding_attention", one per layer
    # Multi-head latent attention (DeepSeek-V2/V3); kv_lora_rank is None for dense attention.
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    # Mixture of experts; n_routed_experts is None for dense MLPs.
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def attention(self) -> str:
        """ "mla", "mha", "mqa" or "gqa"."""
        if self.kv_lora_rank is not None:
            return "mla"
        if self.num_kv_heads == self.num_attention_heads:
            return "mha"
        return "mqa" if self.num_kv_heads == 1 else "gqa"

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts is not None

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.first_k_dense_replace and layer % max(self.moe_layer_freq, 1) == 0

    @property
    def num_sliding_layers(self) -> int:
        return sum(t == "sliding_attention" for t in self.layer_types)

    @property
    def params(self) -> int:
        """Exact parameter count (shared tensors counted once), as ``sum(p.numel())`` would give."""
        return count_params(self)

    @property
    def active_params(self) -> int:
        """Parameters touched per token: all but the routed experts a token does not visit."""
        if not self.is_moe:
            return self.params
        assert self.n_routed_experts is not None and self.num_experts_per_tok is not None
        idle = self.n_routed_experts - self.num_experts_per_tok
        per_expert = 3 * self.hidden_size * (self.moe_intermediate_size or 0)
        moe_layers = sum(self.is_moe_layer(i) for i in range(self.num_layers))
        return self.params - moe_layers * idle * per_expert

    def weights_bytes(self, dtype_bytes: float) -> int:
        return int(self.params * dtype_bytes)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "config"}
        out["layer_types"] = list(self.layer_types)
        out["attention"] = self.attention
        out["params"] = self.params
        return out


def _get(cfg: dict[str, Any], key: str, name: str) -> Any:
    for alias in _ALIASES.get(key, (key,)):
        if cfg.get(alias) is not None:
            return cfg[alias]
    raise KvrayInputError(f"config.json of {name!r} lacks {_ALIASES.get(key, (key,))[0]!r}")


def _int(cfg: dict[str, Any], key: str, name: str) -> int:
    value = _get(cfg, key, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise KvrayInputError(f"config.json of {name!r}: {key!r} must be a positive integer, got {value!r}")
    return value


def _opt_int(cfg: dict[str, Any], key: str) -> int | None:
    value = cfg.get(key)
    return int(value) if value is not None else None


def _layer_types(cfg: dict[str, Any], model_type: str, num_layers: int) -> tuple[str, ...]:
    """Which layers use sliding-window attention, following each family's own config rule."""
    explicit = cfg.get("layer_types")
    if explicit:
        if len(explicit) != num_layers:
            raise KvrayInputError(f"config.json: layer_types has {len(explicit)} entries for {num_layers} layers")
        return tuple("sliding_attention" if "sliding" in t else "full_attention" for t in explicit)
    window = cfg.get("sliding_window")
    if model_type == "gemma2" and window:
        # Gemma-2 alternates, starting with a sliding layer.
        return tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers))
    if model_type == "qwen2":
        if window and cfg.get("use_sliding_window", False):
            first_full = cfg.get("max_window_layers", num_layers)
            return tuple("sliding_attention" if i >= first_full else "full_attention" for i in range(num_layers))
        return ("full_attention",) * num_layers
    if model_type == "mistral" and window:
        return ("sliding_attention",) * num_layers
    return ("full_attention",) * num_layers


def geometry_from_config(cfg: dict[str, Any], name: str | None = None) -> ModelGeometry:
    """Parse a config.json dict. Raises KvrayInputError naming the missing or bad key."""
    if not isinstance(cfg, dict):
        raise KvrayInputError(f"config.json of {name!r} is not a JSON object")
    name = name or str(cfg.get("_name_or_path") or "model")
    model_type = cfg.get("model_type")
    if not model_type:
        raise KvrayInputError(f"config.json of {name!r} lacks 'model_type'")
    num_layers = _int(cfg, "num_layers", name)
    hidden = _int(cfg, "hidden_size", name)
    heads = _int(cfg, "num_attention_heads", name)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise KvrayInputError(f"config.json of {name!r}: {heads} heads not divisible by {kv_heads} KV heads")
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if model_type == "opt":
        intermediate = _int(cfg, "ffn_dim", name)
    elif model_type == "gpt2":
        intermediate = int(cfg.get("n_inner") or 4 * hidden)
    else:
        intermediate = _int(cfg, "intermediate_size", name)
    layer_types = _layer_types(cfg, model_type, num_layers)
    window = cfg.get("sliding_window") if "sliding_attention" in layer_types else None
    default_tied = model_type in ("opt", "gpt2", "gemma2")
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    mla = cfg.get("kv_lora_rank") is not None
    return ModelGeometry(
        name=name,
        model_type=str(model_type),
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=_int(cfg, "vocab_size", name),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", default_tied)),
        max_position_embeddings=_int(cfg, "max_position_embeddings", name),
        torch_dtype=str(dtype) if dtype else None,
        sliding_window=int(window) if window else None,
        layer_types=layer_types,
        kv_lora_rank=_opt_int(cfg, "kv_lora_rank"),
        q_lora_rank=_opt_int(cfg, "q_lora_rank") if mla else None,
        qk_rope_head_dim=_int(cfg, "qk_rope_head_dim", name) if mla else None,
        qk_nope_head_dim=_int(cfg, "qk_nope_head_dim", name) if mla else None,
        v_head_dim=_int(cfg, "v_head_dim", name) if mla else None,
        n_routed_experts=_opt_int(cfg, "n_routed_experts"),
        n_shared_experts=_opt_int(cfg, "n_shared_experts"),
        num_experts_per_tok=_opt_int(cfg, "num_experts_per_tok"),
        moe_intermediate_size=_opt_int(cfg, "moe_intermediate_size"),
        first_k_dense_replace=int(cfg.get("first_k_dense_replace") or 0),
        moe_layer_freq=int(cfg.get("moe_layer_freq") or 1),
        config=dict(cfg),
    )


# --- parameter counting -------------------------------------------------------------------------------


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _gated_mlp(hidden: int, inner: int, bias: bool = False) -> int:
    return 2 * _linear(hidden, inner, bias) + _linear(inner, hidden, bias)


def count_params(g: ModelGeometry) -> int:
    """Exact parameter count per family, mirroring the transformers module tree."""
    cfg, h, L = g.config, g.hidden_size, g.num_layers
    if g.model_type == "opt":
        proj = int(cfg.get("word_embed_proj_dim") or h)
        bias = bool(cfg.get("enable_bias", True))
        ln = 2 * h if cfg.get("layer_norm_elementwise_affine", True) else 0
        total = g.vocab_size * proj + (g.max_position_embeddings + 2) * h
        if proj != h:
            total += 2 * h * proj
        if cfg.get("do_layer_norm_before", True) and not cfg.get("_remove_final_layer_norm", False):
            total += ln
        shards = int(cfg.get("_kvray_attention_shards", 1))  # one TP rank's share (kvray.model.parallel)
        layer = 4 * _linear(h, h // shards, bias) + _linear(h, g.intermediate_size, bias)
        layer += _linear(g.intermediate_size, h, bias)
        total += L * (layer + 2 * ln)
        lm_head = g.vocab_size * proj
    elif g.model_type == "gpt2":
        total = g.vocab_size * h + g.max_position_embeddings * h + 2 * h
        shards = int(cfg.get("_kvray_attention_shards", 1))  # one TP rank's share (kvray.model.parallel)
        layer = 4 * h + _linear(h, 3 * h // shards, True) + _linear(h // shards, h, True)
        layer += _linear(h, g.intermediate_size, True) + _linear(g.intermediate_size, h, True)
        total += L * layer
        lm_head = g.vocab_size * h
    elif g.model_type in ("llama", "mistral", "qwen2", "gemma2"):
        q_out, kv_out = g.num_attention_heads * g.head_dim, g.num_kv_heads * g.head_dim
        qkv_bias = g.model_type == "qwen2" or bool(cfg.get("attention_bias", False))
        o_bias = g.model_type != "qwen2" and bool(cfg.get("attention_bias", False))
        attn = _linear(h, q_out, qkv_bias) + 2 * _linear(h, kv_out, qkv_bias) + _linear(q_out, h, o_bias)
        norms = 4 if g.model_type == "gemma2" else 2
        mlp = _gated_mlp(h, g.intermediate_size, bool(cfg.get("mlp_bias", False)))
        total = g.vocab_size * h + L * (attn + mlp + norms * h) + h
        lm_head = g.vocab_size * h
    elif g.model_type == "deepseek_v2":
        total = g.vocab_size * h + h + L * (_mla_attention_params(g) + 2 * h)
        for layer in range(L):
            total += _deepseek_mlp_params(g, layer)
        lm_head = g.vocab_size * h
    else:
        raise KvrayInputError(
            f"model family {g.model_type!r} is not supported for parameter counting "
            f"(supported: {', '.join(SUPPORTED_FAMILIES)})"
        )
    return total + (0 if g.tie_word_embeddings else lm_head)


def _mla_attention_params(g: ModelGeometry) -> int:
    assert g.kv_lora_rank is not None and g.qk_rope_head_dim is not None
    assert g.qk_nope_head_dim is not None and g.v_head_dim is not None
    h, heads, bias = g.hidden_size, g.num_attention_heads, bool(g.config.get("attention_bias", False))
    qk_head_dim = g.qk_nope_head_dim + g.qk_rope_head_dim
    if g.q_lora_rank is None:
        q = _linear(h, heads * qk_head_dim, False)
    else:
        q = _linear(h, g.q_lora_rank, bias) + g.q_lora_rank + _linear(g.q_lora_rank, heads * qk_head_dim, False)
    kv = _linear(h, g.kv_lora_rank + g.qk_rope_head_dim, bias) + g.kv_lora_rank
    kv += _linear(g.kv_lora_rank, heads * (g.qk_nope_head_dim + g.v_head_dim), False)
    return q + kv + _linear(heads * g.v_head_dim, h, bias)


def _deepseek_mlp_params(g: ModelGeometry, layer: int) -> int:
    h = g.hidden_size
    if not g.is_moe_layer(layer):
        return _gated_mlp(h, g.intermediate_size)
    assert g.n_routed_experts is not None and g.moe_intermediate_size is not None
    experts = g.n_routed_experts * _gated_mlp(h, g.moe_intermediate_size)
    shared = _gated_mlp(h, g.moe_intermediate_size * (g.n_shared_experts or 0)) if g.n_shared_experts else 0
    router = g.n_routed_experts * h
    return experts + shared + router
