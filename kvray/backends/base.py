"""The backend contract: what the runner uses of a backend (``Backend``), and the base every backend subclasses.

A backend is created once per worker, ``load``s a model once per (model, dtype, weights, device) and
then ``run``s many request batches. The runner (kvray/bench/runner.py) owns warmup, repeats, memory
tracking, OOM handling and metrics, so a backend only turns requests into RunTraces — and declares, here,
the facts the runner, the planner and the command line need about it, so none of them knows a backend by
its name:

  simulated          timestamps and memory are predictions: no host OOM pre-check, rows flagged
  kv_layout          "hf" (a static batch padded to its longest member) or "paged" (blocks per request),
                     the layout kvray predicts the backend's KV with (``layout_for`` when options choose it)
  queues_when_full   admits what fits its KV pool and queues the rest (a paged engine), so only a single
                     request that cannot fit alone is a reason to refuse the cell
  oom_precheck       whether the runner's OOM pre-check applies at all (False: no model held here, or an
                     engine that sizes its own pool)
  needs_model_geometry  kvray must resolve the model's config.json to run it (False: a server may serve a
                     model kvray cannot resolve)
  device             where measured work happens in this process ("cpu" | "cuda:N"): the memory tracker's
  weights_bytes      bytes of the loaded weights when the backend holds a model
and the class-level checks ``validate_options`` (the options' form, anywhere) and ``check_cell`` (what this
machine must have to run a cell here). ``BackendBase`` gives every default.

``Backend`` is a Protocol so that a wrapper forwarding attributes (the sweep's load-counting wrapper) is
one too; every backend in this package subclasses ``BackendBase``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from kvray.measure.trace import RunTrace
from kvray.spec import Cell, RequestSpec

T = TypeVar("T")


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
    """Everything the runner reads or calls on a backend (see the module docstring for each fact)."""

    name: str
    simulated: bool
    queues_when_full: bool
    oom_precheck: bool
    device: str
    weights_bytes: int | None

    def layout_for(self, options: Mapping[str, Any]) -> str: ...

    def load(self, cell: Cell) -> None: ...

    def run(self, cell: Cell, requests: Sequence[RequestSpec], repeat: int) -> BackendRun: ...

    def memory_available_bytes(self, cell: Cell) -> int | None: ...

    def free_memory(self) -> None: ...

    def device_info(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class BackendBase:
    """Defaults for every fact of the contract; a backend overrides what differs and implements load/run."""

    name = ""
    simulated = False
    kv_layout = "hf"
    queues_when_full = False
    oom_precheck = True
    needs_model_geometry = True
    device = "cpu"
    weights_bytes: int | None = None

    # --- class-level checks, before any backend exists ----------------------------------------------

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> None:
        """Check the options this backend reads, by their form only: one KvrayInputError line if wrong.

        Nothing here may look at files, the network or the environment: a job is checked on the machine
        that plans it and run on workers that may differ.
        """

    @classmethod
    def check_cell(cls, cell: Cell) -> Cell:
        """Everything needed to run ``cell`` in this process (``kvray bench``): its options plus what this
        machine must have (a vLLM install, an API key's variable). Returns the cell as it will run."""
        cls.validate_options(cell.option_dict)
        return cell

    @classmethod
    def validate_hardware(cls, hardware: str) -> None:
        """A hardware type a job lists for this backend: by default any Ray accelerator type goes."""

    @classmethod
    def layout_for(cls, options: Mapping[str, Any]) -> str:
        """The KV layout of a cell with these options ("hf" | "paged")."""
        return cls.kv_layout

    # --- what the runner calls ------------------------------------------------------------------------

    def load(self, cell: Cell) -> None:
        """Make the cell's model ready; a no-op when the same model is already loaded."""
        raise NotImplementedError

    def run(self, cell: Cell, requests: Sequence[RequestSpec], repeat: int) -> BackendRun:
        """Serve ``requests`` (honouring their arrival offsets) and return one trace per request."""
        raise NotImplementedError

    def memory_available_bytes(self, cell: Cell) -> int | None:
        """What the OOM pre-check may plan with; None → the cell's GPU type, NVML, or free RAM."""
        return None

    def free_memory(self) -> None:
        """After an out-of-memory run: give back what it left, keeping the model for the next cell."""

    def device_info(self) -> dict[str, Any]:
        """Hardware identity: {"name": …, "memory_bytes": …, "driver": …} or {"name": "cpu"}."""
        from kvray.hardware.devices import device_info

        return device_info(self.device)

    def close(self) -> None:
        """Free the model and any server process."""


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from a backend's synchronous ``run``, even when called inside a running
    event loop (an async Ray actor): then it runs on a thread of its own and its exception is re-raised here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="kvray-async")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return,unused-ignore]
