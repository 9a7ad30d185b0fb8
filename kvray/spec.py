"""What to measure: requests, workloads and cells (one measurement point each).

A Cell is pure data — hashable, JSON-serialisable, with a stable ``cell_id`` derived from its content —
so a sweep can be planned, shipped to Ray actors, resumed and joined across hardware by id. Its backend
name is checked where users name one (the job loader, the command line) against the registry in
kvray/backends, a later stage than this one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from kvray.errors import KvrayInputError

WEIGHTS = ("random", "pretrained")


@dataclass(frozen=True)
class RequestSpec:
    """One request: exactly ``prompt_toks`` in, exactly ``gen_toks`` out, arriving ``arrival_s`` after start."""

    id: int
    prompt_toks: int
    gen_toks: int
    arrival_s: float = 0.0
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.prompt_toks <= 0 or self.gen_toks <= 0:
            raise KvrayInputError(
                f"request {self.id}: prompt and generated tokens must be positive, got "
                f"{self.prompt_toks} and {self.gen_toks}"
            )
        if self.arrival_s < 0:
            raise KvrayInputError(f"request {self.id}: arrival offset must be >= 0, got {self.arrival_s}")


@dataclass(frozen=True)
class Workload:
    """The requests of a cell. ``kind`` is "uniform" (N equal requests) or "mixed" (several lengths)."""

    kind: str
    requests: tuple[RequestSpec, ...]

    @classmethod
    def uniform(cls, concurrency: int, prompt_toks: int, gen_toks: int, arrival_gap_s: float = 0.0) -> Workload:
        if concurrency <= 0:
            raise KvrayInputError(f"concurrency must be positive, got {concurrency}")
        return cls(
            "uniform",
            tuple(RequestSpec(i, prompt_toks, gen_toks, round(i * arrival_gap_s, 6)) for i in range(concurrency)),
        )

    @classmethod
    def mixed(cls, lengths: list[int] | tuple[int, ...], gen_toks: int, arrival_gap_s: float = 0.0) -> Workload:
        """One request per entry of ``lengths`` (prompt tokens), e.g. [128, 128, 128, 4096]."""
        if not lengths:
            raise KvrayInputError("a mixed workload needs at least one prompt length")
        return cls(
            "mixed",
            tuple(RequestSpec(i, p, gen_toks, round(i * arrival_gap_s, 6)) for i, p in enumerate(lengths)),
        )

    @property
    def concurrency(self) -> int:
        return len(self.requests)

    @property
    def prompt_toks(self) -> int:
        """The longest prompt (what a static batch pads to)."""
        return max(r.prompt_toks for r in self.requests)

    @property
    def gen_toks(self) -> int:
        return max(r.gen_toks for r in self.requests)

    @property
    def max_seq_len(self) -> int:
        return max(r.prompt_toks + r.gen_toks for r in self.requests)


@dataclass(frozen=True)
class Cell:
    """One measurement point: a model on a backend, in a dtype, on some hardware, under one workload."""

    model: str
    workload: Workload
    backend: str = "hf"  # a name in kvray.backends.REGISTRY
    dtype: str = "bf16"
    weights: str = "random"
    device: str = "auto"  # "auto" | "cpu" | "cuda:N"
    warmup: int = 1
    repeats: int = 1
    kv_dtype: str | None = None
    hardware: str = "any"  # GPU type this cell is placed on (Ray accelerator type or sim GPU name)
    experiment: str = ""  # exp1 | exp2 | … — groups rows for figures
    options: tuple[tuple[str, Any], ...] = field(default=())  # backend knobs, sorted (block_size, base_url…)

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise KvrayInputError(f"unknown weights mode {self.weights!r} (known: {', '.join(WEIGHTS)})")
        if self.warmup < 0 or self.repeats < 1:
            raise KvrayInputError(f"warmup must be >= 0 and repeats >= 1, got {self.warmup} and {self.repeats}")

    @property
    def option_dict(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def concurrency(self) -> int:
        return self.workload.concurrency

    @property
    def prompt_toks(self) -> int:
        return self.workload.prompt_toks

    @property
    def gen_toks(self) -> int:
        return self.workload.gen_toks

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cell:
        d = dict(d)
        wl = d.pop("workload")
        workload = Workload(wl["kind"], tuple(RequestSpec(**r) for r in wl["requests"]))
        options = tuple(sorted((d.pop("options", None) or {}).items()))
        return cls(workload=workload, options=options, **d)

    @property
    def cell_id(self) -> str:
        """12 hex chars of the SHA-256 of the canonical JSON of the cell: stable across runs and machines."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def label(self) -> str:
        wl = self.workload
        shape = f"c{wl.concurrency} p{wl.prompt_toks} g{wl.gen_toks}" + (" mixed" if wl.kind == "mixed" else "")
        return f"{self.model} {self.backend} {self.dtype} {shape}"


def make_options(**kwargs: Any) -> tuple[tuple[str, Any], ...]:
    """Backend options as the sorted tuple a frozen Cell stores (None values dropped)."""
    return tuple(sorted((k, v) for k, v in kwargs.items() if v is not None))
