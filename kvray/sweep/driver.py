"""The sweep driver: plan a job, start a worker per GPU and one collector, hand out cells, survive faults.

    run_job(load_job("jobs/quickstart.yaml"), "results/quickstart")

Scheduling: cells are grouped by (model, backend, dtype, weights, device, hardware) and each group is a
queue ordered from small to large memory. An idle worker keeps to its group (its model stays loaded), and
otherwise joins the group with the fewest workers on it that it has not served before — so a worker loads
each model at most once. A cell that needs at least what an out-of-memory cell of its group needed on the
same hardware is recorded ``skipped_after_oom`` without running.

Faults: a worker that dies is replaced and its cell retried, at most ``job.max_attempts`` runs in all,
then recorded ``error`` with the reason; a cell running past ``job.cell_timeout_s`` is recorded ``error``
and its worker replaced. Every Ray wait has a timeout. The collector refuses a second row for a cell, so
nothing is lost or duplicated; a rerun into the same folder skips every cell that already has a row.

Placement (which actor options a cell's worker needs) lives in ``placement`` and ``actor_options`` alone,
so heterogeneous clusters only have to change those.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvray.errors import KvrayInputError
from kvray.measure.trace import STATUSES, CellResult
from kvray.plan.job import Job
from kvray.plan.planner import GroupKey, group_cells, group_key, plan_cells, skip_reason
from kvray.spec import Cell
from kvray.sweep.workers import import_ray
from kvray.units import first_line

WORKER_START_TIMEOUT_S = 600.0  # process start + imports; a pending placement also ends here
RPC_TIMEOUT_S = 120.0  # any call to the collector or a worker's bookkeeping methods
MAX_START_FAILURES = 3  # consecutive failed starts before a worker slot is given up
WORKER_NAME_PREFIX = "kvray-worker"


class SweepError(RuntimeError):
    """The sweep cannot go on (no worker can start); rows written so far stay, a rerun resumes."""


# --- the cluster and where cells go ------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """What Ray offers: CPUs, GPUs, and GPUs per accelerator type."""

    cpus: float
    gpus: float
    gpus_by_type: dict[str, float] = field(default_factory=dict)

    @classmethod
    def current(cls) -> Cluster:
        ray = import_ray()
        cpus = gpus = 0.0
        by_type: Counter[str] = Counter()
        for node in ray.nodes():
            if not node.get("Alive", node.get("alive", True)):
                continue
            res = node.get("Resources", {})
            cpus += res.get("CPU", 0.0)
            gpus += res.get("GPU", 0.0)
            for key in res:
                if key.startswith("accelerator_type:"):
                    by_type[key.split(":", 1)[1]] += res.get("GPU", 0.0)
        return cls(cpus, gpus, dict(by_type))


@dataclass(frozen=True)
class Placement:
    """What a worker must sit on: a GPU (of a type, or any), or just CPU."""

    gpu: bool
    accelerator_type: str | None = None

    def label(self) -> str:
        if not self.gpu:
            return "cpu"
        return f"gpu:{self.accelerator_type}" if self.accelerator_type else "gpu"


def placement(cell: Cell, cluster: Cluster) -> Placement:
    """The simulator and device: cpu need no GPU; on a GPU-less cluster everything runs on CPU workers."""
    if cell.backend == "sim" or cell.device == "cpu" or cluster.gpus < 1:
        return Placement(gpu=False)
    return Placement(gpu=True, accelerator_type=None if cell.hardware == "any" else cell.hardware)


def capacity(p: Placement, cluster: Cluster, job: Job) -> int:
    """How many workers of this placement: one per matching GPU, one on CPU, at most ``job.workers``."""
    if not p.gpu:
        return job.workers or 1
    n = int(cluster.gpus_by_type.get(p.accelerator_type, 0) if p.accelerator_type else cluster.gpus)
    return max(1, min(n, job.workers or n))


def actor_options(p: Placement, num_cpus: float) -> dict[str, Any]:
    options: dict[str, Any] = {"num_gpus": 1 if p.gpu else 0, "num_cpus": num_cpus, "max_restarts": 0}
    if p.accelerator_type:
        options["accelerator_type"] = p.accelerator_type
    return options


def check_hardware(cells: list[Cell], cluster: Cluster) -> None:
    """Every requested accelerator type must exist, or the sweep would wait forever for it."""
    missing = sorted({c.hardware for c in cells if placement(c, cluster).accelerator_type} - set(cluster.gpus_by_type))
    if missing:
        present = ", ".join(sorted(cluster.gpus_by_type)) or "none"
        raise KvrayInputError(f"hardware {', '.join(missing)} is not in this Ray cluster (present: {present})")


# --- Ray ---------------------------------------------------------------------------------------------


LOCAL_START_ATTEMPTS = 3


def start_local_ray(**kwargs: Any) -> None:
    """``ray.init(address="local", …)``, tried again when the node times out during startup.

    On a busy machine Ray 2.60's raylet gives its dashboard agent a fixed ~15 s to report its ports and
    then aborts ("The current node timed out during startup", ray-project/ray#65983); a second try
    usually finds the machine warmer. ``address="local"`` always starts a fresh cluster, so a stale
    ``ray_current_cluster`` file can never make kvray join a dead one.
    """
    import logging

    # Token authentication stays on (Ray's default for a new local cluster); saying so explicitly keeps
    # Ray from printing a warning about its default on every run.
    if "ray._raylet" not in sys.modules:  # Ray reads the mode once, at import
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    ray = import_ray()
    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING, **kwargs}
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(address="local", **kwargs)
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == LOCAL_START_ATTEMPTS:
                raise
            ray.shutdown()


def ray_is_running() -> bool:
    """True when this process already joined Ray (checked without importing Ray)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def connect(address: str = "local", dashboard: bool = False) -> bool:
    """Join or start Ray; True when this call started it (and the caller should shut it down)."""
    import logging

    if ray_is_running():
        return False
    if address == "local":
        start_local_ray(include_dashboard=dashboard, dashboard_host="127.0.0.1")
        return True
    ray = import_ray()
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError) as exc:
        raise KvrayInputError(f"cannot reach Ray at {address!r}: {str(exc).splitlines()[0]}") from None
    return True


