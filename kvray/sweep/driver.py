"""The sweep driver: plan a job, start a worker per GPU and one collector, hand out cells, survive faults.

    run_job(load_job("jobs/quickstart.yaml"), "results/quickstart")

The driver only wires the parts together and turns the loop; each part owns one concern:
  scheduler.py  which cell a worker runs next, OOM skips, retries (pure Python, no Ray)
  pool.py       the worker actors: start, readiness, results, timeouts, kill and replace
  placement.py  which actor options a cell's worker needs (the one place heterogeneous clusters touch)
  progress.py   what a person sees: listeners told of workers, cells and the end
  collector.py  the one writer of the output folder

Faults: a worker that dies is replaced and its cell retried, at most ``job.max_attempts`` runs in all,
then recorded ``error`` with the reason; a cell running past ``job.cell_timeout_s`` is recorded ``error``
and its worker replaced. Every Ray wait has a timeout. The collector refuses a second row for a cell, so
nothing is lost or duplicated; a rerun into the same folder skips every cell that already has a row.
A collector that dies stops the sweep (CollectorLost, one line): it is not restarted mid-sweep, because the
workers hold its handle and a row in flight to it may or may not have reached cells.jsonl — the rerun reads
cells.jsonl, which settles that, and measures only the cells without a row.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvray.data.reader import read_results
from kvray.data.status import default_output_dir
from kvray.data.writer import DatasetWriter
from kvray.errors import KvrayInputError
from kvray.measure.trace import CellResult
from kvray.plan.job import Job
from kvray.plan.planner import plan_cells
from kvray.spec import Cell
from kvray.sweep.collector import Collector
from kvray.sweep.folder import FolderLock, disk_full, job_changes, job_sha256
from kvray.sweep.placement import Placement, capacity, check_hardware, placement
from kvray.sweep.pool import RPC_TIMEOUT_S, WORKER_NAME_PREFIX, Slot, SlotState, WorkerPool
from kvray.sweep.progress import SweepListener, default_listener
from kvray.sweep.ray_env import Cluster, connect, import_ray, shutdown
from kvray.sweep.scheduler import Scheduler, Verdict
from kvray.units import first_line

__all__ = [
    "COLLECTOR_NAME_PREFIX",
    "WORKER_NAME_PREFIX",
    "CollectorLost",
    "RunRecord",
    "Sweep",
    "SweepError",
    "run_job",
]

COLLECTOR_NAME_PREFIX = "kvray-collector-"  # + the sweep id: named so that an operator (or a test) can find it
INPROCESS = "inprocess"  # the address that runs the job without Ray (kvray/sweep/inprocess.py)
REFRESH_S = 0.25  # the progress view's rows are rebuilt at most this often (it redraws 4 times a second)
COLLECTOR_THREADS = 32  # appends the collector takes at once: they share one write and fsync (group commit)


@dataclass(frozen=True)
class RunRecord:
    """What a run of a job did: where its dataset is and the manifest's record of this run (its ``runs`` entry:
    ``outcome``, ``cells_to_run``, ``cells_already_done``, ``statuses_this_run``, ``wall_s``, ``workers`` …).

    ``run_job`` returns one; so does ``kvray.launch.submit.submit_job``, which for a job run on a remote cluster
    fills ``remote_status`` (the Jobs API's final status) and ``files`` (what came home, or what the job wrote to
    object storage itself — then ``output_dir`` is that URI and ``run`` is empty: the manifest stayed there)."""

    output_dir: Path | str
    run: dict[str, Any] = field(default_factory=dict)
    remote_status: str | None = None
    files: tuple[str, ...] = ()

    @property
    def outcome(self) -> str:
        """``finished``, ``interrupted (Ctrl-C)`` or ``stopped: …``; empty when no record came back."""
        return str(self.run.get("outcome", ""))


class SweepError(RuntimeError):
    """The sweep cannot go on (no worker can start); rows written so far stay, a rerun resumes."""


class CollectorLost(SweepError):
    """The collector actor died mid-sweep: the sweep stops; every row it wrote is in cells.jsonl."""


def exit_on_second_interrupt() -> None:
    """After a first Ctrl-C the sweep stops its workers and writes its tables; a second one quits at once
    (rows already in cells.jsonl are safe: each was fsync'ed when it was written)."""

    def quit_now(signum: int, frame: Any) -> None:
        sys.stderr.write("\nkvray: quit at once; rows already written are kept — rerun the same command to resume\n")
        sys.stderr.flush()
        os._exit(130)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, quit_now)
        sys.stderr.write("kvray: interrupted: stopping workers and writing tables (Ctrl-C again to quit at once)\n")


