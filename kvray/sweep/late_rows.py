"""Rows that arrive after their worker was given up: refused, so a cell rerun elsewhere keeps the rerun's row.

A worker on a node that drops off the network is declared dead by Ray after its health checks fail; the driver
then retries its cell on another worker. The cut-off worker's processes may live on, finish the cell and — once
the network is back — deliver its row late. The collector writes at most one row per cell, so a late row that
came first would win and the rerun's be refused. Each attempt of a cell runs on its own worker incarnation (the
worker id, ``kvray-worker-<sweep>-<slot>-<incarnation>``, names the attempt), so the driver disowns a worker
before its cell is retried, and the collector refuses every later row of a disowned worker: dedupe by cell id
(the writer) and attempt (here). Plain Python, no Ray.
"""

from __future__ import annotations

import threading


class LateRows:
    """The workers given up in this sweep, and the rows of theirs refused since."""

    def __init__(self) -> None:
        self._disowned: set[str] = set()
        self._lock = threading.Lock()
        self.refused: list[dict[str, str | None]] = []  # (cell id, worker id) of each late row, for the run record

    def disown(self, worker_id: str) -> None:
        with self._lock:
            self._disowned.add(worker_id)

    def refuse(self, cell_id: str, worker_id: str | None) -> bool:
        """True (and counted) when the row comes from a worker given up: it must not be written."""
        with self._lock:
            if worker_id is None or worker_id not in self._disowned:
                return False
            self.refused.append({"cell_id": cell_id, "worker_id": worker_id})
            return True
