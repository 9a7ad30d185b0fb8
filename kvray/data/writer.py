"""The one writer of a results folder: each result appended as it arrives (fsync'ed, a whole line per write),
the flat tables written as parts, the manifest written atomically (layout: kvray/data/layout.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvray.data import parts
from kvray.data.layout import CELLS_JSONL, MANIFEST, TIMELINE_JSONL, TRACES_JSONL, jsonl_last_wins
from kvray.data.reader import (
    frames_from_records,
    load_frames,
    load_timeline,
    read_results,
    records_between,
    timeline_frame,
)
from kvray.measure.trace import CellResult


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def drop_row(out_dir: str | Path, cell_id: str) -> bool:
    """Remove ``cell_id``'s row from cells.jsonl (replaced atomically); True when there was one.

    For ``kvray bench --replace``, after the new measurement: lines that are not kvray rows are kept as they are.
    The parts (which hold the old row) are dropped; the next flush writes them anew.
    """
    path = Path(out_dir) / CELLS_JSONL
    if not path.is_file():
        return False
    kept, dropped = [], False
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            same = json.loads(line).get("cell_id") == cell_id
        except (json.JSONDecodeError, AttributeError):
            same = False
        dropped |= same
        if not same:
            kept.append(line)
    if dropped:
        parts.drop_parts(Path(out_dir))
        _atomic_write_bytes(path, b"".join(kept))
    return dropped


class DatasetWriter:
    """Appends CellResults to an output folder; ``flush`` adds the rows since the last one to the parts, and
    ``write_tables`` writes the whole-folder tables (at the end of a run, or after each ``kvray bench``).

    ``append`` and ``flush`` may run on two threads (the collector's actor thread and its flush thread): the
    lock keeps a flush from reading the JSONL files between a row's traces line and its cells line.
    """

    def __init__(self, out_dir: str | Path, tables: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tables = tables
        self._path = self.out_dir / CELLS_JSONL
        self._lock = threading.Lock()  # the queue and the ids; a flush's view of the files' sizes
        self._commit_lock = threading.Lock()  # one batch written at a time
        self._queue: list[_Pending] = []
        self.commits: list[tuple[int, float]] = []  # (rows, seconds) of each batch written: what a row costs
        self.flushes: list[tuple[int, float]] = []  # (rows, seconds) of each part flushed
        self._repair_tail()
        # cell_id → its row's status; None while its row is being written (the id is reserved meanwhile)
        self._status: dict[str, str | None] = {r["cell_id"]: r["status"] for r in read_results(out_dir, traces=False)}

    def _repair_tail(self) -> None:
        """Cut a torn last line so the next append starts on a line boundary."""
        for name in (CELLS_JSONL, TRACES_JSONL, TIMELINE_JSONL):
            path = self.out_dir / name
            if not path.is_file():
                continue
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                with open(path, "r+b") as fh:
                    fh.truncate(keep)

    @property
    def done_ids(self) -> set[str]:
        return set(self._status)

    def status(self, cell_id: str) -> str | None:
        """The status of the cell's row; None when it has none (yet)."""
        return self._status.get(cell_id)

    def append(self, result: CellResult) -> bool:
        """Write one result; False (and nothing written) if this cell_id is already in the dataset."""
        written = self.append_encoded(encode_row(result))
        if written and self.tables:
            self.write_tables()
        return written

    def append_encoded(self, row: EncodedRow) -> bool:
        """Write one row as ``encode_row`` made it (on whichever process ran the cell); False if its cell_id is
        already in the dataset. Returns once the row is on disk (fsync'ed).

        Group commit: rows appended from several threads at once (the collector takes appends concurrently)
        share one write and one fsync per file — the traces and timeline lines of the whole batch first, then
        its rows — so 64 workers cost a few fsyncs per batch, not three per row. A failed write (a full disk)
        cuts each file back to its last whole line and fails every row of the batch.
        """
        pending = _Pending(row)
        with self._lock:
            if row.cell_id in self._status:
                return False
            self._status[row.cell_id] = None  # reserved: a second append of this cell is refused from now on
            self._queue.append(pending)
        with self._commit_lock:  # whoever holds it commits everything queued so far
            if not pending.done:
                with self._lock:
                    batch, self._queue = self._queue, []
                self._commit(batch)
        if pending.error is not None:
            raise pending.error
        return True

    def _commit(self, batch: list[_Pending]) -> None:
        t0 = time.perf_counter()
        try:
            _append_bytes(self.out_dir / TIMELINE_JSONL, b"".join(p.row.timeline_line or b"" for p in batch))
            _append_bytes(self.out_dir / TRACES_JSONL, b"".join(p.row.traces_line or b"" for p in batch))
            _append_bytes(self._path, b"".join(p.row.row_line for p in batch))
        except OSError as exc:
            with self._lock:
                for p in batch:
                    self._status.pop(p.row.cell_id, None)
            for p in batch:
                p.error = exc
        with self._lock:
            for p in batch:
                if p.error is None:
                    self._status[p.row.cell_id] = p.row.status
        for p in batch:
            p.done = True
        self.commits.append((len(batch), time.perf_counter() - t0))

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json_atomic(self.out_dir / MANIFEST, manifest)

    def flush(self) -> int:
        """Add the rows appended since the last part as a new part (kvray/data/parts.py); returns how many.

        Costs the new rows only. Parts that no longer fit the JSONL files are dropped and written anew."""
        with self._commit_lock:  # between batches: every row's traces line is before the row's line
            sizes = parts.jsonl_sizes(self.out_dir)
        index = parts.read_index(self.out_dir)
        if index is None:
            parts.drop_parts(self.out_dir)
            index = parts.PartsIndex()
        if sizes["cells"] == index.offsets["cells"]:
            return 0
        t0 = time.perf_counter()
        records = records_between(self.out_dir, index.offsets, sizes)
        cells, traces = frames_from_records(records)
        timeline = timeline_frame(
            jsonl_last_wins(self.out_dir / TIMELINE_JSONL, index.offsets["timeline"], end=sizes["timeline"])
        )
        parts.write_part(
            self.out_dir, index, {"cells": cells, "traces": traces, "timeline": timeline}, sizes, rows=len(records)
        )
        self.flushes.append((len(records), time.perf_counter() - t0))
        return len(records)

    def write_tables(self) -> None:
        """The whole folder's cells/traces parquet + csv and timeline.parquet (each file replaced atomically),
        from the parts and what follows them."""
        self.flush()
        index = parts.read_index(self.out_dir)
        if index is not None and index.offsets == parts.jsonl_sizes(self.out_dir):  # every row is in a part
            import pandas as pd
            import pyarrow as pa

            try:
                for kind in parts.KINDS:  # a part at a time: memory stays that of one part (parts.write_whole)
                    csv = self.out_dir / f"{kind}.csv" if kind != "timeline" else None
                    written = parts.write_whole(self.out_dir, index, kind, self.out_dir / f"{kind}.parquet", csv)
                    if not written and kind != "timeline":  # no part holds any: an empty table, as for an empty folder
                        self._write_frame(kind, pd.DataFrame())
                return
            except pa.ArrowException:  # parts whose types disagree (a column all-NaN in one, text in another):
                pass  # pandas reconciles them below, the whole folder in memory
        cells, traces = load_frames(self.out_dir)
        timeline = load_timeline(self.out_dir)
        if len(timeline) or (self.out_dir / TIMELINE_JSONL).is_file():
            tmp = self.out_dir / f".timeline.parquet.tmp{os.getpid()}"
            timeline.to_parquet(tmp, index=False)
            os.replace(tmp, self.out_dir / "timeline.parquet")
        for name, frame in (("cells", cells), ("traces", traces)):
            self._write_frame(name, frame)

    def _write_frame(self, name: str, frame: Any) -> None:
        csv_frame = frame.copy()
        if "token_times_s" in csv_frame:
            csv_frame["token_times_s"] = csv_frame["token_times_s"].map(json.dumps)
        _atomic_write_bytes(self.out_dir / f"{name}.csv", csv_frame.to_csv(index=False).encode())
        tmp = self.out_dir / f".{name}.parquet.tmp{os.getpid()}"
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, self.out_dir / f"{name}.parquet")


