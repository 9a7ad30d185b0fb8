"""The collector actor: the one writer of a sweep's output folder.

Workers send each CellResult as it finishes; the collector appends it at once through
``kvray.data.store.DatasetWriter`` (whole line or nothing, each cell_id at most once) and answers whether it
was new, so a retried cell can never produce a second row. The flat tables (parquet, csv) are regenerated
by a background thread at most every ``tables_every_s`` and at the end — never while a worker waits for its
acknowledgement — because cells.jsonl, fsync'ed per row, is the truth.

A rebuild is pandas and parquet work on the collector's cores, so it waits while a cell on the same node is
in its measured window: each worker says when its window opens and closes (``measuring``), and the answer
to "opens" comes only after a rebuild in progress has finished. The first cell measured after a model load
on a two-core machine recorded TPOT p50 18.7 ms where the same cell alone measures 6.5–7.2 ms
(issue 12, item 13); the harness's own work must not be inside a measurement.
It also keeps manifest.json: the job file, kvray's version, and each run with its workers' environments.

Plain Python; the driver wraps it with ``ray.remote`` and pins it to the driver's node.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kvray.data.manifest import read_manifest
from kvray.data.store import DatasetWriter, read_results
from kvray.measure.trace import CellResult
from kvray.sweep.ray_env import import_ray


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _this_node_id() -> str | None:
    """The Ray node this process runs on; None outside Ray (then every worker counts as a neighbour)."""
    try:
        ray = import_ray()
        return str(ray.get_runtime_context().get_node_id()) if ray.is_initialized() else None
    except Exception:
        return None


class Collector:
    def __init__(
        self,
        out_dir: str,
        job: dict[str, Any],
        run: dict[str, Any],
        tables_every_s: float = 5.0,
        node_id: str | None = None,
    ):
        from kvray import __version__

        self.node_id = node_id if node_id is not None else _this_node_id()
        self._measuring: dict[str, str | None] = {}  # worker id → its node, while its cell measures
        self.deferred = 0  # table refreshes put off because a neighbour was measuring
        self.out_dir = Path(out_dir)
        self.writer = DatasetWriter(self.out_dir, tables=False)
        self._status = {r["cell_id"]: r["status"] for r in read_results(self.out_dir)}
        self.tables_every_s = tables_every_s
        self._dirty = False
        self._tables_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh_tables, name="kvray-tables", daemon=True)
        self.appended = 0
        self.duplicates = 0
        previous = read_manifest(self.out_dir)
        self.manifest: dict[str, Any] = {
            "kvray_version": __version__,
            "created_at": previous.get("created_at", now_iso()),
            "job": job,
            "runs": [*previous.get("runs", []), {"started_at": now_iso(), **run, "workers": []}],
        }
        self.writer.write_manifest(self.manifest)
        self._thread.start()

    @property
    def _run(self) -> dict[str, Any]:
        run: dict[str, Any] = self.manifest["runs"][-1]
        return run

    def done_ids(self) -> list[str]:
        return sorted(self.writer.done_ids)

    def status(self, cell_id: str) -> str | None:
        """The status of the cell's row, or None when it has none."""
        return self._status.get(cell_id)

    def append(self, result: dict[str, Any]) -> bool:
        """Write one CellResult (as ``to_dict``); False when its cell already has a row."""
        written = self.writer.append(CellResult.from_dict(result))
        if written:
            self._status[result["cell_id"]] = result["status"]
            self.appended += 1
            self._dirty = True
        else:
            self.duplicates += 1
        return written

    def measuring(self, worker_id: str, node_id: str | None, active: bool) -> bool:
        """A worker's measured window opens (``active``) or closes. Returns once no table rebuild runs, so a
        window that opens after this answer never shares the node with one."""
        with self._tables_lock:  # waits for a rebuild in progress
            if active:
                self._measuring[worker_id] = node_id
            else:
                self._measuring.pop(worker_id, None)
        return True

    def neighbour_measuring(self) -> bool:
        """True while a cell on this node (or on a node nobody could name) is in its measured window."""
        return any(node is None or self.node_id is None or node == self.node_id for node in self._measuring.values())

    def write_tables(self) -> None:
        with self._tables_lock:
            self._dirty = False
            self.writer.write_tables()

    def refresh_tables_if_quiet(self) -> bool:
        """Rebuild the tables when there are new rows and no neighbour is measuring; True if it rebuilt."""
        with self._tables_lock:
            if not self._dirty:
                return False
            if self.neighbour_measuring():
                self.deferred += 1
                return False
            self._dirty = False
            try:
                self.writer.write_tables()
            except Exception:  # a table is a convenience; cells.jsonl is complete regardless
                self._dirty = True
                return False
            return True

    def _refresh_tables(self) -> None:
        while not self._stop.wait(self.tables_every_s):
            self.refresh_tables_if_quiet()

    def add_worker(self, info: dict[str, Any]) -> None:
        self._run["workers"].append(info)
        self.writer.write_manifest(self.manifest)

    def update_worker(self, worker_id: str, stats: dict[str, Any]) -> None:
        self._measuring.pop(worker_id, None)  # a worker killed or replaced mid-window measures no more
        for info in self._run["workers"]:
            if info.get("worker_id") == worker_id:
                info.update(stats)
        self.writer.write_manifest(self.manifest)

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Final tables and manifest; returns this run's record."""
        self._stop.set()
        self._thread.join(timeout=60)
        if self._dirty or not (self.out_dir / "cells.parquet").exists():
            self.write_tables()
        self._run.update(summary, finished_at=now_iso(), rows_appended=self.appended, duplicates=self.duplicates,
                         table_refreshes_deferred=self.deferred)  # fmt: skip
        self.writer.write_manifest(self.manifest)
        return dict(self._run)
