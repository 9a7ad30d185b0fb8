"""One cell's timeline: the telemetry sampler around its measured repeats, the engine's own gauges, energy.

The runner (kvray/runner/run.py) opens a ``CellTelemetry`` around the measured repeats, marks each repeat as
it starts, and ``attach``es the result: ``extra["timeline"]`` (columns repeat, t_s, source, metric, value —
the dataset writes them to timeline.parquet, not to cells.jsonl) and ``extra["energy"]`` (the energy columns
of the row). What is sampled comes from the backend's contract (``telemetry_sources``: which GPUs, which
process tree; ``engine_gauges``: which keys of its own timeline points are engine gauges), so nothing here
knows a backend by name. The interval is the cell option ``telemetry_interval_s`` (default 0.1 s, 0 = off);
a simulated backend has nothing to sample. Telemetry never fails a cell: a sampler that cannot start leaves
NaN energy with the reason.
"""

from __future__ import annotations

import contextlib
from types import TracebackType

from kvray.backends.base import Backend, BackendRun
from kvray.measure import telemetry as tel
from kvray.measure.trace import CellResult
from kvray.spec import Cell
from kvray.units import first_line


class CellTelemetry:
    """``with CellTelemetry(backend, cell) as t: for r in …: t.mark(r); run(r)``, then ``t.attach(result, runs)``."""

    def __init__(self, backend: Backend, cell: Cell):
        self.backend = backend
        self.gpus = cell.tensor_parallel  # a TP group's worker: every one of its GPUs is metered
        self.interval_s = tel.interval_from_options(cell.option_dict)
        self.sampler: tel.TelemetrySampler | None = None
        self.reason: str | None = None
        if backend.simulated:
            self.reason = "simulated: nothing was run to measure"
        elif self.interval_s == 0:
            self.reason = f"telemetry off ({tel.OPTION} = 0)"

    def __enter__(self) -> CellTelemetry:
        if self.reason is None:
            try:
                sources = self.backend.telemetry_sources(gpus=self.gpus)
                self.sampler = tel.TelemetrySampler(sources, self.interval_s).__enter__()
            except Exception as exc:  # telemetry is a view of the run, never a reason to lose it
                self.sampler, self.reason = None, f"telemetry could not start: {first_line(exc)}"
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.sampler is not None:
            self.sampler.__exit__(exc_type, exc, tb)

    def mark(self, repeat: int) -> None:
        if self.sampler is not None:
            self.sampler.mark(repeat)

    def attach(self, result: CellResult, runs: list[BackendRun]) -> None:
        """The cell's timeline rows and energy columns into ``result.extra`` (a failure here loses only them)."""
        if not runs:  # refused, or failed before a measured repeat finished: no window to describe
            return
        with contextlib.suppress(Exception):
            rows = tel.engine_rows(result.extra.get("kv_timeline") or [], self.backend.engine_gauges)
            traces = [t for run in runs for t in run.traces]
            if self.sampler is not None:
                t0s = {i: run.t0_s for i, run in enumerate(runs) if run.t0_s is not None}  # runs[i] is repeat i
                rows = self.sampler.timeline(t0s) + rows
                energy = self.sampler.figures(sum(t.output_toks for t in traces), len(traces))
            else:
                energy = tel.off_figures(self.reason or "no telemetry")
            result.extra["energy"] = energy
            if rows:
                result.extra["timeline"] = tel.columns(sorted(rows, key=lambda r: (r[0], r[1])))
