"""The scheduling policy of a sweep: which cell a worker runs next, and what a failure means for a cell.

Pure Python, no Ray (not even lazily), so the policy is tested on its own (tests/test_scheduler.py): the
driver tells it when a worker is ready, asks it for a worker's next cell, and reports how each cell ended.

Cells are grouped by ``GroupKey`` (model, backend, dtype, weights, device, hardware) and each group is a
queue from small to large predicted memory. An idle worker keeps to its group (its model stays loaded);
otherwise it joins, among the groups of its placement it has not served (any group once it has served
them all), one that has more cells queued than workers on it, preferring the fewest workers and then the
most cells — so a worker loads each model at most once. A cell that needs at least what an out-of-memory
cell of its group needed on the same hardware is recorded ``skipped_after_oom`` without running.

Every cell is settled exactly once: by its worker's row (``done``), or by ``settle`` when its worker died,
hung or raised — retried while ``max_attempts`` allows, else recorded ``error`` with the reason. Rows the
scheduler decides itself (skipped, given up) go out through ``write`` as a ``Verdict``; the driver writes
them to the dataset like any other row.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Collection, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from kvray.backends import backend_class
from kvray.errors import KvrayInputError
from kvray.plan.planner import GroupKey, group_cells, group_key, skip_reason
from kvray.spec import Cell

WorkerId = Hashable  # whatever names a worker for the driver (a slot index)
Where = TypeVar("Where", bound=Hashable)  # a placement: the scheduler only compares them


@dataclass(frozen=True)
class Verdict:
    """A row no worker wrote: the scheduler decided the cell's status (skipped after OOM, or given up)."""

    cell: Cell
    status: str
    reason: str
    hardware: dict[str, Any]


@dataclass
class Seat(Generic[Where]):
    """The scheduler's view of one ready worker: where it sits, what it has loaded, what it runs now."""

    where: Where
    hardware: dict[str, Any]
    group: GroupKey | None = None
    visited: set[GroupKey] = field(default_factory=set)
    cell: Cell | None = None

    @property
    def hardware_name(self) -> str:
        return str(self.hardware.get("name", "cpu"))


def row_hardware(cell: Cell, worker: dict[str, Any]) -> dict[str, Any]:
    """The hardware a verdict's row names: what the cell's backend decides (the simulator's GPU), else the
    worker's device — so a skipped cell names the GPU its OOM happened on, not the CPU worker that simulated it."""
    try:
        decided = backend_class(cell.backend).cell_hardware(cell)
    except KvrayInputError:
        decided = None
    where = {"node_id": worker["node_id"]} if "node_id" in worker else {}
    return {"name": str(worker.get("name", "cpu")), **where, **(decided or {})}


def _no_write(verdict: Verdict) -> None:
    """Default sink: nobody records verdicts."""


def _no_notice(cell: Cell, status: str) -> None:
    """Default listener: nobody watches cells settle."""


