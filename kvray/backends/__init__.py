"""Backends: one small file each behind the protocol in ``base.py``; ``get_backend`` imports lazily."""

from __future__ import annotations

from typing import Any

from kvray.errors import KvrayInputError

# name -> "module:Class"; imported only when used, so a CPU-only or Ray-less machine pays for nothing else.
REGISTRY: dict[str, str] = {
    "hf": "kvray.backends.hf:HFBackend",
    "synthetic": "kvray.backends.synthetic:SyntheticBackend",
    "sim": "kvray.backends.sim:SimBackend",
    "hf-paged": "kvray.backends.hf_paged:HFPagedBackend",
    "vllm": "kvray.backends.vllm:VLLMBackend",
    "openai": "kvray.backends.openai:OpenAIBackend",
    "ollama": "kvray.backends.ollama:OllamaBackend",
}


def get_backend(name: str, **kwargs: Any) -> Any:
    import importlib

    if name not in REGISTRY:
        raise KvrayInputError(f"unknown backend {name!r} (known: {', '.join(REGISTRY)})")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)
