"""The worker actor: one per GPU (or a few on a CPU-only machine), holding its backend and loaded model.

A worker runs the cells the driver hands it, one at a time, through ``kvray.runner.run.run_cell`` (which never
raises for a cell's own failure), stamps the result with its hardware identity (the backend's
``device_info`` plus Ray node id and accelerator type) and sends it to the collector, waiting for the
acknowledgement so a result the driver counts as done is on disk. It counts real model loads per model,
so sweeps can show that a model is loaded once per worker.

It keeps the harness's own work out of its measurements: it tells the collector when a cell's measured
window opens and closes (the collector defers its table rebuilds meanwhile, kvray/sweep/collector.py), and
after a real model load it collects garbage and waits ``SETTLE_AFTER_LOAD_S`` before the cell goes on, so
the load's leftovers (freed buffers, allocator and thread-pool start-up) are not charged to the first cell.

The class is plain Python; the driver wraps it with ``ray.remote`` and its placement options, so this
module imports without Ray (``kvray.sweep.ray_env.import_ray`` is the one place Ray is imported for kvray).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from kvray.backends import get_backend
from kvray.data.writer import encode_row
from kvray.hardware.env import collect_environment
from kvray.measure.trace import CellResult
from kvray.spec import Cell
from kvray.sweep.ray_env import import_ray

COLLECTOR_ACK_TIMEOUT_S = 120.0
MEASURING_ACK_TIMEOUT_S = 30.0  # the collector answers once a table rebuild in progress has finished
SETTLE_AFTER_LOAD_S = 0.5
QUICK_LOAD_S = 0.05  # loads faster than this (the simulator, the synthetic schedule) are not followed by a settle


def model_key(cell: Cell) -> str:
    """What a backend keeps loaded between cells: model, backend, dtype, weights and device."""
    return f"{cell.model}|{cell.backend}|{cell.dtype}|{cell.weights}|{cell.device}"


def limit_memory(headroom_bytes: int, preload: tuple[str, ...] = ("torch", "transformers")) -> None:
    """Cap this process's address space at what it uses now plus ``headroom_bytes`` (a ``worker_setup``).

    A CPU worker then meets a real allocation failure where a GPU of that much free memory would, so the
    OOM boundary can be explored without a GPU. ``preload`` imports the heavy libraries first, so their
    mappings count as "used now" rather than eating the headroom.
    """
    import importlib
    import resource

    for module in preload:
        importlib.import_module(module)
    with open("/proc/self/status") as fh:
        vm_kib = next(int(line.split()[1]) for line in fh if line.startswith("VmSize:"))
    limit = vm_kib * 1024 + int(headroom_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def settle(seconds: float = SETTLE_AFTER_LOAD_S) -> None:
    """After a model load: free what the load left behind, then let the node go quiet before measuring."""
    import gc

    gc.collect()
    time.sleep(seconds)


class CountingBackend:
    """Wraps a backend so every real model load is counted and timed (a repeated load is the backend's no-op),
    and settles after each real load (``settle``; not counted in the load time)."""

    def __init__(
        self, inner: Any, loads: dict[str, int], load_s: dict[str, float], settle_s: float = SETTLE_AFTER_LOAD_S
    ):
        self._inner = inner
        self._loads = loads
        self._load_s = load_s
        self._settle_s = settle_s
        self._key: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, cell: Cell) -> None:
        key = model_key(cell)
        if key == self._key:
            self._inner.load(cell)
            return
        t0 = time.perf_counter()
        self._inner.load(cell)
        self._loads[key] = self._loads.get(key, 0) + 1
        took = time.perf_counter() - t0
        self._load_s[key] = self._load_s.get(key, 0.0) + took
        self._key = key
        if self._settle_s > 0 and took > QUICK_LOAD_S:  # a load that did nothing heavy leaves nothing to settle
            settle(self._settle_s)

    def close(self) -> None:
        self._key = None
        self._inner.close()


class Worker:
    """Runs cells on one device. Created by the driver as ``ray.remote(Worker).options(...)``."""

    def __init__(
        self,
        worker_id: str,
        collector: Any,
        check_oom: bool = True,
        threads: int | None = None,
        accelerator_type: str | None = None,
        setup: Callable[[], Any] | None = None,
    ):
        if threads:  # CPU workers: Ray pins OMP_NUM_THREADS=1 in actors; give torch this worker's share
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = str(threads)
        self.worker_id = worker_id
        self.collector = collector
        self.check_oom = check_oom
        self.threads = threads
        self.loads: dict[str, int] = {}
        self.load_s: dict[str, float] = {}
        self.cells_run = 0
        self.collector_node: str | None = None  # learnt in ``ready``
        self._backends: dict[str, CountingBackend] = {}
        self._current: str | None = None
        if setup is not None:
            setup()
        self.identity = self._identity(accelerator_type)

    def _identity(self, accelerator_type: str | None) -> dict[str, Any]:
        """Node, GPU ids, accelerator type and the GPU's name and memory ("cpu" when there is no GPU)."""
        ray = import_ray()
        node_id = ray.get_runtime_context().get_node_id()
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        if accelerator_type is None:
            accelerator_type = _node_accelerator_type(ray, node_id)
        identity: dict[str, Any] = {
            "worker_id": self.worker_id,
            "node_id": node_id,
            "gpu_ids": gpu_ids,
            "accelerator_type": accelerator_type,
            "name": "cpu",
            "memory_bytes": None,
        }
        if gpu_ids:
            from kvray.hardware.env import nvml_gpus

            gpus, _, _ = nvml_gpus()
            by_index = {str(g.index): g for g in gpus}
            if gpu_ids[0] in by_index:  # logical GPUs (a CPU machine told it has GPUs) stay "cpu"
                identity["name"] = by_index[gpu_ids[0]].name
                identity["memory_bytes"] = by_index[gpu_ids[0]].memory_bytes
        return identity

    def ready(self) -> dict[str, Any]:
        """The worker's identity and environment, for the manifest; returns once the actor is up.

        It also imports what every cell needs (the runner pulls in numpy: ~0.4 s quiet, seconds on a loaded
        node), so a fresh worker's first cell is not charged its imports against ``cell_timeout_s``.
        """
        import kvray.runner.run  # noqa: F401
        import kvray.runner.saturation  # noqa: F401

        ray = import_ray()
        with contextlib.suppress(Exception):  # an older collector, or none answering: tell it every window
            self.collector_node = ray.get(self.collector.node.remote(), timeout=MEASURING_ACK_TIMEOUT_S)
        return {
            **self.identity,
            "pid": os.getpid(),
            "threads": self.threads,
            "environment": collect_environment().to_dict(),
        }

    def _backend_for(self, cell: Cell) -> CountingBackend:
        """The backend for this cell; switching backends closes the previous one to free its memory."""
        if self._current is not None and self._current != cell.backend:
            self._backends[self._current].close()
        if cell.backend not in self._backends:
            self._backends[cell.backend] = CountingBackend(get_backend(cell.backend), self.loads, self.load_s)
        self._current = cell.backend
        return self._backends[cell.backend]

    def run(self, cell: Cell | dict[str, Any]) -> dict[str, Any]:
        """Run one cell, hand its result to the collector, return a short summary for the driver."""
        from kvray.runner.run import run_cell
        from kvray.runner.saturation import is_search, run_search

        cell = cell if isinstance(cell, Cell) else Cell.from_dict(cell)
        try:
            backend = self._backend_for(cell)
        except Exception as exc:  # a backend that cannot even be created: the cell's error, not the worker's
            result = CellResult(cell=cell, status="error", reason=f"{type(exc).__name__}: {exc}")
        else:
            if self.threads and "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(self.threads)
            if is_search(cell):  # a rate search: each probe is a row of its own, recorded as it ends
                result = run_search(backend, cell, self._record, self.check_oom, self._tell_collector)
            else:
                result = run_cell(backend, cell, check_oom=self.check_oom, on_measure=self._tell_collector)
        self.cells_run += 1
        written = self._record(result)
        return {
            "cell_id": cell.cell_id,
            "status": result.status,
            "reason": result.reason,
            "duration_s": result.duration_s,
            "written": written,
        }

    def _record(self, result: Any) -> bool:
        """Stamp the worker's identity on ``result`` and hand it to the collector (True: a new row)."""
        hardware = {**result.hardware, **{k: v for k, v in self.identity.items() if k not in ("name", "memory_bytes")}}
        if hardware.get("name") in (None, "", "cpu") and self.identity["name"] != "cpu":
            hardware["name"], hardware["memory_bytes"] = self.identity["name"], self.identity["memory_bytes"]
        result.hardware = hardware
        ray = import_ray()  # encoded here, so the sweep's one writer only writes (kvray/sweep/collector.py)
        row = encode_row(result)
        return bool(ray.get(self.collector.append_encoded.remote(row), timeout=COLLECTOR_ACK_TIMEOUT_S))

    def _tell_collector(self, active: bool) -> None:
        """The measured window opens or closes: the collector holds its table rebuilds meanwhile. Waits for
        the answer (a rebuild in progress finishes first); a collector that does not answer delays nothing.
        A worker on another node than the collector's says nothing: the collector's work is not on its cores."""
        node = self.identity.get("node_id")
        if self.collector_node is not None and node is not None and node != self.collector_node:
            return
        ray = import_ray()
        ref = self.collector.measuring.remote(self.worker_id, node, active)
        if active:
            with contextlib.suppress(Exception):
                ray.get(ref, timeout=MEASURING_ACK_TIMEOUT_S)

    def stats(self) -> dict[str, Any]:
        """Model loads (per model key) and load seconds, cells run: what benchmarks and tests check."""
        return {
            "worker_id": self.worker_id,
            "model_loads": dict(self.loads),
            "load_s": dict(self.load_s),
            "cells_run": self.cells_run,
        }

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()


def _node_accelerator_type(ray: Any, node_id: str) -> str | None:
    """The ``accelerator_type:X`` resource of this node, if Ray detected or was told one."""
    try:
        for node in ray.nodes():
            if node.get("NodeID") == node_id:
                for resource in node.get("Resources", {}):
                    if resource.startswith("accelerator_type:"):
                        return str(resource.split(":", 1)[1])
    except Exception:
        return None
    return None
