"""Tiny model configs (one per attention kind) and builders shared by the tests.

They are real transformers architectures shrunk to a few hundred thousand parameters, so generate()
runs in milliseconds on a CPU and nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "opt": {
        "model_type": "opt", "architectures": ["OPTForCausalLM"], "hidden_size": 64, "ffn_dim": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "word_embed_proj_dim": 64, "vocab_size": 320,
        "max_position_embeddings": 512, "do_layer_norm_before": True, "enable_bias": True,
        "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float32",
    },
    "llama-gqa": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
        "max_position_embeddings": 512, "tie_word_embeddings": False, "rope_theta": 10000.0,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
    },
    "mistral-swa": {
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 320,
        "max_position_embeddings": 512, "sliding_window": 16, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
    },
    "deepseek-mla": {
        "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 4, "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "first_k_dense_replace": 1, "kv_lora_rank": 32, "q_lora_rank": None, "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 16, "v_head_dim": 16, "vocab_size": 320, "max_position_embeddings": 512,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "torch_dtype": "float32",
    },
}  # fmt: skip


def tiny_config(kind: str, **overrides: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(TINY_CONFIGS[kind])
    cfg["_name_or_path"] = f"tiny-{kind}"
    cfg.update(overrides)
    return cfg


def build_model(cfg: dict[str, Any]) -> Any:
    import transformers

    kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "_name_or_path")}
    config = transformers.AutoConfig.for_model(cfg["model_type"], **kwargs)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def write_model_dir(path: Path, cfg: dict[str, Any]) -> Path:
    """A local model directory holding just config.json, as a user's checkout would."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path
