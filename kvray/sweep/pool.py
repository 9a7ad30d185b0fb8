"""The worker pool: one slot per worker position, its Ray actor started, watched, killed and replaced.

A slot moves STARTING → IDLE ⇄ BUSY and ends RETIRED when it is given up (it failed to start
``MAX_START_FAILURES`` times in a row, did not start within ``WORKER_START_TIMEOUT_S``, or has nothing
left to do). Which cell a slot runs is the scheduler's business; the pool only runs it, reports how the
actor answered, and records each actor's counters in the manifest when it goes. Every Ray wait has a
timeout. Ray is imported lazily (``import_ray``), through the driver that builds the pool.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from kvray.spec import Cell
from kvray.sweep.placement import Placement, actor_options, tp_placement_group
from kvray.sweep.progress import WorkerRow
from kvray.sweep.ray_env import Cluster
from kvray.sweep.workers import Worker
from kvray.units import first_line

WORKER_START_TIMEOUT_S = 600.0  # process start + imports; a pending placement also ends here
RPC_TIMEOUT_S = 120.0  # any call to the collector or a worker's bookkeeping methods
STATS_TIMEOUT_S = 5.0  # a worker's counters on its way out: a hung one does not hold the sweep up
MAX_START_FAILURES = 3  # consecutive failed starts before a worker slot is given up
WORKER_NAME_PREFIX = "kvray-worker"


class SlotState(Enum):
    STARTING = "starting"  # its actor is coming up (``ready`` not answered yet)
    IDLE = "idle"  # up, waiting for a cell
    BUSY = "busy"  # running ``cell``
    RETIRED = "retired"  # given up, or nothing left for it to do


@dataclass
class Slot:
    """One worker position; its actor is replaced when it dies (``incarnation`` counts them)."""

    index: int
    placement: Placement
    actor: Any = None
    name: str = ""
    incarnation: int = 0
    state: SlotState = SlotState.STARTING
    ready_ref: Any = None
    started: float = 0.0  # when the current start or cell began
    info: dict[str, Any] = field(default_factory=dict)  # the actor's identity and environment, once ready
    cell: Cell | None = None
    ref: Any = None
    start_failures: int = 0
    ever_ready: bool = False
    done: int = 0  # cells this incarnation finished
    group: Any = None  # a TP worker's placement group (its N GPUs on one node), removed with the actor

    @property
    def hardware_name(self) -> str:
        return str(self.info.get("name", "cpu"))

    def describe(self) -> str:
        return f"worker {self.index} ({self.placement.label()})"

    def row(self) -> WorkerRow:
        now, busy_s = self.state.value, 0.0
        if self.cell is not None:
            busy_s = time.monotonic() - self.started
            now = f"{self.cell.label()}  ({busy_s:.0f} s)"
        hardware = self.hardware_name  # a logical GPU (a CPU machine told it has GPUs) shows its accelerator type
        if hardware == "cpu" and self.placement.gpu:
            hardware = self.info.get("accelerator_type") or self.placement.accelerator_type or "gpu"
        return WorkerRow(
            f"w{self.index}.{self.incarnation}",
            hardware,
            self.done,
            now,
            node=str(self.info.get("node_id") or "")[:8],
            state=self.state.value,
            busy_s=busy_s,
        )


@dataclass(frozen=True)
class CellOutcome:
    """How a busy slot's actor answered: the row's status, or why there is none (and whether it died)."""

    cell: Cell
    status: str | None = None
    failure: str = ""
    worker_lost: bool = False


@dataclass
class WorkerPool:
    """The sweep's worker actors; ``collector`` is the actor every worker sends its rows to."""

    ray: Any
    cluster: Cluster
    sweep_id: str
    collector: Any
    check_oom: bool
    worker_setup: Callable[[], Any] | None
    t0: float  # when the run started (``ready_s`` counts from here)
    slots: list[Slot] = field(default_factory=list)
    start_errors: list[str] = field(default_factory=list)
    workers_ready_s: float | None = None  # from the start of the run until every worker was up

    # -- starting --

    def add(self, p: Placement, n: int) -> None:
        """Plan ``n`` more worker positions of placement ``p`` (started by ``start_all``)."""
        for _ in range(n):
            self.slots.append(Slot(index=len(self.slots), placement=p))

    def start_all(self) -> None:
        """Widest placements first: a TP group's request reaches Ray before one-GPU workers take its node."""
        for slot in sorted(self.slots, key=lambda s: -s.placement.gpus if s.placement.gpu else 0):
            self.start(slot)

    def start(self, slot: Slot) -> None:
        """A new actor for the slot, sized from the cluster and the number of slots."""
        slot.incarnation += 1
        slot.name = f"{WORKER_NAME_PREFIX}-{self.sweep_id}-{slot.index}-{slot.incarnation}"
        n_workers = max(len(self.slots), 1)
        num_cpus = max(0.01, min(1.0, round(self.cluster.cpus / (n_workers + 1), 2)))
        if slot.placement.gpu:  # never more than its GPUs' share of the node's CPUs: it must fit beside the others
            num_cpus = min(num_cpus, math.floor(100 * self.cluster.cpus_per_gpu * slot.placement.gpus) / 100)
        cpu_workers = sum(not s.placement.gpu for s in self.slots) or 1
        threads = None if slot.placement.gpu else max(1, int(self.cluster.cpus // cpu_workers))
        options = actor_options(slot.placement, num_cpus)
        if slot.placement.gpu and slot.placement.gpus > 1:
            slot.group, options = tp_placement_group(self.ray, slot.placement, num_cpus, f"{slot.name}-tp")
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
        slot.state, slot.started, slot.cell = SlotState.STARTING, time.monotonic(), None

    def ready(self, slot: Slot) -> dict[str, Any] | None:
        """The started actor's identity once it answers; None when it failed (restarted, or retired)."""
        try:
            slot.info = self.ray.get(slot.ready_ref, timeout=RPC_TIMEOUT_S)
        except Exception as exc:
            slot.start_failures += 1
            self.kill(slot)
            if slot.start_failures >= MAX_START_FAILURES:
                self.retire(slot, f"{slot.describe()}: {first_line(exc)}")
            else:
                self.start(slot)
            return None
        slot.start_failures, slot.ever_ready, slot.state, slot.ready_ref = 0, True, SlotState.IDLE, None
        slot.info["ready_s"] = round(time.monotonic() - self.t0, 3)  # since the run started
        if self.workers_ready_s is None and all(s.ever_ready for s in self.slots):
            self.workers_ready_s = round(time.monotonic() - self.t0, 3)
        self.ray.get(self.collector.add_worker.remote(dict(slot.info)), timeout=RPC_TIMEOUT_S)
        return slot.info

    def retire(self, slot: Slot, start_error: str | None = None) -> None:
        """Give the slot up; a start error is kept for the message when no worker can run a cell."""
        slot.state = SlotState.RETIRED
        if start_error is not None:
            self.start_errors.append(start_error)

    def replace(self, slot: Slot, needed: bool) -> None:
        """After its actor went: a new one when there is work for it, else the slot retires."""
        if needed:
            self.start(slot)
        else:  # nothing left for a replacement to do (a later requeue restarts the slot that requeues)
            self.retire(slot)

    # -- running --

    def idle(self) -> list[Slot]:
        return [s for s in self.slots if s.state is SlotState.IDLE]

    def live_placements(self) -> set[Placement]:
        return {s.placement for s in self.slots if s.state is not SlotState.RETIRED}

    def run(self, slot: Slot, cell: Cell) -> None:
        slot.cell, slot.state, slot.started = cell, SlotState.BUSY, time.monotonic()
        slot.ref = slot.actor.run.remote(cell)  # pickled whole: its cached cell_id travels with it

    def wait(self, timeout_s: float) -> list[Slot]:
        """Slots whose start or cell has an answer: waits up to ``timeout_s`` for the first, takes all ready."""
        waiting = {s.ready_ref: s for s in self.slots if s.state is SlotState.STARTING}
        waiting.update({s.ref: s for s in self.slots if s.state is SlotState.BUSY})
        if not waiting:
            return []
        refs = list(waiting)
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout_s)  # wake at the first
        if ready:  # and take every other one that is done by now
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        return [waiting[ref] for ref in ready]

    def outcome(self, slot: Slot) -> CellOutcome:
        """The busy slot's answer; the slot is idle again unless its actor died (then the caller replaces it)."""
        exc_types = self.ray.exceptions
        cell = slot.cell
        assert cell is not None
        try:
            summary = self.ray.get(slot.ref, timeout=RPC_TIMEOUT_S)
        except exc_types.RayTaskError as exc:  # the worker's own code raised (not the cell: run_cell never does)
            self._free(slot)
            return CellOutcome(cell, failure=f"worker error: {first_line(getattr(exc, 'cause', None) or exc)}")
        except (exc_types.RayError, TimeoutError) as exc:
            return CellOutcome(
                cell, failure=f"worker died while running this cell: {first_line(exc)}", worker_lost=True
            )
        slot.done += 1
        self._free(slot)
        return CellOutcome(cell, status=summary["status"])

    def _free(self, slot: Slot) -> None:
        slot.state, slot.cell, slot.ref = SlotState.IDLE, None, None

    def overdue(self, cell_timeout_s: float) -> list[Slot]:
        now = time.monotonic()
        return [s for s in self.slots if s.state is SlotState.BUSY and now - s.started > cell_timeout_s]

    def holding_gpus(self) -> list[Slot]:
        """This sweep's own GPU workers that are up: GPUs a waiting worker may get once they go."""
        return [s for s in self.slots if s.placement.gpu and s.state in (SlotState.IDLE, SlotState.BUSY)]

    def waiting_for_gpus(self) -> bool:
        """Whether a GPU worker is still starting (it may wait for GPUs this sweep's other workers hold)."""
        return any(s.placement.gpu and s.state is SlotState.STARTING for s in self.slots)

    def release(self, slot: Slot) -> None:
        """An idle worker with nothing left to run gives its GPUs back (a TP group may be waiting for them)."""
        self.kill(slot, ended="released: no cells left for it")
        self.retire(slot)

    def retire_unstarted(self) -> None:
        """Slots still starting after ``WORKER_START_TIMEOUT_S`` (a placement Ray cannot satisfy) are given up.

        A GPU worker's clock does not run while this sweep's own GPU workers are up: it may be waiting for
        their GPUs (a TP=8 group for a whole node that one-GPU workers fill), which they give back when done.
        """
        now = time.monotonic()
        holding = bool(self.holding_gpus())
        for slot in self.slots:
            if slot.state is SlotState.STARTING and slot.placement.gpu and holding:
                slot.started = now
                continue
            if slot.state is SlotState.STARTING and now - slot.started > WORKER_START_TIMEOUT_S:
                self.kill(slot)
                self.retire(slot, f"{slot.describe()} did not start within {WORKER_START_TIMEOUT_S:g} s")

    # -- stopping --

    def kill(self, slot: Slot, ended: str = "replaced", ask: bool = True) -> None:
        """Kill the slot's actor (a no-op if dead), recording its counters in the manifest.

        ``ask=False`` skips asking for the counters, for an actor that would not answer (it hung).
        """
        stats: dict[str, Any] = {}
        if ask and slot.state in (SlotState.IDLE, SlotState.BUSY):
            with contextlib.suppress(Exception):
                stats = self.ray.get(slot.actor.stats.remote(), timeout=STATS_TIMEOUT_S)
        try:
            if slot.info:
                record = {**stats, "ended": ended, "cells_done": slot.done}
                self.ray.get(self.collector.update_worker.remote(slot.name, record), timeout=RPC_TIMEOUT_S)
        finally:  # killed even when its record cannot be written (a dead collector): no worker outlives a sweep
            with contextlib.suppress(Exception):
                self.ray.kill(slot.actor, no_restart=True)
            if slot.group is not None:  # a TP worker's GPUs go back with it
                with contextlib.suppress(Exception):
                    self.ray.util.remove_placement_group(slot.group)
                slot.group = None
            slot.cell, slot.ref, slot.info, slot.done = None, None, {}, 0

    def close(self, ended: str) -> None:
        """Stop every worker still held, recording how the run ended for it; every one is stopped before the
        first failure to record one (a dead collector) is raised."""
        failure: Exception | None = None
        for slot in self.slots:
            if slot.state is not SlotState.RETIRED:
                try:
                    self.kill(slot, ended=ended)
                except Exception as exc:
                    failure = failure or exc
        if failure is not None:
            raise failure

    def rows(self) -> list[WorkerRow]:
        return [s.row() for s in self.slots]