class Sweep:
    """One run of a job into a folder on the Ray this process has joined."""

    def __init__(
        self,
        job: Job,
        out_dir: Path,
        check_oom: bool,
        listener: SweepListener,
        worker_setup: Callable[[], Any] | None,
        poll_s: float,
        sync_to: str | None = None,
    ):
        self.ray = import_ray()
        self.sync_to = sync_to  # the object-storage URI ``out_dir`` stages for: the collector uploads to it
        self.job = job
        self.out_dir = out_dir
        self.check_oom = check_oom
        self.listener = listener
        self.worker_setup = worker_setup
        self.poll_s = poll_s
        self.cluster = Cluster.current()
        self.sweep_id = hashlib.sha256(f"{out_dir.resolve()}{time.time()}".encode()).hexdigest()[:8]
        self.t0 = time.monotonic()
        self.refreshed = -REFRESH_S

    def run(self) -> dict[str, Any]:
        """Every cell without a row, then the run's record (also in the manifest)."""
        self.t0 = time.monotonic()
        cells = plan_cells(self.job, sorted(self.cluster.gpus_by_type))
        check_hardware(cells, self.cluster)
        self.collector = self.start_collector(len(cells))
        done = self.done_ids()
        todo = [c for c in cells if c.cell_id not in done]
        already = len(cells) - len(todo)
        self.scheduler: Scheduler[Placement] = Scheduler(
            todo,
            where=lambda cell: placement(cell, self.cluster),
            max_attempts=self.job.max_attempts,
            write=self.write_verdict,
            on_settled=self.listener.on_cell_done,
        )
        self.pool = WorkerPool(
            self.ray, self.cluster, self.sweep_id, self.collector, self.check_oom, self.worker_setup, self.t0
        )
        self.listener.on_start(self.job.name, len(cells), already)
        outcome, cut_off = "finished", False
        try:
            if todo:
                self.start_workers()
                while self.turn():
                    pass
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                exit_on_second_interrupt()
            if self.collector_lost(exc):
                outcome = "stopped: the collector died"
                raise CollectorLost(
                    f"the collector (the one writer of {self.out_dir}) died mid-sweep; every row it wrote is in "
                    f"cells.jsonl and the tables were rebuilt from it; rerun the same command to resume ({first_line(exc)})"
                ) from None
            outcome = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else f"stopped: {first_line(exc)}"
            if isinstance(exc, ConnectionError):  # a Ray Client driver cut off from the cluster (and its collector)
                cut_off = True  # nothing to close from here: any Ray call would try to reach the cluster again
                raise SweepError(
                    f"lost the connection to the Ray cluster ({first_line(exc)}); every row the collector wrote is in "
                    f"{self.out_dir}; rerun the same command to resume"
                ) from None
            raise
        finally:
            self.listener.on_close(outcome)
            # cut off: the cluster ends this client's session (workers, collector) after its reconnect grace period
            record = {} if cut_off else self.close(outcome, already=already, to_run=len(todo))
        return record

    def collector_lost(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a call to a dead actor and the collector is that actor (it answers no ping)."""
        if not isinstance(exc, self.ray.exceptions.RayActorError):
            return False
        try:
            self.ray.get(self.collector.status.remote(""), timeout=10.0)
        except Exception:
            return True
        return False

    def turn(self) -> bool:
        """One turn of the loop; False once every cell is settled."""
        self.hand_out()
        self.check_stranded()
        if self.scheduler.all_settled:
            return False
        self.collect_finished()
        self.handle_failures()
        now = time.monotonic()
        if now - self.refreshed >= REFRESH_S:  # a turn can be milliseconds apart when cells are quick
            self.refreshed = now
            self.listener.on_refresh(self.pool.rows())
        return True

    # -- the steps --

    def start_collector(self, cells_planned: int) -> Any:
        """The collector actor, pinned to this node so the folder is written where the driver runs."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options: dict[str, Any] = {
            "num_cpus": 0,
            "max_restarts": 0,
            "name": COLLECTOR_NAME_PREFIX + self.sweep_id,
            "max_concurrency": COLLECTOR_THREADS,
        }
        with contextlib.suppress(Exception):  # a Ray-client driver has no node: write wherever it lands
            node_id = self.ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        job_record = {
            "name": self.job.name,
            "source": self.job.source,
            "text": self.job.text,
            "spec": self.job.to_dict(),
        }
        run_record = {
            "address": self.ray.get_runtime_context().gcs_address,
            "ray_version": self.ray.__version__,
            "cluster": self.cluster.to_dict(),
            "check_oom": self.check_oom,
            "cells_planned": cells_planned,
            "job_sha256": job_sha256(self.job),
        }
        if self.sync_to:  # the URI holds no secret (kvray.data.location.parse_remote refuses them)
            from kvray.data.object_store import STORAGE_ENV_VARS

            run_record["output"] = self.sync_to
            # A joined cluster's worker does not have this shell's credentials: give the collector them, as
            # ``kvray launch`` gives a job HF_TOKEN (through Ray, never into a file kvray writes).
            env_vars = {k: os.environ[k] for k in STORAGE_ENV_VARS if os.environ.get(k)}
            if env_vars:
                options["runtime_env"] = {"env_vars": env_vars}
        return (
            self.ray.remote(Collector)
            .options(**options)
            .remote(str(self.out_dir), job_record, run_record, sync_to=self.sync_to)
        )

    def done_ids(self) -> set[str]:
        """Cells with a row. Read here (the collector shares this node), so workers start beside the collector."""
        from ray.util.client import ray as client

        if client.is_connected():  # a Ray-client driver: the folder lives on the cluster
            return set(self.ray.get(self.collector.done_ids.remote(), timeout=RPC_TIMEOUT_S))
        return {r["cell_id"] for r in read_results(self.out_dir, traces=False)}

    def start_workers(self) -> None:
        """A worker per matching GPU for each placement with cells (CPU workers per ``job.workers``)."""
        for p, n_cells in self.scheduler.demand().items():
            self.pool.add(p, min(capacity(p, self.cluster, self.job), n_cells))
        self.pool.start_all()

    def hand_out(self) -> None:
        for slot in self.pool.idle():
            cell = self.scheduler.next_cell(slot.index)
            if cell is not None:
                self.pool.run(slot, cell)
            elif self.pool.waiting_for_gpus() and slot.placement.gpu and not self.scheduler.has_work(slot.placement):
                # Done with its cells while another worker waits for GPUs (a TP group for a whole node): free them.
                self.scheduler.leave(slot.index)
                self.pool.release(slot)

    def check_stranded(self) -> None:
        """Cells whose placement has no worker left: stop, so a rerun can retry them."""
        stranded = self.scheduler.stranded(self.pool.live_placements())
        if stranded:
            detail = "; ".join(self.pool.start_errors) or "every worker was given up"
            raise SweepError(f"no worker for {stranded[0].label()} could start: {detail}")

    def collect_finished(self) -> None:
        """Workers that came up and cells that ended since the last turn (waits up to ``poll_s``)."""
        for slot in self.pool.wait(self.poll_s):
            if slot.state is SlotState.STARTING:
                self.worker_ready(slot)
            else:
                self.cell_finished(slot)

    def handle_failures(self) -> None:
        """A cell past its timeout is an error and its (hung) worker replaced; a start that never ends is given up."""
        for slot in self.pool.overdue(self.job.cell_timeout_s):
            assert slot.cell is not None
            self.worker_lost(slot, slot.cell, f"timed out after {self.job.cell_timeout_s:g} s", retry=False)
        self.pool.retire_unstarted()

    def close(self, outcome: str, already: int, to_run: int) -> dict[str, Any]:
        """Stop the workers, write the final tables and the run's record; quiet when a failure is on its way out."""
        record: dict[str, Any] = {}
        try:
            self.pool.close(ended="finished" if outcome == "finished" else "stopped")
            summary = {
                "outcome": outcome,
                "cells_already_done": already,
                "cells_to_run": to_run,
                "statuses_this_run": dict(self.scheduler.statuses),
                # runs beyond each cell's first: a cell whose worker died (a lost node) and ran again elsewhere
                "cell_retries": sum(self.scheduler.attempts.values()) - len(self.scheduler.attempts),
                "wall_s": round(time.monotonic() - self.t0, 3),
                "workers_ready_s": self.pool.workers_ready_s,
                "workers_planned": len(self.pool.slots),
            }
            record = self.ray.get(self.collector.finish.remote(summary), timeout=RPC_TIMEOUT_S)
            self.ray.kill(self.collector, no_restart=True)
        except Exception:
            if outcome == "finished":
                raise
        return record

    # -- what happens to a worker and its cell --

    def worker_ready(self, slot: Slot) -> None:
        info = self.pool.ready(slot)
        if info is not None:
            self.scheduler.join(slot.index, slot.placement, info)
            self.listener.on_worker_ready(slot.name, info)

    def cell_finished(self, slot: Slot) -> None:
        outcome = self.pool.outcome(slot)
        if outcome.failure and disk_full(RuntimeError(outcome.failure)):  # the collector could not write its row
            raise SweepError(f"{outcome.cell.label()}: {outcome.failure}")
        if outcome.status is not None:
            self.scheduler.done(slot.index, outcome.status)
        elif outcome.worker_lost:
            self.worker_lost(slot, outcome.cell, outcome.failure, retry=True)
        else:  # the worker's own code raised; it stays
            self.settle(outcome.cell, outcome.failure, retry=True)

    def worker_lost(self, slot: Slot, cell: Cell, why: str, retry: bool) -> None:
        """The slot's actor is gone (died, or hung: ``retry=False``): settle its cell, then replace it."""
        self.pool.kill(slot, ask=retry)  # a hung worker would not answer
        with contextlib.suppress(Exception):  # its row, should it still come (a partition healing), is refused
            self.ray.get(self.collector.disown.remote(slot.name), timeout=RPC_TIMEOUT_S)
        self.settle(cell, why, retry)
        self.scheduler.leave(slot.index)
        self.pool.replace(slot, needed=self.scheduler.has_work(slot.placement))

    def settle(self, cell: Cell, why: str, retry: bool) -> None:
        """Through the scheduler, with the row the worker may have written before it went."""
        recorded = None
        if cell.cell_id not in self.scheduler.settled:
            recorded = self.ray.get(self.collector.status.remote(cell.cell_id), timeout=RPC_TIMEOUT_S)
        self.scheduler.settle(cell, why, retry, recorded=recorded)

    def write_verdict(self, verdict: Verdict) -> None:
        """A row the scheduler decides (skipped, given up): through the collector like every other row."""
        result = CellResult(cell=verdict.cell, status=verdict.status, reason=verdict.reason, hardware=verdict.hardware)
        self.ray.get(self.collector.append.remote(result.to_dict()), timeout=RPC_TIMEOUT_S)


