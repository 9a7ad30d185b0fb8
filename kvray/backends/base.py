"""The backend contract: what the runner uses of a backend (``Backend``), and the base every backend subclasses.

A backend is created once per worker, ``load``s a model once per (model, dtype, weights, device) and
then ``run``s many request batches. The runner (kvray/runner/run.py) owns warmup, repeats, memory
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
  multi_client       the client side of a cell can be spread over K Ray actors (a cell's ``clients``): a server
                     backend, whose requests go over HTTP from any process; an in-process engine cannot
  ttft_basis         which clock a trace's first-token time is on, recorded in every row: "engine" (the engine
                     stamps the token in this process: hf, hf-paged, sim, synthetic) or "client-http" (the client
                     stamps the chunk's arrival, so TTFT includes HTTP, tokenisation and server queueing: vllm,
                     openai, ollama). Calibration fits the roofline only to "engine" rows.
and the methods ``memory_tracker()`` (what measures memory around the measured repeats: this process on
``device`` by default, a server's process tree for a server kvray starts, nothing for a remote server) and
``memory_scope()`` (the row's words for which process that tracker measured),
``telemetry_sources()`` (the GPUs and process tree a cell's telemetry samples: kvray/measure/telemetry.py) and
``engine_gauges`` (the keys of the backend's own timeline points, ``extra["kv_timeline"]``, that are engine gauges
for the cell's timeline — a run returns its own repeat's points; the runner joins a cell's repeats, so no backend
carries timeline state from one run to the next),
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

from kvray.hardware.devices import device_info
from kvray.measure.memory import MemoryTracker
from kvray.measure.telemetry import TelemetrySources, group_devices
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
    # Counts the server reports for this run (prefix-cache hits and queries, requests whose chunk tokens
    # disagreed with usage): the runner sums them over the measured repeats into the cell's row.
    counters: dict[str, int] = field(default_factory=dict)
    # The time.perf_counter() value this run's trace times are seconds since (its t0), so telemetry sampled
    # outside the run lines up with its tokens; None: the runner's mark just before ``run`` stands in for it.
    t0_s: float | None = None


@runtime_checkable
class Backend(Protocol):
    """Everything the runner reads or calls on a backend (see the module docstring for each fact)."""

    name: str
    simulated: bool
    queues_when_full: bool
    oom_precheck: bool
    device: str
    weights_bytes: int | None
    ttft_basis: str
    engine_gauges: tuple[str, ...]

    def layout_for(self, options: Mapping[str, Any]) -> str: ...

    def load(self, cell: Cell) -> None: ...

    def run(self, cell: Cell, requests: Sequence[RequestSpec], repeat: int) -> BackendRun: ...

    def memory_available_bytes(self, cell: Cell) -> int | None: ...

    def free_memory(self) -> None: ...

    def memory_tracker(self) -> Any: ...

    def memory_scope(self) -> str: ...

    def telemetry_sources(self, gpus: int = 1) -> Any: ...

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
    ttft_basis = "engine"
    multi_client = False

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

    @classmethod
    def cell_hardware(cls, cell: Cell) -> dict[str, Any] | None:
        """The hardware a row of ``cell`` names when the cell, not the worker's device, decides it (the
        simulator's GPU); None: the worker's device. Rows no backend ran (skipped after OOM) use it too."""
        return None

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

    def memory_tracker(self) -> Any:
        """A fresh context manager with ``figures()`` and ``is_cuda`` that measures memory around the measured
        repeats, or None when nothing here can see the memory that matters (a remote server)."""
        return MemoryTracker(self.device or "cpu")

    def memory_scope(self) -> str:
        """Which process the memory columns of this backend's rows describe."""
        return "kvray process"

    # keys of the points a backend samples from its engine (a server's /metrics, hf-paged's cache) that the
    # cell's timeline keeps as source "engine"; a backend without such points has none to give
    engine_gauges: tuple[str, ...] = (
        "kv_usage",
        "kv_used_bytes",
        "running",
        "waiting",
        "preemptions",
        "prefix_cache_hits",
        "prefix_cache_queries",
        "prompt_tokens",
        "generation_tokens",
    )

    def telemetry_sources(self, gpus: int = 1) -> Any:
        """What a cell's telemetry samples (``kvray.measure.telemetry.TelemetrySources``): by default this
        process's tree and, on a GPU, the ``gpus`` GPUs of the cell's group from ``device`` on, through NVML."""
        return TelemetrySources(gpus=group_devices(self.device or "cpu", gpus))

    def device_info(self) -> dict[str, Any]:
        """Hardware identity: {"name": …, "memory_bytes": …, "driver": …} or {"name": "cpu"}."""
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
