"""What to measure: requests, workloads and cells (one measurement point each).

A Cell is pure data — hashable, JSON-serialisable, with a stable ``cell_id`` derived from its content —
so a sweep can be planned, shipped to Ray actors, resumed and joined across hardware by id. Its backend
name is checked where users name one (the job loader, the command line) against the registry in
kvray/backends, a later stage than this one.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
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
    # Closed loops: this request is sent ``think_s`` after request ``after`` (same repeat) ends, not at
    # ``arrival_s``; its trace's arrival is that moment (kvray/backends/arrivals.py keeps the schedule).
    after: int | None = None
    think_s: float = 0.0
    # KV reuse: the first ``shared_prefix_toks`` prompt tokens are the same for every request of
    # ``prefix_group`` (a shared system prompt, a conversation's history); the rest is unique to the request.
    prefix_group: int | None = None
    shared_prefix_toks: int = 0
    # A replayed trace's request (kvray/traces/): its prompt is these blocks of ``block_toks`` tokens in order — equal
    # ids are equal tokens, different ids different ones (the trace's hash_ids, kvray/sim/reuse.py), then its own.
    block_ids: tuple[int, ...] = ()
    block_toks: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.block_ids, tuple):  # a list from JSON: a tuple, so the request stays hashable
            object.__setattr__(self, "block_ids", tuple(self.block_ids))
        if self.block_ids and not (
            self.block_toks > 0 and self.block_toks * (len(self.block_ids) - 1) < self.prompt_toks
        ):
            raise KvrayInputError(
                f"request {self.id}: {len(self.block_ids)} blocks of {self.block_toks} tokens do not fit a prompt of "
                f"{self.prompt_toks} tokens (all but the last block must be whole)"
            )
        if self.prompt_toks <= 0 or self.gen_toks <= 0:
            raise KvrayInputError(
                f"request {self.id}: prompt and generated tokens must be positive, got "
                f"{self.prompt_toks} and {self.gen_toks}"
            )
        if self.arrival_s < 0 or self.think_s < 0:
            raise KvrayInputError(f"request {self.id}: arrival offset and think time must be >= 0")
        if not 0 <= self.shared_prefix_toks <= self.prompt_toks:
            raise KvrayInputError(f"request {self.id}: shared_prefix_toks must be within 0..prompt_toks")

    def to_dict(self) -> dict[str, Any]:
        """Fields at their defaults are left out, so cells planned before a field existed keep their ids."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}  # flat: no need for asdict's deep copies
        return {k: v for k, v in d.items() if k in _REQUEST_CORE or v != _REQUEST_DEFAULTS[k]}


_REQUEST_CORE = ("id", "prompt_toks", "gen_toks", "arrival_s", "temperature")
_REQUEST_DEFAULTS = {
    "after": None,
    "think_s": 0.0,
    "prefix_group": None,
    "shared_prefix_toks": 0,
    "block_ids": (),
    "block_toks": 0,
}

LOAD_KINDS = ("burst", "closed", "poisson", "gamma", "constant", "replay")
OPEN_LOOPS = ("poisson", "gamma", "constant")


