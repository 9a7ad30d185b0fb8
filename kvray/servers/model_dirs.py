"""Servable model directories built offline: config + random weights + a word-level tokenizer.

Server backends (vLLM, ``transformers serve``) load a model *directory* — weights and a tokenizer — not a
config. For random-weight cells kvray writes one: the config kvray resolved, seeded random weights in
safetensors, and a word-level tokenizer whose every token decodes to a whole word. A byte-level BPE
tokenizer on random weights emits partial UTF-8 that servers hold back (field notes), so streamed chunks
would not line up with tokens; with whole words every generated token is one visible piece of text.

Directories are cached under ``$KVRAY_CACHE_DIR`` (default ``~/.cache/kvray``) by content hash, so a sweep
builds each model once and every backend serves the same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kvray.errors import KvrayInputError
from kvray.model.kvmath import normalize_dtype
from kvray.model.resolve import load_config

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
# Used by servers for /v1/chat/completions; plain concatenation keeps prompt lengths predictable.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
_FORMAT_VERSION = 1  # bump when the directory layout changes, so stale caches are rebuilt


def cache_dir() -> Path:
    return Path(os.environ.get("KVRAY_CACHE_DIR", Path.home() / ".cache" / "kvray")).expanduser()


def word(i: int) -> str:
    """The text of vocabulary entry ``i`` (ids 0–3 are the special tokens)."""
    return SPECIAL_TOKENS[i] if i < len(SPECIAL_TOKENS) else f"w{i}"


def build_word_tokenizer(vocab_size: int, bos_id: int = 1, eos_id: int = 2, pad_id: int = 0) -> Any:
    """A ``PreTrainedTokenizerFast`` over ``vocab_size`` whitespace-separated words, BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= len(SPECIAL_TOKENS):
        raise KvrayInputError(f"vocab_size {vocab_size} is too small for a word-level tokenizer")
    vocab = {word(i): i for i in range(vocab_size)}
    names = {"pad": word(pad_id), "bos": word(bos_id), "eos": word(eos_id), "unk": "<unk>"}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=names["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Decoding joins words with a space; Metaspace-style markers would make the first token special.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{names['bos']} $A", pair=f"{names['bos']} $A $B", special_tokens=[(names["bos"], bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=names["bos"],
        eos_token=names["eos"],
        pad_token=names["pad"],
        unk_token=names["unk"],
        chat_template=CHAT_TEMPLATE,
    )


def special_ids(pad: Any, bos: Any, eos: Any) -> tuple[int, int, int]:
    """(pad, bos, eos) of the word tokenizer for a config's ids: the config's own when they are three distinct
    special words (ids 0–3), else 0, 1, 2 — the served directory's config is rewritten to match."""
    eos_id = eos[0] if isinstance(eos, list) else (eos if eos is not None else 2)
    bos_id = bos if bos is not None else 1
    pad_id = pad if pad is not None else 0
    if len({bos_id, eos_id, pad_id}) < 3 or max(bos_id, eos_id, pad_id) >= len(SPECIAL_TOKENS):
        return 0, 1, 2
    return int(pad_id), int(bos_id), int(eos_id)


def bundled_word_tokenizer(model: str) -> Any:
    """The tokenizer of a model kvray bundles as a geometry alone (``kvray/tiny-llama``): such an id is on no hub,
    and a server kvray starts for it serves the directory ``servable_model_dir`` writes, whose tokenizer is this
    one — the same vocabulary and special ids, built offline."""
    config = load_config(model)
    pad_id, bos_id, eos_id = special_ids(
        config.get("pad_token_id"), config.get("bos_token_id"), config.get("eos_token_id")
    )
    return build_word_tokenizer(int(config["vocab_size"]), bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)


def _config_key(config: dict[str, Any], dtype: str, seed: int) -> str:
    blob = json.dumps({"config": config, "dtype": dtype, "seed": seed, "v": _FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def is_servable_dir(path: Path) -> bool:
    """A directory a server can load: config, weights and a tokenizer."""
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
    return (path / "config.json").is_file() and has_weights and has_tokenizer


def servable_model_dir(model: str, dtype: str = "fp32", seed: int = 0, root: Path | None = None) -> Path:
    """A directory holding ``model``'s config with random weights and a word-level tokenizer.

    A local directory that already has weights and a tokenizer is returned unchanged. Otherwise the
    geometry kvray resolves for ``model`` (bundled, local config or hub config) gets seeded random
    weights in ``dtype``; the result is cached and reused.
    """
    local = Path(model).expanduser()
    if local.is_dir() and is_servable_dir(local):
        return local.resolve()
    dtype = normalize_dtype(dtype, allow_fp8=False)
    config = {k: v for k, v in load_config(model).items() if not k.startswith("_kvray")}
    out = (
        root or cache_dir() / "models"
    ) / f"{model.replace('/', '--').strip('.-')}-{_config_key(config, dtype, seed)}"
    if is_servable_dir(out):
        return out
    _write_model_dir(out, config, dtype, seed)
    return out


def _write_model_dir(out: Path, config: dict[str, Any], dtype: str, seed: int) -> None:
    """Write to a temporary sibling, then rename: a concurrent or interrupted build never leaves half a dir."""
    import shutil

    import torch
    import transformers

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "_name_or_path", "torch_dtype", "dtype")}
    hf_config = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).to(torch_dtype).eval()
    pad_id, bos_id, eos_id = special_ids(hf_config.pad_token_id, hf_config.bos_token_id, hf_config.eos_token_id)
    if (pad_id, bos_id, eos_id) != (hf_config.pad_token_id, hf_config.bos_token_id, hf_config.eos_token_id):
        model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = pad_id, bos_id, eos_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = pad_id
            model.generation_config.bos_token_id = bos_id
            model.generation_config.eos_token_id = eos_id
    tokenizer = build_word_tokenizer(hf_config.vocab_size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
        return
    os.replace(tmp, out)