class Scheduler(Generic[Where]):
    """Hands out cells to workers and receives their outcomes; see the module docstring for the policy."""

    def __init__(
        self,
        cells: Iterable[Cell],
        where: Callable[[Cell], Where],
        max_attempts: int,
        write: Callable[[Verdict], None] = _no_write,
        on_settled: Callable[[Cell, str], None] = _no_notice,
    ):
        self.queues: dict[GroupKey, deque[Cell]] = {g: deque(m) for g, m in group_cells(cells).items()}
        # The placement is a function of the group's fields (backend, device, hardware): one per group.
        self.group_where: dict[GroupKey, Where] = {g: where(q[0]) for g, q in self.queues.items()}
        self.total = sum(len(q) for q in self.queues.values())
        self.max_attempts = max_attempts
        self.write = write
        self.on_settled = on_settled
        self.attempts: Counter[str] = Counter()
        self.oomed: dict[tuple[GroupKey, str], list[Cell]] = {}
        self.settled: dict[str, str] = {}  # cell_id → status
        self.statuses: Counter[str] = Counter()
        self.seats: dict[WorkerId, Seat[Where]] = {}

    # -- what there is to do --

    def demand(self) -> dict[Where, int]:
        """Cells per placement, placements in the order their first group appears (small to large)."""
        cells: dict[Where, int] = {}
        for group, queue in self.queues.items():
            where = self.group_where[group]
            cells[where] = cells.get(where, 0) + len(queue)
        return cells

    def has_work(self, where: Where) -> bool:
        """True while a cell of this placement is queued (a dead worker of it is worth replacing)."""
        return any(q for g, q in self.queues.items() if self.group_where[g] == where)

    def stranded(self, live: Collection[Where]) -> list[Where]:
        """Placements with cells queued but no live worker: those cells would wait forever."""
        return [w for w in dict.fromkeys(self.group_where.values()) if w not in live and self.has_work(w)]

    @property
    def all_settled(self) -> bool:
        return len(self.settled) >= self.total

    # -- workers --

    def join(self, worker: WorkerId, where: Where, hardware: dict[str, Any]) -> None:
        """A worker is ready (a replacement starts afresh: nothing loaded, nothing visited)."""
        self.seats[worker] = Seat(where=where, hardware=dict(hardware))

    def leave(self, worker: WorkerId) -> None:
        """A worker is gone; settle its cell first (``settle``), or it stays counted as running."""
        self.seats.pop(worker, None)

    def next_cell(self, worker: WorkerId) -> Cell | None:
        """The worker's next cell (its attempt counted), or None when it should wait or has nothing to do.

        Cells its group's OOM rules out on its hardware are settled ``skipped_after_oom`` on the way.
        """
        seat = self.seats[worker]
        assert seat.cell is None, "a worker runs one cell at a time"
        while (group := self._group_for(seat)) is not None:
            cell = self._pop_runnable(group, seat)
            if cell is not None:
                seat.group = group
                seat.visited.add(group)
                seat.cell = cell
                self.attempts[cell.cell_id] += 1
                return cell
        return None

    def _group_for(self, seat: Seat[Where]) -> GroupKey | None:
        """Keep to the seat's group; otherwise join an unvisited group that has more cells than workers."""
        candidates = [g for g, q in self.queues.items() if q and self.group_where[g] == seat.where]
        if seat.group in candidates:
            return seat.group
        busy = Counter(s.group for s in self.seats.values() if s.cell is not None)
        fresh = [g for g in candidates if g not in seat.visited] or candidates
        fresh = [g for g in fresh if len(self.queues[g]) > busy[g]]
        return min(fresh, key=lambda g: (busy[g], -len(self.queues[g]))) if fresh else None

    def _pop_runnable(self, group: GroupKey, seat: Seat[Where]) -> Cell | None:
        """The group's first cell not ruled out by an OOM on this hardware; the ruled-out ones are settled."""
        queue = self.queues[group]
        oomed = self.oomed.get((group, seat.hardware_name), [])
        while queue:
            cell = queue.popleft()
            hardware = row_hardware(cell, seat.hardware)
            reason = skip_reason(cell, oomed, hardware["name"])
            if reason is None:
                return cell
            self._decide(Verdict(cell, "skipped_after_oom", reason, hardware))
        return None

    # -- outcomes --

    def done(self, worker: WorkerId, status: str) -> None:
        """The worker finished its cell and wrote its row; an OOM marks the boundary for its group."""
        seat = self.seats[worker]
        cell, seat.cell = seat.cell, None
        assert cell is not None, "done without a cell"
        self._record(cell, status)
        if status == "oom":
            self.oomed.setdefault((group_key(cell), seat.hardware_name), []).append(cell)

    def settle(self, cell: Cell, why: str, retry: bool, recorded: str | None = None) -> None:
        """A cell whose worker died, hung or raised: the one place that decides what becomes of it.

        ``recorded`` is the status of a row the worker wrote before it went (then that stands). Otherwise
        the cell goes back to the front of its queue while ``retry`` and its attempts allow, else it is
        recorded ``error`` with ``why`` and the number of attempts.
        """
        holder = next((s for s in self.seats.values() if s.cell is not None and s.cell.cell_id == cell.cell_id), None)
        if holder is not None:
            holder.cell = None
        if cell.cell_id in self.settled:
            return
        if recorded is not None:
            self._record(cell, recorded)
        elif retry and self.attempts[cell.cell_id] < self.max_attempts:
            self.queues[group_key(cell)].appendleft(cell)
        else:
            n = self.attempts[cell.cell_id]
            reason = f"{why} (after {n} attempt{'s' if n != 1 else ''})"
            hardware = row_hardware(cell, holder.hardware if holder is not None else {})
            self._decide(Verdict(cell, "error", reason, hardware))

    def _decide(self, verdict: Verdict) -> None:
        self.write(verdict)  # on disk first: a verdict that failed to write is not settled
        self._record(verdict.cell, verdict.status)

    def _record(self, cell: Cell, status: str) -> None:
        if cell.cell_id in self.settled:  # a second outcome for a cell changes nothing
            return
        self.settled[cell.cell_id] = status
        self.statuses[status] += 1
        self.on_settled(cell, status)
