"""Geometry parsing and exact parameter counts against transformers' own modules."""

import json

import pytest
from tiny_models import TINY_CONFIGS, build_model, tiny_config

from kvray.errors import KvrayInputError
from kvray.model.geometry import geometry_from_config
from kvray.model.resolve import BUNDLED_DIR, bundled_models, resolve_geometry


def _shrink(cfg: dict) -> dict:
    """A bundled config scaled down but keeping its family's structural switches."""
    small = dict(cfg)
    mt = cfg["model_type"]
    if mt == "opt":
        small.update(
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=128,
        )
    elif mt == "gpt2":
        small.update(n_embd=64, n_layer=2, n_head=4, n_positions=128, n_ctx=128)
    elif mt == "deepseek_v2":
        small.update(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            kv_lora_rank=32,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=16,
            max_position_embeddings=256,
            rope_scaling=None,
        )
    else:
        kv_ratio = cfg["num_attention_heads"] // cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        small.update(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=max(1, 4 // kv_ratio),
            max_position_embeddings=256,
            rope_scaling=None,
        )
        if "head_dim" in small:
            small["head_dim"] = 32
        if small.get("sliding_window"):
            small["sliding_window"] = 16
    small.update(vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return small


@pytest.mark.parametrize("path", sorted(BUNDLED_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_param_count_is_exact_for_every_bundled_family(path):
    small = _shrink(json.loads(path.read_text()))
    model = build_model(small)
    assert geometry_from_config(small).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_param_count_is_exact_for_test_models(kind):
    cfg = tiny_config(kind)
    assert geometry_from_config(cfg).params == sum(p.numel() for p in build_model(cfg).parameters())


def test_opt_with_projection_and_untied_head_counts_exactly():
    cfg = tiny_config("opt", word_embed_proj_dim=32, tie_word_embeddings=False)
    assert geometry_from_config(cfg).params == sum(p.numel() for p in build_model(cfg).parameters())


@pytest.mark.parametrize(
    ("model", "billions"),
    [
        ("meta-llama/Meta-Llama-3-8B", 8.030),
        ("meta-llama/Llama-2-7b-hf", 6.738),
        ("mistralai/Mistral-7B-v0.1", 7.242),
        ("meta-llama/Llama-3.1-70B", 70.554),
        ("deepseek-ai/DeepSeek-V2-Lite", 15.706),
        ("facebook/opt-1.3b", 1.316),
        ("Qwen/Qwen2.5-0.5B", 0.494),
    ],
)
def test_bundled_geometries_match_published_sizes(model, billions):
    assert resolve_geometry(model).params / 1e9 == pytest.approx(billions, abs=0.001)


def test_attention_kinds_and_windows():
    assert resolve_geometry("facebook/opt-1.3b").attention == "mha"
    assert resolve_geometry("meta-llama/Meta-Llama-3-8B").attention == "gqa"
    assert resolve_geometry("deepseek-ai/DeepSeek-V2-Lite").attention == "mla"
    assert geometry_from_config(tiny_config("llama-gqa", num_key_value_heads=1)).attention == "mqa"
    gemma = resolve_geometry("google/gemma-2-2b")
    assert gemma.head_dim == 256  # explicit head_dim wins over hidden / heads (2304 / 8 = 288)
    assert gemma.layer_types[:2] == ("sliding_attention", "full_attention")
    assert gemma.num_sliding_layers == 13 and gemma.sliding_window == 4096
    assert resolve_geometry("Qwen/Qwen2.5-7B").sliding_window is None  # use_sliding_window is false
    assert resolve_geometry("mistralai/Mistral-7B-v0.1").num_sliding_layers == 32


def test_explicit_layer_types_are_honoured():
    cfg = tiny_config("llama-gqa", sliding_window=8, layer_types=["full_attention", "sliding_attention"])
    g = geometry_from_config(cfg)
    assert g.layer_types == ("full_attention", "sliding_attention") and g.sliding_window == 8


def test_moe_active_params_are_fewer():
    g = resolve_geometry("deepseek-ai/DeepSeek-V2-Lite")
    assert g.is_moe and 2.0e9 < g.active_params < 3.0e9 < g.params


def test_missing_key_is_named():
    cfg = tiny_config("llama-gqa")
    del cfg["num_hidden_layers"]
    with pytest.raises(KvrayInputError, match="num_hidden_layers"):
        geometry_from_config(cfg)


def test_resolution_order_local_dir_then_bundled_then_offline_error(tmp_path):
    from tiny_models import write_model_dir

    local = write_model_dir(tmp_path / "facebook" / "opt-1.3b", tiny_config("opt"))
    assert resolve_geometry(str(local)).hidden_size == 64  # the directory wins over the bundled id
    assert resolve_geometry("facebook/opt-1.3b").hidden_size == 2048
    with pytest.raises(KvrayInputError, match="bundled: .*facebook/opt-1.3b"):
        resolve_geometry("nobody/no-such-model")
    assert "kvray/tiny-llama" in bundled_models()


def test_malformed_config_json_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(KvrayInputError, match="not valid JSON"):
        resolve_geometry(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KvrayInputError, match="without config.json"):
        resolve_geometry(str(empty))