@dataclass(frozen=True)
class EncodedRow:
    """A result as the bytes of its lines: encoded where the cell ran, so the one writer only writes."""

    cell_id: str
    status: str
    row_line: bytes  # cells.jsonl: the record without its traces (``"traces": []`` when it has none)
    traces_line: bytes | None  # traces.jsonl, before the row
    timeline_line: bytes | None  # timeline.jsonl, before the row
    worker_id: str | None = None  # the worker (one attempt of the cell) that ran it: kvray/sweep/late_rows.py


@dataclass
class _Pending:
    row: EncodedRow
    done: bool = False
    error: OSError | None = None


def _line(obj: Any) -> bytes:
    return (json.dumps(obj, default=_json_default) + "\n").encode()


def encode_row(result: CellResult) -> EncodedRow:
    """The lines ``DatasetWriter.append_encoded`` writes for ``result``: its traces and timeline apart from
    its row (module docstring: why)."""
    record = result.to_dict()
    timeline = record["extra"].pop("timeline", None)  # samples go to timeline.jsonl, not the row
    traces = record.pop("traces")
    if not traces:
        record["traces"] = []  # said inline: a reader need not look for them
    return EncodedRow(
        cell_id=result.cell_id,
        status=result.status,
        row_line=_line(record),
        traces_line=_line({"cell_id": result.cell_id, "traces": traces}) if traces else None,
        timeline_line=_line({"cell_id": result.cell_id, **timeline}) if timeline else None,
        worker_id=result.hardware.get("worker_id"),
    )


def _append_bytes(path: Path, data: bytes) -> None:
    """Append whole lines with single writes, fsync'ed; a failed write leaves whole lines only."""
    if not data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    try:
        written = 0
        while written < len(data):  # a full disk can take part of the data before it raises
            written += os.write(fd, data[written:])
        os.fsync(fd)
    except OSError:  # ENOSPC and friends: cut the partial line so the file stays whole lines
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise
    finally:
        os.close(fd)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    return str(obj)
