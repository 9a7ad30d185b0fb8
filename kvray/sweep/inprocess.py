"""The same sweep without Ray: every cell of a job measured in this process, one after another.

    run_job(load_job("jobs/quickstart.yaml"), "results/quickstart", address="inprocess")

For a machine without Ray (a GPU box with only torch and transformers), for simulated and synthetic sweeps whose
cells take milliseconds (an actor's start costs more than the whole sweep), and for tests of the whole path —
plan → scheduler → backend → row → collector → tables — in seconds. It is the Ray sweep with the Ray parts
taken out, not a second implementation: the same planner, the same scheduler policy (kvray/sweep/scheduler.py:
groups small to large, OOM skips, retries), the same worker code (kvray/sweep/workers.py, its Ray calls
replaced by direct ones) and the same collector (kvray/sweep/collector.py, a plain object here: rows fsync'ed
as they arrive, parts flushed outside measured windows, the manifest's run record).

What it does not have: parallel workers (one device, the first GPU or the CPU), fault isolation (a cell that
kills the process ends the run; the rerun resumes from cells.jsonl, as after any crash) and cell timeouts
(nothing can interrupt a cell in its own process). The manifest's run record says ``address: inprocess``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from kvray.data.writer import encode_row
from kvray.hardware.env import collect_environment
from kvray.measure.trace import CellResult
from kvray.plan.job import Job
from kvray.plan.planner import plan_cells
from kvray.spec import Cell
from kvray.sweep.collector import Collector
from kvray.sweep.folder import job_sha256
from kvray.sweep.placement import Placement, check_hardware, placement
from kvray.sweep.progress import SweepListener, WorkerRow
from kvray.sweep.ray_env import Cluster
from kvray.sweep.scheduler import Scheduler, Verdict
from kvray.sweep.workers import Worker
from kvray.units import first_line

HERE = "this process"  # the node every row of an in-process run names
WORKER_ID = "inprocess-0"


def this_machine() -> Cluster:
    """What this process can use: its CPUs and the GPUs NVML sees (no accelerator types: a job that names one
    is refused, as on a Ray cluster without declared types)."""
    from kvray.hardware.env import nvml_gpus

    gpus = float(len(nvml_gpus()[0]))
    nodes = ((HERE, None, gpus),) if gpus else ()
    return Cluster(cpus=float(os.cpu_count() or 1), gpus=gpus, nodes=nodes, cpus_per_gpu=float(os.cpu_count() or 1))


class InProcessWorker(Worker):
    """``Worker`` with its Ray calls made directly: its rows go straight to the collector object."""

    def _identity(self, accelerator_type: str | None) -> dict[str, Any]:
        from kvray.hardware.env import nvml_gpus

        gpus = nvml_gpus()[0]
        identity: dict[str, Any] = {
            "worker_id": self.worker_id,
            "node_id": HERE,
            "gpu_ids": [],
            "accelerator_type": None,
            "name": "cpu",
            "memory_bytes": None,
        }
        if gpus:
            identity.update(gpu_ids=[str(gpus[0].index)], name=gpus[0].name, memory_bytes=gpus[0].memory_bytes)
        return identity

    def ready(self) -> dict[str, Any]:
        self.collector_node = HERE
        return {
            **self.identity,
            "pid": os.getpid(),
            "threads": self.threads,
            "environment": collect_environment().to_dict(),
        }

    def _record(self, result: Any) -> bool:
        result.hardware = {
            **result.hardware,
            **{k: v for k, v in self.identity.items() if k not in ("name", "memory_bytes")},
        }
        if result.hardware.get("name") in (None, "", "cpu") and self.identity["name"] != "cpu":
            result.hardware["name"] = self.identity["name"]
            result.hardware["memory_bytes"] = self.identity["memory_bytes"]
        return bool(self.collector.append_encoded(encode_row(result)))

    def _tell_collector(self, active: bool) -> None:
        self.collector.measuring(self.worker_id, HERE, active)  # table flushes wait for the measured window


def run_in_process(
    job: Job, out_dir: Any, *, check_oom: bool, listener: SweepListener, sync_to: str | None = None
) -> dict[str, Any]:
    """Every cell of ``job`` without a row in ``out_dir``, here; returns the run's record (as the manifest's)."""
    t0 = time.monotonic()
    cluster = this_machine()
    cells = plan_cells(job, sorted(cluster.gpus_by_type))
    check_hardware(cells, cluster, where="this machine (--address inprocess)")
    job_record = {"name": job.name, "source": job.source, "text": job.text, "spec": job.to_dict()}
    run_record = {
        "address": "inprocess",
        "ray_version": None,
        "cluster": cluster.to_dict(),
        "check_oom": check_oom,
        "cells_planned": len(cells),
        "job_sha256": job_sha256(job),
    }
    if sync_to:
        run_record["output"] = sync_to
    collector = Collector(str(out_dir), job_record, run_record, node_id=HERE, sync_to=sync_to)
    done = set(collector.done_ids())
    todo = [c for c in cells if c.cell_id not in done]

    def write(verdict: Verdict) -> None:
        result = CellResult(cell=verdict.cell, status=verdict.status, reason=verdict.reason, hardware=verdict.hardware)
        collector.append(result.to_dict())

    scheduler: Scheduler[Placement] = Scheduler(
        todo,
        where=lambda cell: placement(cell, cluster),
        max_attempts=job.max_attempts,
        write=write,
        on_settled=listener.on_cell_done,
    )
    listener.on_start(job.name, len(cells), len(cells) - len(todo))
    outcome = "finished"
    worker: InProcessWorker | None = None
    try:
        if todo:
            worker = InProcessWorker(WORKER_ID, collector, check_oom=check_oom)
            info = worker.ready()
            collector.add_worker(info)
            listener.on_worker_ready(WORKER_ID, info)
            for where in list(scheduler.demand()):  # one device serves each placement in turn
                scheduler.join(WORKER_ID, where, info)
                while (cell := scheduler.next_cell(WORKER_ID)) is not None:
                    listener.on_refresh([_row(info, cell, scheduler)])
                    run_one(worker, scheduler, cell)
                scheduler.leave(WORKER_ID)
    except BaseException as exc:
        outcome = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else f"stopped: {first_line(exc)}"
        raise
    finally:
        listener.on_close(outcome)
        if worker is not None:
            worker.close()
            collector.update_worker(WORKER_ID, worker.stats())
        summary = {
            "outcome": outcome,
            "cells_already_done": len(cells) - len(todo),
            "cells_to_run": len(todo),
            "statuses_this_run": dict(scheduler.statuses),
            "cell_retries": sum(scheduler.attempts.values()) - len(scheduler.attempts),
            "wall_s": round(time.monotonic() - t0, 3),
            "workers_planned": 1 if todo else 0,
        }
        record = collector.finish(summary)
    return record


def run_one(worker: InProcessWorker, scheduler: Scheduler[Placement], cell: Cell) -> None:
    """One cell through the worker; an exception of the harness (not the cell's own error row) is settled by
    the scheduler — retried while attempts allow, else an ``error`` row with the reason."""
    try:
        answer = worker.run(cell)
    except Exception as exc:
        scheduler.settle(
            cell, f"{type(exc).__name__}: {first_line(exc)}", retry=True, recorded=worker.collector.status(cell.cell_id)
        )
        return
    scheduler.done(WORKER_ID, answer["status"])


def _row(info: dict[str, Any], cell: Cell, scheduler: Scheduler[Placement]) -> WorkerRow:
    done = sum(scheduler.statuses.values())
    return WorkerRow("w0.0", str(info.get("name", "cpu")), done, cell.label(), node=HERE, state="busy")
