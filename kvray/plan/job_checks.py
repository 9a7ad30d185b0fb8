"""The job file's checks that reach past its own schema — what the backends accept (options, clients, hardware),
the TP degrees a model can be split over — and the ``Checker`` every key's check
reports through, naming the file and the key path (kvray/plan/job.py reads the schema top to bottom).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from kvray.backends import backend_class, check_clients, validate_backend
from kvray.errors import KvrayInputError
from kvray.model.parallel import check_tensor_parallel
from kvray.model.resolve import resolve_geometry

HARDWARE_MODES = ("any", "each")


class Checker:
    """Builds one-line errors that name the file and the key — or, for a job built from a command's flags
    (``kvray bench``, kvray/bench/cell.py), the flag: ``flags`` maps key paths (``grid.load.rate``, indices
    left out) to the flag that set them, and a key with no flag of its own is named by its nearest parent's."""

    def __init__(self, source: str, flags: Mapping[str, str] | None = None):
        self.source = source
        self.flags = dict(flags or {})

    def name(self, key: str) -> str:
        """``key`` as the user wrote it: the key path in a file, the flag on a command line."""
        if not self.flags:
            return key
        path = re.sub(r"\[\d+\]", "", key)
        while path and path not in self.flags:
            path = path.rpartition(".")[0]
        return self.flags.get(path, key)

    def fail(self, key: str, message: str) -> KvrayInputError:
        named = self.name(key) if key else ""
        where = [part for part in (self.source, named) if part]
        return KvrayInputError(": ".join([*where, message]))

    def string(self, key: str, value: Any, allow_empty: bool = False) -> str:
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise self.fail(key, f"expected a {'' if allow_empty else 'non-empty '}string, got {value!r}")
        return value.strip()

    def choice(self, key: str, value: Any, allowed: tuple[str, ...] | list[str], what: str = "") -> str:
        if value not in allowed:
            got = f"unknown {what} {value!r}" if what else f"got {value!r}"
            raise self.fail(key, f"{got} (allowed: {', '.join(allowed)})")
        return str(value)

    def int_(self, key: str, value: Any, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def number(self, key: str, value: Any, minimum: float, strict: bool = False) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or value < minimum or (strict and value == minimum):
            raise self.fail(key, f"expected a number {'>' if strict else '>='} {minimum:g}, got {value!r}")
        return float(value)

    def listed(self, key: str, value: Any) -> list[Any]:
        """A list, or a scalar standing for a list of one; never empty."""
        items = value if isinstance(value, list) else [value]
        if not items or value is None:
            raise self.fail(key, "expected a non-empty list")
        return items

    def ints(self, key: str, value: Any, minimum: int = 1) -> tuple[int, ...]:
        items = self.listed(key, value)
        bad = [v for v in items if isinstance(v, bool) or not isinstance(v, int) or v < minimum]
        if bad:
            positive = "must be positive: " if minimum == 1 else ""
            raise self.fail(key, f"{positive}expected integers >= {minimum}, got {bad[0]!r}")
        return tuple(items)

    def numbers(self, key: str, value: Any) -> tuple[float, ...]:
        items = self.listed(key, value)
        return tuple(self.number(f"{key}[{i}]", v, 0.0) for i, v in enumerate(items))

    def mapping(self, key: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping of keys ({', '.join(allowed)}), got {value!r}")
        for k in value:
            if k not in allowed:
                prefix = f"{key}." if key else ""
                raise self.fail(f"{prefix}{k}", f"unknown key (allowed: {', '.join(allowed)})")
        return value


def check_options(c: Checker, backends: list[str], options: dict[str, Any]) -> None:
    """Each backend checks the form of the options it reads (openai needs base_url, ollama host, …)."""
    for backend in backends:
        try:
            validate_backend(backend, {k: v for k, v in options.items() if v is not None})
        except KvrayInputError as exc:
            raise c.fail("options", str(exc)) from None


def check_tensor_parallel_degrees(c: Checker, value: Any, models: list[str]) -> list[int]:
    """TP degrees: positive, each once, and (for models kvray knows the geometry of) degrees vLLM accepts."""
    degrees = list(c.ints("tensor_parallel", value))
    if len(set(degrees)) != len(degrees):
        raise c.fail("tensor_parallel", f"lists a degree twice: {degrees}")
    if degrees == [1]:
        return degrees
    for model in models:
        try:
            g = resolve_geometry(model)
        except KvrayInputError:
            continue  # an unknown model is reported by the length check, naming models[i]
        for n in degrees:
            try:
                check_tensor_parallel(g, n)
            except KvrayInputError as exc:
                raise c.fail("tensor_parallel", str(exc)) from None
    return degrees


def check_clients_count(c: Checker, value: Any, backends: list[str]) -> int:
    """Client actors per cell: a positive integer, above 1 only when every backend of the job is a server backend."""
    for backend in backends:
        try:
            check_clients(backend, value)
        except KvrayInputError as exc:
            raise c.fail("clients", str(exc)) from None
    return int(value)


def check_hardware(c: Checker, value: Any, backends: list[str]) -> str | list[str]:
    if isinstance(value, str) and value in HARDWARE_MODES:
        return value
    items = [c.string(f"hardware[{i}]", h) for i, h in enumerate(c.listed("hardware", value))]
    for backend in backends:  # e.g. the simulator's hardware is a GPU from its table, not a Ray accelerator type
        for i, h in enumerate(items):
            try:
                backend_class(backend).validate_hardware(h)
            except KvrayInputError as exc:
                raise c.fail(f"hardware[{i}]", str(exc)) from None
    if len(set(items)) != len(items):
        raise c.fail("hardware", f"lists a type twice: {items}")
    return items
