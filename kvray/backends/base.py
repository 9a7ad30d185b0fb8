"""The one protocol every backend implements, and the result type it returns for one repeat.

A backend is created once per worker, ``load``s a model once per (model, dtype, weights, device) and
then ``run``s many request batches. The runner (kvray/runner.py) owns warmup, repeats, memory tracking,
OOM handling and metrics, so a backend only turns requests into RunTraces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from kvray.measure.trace import RunTrace
from kvray.spec import Cell, RequestSpec


@dataclass
class BackendRun:
    """What one pass over a workload produced."""

    traces: list[RunTrace]
    kv_measured_bytes: int | None = None  # bytes actually held by the KV cache at its peak, if observable
    # Memory figures the backend knows better than a process-level tracker (sim predictions, a server's
    # own metrics); the runner merges them over what its MemoryTracker saw.
    memory: dict[str, int | float | None] = field(default_factory=dict)
    simulated: bool = False  # True when timestamps and memory are predictions, not measurements
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    name: str

    def load(self, cell: Cell) -> None:
        """Make the cell's model ready; a no-op when the same model is already loaded."""

    def run(self, cell: Cell, requests: Sequence[RequestSpec], repeat: int) -> BackendRun:
        """Serve ``requests`` (honouring their arrival offsets) and return one trace per request."""

    def device_info(self) -> dict[str, Any]:
        """Hardware identity: {"name": …, "memory_bytes": …, "driver": …} or {"name": "cpu"}."""

    def close(self) -> None:
        """Free the model and any server process."""