# --- the driver --------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """One worker position; its actor is replaced when it dies."""

    index: int
    placement: Placement
    actor: Any = None
    name: str = ""
    incarnation: int = 0
    state: str = "starting"  # starting | idle | busy | retired
    ready_ref: Any = None
    started: float = 0.0  # when the current start or cell began
    info: dict[str, Any] = field(default_factory=dict)
    group: GroupKey | None = None
    visited: set[GroupKey] = field(default_factory=set)
    cell: Cell | None = None
    ref: Any = None
    start_failures: int = 0
    ever_ready: bool = False
    done: int = 0

    @property
    def hardware_name(self) -> str:
        return str(self.info.get("name", "cpu"))


class _View:
    """Rich progress on stderr: cells done/total, failures, ETA, and each worker's current cell."""

    def __init__(self, total: int, title: str, enabled: bool):
        self.enabled = enabled
        self.failures = 0
        if not enabled:
            return
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._group = Group
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failures]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.task = self.progress.add_task(title, total=total, failures="")
        self.live = Live(self._render([]), console=Console(stderr=True), refresh_per_second=4, transient=False)
        self.live.start()

    def _render(self, slots: list[_Slot]) -> Any:
        from rich.table import Table

        table = Table(box=None, show_header=True, header_style="dim", pad_edge=False)
        for column in ("worker", "hardware", "cells", "now"):
            table.add_column(column)
        for s in slots:
            now = s.cell.label() if s.cell is not None else s.state
            if s.cell is not None:
                now += f"  ({time.monotonic() - s.started:.0f} s)"
            table.add_row(f"w{s.index}.{s.incarnation}", s.hardware_name, str(s.done), now)
        return self._group(self.progress, table)

    def update(self, done: int, slots: list[_Slot]) -> None:
        if not self.enabled:
            return
        failures = f"[red]{self.failures} failed[/]" if self.failures else ""
        self.progress.update(self.task, completed=done, failures=failures)
        self.live.update(self._render(slots))

    def stop(self) -> None:
        if self.enabled:
            self.live.stop()
            if not self.live.console.is_terminal:  # a log file: end the last frame's line
                self.live.console.line()