@dataclass(frozen=True)
class LoadSpec:
    """How a workload's requests were scheduled — kept with the cell so its row can say what was offered.

    burst      every request at its arrival offset (0: all at once) — the seed's static-batch experiments
    closed     ``users`` users, each sending its next request when its previous one ends (+ think time)
    poisson    an open loop at ``rate_rps``: exponential gaps, seeded
    gamma      an open loop at ``rate_rps`` with gamma gaps of shape 1/``burstiness`` (1 = poisson)
    constant   an open loop at ``rate_rps``: equal gaps
    replay     a trace's recorded arrivals (× speedup; kvray/traces/, kvray/plan/replay.py): an open loop whose
               ``rate_rps`` is the trace's mean rate, ``trace`` says which trace and how it was cut
    ``warmup_s``/``cooldown_s`` trim the steady-state window (kvray/measure/serving.py); None = the default.
    """

    kind: str = "burst"
    rate_rps: float | None = None
    users: int | None = None
    requests: int | None = None
    duration_s: float | None = None
    burstiness: float = 1.0
    seed: int = 0
    warmup_s: float | None = None
    cooldown_s: float | None = None
    # "saturation": no rate given — the cell is a search (kvray/runner/saturation.py) that probes rates up to
    # the highest sustainable one, then measures rates below it; each probe is a cell of its own
    search: str | None = None
    trace: str | None = None  # replay: "format:file ×speedup …" (kvray/plan/replay.py), in the row's ``load``

    def __post_init__(self) -> None:
        if self.kind not in LOAD_KINDS:
            raise KvrayInputError(f"unknown load kind {self.kind!r} (known: {', '.join(LOAD_KINDS)})")
        if self.search is not None and (self.search != "saturation" or self.kind not in OPEN_LOOPS):
            raise KvrayInputError(f"rate auto (a saturation search) needs an open loop ({', '.join(OPEN_LOOPS)})")
        if self.kind in OPEN_LOOPS and self.search is None and not (self.rate_rps and self.rate_rps > 0):
            raise KvrayInputError(f"a {self.kind} load needs a positive rate (requests/s), got {self.rate_rps}")
        if self.kind == "closed" and not (self.users and self.users > 0):
            raise KvrayInputError(f"a closed load needs a positive number of users, got {self.users}")
        if self.requests is not None and self.requests <= 0:
            raise KvrayInputError(f"a load's request count must be positive, got {self.requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise KvrayInputError(f"a load's duration must be positive seconds, got {self.duration_s}")
        if self.burstiness <= 0:
            raise KvrayInputError(f"burstiness must be positive, got {self.burstiness}")
        if any(w is not None and w < 0 for w in (self.warmup_s, self.cooldown_s)):
            raise KvrayInputError("warmup_s and cooldown_s must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class LengthSpec:
    """Where a workload's lengths came from: ``kind`` fixed | uniform | normal | lognormal | a bundled
    dataset's name, its parameters (sorted pairs) and the seed; the realised lengths are the requests'."""

    prompt: tuple[tuple[str, Any], ...] = ()
    gen: tuple[tuple[str, Any], ...] = ()
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": dict(self.prompt), "gen": dict(self.gen), "seed": self.seed}


@dataclass(frozen=True)
class Workload:
    """The requests of a cell. ``kind`` is "uniform" (N equal requests) or "mixed" (several lengths)."""

    kind: str
    requests: tuple[RequestSpec, ...]
    load: LoadSpec | None = None  # None: a burst, as every workload was before load models
    lengths: LengthSpec | None = None  # None: lengths given explicitly
    # the SLO thresholds a row's goodput is judged against, e.g. (("tpot_ms", 50.0), ("ttft_ms", 500.0))
    slo: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Fields at their defaults are left out, so cells planned before a field existed keep their ids."""
        d: dict[str, Any] = {"kind": self.kind, "requests": [r.to_dict() for r in self.requests]}
        if self.load is not None:
            d["load"] = self.load.to_dict()
        if self.lengths is not None:
            d["lengths"] = self.lengths.to_dict()
        if self.slo:
            d["slo"] = dict(self.slo)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        lengths = d.get("lengths")
        return cls(
            d["kind"],
            tuple(RequestSpec(**r) for r in d["requests"]),
            load=LoadSpec(**d["load"]) if d.get("load") else None,
            lengths=LengthSpec(
                tuple(sorted(lengths["prompt"].items())), tuple(sorted(lengths["gen"].items())), lengths.get("seed", 0)
            )
            if lengths
            else None,
            slo=tuple(sorted((d.get("slo") or {}).items())),
        )

    @property
    def load_kind(self) -> str:
        return self.load.kind if self.load is not None else "burst"

    @property
    def max_in_flight(self) -> int:
        """The most requests that can be in flight at once: a closed loop's users; every request otherwise (an
        open loop's arrivals may all overlap) — what a static batch's memory check must assume."""
        if self.load is not None and self.load.kind == "closed" and self.load.users:
            return min(self.load.users, len(self.requests))
        return len(self.requests)

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
    tensor_parallel: int = 1  # GPUs of one node (of type ``hardware``) the model is split over; left out of ids at 1
    # Server backends: Ray actors the cell's client side is spread over, each sending its share of the arrival
    # schedule (kvray/backends/http/clients.py); 1 = this process alone. Left out of ids at 1.
    clients: int = 1

    def __post_init__(self) -> None:
        tp = self.tensor_parallel
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise KvrayInputError(f"tensor_parallel must be a positive integer, got {self.tensor_parallel!r}")
        k = self.clients
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise KvrayInputError(f"clients must be a positive integer, got {self.clients!r}")
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
        # the fields one level deep: asdict would deep-copy every request of the workload, then be overwritten
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["workload"] = self.workload.to_dict()
        d["options"] = dict(self.options)
        if d["tensor_parallel"] == 1:
            del d["tensor_parallel"]  # cells planned before TP existed keep their ids
        if d["clients"] == 1:
            del d["clients"]  # … and before client actors existed
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cell:
        d = dict(d)
        workload = Workload.from_dict(d.pop("workload"))
        options = tuple(sorted((d.pop("options", None) or {}).items()))
        return cls(workload=workload, options=options, **d)

    @functools.cached_property
    def cell_id(self) -> str:
        """12 hex chars of the SHA-256 of the canonical JSON of the cell: stable across runs and machines.

        Cached on the (frozen) cell: a serving load's cell holds every request, and per-request prompt seeds ask
        for the id once per request — recomputing it made a 400-request client O(n²) (48 s of CPU at 100 req/s)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def label(self) -> str:
        wl = self.workload
        shape = f"c{wl.concurrency} p{wl.prompt_toks} g{wl.gen_toks}" + (" mixed" if wl.kind == "mixed" else "")
        clients = f" ×{self.clients} clients" if self.clients > 1 else ""
        return f"{self.model} {self.backend} {self.dtype} {shape}{clients}"


def make_options(**kwargs: Any) -> tuple[tuple[str, Any], ...]:
    """Backend options as the sorted tuple a frozen Cell stores (None values dropped)."""
    return tuple(sorted((k, v) for k, v in kwargs.items() if v is not None))
