"""What a cell costs the harness: CPU per cell by stage, for cells whose backend takes no time.

    uv run python benchmarks/cell_overhead.py [--cells 30] [--shapes 4x4,64x32,512x128] [--repeats 1]

Each cell runs in this process through ``run_cell`` on an *instant* backend: the synthetic backend's schedule
(TTFT 50 ms, TPOT 10 ms, each gap jittered ±20 % so no two values tie) computed instead of slept, so every
latency column is populated — 64 requests × 32 tokens pool 64 TTFTs and 1,984 inter-token gaps — and the
backend's own cost is building the traces. (The synthetic backend with ``tpot_s: 0``, benchmarks/scale.py's
instant cells, stamps its tokens microseconds apart: kvray calls those streams bunched and drops their TPOT and
ITL, so its cells skip the largest distribution.) Then the row is encoded as a worker encodes it and appended
as the collector appends it (``DatasetWriter.append_encoded``: write + fsync, into a temporary folder), with
a Parquet part flushed every 50 rows as the collector's flush thread does.

Clock: this process's CPU time (``time.process_time``: user + system of every thread), which another program's
load distorts less than wall time. Stages, median over the cells of a shape (ms a cell):

  backend      ``Backend.run`` (building the traces)
  metrics      ``serving_summary`` less its intervals: per-request figures, percentiles, counts, throughput
  intervals    the percentile intervals (``kvray.measure.metrics.bootstrap_percentile_ci``)
  run_cell     the rest of ``run_cell``: versions, memory columns, the telemetry sampler's start and stop
  encode       ``encode_row``: the JSON lines a worker sends
  append       ``DatasetWriter.append_encoded`` (write + fsync) plus its share of the Parquet parts (one a 50 rows)
  after        everything after the backend returned: metrics + intervals + run_cell (issue #31: ≤ 10 ms for 64)

With ``kvray.measure.metrics.resampled_percentile_ci`` present (the direct bootstrap the intervals used before
issue #31, kept as the reference), each shape runs twice, interleaved cell by cell: ``before`` with it in place
of the intervals, ``now`` with the shipped one, so their ratio comes from one run on one machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # kvray from this checkout, installed or not

STAGES = ("backend", "metrics", "intervals", "run_cell", "encode", "append", "after")
PART_EVERY = 50  # rows between Parquet parts (the collector flushes every 5 s: ~50 rows at 10 cells/s)


def instant_backend() -> Any:
    """The synthetic backend with its schedule computed rather than slept (module docstring)."""
    import numpy as np

    from kvray.backends.base import BackendRun
    from kvray.backends.synthetic import SyntheticBackend
    from kvray.measure.trace import RunTrace

    class InstantBackend(SyntheticBackend):
        def run(self, cell: Any, requests: Sequence[Any], repeat: int) -> BackendRun:
            rng = np.random.default_rng([repeat + 1, len(requests), requests[0].prompt_toks])
            traces = []
            for r in requests:
                jitter = 0.8 + 0.4 * rng.random(r.gen_toks)
                gaps = 0.010 * jitter
                gaps[0] = 0.050 * jitter[0]  # TTFT 40–60 ms
                times = np.cumsum(gaps).tolist()
                traces.append(
                    RunTrace(
                        request_id=r.id,
                        repeat=repeat,
                        arrival_s=0.0,
                        start_s=0.0,
                        token_times_s=times,
                        end_s=times[-1],
                        prompt_toks=r.prompt_toks,
                        output_toks=r.gen_toks,
                        sent_s=0.0,
                    )
                )
            return BackendRun(traces=traces)

    return InstantBackend()


class StageClock:
    """Process CPU seconds spent inside wrapped functions, by stage, for the cell being run."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            c0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[stage] += time.process_time() - c0

        return timed