class _Sweep:
    def __init__(
        self,
        job: Job,
        out_dir: Path,
        check_oom: bool,
        progress: bool,
        worker_setup: Callable[[], Any] | None,
        poll_s: float,
    ):
        self.ray = import_ray()
        self.job = job
        self.out_dir = out_dir
        self.check_oom = check_oom
        self.progress = progress
        self.worker_setup = worker_setup
        self.poll_s = poll_s
        self.cluster = Cluster.current()
        self.sweep_id = hashlib.sha256(f"{out_dir.resolve()}{time.time()}".encode()).hexdigest()[:8]
        self.queues: dict[GroupKey, deque[Cell]] = {}
        self.group_placement: dict[GroupKey, Placement] = {}
        self.attempts: Counter[str] = Counter()
        self.oomed: dict[tuple[GroupKey, str], list[Cell]] = {}
        self.slots: list[_Slot] = []
        self.finished: set[str] = set()
        self.statuses: Counter[str] = Counter()
        self.start_errors: list[str] = []
        self.t0 = time.monotonic()
        self.workers_ready_s: float | None = None  # from the start of the run until every worker was up

    # -- setup --

    def _collector(self, run: dict[str, Any]) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from kvray.sweep.collector import Collector

        options: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0}
        with contextlib.suppress(Exception):  # write where the driver runs (a Ray-client driver has no node)
            node_id = self.ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        job_record = {
            "name": self.job.name,
            "source": self.job.source,
            "text": self.job.text,
            "spec": self.job.to_dict(),
        }
        return self.ray.remote(Collector).options(**options).remote(str(self.out_dir), job_record, run)

    def _start(self, slot: _Slot) -> None:
        from kvray.sweep.workers import Worker

        slot.incarnation += 1
        slot.name = f"{WORKER_NAME_PREFIX}-{self.sweep_id}-{slot.index}-{slot.incarnation}"
        n_workers = max(len(self.slots), 1)
        num_cpus = max(0.01, min(1.0, round(self.cluster.cpus / (n_workers + 1), 2)))
        cpu_workers = sum(not s.placement.gpu for s in self.slots) or 1
        threads = None if slot.placement.gpu else max(1, int(self.cluster.cpus // cpu_workers))
        options = actor_options(slot.placement, num_cpus)
        slot.actor = (
            self.ray.remote(Worker)
            .options(name=slot.name, **options)
            .remote(
                slot.name,
                self.collector,
                check_oom=self.check_oom,
                threads=threads,
                accelerator_type=slot.placement.accelerator_type,
                setup=self.worker_setup,
            )
        )
        slot.ready_ref = slot.actor.ready.remote()
        slot.state, slot.started, slot.group, slot.visited, slot.cell = "starting", time.monotonic(), None, set(), None

    # -- bookkeeping --

    def _write(self, result: CellResult) -> None:
        """A row the driver decides (skipped, given up): through the collector like every other row."""
        self.ray.get(self.collector.append.remote(result.to_dict()), timeout=RPC_TIMEOUT_S)
        self._finish(result.cell_id, result.status)

    def _finish(self, cell_id: str, status: str) -> None:
        if cell_id in self.finished:
            return
        self.finished.add(cell_id)
        self.statuses[status] += 1
        if status == "error":
            self.view.failures += 1

    def _next_cell(self, slot: _Slot) -> Cell | None:
        """Keep to the slot's group; otherwise join an unvisited group that has more cells than workers."""
        active = Counter(s.group for s in self.slots if s.state == "busy")
        candidates = [g for g, q in self.queues.items() if q and self.group_placement[g] == slot.placement]
        while candidates:
            if slot.group in candidates:
                group = slot.group
            else:
                fresh = [g for g in candidates if g not in slot.visited] or candidates
                fresh = [g for g in fresh if len(self.queues[g]) > active[g]]
                if not fresh:
                    return None
                group = min(fresh, key=lambda g: (active[g], -len(self.queues[g])))
            assert group is not None
            queue = self.queues[group]
            while queue:
                cell = queue.popleft()
                reason = skip_reason(cell, self.oomed.get((group, slot.hardware_name), []), slot.hardware_name)
                if reason is None:
                    slot.group = group
                    slot.visited.add(group)
                    return cell
                hardware = {"name": slot.hardware_name, "node_id": slot.info.get("node_id")}
                self._write(CellResult(cell=cell, status="skipped_after_oom", reason=reason, hardware=hardware))
            candidates.remove(group)
        return None

    def _dispatch(self, slot: _Slot) -> None:
        cell = self._next_cell(slot)
        if cell is None:
            return
        self.attempts[cell.cell_id] += 1
        slot.cell, slot.state, slot.started = cell, "busy", time.monotonic()
        slot.ref = slot.actor.run.remote(cell.to_dict())

    def _worker_failed(self, slot: _Slot, why: str, retry: bool = True) -> None:
        """The slot's actor is gone (died, hung, failed): settle its cell, then start a replacement."""
        cell = slot.cell
        self._forget(slot, ask=retry)  # a hung worker (no retry) would not answer
        if cell is not None and cell.cell_id not in self.finished:
            status = self.ray.get(self.collector.status.remote(cell.cell_id), timeout=RPC_TIMEOUT_S)
            if status is not None:
                self._finish(cell.cell_id, status)  # its row was written before the worker went
            elif retry and self.attempts[cell.cell_id] < self.job.max_attempts:
                self.queues[group_key(cell)].appendleft(cell)
            else:
                n = self.attempts[cell.cell_id]
                reason = f"{why} (after {n} attempt{'s' if n != 1 else ''})"
                self._write(CellResult(cell=cell, status="error", reason=reason, hardware={"name": slot.hardware_name}))
        if any(q for g, q in self.queues.items() if self.group_placement[g] == slot.placement):
            self._start(slot)
        else:  # nothing left for a replacement to do (a later requeue restarts the slot that requeues)
            slot.state = "retired"

    def _forget(self, slot: _Slot, ended: str = "replaced", ask: bool = True) -> None:
        """Kill the slot's actor (a no-op if dead), recording its counters in the manifest."""
        stats: dict[str, Any] = {}
        if ask and slot.state in ("idle", "busy"):
            with contextlib.suppress(Exception):
                stats = self.ray.get(slot.actor.stats.remote(), timeout=5)
        if slot.info:
            record = {**stats, "ended": ended, "cells_done": slot.done}
            self.ray.get(self.collector.update_worker.remote(slot.name, record), timeout=RPC_TIMEOUT_S)
        with contextlib.suppress(Exception):
            self.ray.kill(slot.actor, no_restart=True)
        slot.cell, slot.ref, slot.info, slot.done = None, None, {}, 0

    def _on_ready(self, slot: _Slot) -> None:
        try:
            slot.info = self.ray.get(slot.ready_ref, timeout=RPC_TIMEOUT_S)
        except Exception as exc:
            slot.start_failures += 1
            self._forget(slot)
            if slot.start_failures >= MAX_START_FAILURES:
                slot.state = "retired"
                self.start_errors.append(f"worker {slot.index} ({slot.placement.label()}): {first_line(exc)}")
            else:
                self._start(slot)
            return
        slot.start_failures, slot.ever_ready, slot.state, slot.ready_ref = 0, True, "idle", None
        slot.info["ready_s"] = round(time.monotonic() - self.t0, 3)  # since the run started
        if self.workers_ready_s is None and all(s.ever_ready for s in self.slots):
            self.workers_ready_s = round(time.monotonic() - self.t0, 3)
        self.ray.get(self.collector.add_worker.remote(dict(slot.info)), timeout=RPC_TIMEOUT_S)

    def _on_result(self, slot: _Slot) -> None:
        exc_types = self.ray.exceptions
        cell = slot.cell
        assert cell is not None
        try:
            summary = self.ray.get(slot.ref, timeout=RPC_TIMEOUT_S)
        except exc_types.RayTaskError as exc:  # the worker's own code raised (not the cell: run_cell never does)
            slot.state = "idle"
            slot.cell, slot.ref = None, None
            self._retry_or_fail(slot, cell, f"worker error: {first_line(getattr(exc, 'cause', None) or exc)}")
            return
        except (exc_types.RayError, TimeoutError) as exc:
            self._worker_failed(slot, f"worker died while running this cell: {first_line(exc)}")
            return
        slot.done += 1
        slot.state, slot.cell, slot.ref = "idle", None, None
        self._finish(cell.cell_id, summary["status"])
        if summary["status"] == "oom":
            self.oomed.setdefault((group_key(cell), slot.hardware_name), []).append(cell)

    def _retry_or_fail(self, slot: _Slot, cell: Cell, why: str) -> None:
        status = self.ray.get(self.collector.status.remote(cell.cell_id), timeout=RPC_TIMEOUT_S)
        if status is not None:
            self._finish(cell.cell_id, status)
        elif self.attempts[cell.cell_id] < self.job.max_attempts:
            self.queues[group_key(cell)].appendleft(cell)
        else:
            self._write(CellResult(cell=cell, status="error", reason=why, hardware={"name": slot.hardware_name}))

    # -- the loop --

    def run(self) -> dict[str, Any]:
        self.t0 = time.monotonic()
        cells = plan_cells(self.job, sorted(self.cluster.gpus_by_type))
        check_hardware(cells, self.cluster)
        run_record = {
            "address": self.ray.get_runtime_context().gcs_address,
            "ray_version": self.ray.__version__,
            "cluster": {
                "cpus": self.cluster.cpus,
                "gpus": self.cluster.gpus,
                "gpus_by_type": self.cluster.gpus_by_type,
            },
            "check_oom": self.check_oom,
            "cells_planned": len(cells),
        }
        self.collector = self._collector(run_record)
        done = self._done_ids()
        todo = [c for c in cells if c.cell_id not in done]
        already = len(cells) - len(todo)
        self.view = _View(len(cells), self.job.name, self.progress)
        self.view.update(already, [])
        outcome = "finished"
        try:
            if todo:
                self._sweep(todo, already)
        except BaseException as exc:
            outcome = f"stopped: {first_line(exc)}"
            raise
        finally:
            self.view.stop()
            record = self._close(outcome, already, len(todo))
        return record

    def _close(self, outcome: str, already: int, to_run: int) -> dict[str, Any]:
        """Stop the workers, write the final tables and the run's record; quiet when a failure is on its way out."""
        record: dict[str, Any] = {}
        try:
            for slot in self.slots:
                if slot.state != "retired":
                    self._forget(slot, ended="finished" if outcome == "finished" else "stopped")
            summary = {
                "outcome": outcome,
                "cells_already_done": already,
                "cells_to_run": to_run,
                "statuses_this_run": dict(self.statuses),
                "wall_s": round(time.monotonic() - self.t0, 3),
                "workers_ready_s": self.workers_ready_s,
                "workers_planned": len(self.slots),
            }
            record = self.ray.get(self.collector.finish.remote(summary), timeout=RPC_TIMEOUT_S)
            self.ray.kill(self.collector, no_restart=True)
        except Exception:
            if outcome == "finished":
                raise
        return record

    def _done_ids(self) -> set[str]:
        """Cells with a row. Read here (the collector shares this node), so workers start beside the collector."""
        from ray.util.client import ray as client

        if client.is_connected():  # a Ray-client driver: the folder lives on the cluster
            return set(self.ray.get(self.collector.done_ids.remote(), timeout=RPC_TIMEOUT_S))
        from kvray.data.store import read_results

        return {r["cell_id"] for r in read_results(self.out_dir)}

    def _sweep(self, todo: list[Cell], already: int) -> None:
        for group, members in group_cells(todo).items():
            self.queues[group] = deque(members)
        by_placement = Counter(placement(c, self.cluster) for c in todo)
        for p in self._init_placements():
            for _ in range(min(capacity(p, self.cluster, self.job), by_placement[p])):
                self.slots.append(_Slot(index=len(self.slots), placement=p))
        for slot in self.slots:
            self._start(slot)
        while True:
            for slot in self.slots:
                if slot.state == "idle":
                    self._dispatch(slot)
            self._settle_orphans()
            if len(self.finished) >= len(todo):
                break
            waiting = {s.ready_ref: s for s in self.slots if s.state == "starting"}
            waiting.update({s.ref: s for s in self.slots if s.state == "busy"})
            if waiting:
                refs = list(waiting)
                ready, _ = self.ray.wait(refs, num_returns=1, timeout=self.poll_s)  # wake at the first
                if ready:  # and take every other one that is done by now
                    ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
                for ref in ready:
                    slot = waiting[ref]
                    if slot.state == "starting":
                        self._on_ready(slot)
                    else:
                        self._on_result(slot)
            self._check_timeouts()
            self.view.update(already + len(self.finished), self.slots)

    def _init_placements(self) -> list[Placement]:
        seen: list[Placement] = []
        for group, queue in self.queues.items():
            p = placement(queue[0], self.cluster)
            self.group_placement[group] = p
            if p not in seen:
                seen.append(p)
        return seen

    def _settle_orphans(self) -> None:
        """Cells whose placement has no worker left: stop, so a rerun can retry them."""
        for p in set(self.group_placement.values()):
            if any(s.placement == p and s.state != "retired" for s in self.slots):
                continue
            if any(q for g, q in self.queues.items() if self.group_placement[g] == p):
                detail = "; ".join(self.start_errors) or "every worker was given up"
                raise SweepError(f"no worker for {p.label()} could start: {detail}")

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.state == "busy" and now - slot.started > self.job.cell_timeout_s:
                self._worker_failed(slot, f"timed out after {self.job.cell_timeout_s:g} s", retry=False)
            elif slot.state == "starting" and now - slot.started > WORKER_START_TIMEOUT_S:
                self.start_errors.append(
                    f"worker {slot.index} ({slot.placement.label()}) did not start within {WORKER_START_TIMEOUT_S:g} s"
                )
                self._forget(slot)
                slot.state = "retired"


# --- the public entry point --------------------------------------------------------------------------


def default_output_dir(job: Job) -> Path:
    return Path("results") / job.name


def run_job(
    job: Job,
    output_dir: str | Path | None = None,
    address: str = "local",
    resume: bool = True,
    check_oom: bool = True,
    progress: bool = True,
    dashboard: bool = False,
    worker_setup: Callable[[], Any] | None = None,
    poll_s: float = 0.2,
) -> Path:
    """Run every cell of ``job`` not yet in ``output_dir`` on Ray; returns the output folder.

    Uses the running Ray if this process already joined one; otherwise starts a local single-node Ray
    (``address="local"``), or joins ``"auto"`` / ``"ray://host:port"``, and shuts down what it started.
    ``worker_setup`` runs once inside each worker before anything else (resource limits, env tweaks).
    """
    out = Path(output_dir) if output_dir is not None else default_output_dir(job)
    if not resume:
        from kvray.data.store import read_results

        ids = {c.cell_id for c in plan_cells(job)}
        if any(r["cell_id"] in ids for r in read_results(out)):
            raise KvrayInputError(
                f"{out} already holds results of this job; rerun with --resume (the default) to finish "
                "the job, or choose another --output"
            )
    out.mkdir(parents=True, exist_ok=True)
    started = connect(address, dashboard)
    try:
        _Sweep(job, out, check_oom, progress, worker_setup, poll_s).run()
    finally:
        if started:
            import_ray().shutdown()
    return out


def last_run(output_dir: str | Path) -> dict[str, Any]:
    """The manifest's record of the latest run into ``output_dir`` ({} when none)."""
    from kvray.sweep.collector import _read_manifest

    runs = _read_manifest(Path(output_dir)).get("runs", [])
    return dict(runs[-1]) if runs else {}


def status_counts(output_dir: str | Path, job: Job | None = None) -> dict[str, int]:
    """Rows per status in ``output_dir`` (only the job's cells when a job is given), every status listed."""
    from kvray.data.store import read_results

    records = read_results(output_dir)
    if job is not None:
        ids = {c.cell_id for c in plan_cells(job, _types_in(records))}
        records = [r for r in records if r["cell_id"] in ids]
    counts = Counter(r["status"] for r in records)
    return {s: counts.get(s, 0) for s in STATUSES} | {s: n for s, n in counts.items() if s not in STATUSES}


def _types_in(records: list[dict[str, Any]]) -> list[str]:
    """The hardware types a ``hardware: each`` job was expanded to, read back from its rows."""
    return sorted({r["cell"].get("hardware", "any") for r in records} - {"any"})
