"""The collector actor: the one writer of a sweep's output folder.

Workers send each CellResult as it finishes; the collector appends it at once through
``kvray.data.writer.DatasetWriter`` (whole line or nothing, each cell_id at most once) and answers whether it
was new, so a retried cell can never produce a second row. A background thread adds the rows since its last
flush to the folder's Parquet parts (kvray/data/parts.py) at most every ``tables_every_s`` — a cost of the
new rows only, never while a worker waits for its acknowledgement — and the whole-folder tables (parquet,
csv) are written once, at the end: the JSONL files, fsync'ed per row, are the truth.

A flush is pandas and parquet work on the collector's cores, so it waits while a cell on the same node is
in its measured window: each worker says when its window opens and closes (``measuring``), and the answer
to "opens" comes only after a rebuild in progress has finished. The first cell measured after a model load
on a two-core machine recorded TPOT p50 18.7 ms where the same cell alone measures 6.5–7.2 ms
(issue 12, item 13); the harness's own work must not be inside a measurement.
It also keeps manifest.json: the job file, kvray's version, and each run with its workers' environments.

With ``sync_to`` (an object-storage URI; the folder is then the driver's staging folder, kvray/data/location.py)
the collector is also the one that uploads while the sweep runs: after each parts flush it sends the new parts,
the JSONL files up to the flush and the index, so the bucket holds every row up to the last flush even if the
driver dies; at ``finish`` it sends the tables. An upload is harness work like a flush, so it runs in the same
quiet window; one that fails is counted and retried at the next flush (the sweep never stops for it).

Plain Python; the driver wraps it with ``ray.remote`` (``max_concurrency``: appends from many workers are
taken at once and committed together) and pins it to the driver's node.
"""

from __future__ import annotations

import resource
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kvray.data.location import Stage
from kvray.data.manifest import read_manifest
from kvray.data.object_store import parse_remote
from kvray.data.writer import DatasetWriter, EncodedRow, encode_row
from kvray.measure.trace import CellResult
from kvray.sweep.late_rows import LateRows
from kvray.sweep.ray_env import import_ray
from kvray.sweep.stragglers import run_stragglers
from kvray.units import first_line