def run_job(
    job: Job,
    output_dir: str | Path | None = None,
    *,
    address: str = "local",
    resume: bool = True,
    check_oom: bool = True,
    progress: bool = True,
    dashboard: bool = False,
    worker_setup: Callable[[], Any] | None = None,
    poll_s: float = 0.2,
    notice: Callable[[str], object] | None = None,
    sync_to: str | None = None,
) -> RunRecord:
    """Run every cell of ``job`` not yet in ``output_dir`` on Ray; returns the run's record (its folder and the
    manifest's entry for this run: outcome, cells run now and already done, statuses, wall seconds, workers).

    Uses the running Ray if this process already joined one; otherwise starts a local single-node Ray
    (``address="local"``), or joins ``"auto"`` / ``"ray://host:port"``, and shuts down what it started;
    ``address="inprocess"`` runs every cell in this process, without Ray (kvray/sweep/inprocess.py).
    ``worker_setup`` runs once inside each worker before anything else (resource limits, env tweaks).
    ``notice`` receives one line when the job changed since the folder's last run (default: stderr).
    ``sync_to``: the object-storage URI ``output_dir`` is the staging folder of (kvray.data.location
    ``output_folder``): the collector uploads to it after each parts flush and at the end.

    The folder is locked for the run (a second run into it refuses); a bad request (hardware the cluster
    lacks) leaves no folder behind; Ctrl-C stops the workers, writes the tables and re-raises
    KeyboardInterrupt (a second Ctrl-C quits at once); a full disk is a SweepError saying so.
    """
    out = Path(output_dir) if output_dir is not None else default_output_dir(job)
    if not resume:
        from kvray.data.reader import read_results

        ids = {c.cell_id for c in plan_cells(job)}
        if any(r["cell_id"] in ids for r in read_results(out, traces=False)):
            raise KvrayInputError(
                f"{out} already holds results of this job; rerun with --resume (the default) to finish "
                "the job, or choose another --output"
            )
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(out)
        lock.acquire()
    except OSError as exc:
        raise KvrayInputError(f"cannot write the results folder {out}: {exc.strerror or exc}") from None
    try:
        changes = job_changes(job, out)
        if changes is not None:
            (notice or (lambda text: sys.stderr.write(f"kvray: note: {text}\n")))(changes.describe())
        if address == INPROCESS:  # no Ray: the same planner, scheduler, worker and collector, in this process
            from kvray.sweep.inprocess import run_in_process

            run = run_in_process(job, out, check_oom=check_oom, listener=default_listener(progress), sync_to=sync_to)
        else:
            started = connect(address, dashboard)
            try:
                run = Sweep(job, out, check_oom, default_listener(progress), worker_setup, poll_s, sync_to).run()
            finally:
                if started:
                    shutdown()
    except KvrayInputError:
        lock.release()
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if nothing was written: a refused run leaves no empty folder behind
        raise
    except KeyboardInterrupt:
        write_tables_here(out)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
        raise
    except Exception as exc:
        if isinstance(exc, CollectorLost):
            write_tables_here(out)
        if disk_full(exc):
            raise SweepError(
                f"no space left on the disk of {out}: the sweep stopped; every row written so far is in "
                "cells.jsonl (a torn last line is cut on the next run); free space and rerun the same "
                "command to resume"
            ) from None
        raise
    finally:
        lock.release()
    return RunRecord(out, run)


def write_tables_here(out: Path) -> None:
    """The flat tables from cells.jsonl, written by this process: after Ctrl-C the collector may be gone."""
    with contextlib.suppress(Exception):
        if (out / "cells.jsonl").is_file():
            DatasetWriter(out, tables=False).write_tables()
