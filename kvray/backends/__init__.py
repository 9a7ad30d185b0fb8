"""Backends: one small module each behind the contract in ``base.py``, found by name in ``REGISTRY``.

The registry is the one list of backend names: the job loader, the planner and the command line ask it
(``backend_names``, ``validate_backend``, ``kv_layout``, ``check_cell``) instead of knowing backends by
name. A backend's module is imported only when one of these asks about it; no backend module imports
torch, transformers or ray at import time, so asking is cheap (tests/test_runner.py checks that).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from kvray.backends.base import BackendBase
from kvray.errors import KvrayInputError
from kvray.measure.telemetry import interval_from_options
from kvray.spec import Cell
from kvray.units import first_line

# name -> "module:Class"
REGISTRY: dict[str, str] = {
    "hf": "kvray.backends.hf:HFBackend",
    "synthetic": "kvray.backends.synthetic:SyntheticBackend",
    "sim": "kvray.backends.sim:SimBackend",
    "hf-paged": "kvray.backends.hf_paged:HFPagedBackend",
    "vllm": "kvray.backends.vllm:VLLMBackend",
    "openai": "kvray.backends.http:OpenAIBackend",
    "ollama": "kvray.backends.ollama:OllamaBackend",
}


def backend_names() -> tuple[str, ...]:
    """Every backend name kvray knows, in the registry's order."""
    return tuple(REGISTRY)


def backend_class(name: str) -> type[BackendBase]:
    """The class registered as ``name`` (imported now), or one KvrayInputError listing the known names."""
    if name not in REGISTRY:
        raise KvrayInputError(f"unknown backend {name!r} (known: {', '.join(REGISTRY)})")
    module, cls = REGISTRY[name].split(":")
    found: type[BackendBase] = getattr(importlib.import_module(module), cls)
    return found


def validate_backend(name: str, options: Mapping[str, Any] | None = None) -> type[BackendBase]:
    """Check a backend name and the form of its options (no environment looked at); returns its class.

    Every problem is one KvrayInputError line: an unknown name, a missing required option (openai's
    base_url, ollama's host), a value out of range or of the wrong type.
    """
    cls = backend_class(name)
    interval_from_options(dict(options or {}))  # telemetry_interval_s: an option of every backend (the runner's)
    try:
        cls.validate_options(dict(options or {}))
    except KvrayInputError:
        raise
    except (TypeError, ValueError) as exc:  # e.g. a number option given as text
        raise KvrayInputError(f"{name}: an option has the wrong type ({first_line(exc)})") from None
    return cls


def check_cell(cell: Cell) -> Cell:
    """Everything needed to run ``cell`` in this process, before anything starts (``kvray bench``): its backend
    and options, plus what this machine must have for it. Returns the cell as it will run."""
    cls = validate_backend(cell.backend, cell.option_dict)
    return cls.check_cell(cell)


def multi_client_backends() -> tuple[str, ...]:
    """Backends whose client side a cell can spread over K Ray actors (``clients: K``): the server backends."""
    return tuple(name for name in REGISTRY if backend_class(name).multi_client)


def check_clients(backend: str, clients: Any) -> int:
    """A cell's client count: a positive integer, above 1 only for a server backend; else one KvrayInputError
    line, for the caller to prefix with the job key or the flag."""
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise KvrayInputError(f"expected a positive integer (client processes), got {clients!r}")
    if clients > 1 and not backend_class(backend).multi_client:
        raise KvrayInputError(
            f"got {clients}, but backend {backend} runs in this process: its requests cannot be sent from other "
            f"client processes (clients > 1 is for server backends: {', '.join(multi_client_backends())})"
        )
    return clients


def kv_layout(name: str, options: Mapping[str, Any] | None = None) -> str:
    """The KV layout ("hf" | "paged") backend ``name`` keeps with these options, as its class declares it."""
    return backend_class(name).layout_for(dict(options or {}))


def get_backend(name: str, **kwargs: Any) -> BackendBase:
    """A new backend instance (``kwargs`` go to its constructor, e.g. the sim backend's calibration file)."""
    return backend_class(name)(**kwargs)