MARK_EVERY = 50  # the collector notes the time every this many rows (a 10,000-row run: 200 marks)


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
        sync_to: str | None = None,
    ):
        from kvray import __version__

        self.node_id = node_id if node_id is not None else _this_node_id()
        self._measuring: dict[str, str | None] = {}  # worker id → its node, while its cell measures
        self.deferred = 0  # table refreshes put off because a neighbour was measuring
        self.out_dir = Path(out_dir)
        self.writer = DatasetWriter(self.out_dir, tables=False)
        self.stage = Stage(parse_remote(sync_to), self.out_dir) if sync_to else None
        self.upload_failures = 0
        self.upload_error: str | None = None
        self.tables_every_s = tables_every_s
        self._dirty = False
        self._tables_lock = threading.Lock()
        self._stats_lock = threading.Lock()  # appends run on several threads at once
        self._manifest_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh_tables, name="kvray-tables", daemon=True)
        self.appended = 0
        self.duplicates = 0
        self.late = LateRows()
        # the collector's own seconds per row (decode, write, fsync, bookkeeping): the first and last 1,000
        self._append_s_first: list[float] = []
        self._append_s_last: deque[float] = deque(maxlen=1000)
        self.flushes = 0
        self._marks: list[tuple[int, float]] = []  # (rows written, wall clock) every MARK_EVERY rows
        self._cpu0 = time.process_time()
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
        return self.writer.status(cell_id)

    def append(self, result: dict[str, Any]) -> bool:
        """Write one CellResult (as ``to_dict``); False when its cell already has a row."""
        return self.append_encoded(encode_row(CellResult.from_dict(result)))

    def append_encoded(self, row: EncodedRow) -> bool:
        """Write one row encoded by the worker that ran it (``encode_row``); False when its cell already has a
        row. Called from many threads at once (the actor's ``max_concurrency``): rows that arrive together are
        written and fsync'ed together (``DatasetWriter.append_encoded``)."""
        if self.late.refuse(row.cell_id, row.worker_id):  # its worker was given up and the cell retried
            return False
        t0 = time.perf_counter()
        written = self.writer.append_encoded(row)
        took = time.perf_counter() - t0
        with self._stats_lock:
            if len(self._append_s_first) < 1000:
                self._append_s_first.append(took)
            self._append_s_last.append(took)
            if written:
                self.appended += 1
                self._dirty = True
                if self.appended % MARK_EVERY == 0:
                    self._marks.append((self.appended, round(time.time(), 3)))
            else:
                self.duplicates += 1
        return written

    def disown(self, worker_id: str) -> bool:
        """The driver gave ``worker_id`` up (its node cut off, dead or hung) before retrying its cell: a row of
        it that arrives from now on is refused (kvray/sweep/late_rows.py)."""
        self.late.disown(worker_id)
        return True

    def node(self) -> str | None:
        """The Ray node this collector runs on: a worker elsewhere need not tell it of its measured windows."""
        return self.node_id

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
        """Add the new rows to the parts when there are some and no neighbour is measuring; True if it did."""
        with self._tables_lock:
            if not self._dirty:
                return False
            if self.neighbour_measuring():
                self.deferred += 1
                return False
            self._dirty = False
            try:
                self.writer.flush()
            except Exception:  # a table is a convenience; the JSONL files are complete regardless
                self._dirty = True
                return False
            self.flushes += 1
            self.upload(final=False)
            return True

    def upload(self, final: bool) -> bool:
        """Send what changed to ``sync_to`` (nothing without one); False when it failed (counted, not raised:
        the staging folder keeps everything and the next call sends it)."""
        if self.stage is None:
            return True
        try:
            self.stage.sync(final=final)
        except Exception as exc:
            self.upload_failures += 1
            self.upload_error = first_line(exc)
            return False
        return True

    def _refresh_tables(self) -> None:
        import pandas  # noqa: F401 - imported now, before any cell runs, not on the first flush's clock
        import pyarrow.parquet  # noqa: F401

        while not self._stop.wait(self.tables_every_s):
            self.refresh_tables_if_quiet()

    def add_worker(self, info: dict[str, Any]) -> None:
        with self._manifest_lock:
            self._run["workers"].append(info)
            self.writer.write_manifest(self.manifest)

    def update_worker(self, worker_id: str, stats: dict[str, Any]) -> None:
        self._measuring.pop(worker_id, None)  # a worker killed or replaced mid-window measures no more
        with self._manifest_lock:
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
        self.upload(final=True)  # the rows and tables first: the driver may not live to send them
        summary = {
            **summary,
            "stragglers": run_stragglers(self.out_dir, self._run["workers"]),
            "late_rows_refused": list(self.late.refused),
        }
        self._run.update(
            summary,
            finished_at=now_iso(),
            rows_appended=self.appended,
            duplicates=self.duplicates,
            table_refreshes_deferred=self.deferred,
            collector=self.costs(),
        )
        self.writer.write_manifest(self.manifest)
        self.upload(final=True)  # the manifest with this run's record
        return dict(self._run)

    def costs(self) -> dict[str, Any]:
        """What the collector spent (its process): per-row append ms over the first and last 1,000 rows, parts
        flushed, CPU seconds, peak RSS — so a sweep's record shows whether its one writer kept up."""

        def mean_ms(values: Any) -> float | None:
            return round(1000 * sum(values) / len(values), 3) if values else None

        def per_row_ms(batches: list[tuple[int, float]]) -> float | None:
            rows = sum(n for n, _ in batches)
            return round(1000 * sum(t for _, t in batches) / rows, 3) if rows else None

        def first_rows(batches: list[tuple[int, float]], n: int = 1000) -> list[tuple[int, float]]:
            kept, total = [], 0
            for batch in batches:
                if total >= n:
                    break
                kept.append(batch)
                total += batch[0]
            return kept

        commits, flushes = list(self.writer.commits), list(self.writer.flushes)
        return {
            "rows": self.appended,
            # an append's wait for its acknowledgement (queueing behind other rows included) …
            "append_ms_first_1000": mean_ms(self._append_s_first),
            "append_ms_last_1000": mean_ms(self._append_s_last),
            # … and what writing a row costs: its batch's write + fsync time over the batch's rows
            "write_ms_per_row_first_1000": per_row_ms(first_rows(commits)),
            "write_ms_per_row_last_1000": per_row_ms(first_rows(commits[::-1])),
            "commit_batches": len(commits),
            "flush_ms_per_row_first": per_row_ms(flushes[:1]),
            "flush_ms_per_row_last": per_row_ms(flushes[-1:]),
            "parts_flushed": self.flushes,
            "cpu_s": round(time.process_time() - self._cpu0, 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rows_at": list(self._marks),  # rows per second over any stretch of the run, from these
            **(
                {
                    "uploads": self.stage.uploads,
                    "upload_failures": self.upload_failures,
                    "upload_error": self.upload_error,
                }
                if self.stage is not None
                else {}
            ),
        }