def measure(shapes: Sequence[tuple[int, int]], cells: int, repeats: int) -> dict[tuple[str, str], dict[str, float]]:
    """{(shape, mode): {stage: median ms a cell}}; modes interleaved cell by cell (module docstring)."""
    import pandas  # noqa: F401 - the collector imports these at its start, before any row (kvray/sweep/collector.py)
    import pyarrow.parquet  # noqa: F401

    from kvray.data.writer import DatasetWriter, encode_row
    from kvray.measure import metrics, serving
    from kvray.runner import run as runner
    from kvray.spec import Cell, Workload, make_options

    clock = StageClock()
    shipped = metrics.bootstrap_percentile_ci
    reference = getattr(metrics, "resampled_percentile_ci", None)
    modes = {"now": shipped, **({"before": reference} if reference is not None else {})}
    backend = instant_backend()
    backend.run = clock.wrap("backend", backend.run)  # type: ignore[method-assign]
    summary = serving.serving_summary
    serving_timed = clock.wrap("summary", summary)
    runner.serving_summary = serving_timed  # type: ignore[attr-defined]
    medians: dict[tuple[str, str], dict[str, float]] = {}
    try:
        for requests, gen_toks in shapes:
            samples: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in modes}
            with tempfile.TemporaryDirectory() as tmp:
                writers = {m: DatasetWriter(Path(tmp) / m, tables=False) for m in modes}
                flushed = dict.fromkeys(modes, 0.0)
                for i in range(cells + 1):  # the first cell of each mode warms its caches, and is not counted
                    for mode, interval_fn in modes.items():
                        metrics.bootstrap_percentile_ci = clock.wrap("intervals", interval_fn)
                        cell = Cell(
                            model="kvray/tiny-llama",
                            workload=Workload.uniform(requests, 8 + i, gen_toks),
                            backend="synthetic",
                            dtype="fp32",
                            warmup=0,
                            repeats=repeats,
                            options=make_options(telemetry_interval_s=0.1),
                        )
                        clock.spent.clear()
                        c0 = time.process_time()
                        result = runner.run_cell(backend, cell, check_oom=False)
                        total = time.process_time() - c0
                        assert result.status == "ok", result.reason
                        c1 = time.process_time()
                        row = encode_row(result)
                        c2 = time.process_time()
                        writers[mode].append_encoded(row)
                        c3 = time.process_time()
                        if i % PART_EVERY == 0 or i == cells:  # a part's cost is spread over its rows (below)
                            writers[mode].flush()
                            flushed[mode] += time.process_time() - c3
                        if i == 0:
                            continue
                        spent = dict(clock.spent)
                        stage = {
                            "backend": spent["backend"],
                            "metrics": spent["summary"] - spent["intervals"],
                            "intervals": spent["intervals"],
                            "run_cell": total - spent["backend"] - spent["summary"],
                            "encode": c2 - c1,
                            "append": c3 - c2,
                        }
                        stage["after"] = stage["metrics"] + stage["intervals"] + stage["run_cell"]
                        for k, v in stage.items():
                            samples[mode][k].append(v * 1e3)
                for mode in modes:  # each row's share of the parts (the warm-up row's part included)
                    samples[mode]["append"] = [v + flushed[mode] * 1e3 / (cells + 1) for v in samples[mode]["append"]]
            for mode in modes:
                medians[(f"{requests}x{gen_toks}", mode)] = {k: statistics.median(samples[mode][k]) for k in STAGES}
    finally:
        metrics.bootstrap_percentile_ci = shipped
        runner.serving_summary = summary  # type: ignore[attr-defined]
    return medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=30, help="cells measured per shape and mode (after one warm-up)")
    ap.add_argument("--shapes", default="4x4,64x32,512x128", help="requests x output tokens, comma-separated")
    ap.add_argument("--repeats", type=int, default=1, help="measured repeats per cell")
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    import os

    print(
        f"CPU ms a cell (process_time, median of {args.cells} cells; {args.repeats} repeat(s) a cell); "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    medians = measure(shapes, args.cells, args.repeats)  # type: ignore[arg-type]
    print(f"{'shape':>9} {'mode':>6} " + " ".join(f"{s:>9}" for s in STAGES))
    for (shape, mode), m in medians.items():
        print(f"{shape:>9} {mode:>6} " + " ".join(f"{m[s]:9.2f}" for s in STAGES))
    for shape in dict.fromkeys(s for s, _ in medians):
        if (shape, "before") in medians:
            b, n = medians[(shape, "before")], medians[(shape, "now")]
            print(
                f"{shape:>9} before/now: intervals {b['intervals'] / max(n['intervals'], 1e-9):.1f}×, "
                f"after the backend {b['after'] / max(n['after'], 1e-9):.1f}×"
            )
    print("target: 'after' ≤ 10 ms for 64x32")


if __name__ == "__main__":
    main()
