"""What a cell produced: per-request RunTraces and the CellResult that carries them.

Times in a RunTrace are seconds on one monotonic clock (``time.perf_counter``), relative to the start
of the repeat that produced it, so traces from different backends and machines compare directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from kvray.spec import Cell

# ok       every request of every measured repeat succeeded
# partial  the cell ran, but some requests failed: its latency percentiles pool only the successful ones
#          (``requests_failed``, ``failure_rate`` and each ``<metric>_n`` say how many) — under a serving load
#          a failed request also adds the TTFT, queue time and token gaps it observed (kvray/measure/serving.py)
# oom | error | skipped_after_oom | refused   no measurement (see docs/metrics.md, "Status and OOM")
STATUSES = ("ok", "partial", "oom", "error", "skipped_after_oom", "refused")
MEASURED_STATUSES = ("ok", "partial")  # cells whose metrics are results (drawn, fitted, tabled)
FINAL_STATUSES = STATUSES  # every status is final: a resumed sweep does not rerun any of them


@dataclass
class RunTrace:
    """One request's life: arrival → entered the engine → each output token → end.

    ``token_times_s`` has one entry per output token. Tokens delivered together in one chunk (an HTTP
    stream event carrying k tokens) share that chunk's timestamp; the metric code splits the gap.
    """

    request_id: int
    repeat: int
    arrival_s: float
    start_s: float
    token_times_s: list[float]
    end_s: float
    prompt_toks: int
    output_toks: int
    status: str = "ok"  # "ok" | "error" | "oom"
    error: str | None = None
    # Server backends: the tokens the stream's chunks counted (token_ids or re-tokenised text) when that differs
    # from the server's usage count, which ``output_toks`` holds; None when they agree or nothing was reconciled.
    chunk_toks: int | None = None
    # When the client actually sent the request (or handed it to an in-process engine's queue), on the same
    # clock; ``arrival_s`` is when the schedule said it was due, so sent − arrival is the client's lag. None in
    # rows written before it existed.
    sent_s: float | None = None
    # Prompt tokens the engine served from its prefix cache for this request (vLLM's usage.prompt_tokens_details.
    # cached_tokens, with --enable-prompt-tokens-details); None where the engine does not say.
    cached_prompt_toks: int | None = None
    # Which of the cell's client actors sent the request (0 … clients − 1; kvray/backends/http/clients.py), its
    # times already moved onto the caller's clock; None when the cell's client side was this one process.
    client: int | None = None

    @property
    def first_token_s(self) -> float | None:
        return self.token_times_s[0] if self.token_times_s else None

    def to_dict(self) -> dict[str, Any]:
        """Its fields as a dict (the token times copied): ``dataclasses.asdict`` deep-copies every float, ten times
        the cost for a trace of 128 tokens (benchmarks/cell_overhead.py)."""
        d = {name: getattr(self, name) for name in _TRACE_FIELDS}
        d["token_times_s"] = list(self.token_times_s)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunTrace:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


_TRACE_FIELDS = tuple(f.name for f in fields(RunTrace))


@dataclass
class CellResult:
    """Everything one cell yields; ``to_row`` flattens it into one dataset row."""

    cell: Cell
    status: str
    reason: str | None = None
    traces: list[RunTrace] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    # baseline_bytes (weights loaded), peak_allocated_bytes, peak_reserved_bytes, nvml_peak_used_bytes,
    # rss_peak_bytes, kv_measured_bytes, kv_predicted_bytes, kv_rel_error …
    memory: dict[str, float | int | None] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=lambda: {"name": "cpu"})
    versions: dict[str, str | None] = field(default_factory=dict)
    simulated: bool = False
    started_at: str = ""  # ISO-8601 UTC
    duration_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # backend specifics: vLLM cache info, KV timeline…

    @property
    def cell_id(self) -> str:
        return self.cell.cell_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "cell": self.cell.to_dict(),
            "cell_id": self.cell_id,
            "status": self.status,
            "reason": self.reason,
            "traces": [t.to_dict() for t in self.traces],
            "metrics": self.metrics,
            "memory": self.memory,
            "hardware": self.hardware,
            "versions": self.versions,
            "simulated": self.simulated,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CellResult:
        return cls(
            cell=Cell.from_dict(d["cell"]),
            status=d["status"],
            reason=d.get("reason"),
            traces=[RunTrace.from_dict(t) for t in d.get("traces", [])],
            metrics=d.get("metrics", {}),
            memory=d.get("memory", {}),
            hardware=d.get("hardware", {"name": "cpu"}),
            versions=d.get("versions", {}),
            simulated=bool(d.get("simulated", False)),
            started_at=d.get("started_at", ""),
            duration_s=float(d.get("duration_s", 0.0)),
            extra=d.get("extra", {}),
        )

    def to_row(self) -> dict[str, Any]:
        """One flat dataset row: identity, shape, status, hardware, memory and every metric as columns."""
        c = self.cell
        row: dict[str, Any] = {
            "cell_id": self.cell_id,
            "experiment": c.experiment,
            "model": c.model,
            "backend": c.backend,
            "dtype": c.dtype,
            "kv_dtype": c.kv_dtype or c.dtype,
            "weights": c.weights,
            "device": c.device,
            "hardware_requested": c.hardware,
            "tensor_parallel": c.tensor_parallel,  # GPUs the model was split over (kvray/model/parallel.py)
            "clients": c.clients,  # processes the load was sent from (Ray actors when > 1; docs/metrics.md)
            # how the backend spread the model over them: "tensor parallel (vLLM)", "layer-wise placement, not
            # tensor parallelism" (HF device_map), what a server reports; None on one device
            "parallelism": self.extra.get("parallelism"),
            "workload": c.workload.kind,
            # a burst's size; a closed loop's users; None for an open loop (its rate is ``offered_rps``)
            "concurrency": _concurrency(c),
            "requests_planned": len(c.workload.requests),
            "prompt_toks": c.prompt_toks,
            "gen_toks": c.gen_toks,
            "prompt_toks_list": ",".join(str(r.prompt_toks) for r in c.workload.requests),
            "gen_toks_list": ",".join(str(r.gen_toks) for r in c.workload.requests),
            "lengths": json.dumps(c.workload.lengths.to_dict(), sort_keys=True) if c.workload.lengths else None,
            "warmup": c.warmup,
            "repeats": c.repeats,
            "status": self.status,
            "reason": self.reason,
            "simulated": self.simulated,
            "hardware": self.hardware.get("name", "cpu"),
            "hardware_memory_bytes": self.hardware.get("memory_bytes"),
            "accelerator_type": self.hardware.get("accelerator_type"),
            "node_id": self.hardware.get("node_id"),
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "ttft_basis": self.extra.get("ttft_basis"),  # "engine" | "client-http" (kvray/backends/base.py)
            "memory_scope": self.extra.get("memory_scope"),  # which process the memory columns measured
            "kv_layout": self.extra.get("kv_layout"),  # "hf" | "paged": how the KV was kept (kvray/runner/run.py)
            "kv_block_size": self.extra.get("kv_block_size"),  # tokens per block of a paged layout, else None
        }
        row.update({k: v for k, v in self.memory.items()})
        row.update(self.metrics)
        row.update(self.extra.get("energy") or {})  # energy and telemetry columns (kvray/measure/telemetry.py)
        return row


def _concurrency(cell: Cell) -> int | None:
    load = cell.workload.load
    if load is None or load.kind == "burst":
        return cell.concurrency
    return load.users if load.kind == "closed" else None
