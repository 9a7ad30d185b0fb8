"""The harness keeps its own work out of measured windows, and rows name what they measured.

- The collector defers its table rebuilds while a cell on its node measures (plain Python, no Ray: the
  collector is driven the way workers drive it through Ray).
- A cell skipped after an OOM names the GPU the OOM happened on, not the CPU worker that simulated it.
- ``activation_peak_bytes`` subtracts only the KV allocated inside the measured window (numbers injected:
  the CUDA path cannot run on this machine).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from kvray.backends.base import BackendRun
from kvray.measure.trace import CellResult, RunTrace
from kvray.plan.job import job_from_dict
from kvray.plan.planner import plan_cells
from kvray.runner.run import _memory
from kvray.spec import Cell, Workload
from kvray.sweep.collector import Collector
from kvray.sweep.scheduler import Scheduler, Verdict

GIB = 2**30


def a_result(i: int) -> dict:
    cell = Cell("kvray/tiny-llama", Workload.uniform(1 + i, 8, 2), backend="synthetic")
    trace = RunTrace(0, 0, 0.0, 0.0, [0.1, 0.2], 0.2, 8, 2)
    return CellResult(cell=cell, status="ok", traces=[trace]).to_dict()


def collector(tmp_path: Path) -> Collector:
    # tables_every_s is long: the test calls the refresh step itself, so no timing decides the outcome.
    return Collector(str(tmp_path), {"name": "t"}, {}, tables_every_s=3600, node_id="node-a")


def test_tables_wait_while_a_cell_on_this_node_measures(tmp_path):
    col = collector(tmp_path)
    col.append(a_result(0))
    col.measuring("w1", "node-a", True)
    assert col.refresh_tables_if_quiet() is False and not (tmp_path / "parts" / "index.json").exists()
    col.measuring("w2", "node-b", True)  # another node's cell does not share these cores
    col.measuring("w1", "node-a", False)
    assert col.refresh_tables_if_quiet() is True and (tmp_path / "parts" / "index.json").exists()
    assert col.deferred == 1
    col.append(a_result(1))
    col.measuring("w3", None, True)  # a worker that cannot name its node counts as a neighbour
    assert col.refresh_tables_if_quiet() is False
    col.update_worker("w3", {"ended": "replaced"})  # a worker killed mid-window measures no more
    assert col.refresh_tables_if_quiet() is True
    col.finish({})
    assert col.manifest["runs"][-1]["table_refreshes_deferred"] == 2


def test_a_window_never_opens_during_a_rebuild(tmp_path, monkeypatch):
    """``measuring(True)`` answers only after a flush of the parts in progress has finished."""
    col = collector(tmp_path)
    col.append(a_result(0))
    started, release = threading.Event(), threading.Event()
    real = col.writer.flush

    def slow_flush() -> int:
        started.set()
        release.wait(10)
        return real()

    monkeypatch.setattr(col.writer, "flush", slow_flush)
    rebuild = threading.Thread(target=col.refresh_tables_if_quiet)
    rebuild.start()
    assert started.wait(10)
    answered = threading.Event()
    opener = threading.Thread(target=lambda: (col.measuring("w1", "node-a", True), answered.set()))
    opener.start()
    time.sleep(0.3)
    assert not answered.is_set()  # still rebuilding: the worker waits before it measures
    release.set()
    rebuild.join(10)
    opener.join(10)
    assert answered.is_set() and (tmp_path / "parts" / "index.json").exists()
    col.append(a_result(1))
    assert col.refresh_tables_if_quiet() is False  # and no new rebuild starts inside the window
    col.finish({})


def test_a_skipped_cell_names_the_simulated_gpu_it_ran_out_of_memory_on():
    job = job_from_dict(
        {
            "name": "sim",
            "models": ["meta-llama/Meta-Llama-3-8B"],
            "backends": ["sim"],
            "dtypes": ["bf16"],
            "hardware": ["RTX-4090"],
            "warmup": 0,
            "repeats": 1,
            "grid": {"prompt_toks": [512], "gen_toks": [16], "concurrency": [1, 2]},
        }
    )
    cells = plan_cells(job)
    verdicts: list[Verdict] = []
    s: Scheduler[str] = Scheduler(cells, where=lambda c: "cpu", max_attempts=1, write=verdicts.append)
    s.join("w", "cpu", {"name": "cpu", "node_id": "n1"})  # the simulator runs on a CPU worker
    first = s.next_cell("w")
    assert first is not None and first.workload.concurrency == 1
    s.done("w", "oom")  # its row says RTX-4090 (the sim backend's device_info)
    assert s.next_cell("w") is None
    (verdict,) = verdicts
    assert verdict.status == "skipped_after_oom" and verdict.hardware["name"] == "RTX-4090"
    assert "ran out of memory on RTX-4090" in verdict.reason and verdict.hardware["node_id"] == "n1"


class InjectedCudaTracker:
    """What MemoryTracker reports on a GPU, with numbers chosen by hand."""

    is_cuda = True

    def __init__(self, baseline: int, peak: int):
        self.baseline, self.peak = baseline, peak

    def figures(self) -> dict:
        return {"baseline_bytes": self.baseline, "peak_allocated_bytes": self.peak}


def test_activation_peak_subtracts_only_kv_allocated_inside_the_window():
    """Weights 1 GiB, a paged pool of 4 GiB of which 1 GiB is used, 0.3 GiB of transient activations."""
    cell = Cell("kvray/tiny-llama", Workload.uniform(4, 64, 8), backend="hf-paged")
    act = int(0.3 * GIB)

    def paged_run(pool_in_window: int) -> BackendRun:
        memory = {"kv_reserved_bytes": 4 * GIB, "kv_allocated_in_window_bytes": pool_in_window}
        return BackendRun(traces=[], kv_measured_bytes=1 * GIB, memory=memory)

    # warmup created the pool: it is in the baseline, and the used KV inside it is not new memory
    warm = _memory(cell, [paged_run(0)], InjectedCudaTracker(5 * GIB, 5 * GIB + act), None)
    assert warm["activation_peak_bytes"] == act  # the old formula gave 0.3 − 1 = −0.7 GiB
    # no warmup: the first measured repeat allocated the whole pool, used or not
    cold = _memory(cell, [paged_run(4 * GIB), paged_run(0)], InjectedCudaTracker(1 * GIB, 5 * GIB + act), None)
    assert cold["activation_peak_bytes"] == act  # the old formula gave 4.3 − 1 = 3.3 GiB
    # a static cache (hf) is created inside the window: all of the measured KV is new memory
    static = BackendRun(traces=[], kv_measured_bytes=1 * GIB)
    hf = _memory(cell, [static], InjectedCudaTracker(1 * GIB, 2 * GIB + act), None)
    assert hf["activation_peak_bytes"] == act


def test_the_runner_announces_the_measured_window_after_warmup_and_closes_it():
    from kvray.backends import get_backend
    from kvray.runner.run import run_cell
    from kvray.spec import make_options

    backend = get_backend("synthetic")
    repeats_seen: list[int] = []
    real_run = backend.run
    backend.run = lambda cell, requests, repeat: (repeats_seen.append(repeat), real_run(cell, requests, repeat))[1]  # type: ignore[method-assign]
    events: list[tuple[bool, list[int]]] = []
    cell = Cell(
        "kvray/tiny-llama",
        Workload.uniform(2, 8, 3),
        backend="synthetic",
        warmup=2,
        repeats=2,
        options=make_options(ttft_s=0.0, tpot_s=0.0),
    )
    result = run_cell(backend, cell, on_measure=lambda active: events.append((active, list(repeats_seen))))
    assert result.status == "ok"
    assert events == [(True, [-1, -2]), (False, [-1, -2, 0, 1])]  # opened after both warmups, closed after both repeats
    failing = Cell(
        "kvray/tiny-llama", Workload.uniform(2, 8, 3), backend="synthetic", warmup=0, options=make_options(fail="error")
    )
    events.clear()
    assert run_cell(backend, failing, on_measure=lambda active: events.append((active, []))).status == "error"
    assert [e[0] for e in events] == [True, False]  # closed even though the repeat raised
