"""Progress as callbacks: the driver tells listeners what happened; what to show is each listener's business.

``RichView`` is the live view on stderr (cells done/total, failures, ETA, each worker's current cell — or, past
``GROUP_ABOVE`` workers, a line per node and hardware type with its workers' states);
``LogView`` writes one log line per event to the ``kvray.sweep`` logger (silent unless logging is set up,
e.g. ``--verbose``). Anything with the ``SweepListener`` methods can be given to the driver's ``Sweep``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from kvray.spec import Cell

log = logging.getLogger("kvray.sweep")


@dataclass(frozen=True)
class WorkerRow:
    """One worker as a progress view shows it."""

    worker: str  # "w<slot>.<incarnation>"
    hardware: str
    cells: int  # cells this incarnation finished
    now: str  # its cell and seconds on it, or its state
    node: str = ""  # the Ray node it runs on (its id's first 8 characters), once it is up
    state: str = ""  # starting | idle | busy | retired
    busy_s: float = 0.0  # seconds on its current cell


GROUP_ABOVE = 12  # more workers than this are shown a line per node and hardware, not a line each


@dataclass(frozen=True)
class GroupRow:
    """The workers of one node and hardware type, as one line of a large sweep's view."""

    node: str
    hardware: str
    workers: int
    states: dict[str, int]
    cells: int
    longest_s: float  # the longest-running current cell of the group

    def describe(self) -> str:
        states = ", ".join(f"{n} {state}" for state, n in sorted(self.states.items()))
        longest = f", longest cell {self.longest_s:.0f} s" if self.states.get("busy") else ""
        return f"{self.workers} workers: {states}{longest}"


def group_rows(workers: list[WorkerRow]) -> list[GroupRow]:
    """One row per (node, hardware), nodes in the order their first worker appears: 64 workers on 8 nodes
    read as 8 lines. Workers not up yet have no node: they are grouped by hardware alone."""
    groups: dict[tuple[str, str], list[WorkerRow]] = {}
    for w in workers:
        groups.setdefault((w.node or "(starting)", w.hardware), []).append(w)
    rows = []
    for (node, hardware), members in groups.items():
        states: dict[str, int] = {}
        for w in members:
            states[w.state or "?"] = states.get(w.state or "?", 0) + 1
        busy = [w.busy_s for w in members if w.state == "busy"]
        rows.append(
            GroupRow(node, hardware, len(members), states, sum(w.cells for w in members), max(busy, default=0.0))
        )
    return rows


class SweepListener(Protocol):
    def on_start(self, title: str, total: int, already: int) -> None:
        """The sweep begins: ``total`` cells in the job, ``already`` of them with a row from an earlier run."""

    def on_worker_ready(self, worker: str, info: dict[str, Any]) -> None:
        """A worker actor is up; ``info`` is its identity (name, node, GPU ids) and environment."""

    def on_cell_done(self, cell: Cell, status: str) -> None:
        """A cell is settled (a worker's row, or the driver's: skipped, given up)."""

    def on_refresh(self, workers: list[WorkerRow]) -> None:
        """Once per turn of the driver's loop (a few times a second): the workers as they are now."""

    def on_close(self, outcome: str) -> None:
        """The sweep ends: ``finished``, or ``stopped: <why>``."""


class LogView:
    """One ``kvray.sweep`` log line per worker, cell and ending; nothing on refreshes."""

    def __init__(self) -> None:
        self.total = self.done = 0

    def on_start(self, title: str, total: int, already: int) -> None:
        self.total, self.done = total, already
        log.info("%s: %d cells, %d already done", title, total, already)

    def on_worker_ready(self, worker: str, info: dict[str, Any]) -> None:
        log.info("%s ready on %s (node %s)", worker, info.get("name", "cpu"), info.get("node_id"))

    def on_cell_done(self, cell: Cell, status: str) -> None:
        self.done += 1
        log.info("[%d/%d] %s %s", self.done, self.total, status, cell.label())

    def on_refresh(self, workers: list[WorkerRow]) -> None:
        pass

    def on_close(self, outcome: str) -> None:
        log.info("sweep %s: %d/%d cells", outcome, self.done, self.total)


class RichView:
    """Rich progress on stderr: cells done/total, failures, ETA, and each worker's current cell."""

    def __init__(self) -> None:
        self.done = self.failures = 0
        self.live: Any = None

    def on_start(self, title: str, total: int, already: int) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.done = already
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
        self.on_refresh([])

    def _render(self, workers: list[WorkerRow]) -> Any:
        from rich.console import Group
        from rich.table import Table

        table = Table(box=None, show_header=True, header_style="dim", pad_edge=False)
        if len(workers) > GROUP_ABOVE:
            for column in ("node", "hardware", "cells", "workers"):
                table.add_column(column)
            for g in group_rows(workers):
                table.add_row(g.node, g.hardware, str(g.cells), g.describe())
            return Group(self.progress, table)
        for column in ("worker", "hardware", "cells", "now"):
            table.add_column(column)
        for w in workers:
            table.add_row(w.worker, w.hardware, str(w.cells), w.now)
        return Group(self.progress, table)

    def on_worker_ready(self, worker: str, info: dict[str, Any]) -> None:
        pass  # its row shows it on the next refresh

    def on_cell_done(self, cell: Cell, status: str) -> None:
        self.done += 1
        self.failures += status == "error"

    def on_refresh(self, workers: list[WorkerRow]) -> None:
        if self.live is None:
            return
        failures = f"[red]{self.failures} failed[/]" if self.failures else ""
        self.progress.update(self.task, completed=self.done, failures=failures)
        self.live.update(self._render(workers))

    def on_close(self, outcome: str) -> None:
        if self.live is not None:
            self.live.stop()
            if not self.live.console.is_terminal:  # a log file: end the last frame's line
                self.live.console.line()
            self.live = None


def default_listener(progress: bool) -> SweepListener:
    """The live view when ``progress``, else log lines (quiet unless logging is configured)."""
    return RichView() if progress else LogView()
