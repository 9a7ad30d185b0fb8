"""Run one cell on a backend: OOM pre-check, load, warmup, measured repeats under a MemoryTracker, metrics.

``run_cell`` is the single entry point every caller uses (``kvray bench``, Ray workers, the simulator),
and it never raises for the cell's own failure: a CellResult with status ok | partial (some requests
failed) | oom | error | refused comes back.
What it needs to know about a backend — simulated or measured, KV layout and admission, device, memory —
the backend declares through the contract in kvray/backends/base.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from kvray.backends.base import Backend, BackendRun
from kvray.data.layout import MEMORY_COLUMNS
from kvray.hardware.env import library_versions
from kvray.measure.memory import attempted_bytes, is_oom_error
from kvray.measure.serving import client_columns, serving_summary
from kvray.measure.trace import CellResult, RunTrace
from kvray.model.kvmath import cached_positions, kv_bytes_batch
from kvray.model.oom import check_oom_risk
from kvray.model.resolve import resolve_geometry
from kvray.runner.timeline import CellTelemetry
from kvray.spec import Cell
from kvray.units import first_line, human_bytes

# Memory columns every CellResult carries (None where a backend or device cannot tell): the dataset's list.
MEMORY_KEYS = MEMORY_COLUMNS


@lru_cache(maxsize=1)
def _library_versions() -> dict[str, str | None]:
    """Package metadata scans take milliseconds each; versions cannot change within a process."""
    return library_versions()


def predicted_kv_bytes(cell: Cell) -> int | None:
    """KV bytes of the cell's workload as one static hf batch (None when the model's geometry is unknown)."""
    try:
        g = resolve_geometry(cell.model)
        wl = cell.workload
        gen_toks = wl.gen_toks  # the longest: a property over every request, so once, not once per request
        positions = [cached_positions(r.prompt_toks, gen_toks) for r in wl.requests]
        return kv_bytes_batch(g, positions, cell.kv_dtype or cell.dtype, "hf")
    except Exception:
        return None


def oom_refusal(backend: Backend, cell: Cell) -> str | None:
    """The reason to refuse a high-risk cell, or None when it may run.

    The estimate uses the backend's KV layout and admission: a static batch (hf) must hold every request
    padded to the longest at once, so concurrency × length is what must fit; an engine that queues what
    does not fit (``queues_when_full``, a paged engine) runs any concurrency in turns, so only one request
    that cannot fit even alone is a reason to refuse.
    """
    available = backend.memory_available_bytes(cell)
    gpu = cell.hardware if cell.hardware not in ("any", "", "cpu") and available is None else None
    queues = backend.queues_when_full
    risk = check_oom_risk(
        cell.model,
        1 if queues else cell.workload.max_in_flight,
        cell.workload.max_seq_len,
        dtype=cell.dtype,
        gpu=gpu,
        kv_dtype=cell.kv_dtype,
        layout=backend.layout_for(cell.option_dict),
        available_bytes=available,
        tp=cell.tensor_parallel,  # per GPU of the cell's TP group (kvray/model/parallel.py)
    )
    if risk.risk_level != "high":
        return None
    recs = "; ".join(risk.recommendations)
    what = f"one request of {risk.seq_len} tokens alone" if queues else "estimated"
    return (
        f"refused: OOM risk high — {what} {risk.total_estimated_gb:.2f} GiB (weights "
        f"{risk.weights_gb:.2f}, KV {risk.kv_gb:.2f}, activations {risk.activation_gb:.2f}) of "
        f"{risk.available_gb:.2f} GiB on {risk.device}; max concurrency {risk.max_concurrency}"
        + (f"; {recs}" if recs else "")
        + " (run with --no-check-oom / check_oom=False to try anyway)"
    )


def run_cell(
    backend: Backend, cell: Cell, check_oom: bool = True, on_measure: Callable[[bool], None] | None = None
) -> CellResult:
    """Measure one cell. Warmup runs are discarded; ``cell.repeats`` runs are measured and pooled.

    ``on_measure(True)`` is called just before the measured window opens and ``on_measure(False)`` when it
    closes, so the harness can keep its own work (a sweep's table rebuilds) out of the window."""
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    t_start = time.perf_counter()
    result = CellResult(cell=cell, status="ok", started_at=started_at)
    runs: list[BackendRun] = []
    tracker: Any = None  # the backend's choice (memory_tracker): this process, a server's tree, or nothing
    telemetry: CellTelemetry | None = None
    failure: tuple[str, str] | None = None
    oom_size: int | None = None
    try:
        result.versions = dict(_library_versions())
        if check_oom and not backend.simulated and backend.oom_precheck:
            refusal = oom_refusal(backend, cell)
            if refusal:
                failure = ("refused", refusal)
        if failure is None:
            backend.load(cell)
            requests = cell.workload.requests
            for i in range(cell.warmup):
                backend.run(cell, requests, repeat=-1 - i)
            tracker = backend.memory_tracker()
            telemetry = CellTelemetry(backend, cell)  # GPU/CPU samples on the traces' clock, energy (timeline.py)
            with _measuring(on_measure), tracker if tracker is not None else contextlib.nullcontext(), telemetry:
                for repeat in range(cell.repeats):
                    telemetry.mark(repeat)
                    runs.append(backend.run(cell, requests, repeat=repeat))
    except Exception as exc:  # the cell's own failure: recorded, never raised
        if is_oom_error(exc):
            oom_size = attempted_bytes(exc)
            failure = ("oom", f"out of memory: {first_line(exc)}")
        else:
            failure = ("error", first_line(exc))
    if failure is not None and failure[0] == "oom":
        with contextlib.suppress(Exception):
            backend.free_memory()
    try:
        result.hardware = backend.device_info()
    except Exception:
        result.hardware = {"name": "cpu"}

    traces: list[RunTrace] = [t for run in runs for t in run.traces]
    result.traces = traces
    result.simulated = backend.simulated or any(run.simulated for run in runs)
    if traces:  # steady-state requests only under a serving load (kvray/measure/serving.py)
        result.metrics = serving_summary(cell.workload, traces, simulated=result.simulated)
    result.memory = _memory(cell, runs, tracker, oom_size)
    if result.memory.get("weights_bytes") is None and backend.weights_bytes is not None:
        result.memory["weights_bytes"] = backend.weights_bytes
    for run in runs:
        result.extra.update(run.extra)
    if any(run.extra.get("kv_timeline") for run in runs):  # each run holds its repeat's points; the cell, all of them
        result.extra["kv_timeline"] = [point for run in runs for point in run.extra.get("kv_timeline") or []]
    if cell.workload.load_kind == "replay" and result.memory.get("prefix_cache_hit_rate_predicted") is None:
        from kvray.plan.replay import predicted_hit_rate  # every replayed row carries it (kvray/plan/replay.py)

        result.memory["prefix_cache_hit_rate_predicted"] = predicted_hit_rate(cell)
    if cell.clients > 1 and traces:  # per-client lag and clock ties (kvray/measure/serving.py)
        result.metrics.update(client_columns(cell.clients, traces, result.extra.get("client_clocks") or []))
    result.extra["ttft_basis"] = backend.ttft_basis  # which clock TTFT is on (kvray/backends/base.py)
    result.extra.update(_kv_layout(backend, cell, runs))  # the layout the KV was kept in, for calibrate and readers
    result.extra["memory_scope"] = backend.memory_scope()  # which process the memory columns measured
    if telemetry is not None:
        telemetry.attach(result, runs)  # extra["timeline"] (→ timeline.parquet) and extra["energy"] (→ the row)
    for run in runs:  # server counters (prefix-cache hits, …) over the measured repeats
        for key, count in run.counters.items():
            result.metrics[key] = result.metrics.get(key, 0) + count
    if failure is not None:
        result.status, result.reason = failure
        if result.status == "oom":
            result.reason = _oom_reason(result.reason, cell, result.memory)
    elif traces and not any(t.status == "ok" for t in traces):
        result.status, result.reason = "error", next((t.error for t in traces if t.error), "every request failed")
    elif any(t.status != "ok" for t in traces):  # measured, but its percentiles pool only the successful requests
        failed = [t for t in traces if t.status != "ok"]
        first = next((t.error for t in failed if t.error), "no reason given")
        result.status, result.reason = "partial", f"{len(failed)} of {len(traces)} requests failed: {first}"
    result.duration_s = time.perf_counter() - t_start
    return result


def _kv_layout(backend: Backend, cell: Cell, runs: list[BackendRun]) -> dict[str, Any]:
    """``kv_layout`` ("hf" | "paged", as the backend declares it for the cell's options) and, for a paged one,
    ``kv_block_size`` in tokens: the engine's own (hf-paged's cache, a server's cache_config_info), else the
    cell's ``block_size`` option — so a row says how its KV was laid out and nothing downstream re-derives it."""
    options = dict(cell.options)
    try:
        layout = backend.layout_for(options)
    except Exception:
        return {}
    block: Any = None
    if layout == "paged":
        for run in runs:
            for key in ("paged_cache", "server_cache"):
                block = block or (run.extra.get(key) or {}).get("block_size")
        block = block or options.get("block_size")
    return {"kv_layout": layout, "kv_block_size": int(block) if block else None}


@contextlib.contextmanager
def _measuring(on_measure: Callable[[bool], None] | None) -> Iterator[None]:
    """Tell ``on_measure`` the measured window opens, and that it closed (also when a repeat raised)."""
    if on_measure is None:
        yield
        return
    on_measure(True)
    try:
        yield
    finally:
        on_measure(False)


def _memory(cell: Cell, runs: list[BackendRun], tracker: Any, oom_size: int | None) -> dict[str, Any]:
    memory: dict[str, Any] = dict.fromkeys(MEMORY_KEYS)
    if tracker is not None:
        memory.update(tracker.figures())
    measured = [r.kv_measured_bytes for r in runs if r.kv_measured_bytes is not None]
    memory["kv_measured_bytes"] = max(measured) if measured else None
    for run in runs:  # the backend knows better than the process-level tracker; peaks over repeats
        for key, value in run.memory.items():
            if value is None:
                memory.setdefault(key, None)
            elif key.startswith("kv_") and isinstance(memory.get(key), int | float):
                memory[key] = max(memory[key], value)
            else:
                memory[key] = value
    # A paged engine predicts from its running set at its own measured peak (kvray/measure/kv_timeline.py): the
    # row pairs the peak repeat's measurement with that repeat's prediction, not a max of each over repeats.
    timed = [r for r in runs if r.kv_measured_bytes is not None and "kv_peak_running" in r.memory]
    if timed:
        from kvray.measure.kv_timeline import PEAK_KEYS

        at_peak = max(timed, key=lambda r: r.kv_measured_bytes or 0).memory
        memory.update({k: at_peak[k] for k in PEAK_KEYS if k in at_peak})
    if memory["kv_predicted_bytes"] is None and not any("kv_predicted_bytes" in r.memory for r in runs):
        memory["kv_predicted_bytes"] = predicted_kv_bytes(cell)
    kv_m, kv_p = memory["kv_measured_bytes"], memory["kv_predicted_bytes"]
    memory["kv_rel_error"] = (kv_m - kv_p) / kv_p if kv_m is not None and kv_p else None
    peak, base = memory["peak_allocated_bytes"], memory["baseline_bytes"]
    if peak is not None and base is not None and tracker is not None and tracker.is_cuda:
        # Only KV allocated inside the window is in peak − baseline: a static cache (all of kv_measured), or a
        # paged pool the engine created during a measured repeat (kv_allocated_in_window_bytes; 0 when the
        # pool was already in the baseline). docs/metrics.md, "activation_peak_bytes".
        grown = memory.get("kv_allocated_in_window_bytes")
        memory["activation_peak_bytes"] = peak - base - (grown if grown is not None else (kv_m or 0))
    if oom_size is not None:
        memory["oom_attempted_bytes"] = oom_size
    return memory


def _oom_reason(reason: str | None, cell: Cell, memory: dict[str, Any]) -> str:
    """The failure plus the sizes that were attempted, so the OOM boundary can be read off the dataset."""
    wl = cell.workload
    parts = [reason or "out of memory", f"{wl.concurrency} requests × {wl.max_seq_len} tokens"]
    if memory.get("kv_predicted_bytes"):
        parts.append(f"predicted KV {human_bytes(memory['kv_predicted_bytes'])}")
    if memory.get("oom_attempted_bytes"):
        parts.append(f"allocation attempted {human_bytes(memory['oom_attempted_bytes'])}")
    return "; ".join(parts)


def run_cells(
    backend: Backend,
    cells: Iterable[Cell],
    on_result: Callable[[CellResult], None] | None = None,
    check_oom: bool = True,
) -> list[CellResult]:
    """Run cells in order on one backend (the model stays loaded between cells that share it)."""
    results = []
    for cell in cells:
        result = run_cell(backend, cell, check_oom=check_oom)
        if on_result is not None:
            on_result(result)
        results.append(result)
    return results
