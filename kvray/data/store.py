"""The dataset on disk: written as results arrive, never corrupt, resumable, readable without Ray or torch.

Layout of an output folder:
  cells.jsonl      one CellResult.to_dict() per line, without its traces — the source of truth, append-only,
                   fsync'ed; folders written before kvray 0.x's issue #18 hold the traces inline, and still load
  traces.jsonl     one line per cell: {"cell_id", "traces": [RunTrace.to_dict()…]}, appended (fsync'ed) before
                   the cell's row; the last line per cell_id wins (a rerun of a cell whose row never landed)
  timeline.jsonl   one line per cell: its telemetry and engine samples as columns (kvray/bench/timeline.py),
                   appended (fsync'ed) before the cell's row; the last line per cell_id wins
  parts/           the flat tables in Parquet row groups of the rows appended since the previous part
                   (kvray/data/parts.py): what ``load_dataset`` reads, so a 10,000-cell folder loads in seconds
  cells.parquet    flat rows (CellResult.to_row) of the whole folder, written when a run ends
  cells.csv        the same rows as CSV
  traces.parquet   one row per request (RunTrace fields + per-request metrics), list column token_times_s
  traces.csv       the same, token_times_s as a JSON list
  timeline.parquet one row per sample (cell_id, repeat, t_s, source, metric, value), written with the tables
  manifest.json    job, kvray version, workers' environments (written atomically)

Why the traces live apart from the rows: every token's timestamp of every request is ~90 % of a row's bytes
(64 requests × 32 tokens: 64 KB of a 76 KB line). Kept out of cells.jsonl, everything that needs only rows —
resuming, status counts, done ids, the collector's start — reads a small file, and the tables are appended as
parts instead of being rebuilt from every line every few seconds (issue #18: 600 cells were 40 MB of JSONL
re-parsed each time).

A line is appended with a single write of the whole line; a crash can at worst leave a partial last line,
which the next writer truncates and the loader ignores. Each cell_id appears at most once in cells.jsonl.
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
from kvray.measure.telemetry import ENERGY_TEXT_COLUMNS
from kvray.measure.trace import CellResult

CELLS_JSONL = "cells.jsonl"
TRACES_JSONL = "traces.jsonl"
TIMELINE_JSONL = "timeline.jsonl"
TIMELINE_COLUMNS = ("cell_id", "repeat", "t_s", "source", "metric", "value")
MANIFEST = "manifest.json"
# A running `kvray run` holds its folder with this dot file (kvray/sweep/folder.py); `kvray bench` refuses a held
# folder. A dot file, so `kvray launch` packing a dataset leaves it behind.
LOCK_NAME = ".kvray-run.lock"

# ---------------------------------------------------------------- columns
# The columns of a cells row (CellResult.to_row) that later stages name, written once here, in the first stage
# that reads rows back: the runner fills every memory column of every result; the views (kvray.analysis.views)
# keep the text columns as text and read every other column as a number.

# Memory every CellResult carries, in bytes (None where a backend or device cannot tell).
MEMORY_COLUMNS = (
    "baseline_bytes",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "nvml_baseline_used_bytes",
    "nvml_peak_used_bytes",
    "rss_peak_bytes",
    "weights_bytes",
    "kv_measured_bytes",
    "kv_predicted_bytes",
    "kv_rel_error",
    "activation_peak_bytes",
)
# Text that says what a cell is and how it ended: a series, a table row and a figure are told apart by these.
LABEL_COLUMNS = (
    "cell_id",
    "experiment",
    "model",
    "backend",
    "dtype",
    "kv_dtype",
    "weights",
    "hardware",
    "workload",
    "prompt_toks_list",
    "status",
    "reason",
)
# Text that says where and when it ran.
PLACEMENT_COLUMNS = ("device", "hardware_requested", "accelerator_type", "node_id", "started_at", "parallelism")
# Text that says what a number measured: TTFT's clock, the process the memory columns describe.
BASIS_COLUMNS = ("ttft_basis", "memory_scope")
# Text that says what load a cell served (kvray/measure/serving.py, kvray/bench/saturation.py).
SERVING_TEXT_COLUMNS = (
    "load", "slo", "lengths", "gen_toks_list", "probe_offered_rps", "probe_offered_rps_realised", "probe_achieved_rps",
    "search_stopped",
    "client_lag_s_p99_by_client", "client_requests_by_client",  # K client actors (kvray/backends/openai/clients.py)
)  # fmt: skip
TEXT_COLUMNS = LABEL_COLUMNS + PLACEMENT_COLUMNS + BASIS_COLUMNS + ENERGY_TEXT_COLUMNS + SERVING_TEXT_COLUMNS


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def _jsonl_last_wins(
    path: Path, start: int = 0, wanted: set[str] | None = None, end: int | None = None
) -> dict[str, dict[str, Any]]:
    """Every complete JSON line of ``path`` in bytes [``start``, ``end``) by its cell_id, the last line of a cell
    winning; a torn line is skipped. ``wanted``: only these cell ids — lines whose first 200 bytes do not name
    one are skipped unparsed (traces.jsonl and timeline.jsonl lines begin with their cell_id)."""
    by_id: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return by_id
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read() if end is None else fh.read(max(end - start, 0))
    keys = [f'"cell_id": "{cid}"'.encode() for cid in wanted] if wanted is not None else None
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        if keys is not None and not any(key in line[:200] for key in keys):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line from a crash mid-write
        if isinstance(record, dict) and "cell_id" in record:
            by_id[record["cell_id"]] = record
    return by_id


# Columns renamed since datasets were first written (old name → new): rows are upgraded as they are read, so an
# old folder loads, draws and reports under today's names. kv_saved_bytes counted hit tokens × bytes per token —
# KV not recomputed, not memory saved (docs/kv_reuse.md).
RENAMED_COLUMNS = {
    "kv_saved_bytes": "kv_not_recomputed_bytes",
    "kv_saved_bytes_predicted": "kv_not_recomputed_bytes_predicted",
}


def upgrade_record(record: dict[str, Any]) -> dict[str, Any]:
    """A row read from disk with RENAMED_COLUMNS' old names under their new ones (in place; returned)."""
    memory = record.get("memory")
    if isinstance(memory, dict):
        for old, new in RENAMED_COLUMNS.items():
            if old in memory:
                memory.setdefault(new, memory.pop(old))
    return record


def read_results(out_dir: str | Path, traces: bool = True) -> list[dict[str, Any]]:
    """Every complete line of cells.jsonl (a torn last line is skipped), last record per cell_id wins.

    ``traces``: give each record its ``traces`` from traces.jsonl (records of older folders hold them inline).
    Without them a record is a row's worth of bytes: what resuming and counting need.
    """
    records = [upgrade_record(r) for r in _jsonl_last_wins(Path(out_dir) / CELLS_JSONL).values()]
    if traces:
        attach_traces(out_dir, records)
    return records


def attach_traces(out_dir: str | Path, records: list[dict[str, Any]], start: int = 0) -> None:
    """Set ``traces`` on the records that lack them, from traces.jsonl (read from byte ``start``)."""
    missing = {r["cell_id"] for r in records if "traces" not in r}
    if not missing:
        return
    wanted = missing if len(missing) <= 16 else None  # a few cells: skip the other lines unparsed
    found = _jsonl_last_wins(Path(out_dir) / TRACES_JSONL, start, wanted)
    for r in records:
        if "traces" not in r:
            r["traces"] = found.get(r["cell_id"], {}).get("traces", [])


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
        records = _records_between(self.out_dir, index.offsets, sizes)
        cells, traces = frames_from_records(records)
        timeline = _timeline_frame(_jsonl_last_wins(self.out_dir / TIMELINE_JSONL, index.offsets["timeline"],
                                                    end=sizes["timeline"]))  # fmt: skip
        parts.write_part(self.out_dir, index, {"cells": cells, "traces": traces, "timeline": timeline}, sizes,
                         rows=len(records))  # fmt: skip
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


def _records_between(out: Path, start: dict[str, int], end: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """The rows of cells.jsonl between byte offsets, each with its traces (from traces.jsonl between the same
    files' offsets; a row of an older folder holds them inline)."""
    end = end or {}
    records = list(_jsonl_last_wins(out / CELLS_JSONL, start["cells"], end=end.get("cells")).values())
    if any("traces" not in r for r in records):
        found = _jsonl_last_wins(out / TRACES_JSONL, start["traces"], end=end.get("traces"))
        for r in records:
            if "traces" not in r:
                r["traces"] = found.get(r["cell_id"], {}).get("traces", [])
    return records


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


def read_timeline(out_dir: str | Path, cell_id: str | None = None) -> Any:
    """timeline.jsonl as a DataFrame (TIMELINE_COLUMNS; one cell's rows with ``cell_id``): the last line per cell
    wins, a torn line is skipped, a cell whose row is gone (``kvray bench --replace`` mid-way) is kept."""
    if cell_id is None:
        return load_timeline(out_dir)
    return _timeline_frame(_jsonl_last_wins(Path(out_dir) / TIMELINE_JSONL, wanted={cell_id}))


def _timeline_frame(by_id: dict[str, dict[str, Any]]) -> Any:
    import pandas as pd

    columns: dict[str, list[Any]] = {k: [] for k in TIMELINE_COLUMNS}
    for cid, r in by_id.items():  # columns, not a frame per cell: a flush holds hundreds of cells
        columns["cell_id"] += [cid] * len(r["t_s"])
        for k in TIMELINE_COLUMNS[1:]:
            columns[k] += r[k]
    return pd.DataFrame(columns)


def load_timeline(out_dir: str | Path) -> Any:
    """Every cell's timeline samples: the parts, then timeline.jsonl after them (all of it without parts)."""
    import pandas as pd

    out = Path(out_dir)
    index = parts.read_index(out)
    start = index.offsets["timeline"] if index else 0
    frames = [*(parts.read_parts(out, index, "timeline") if index else []),
              _timeline_frame(_jsonl_last_wins(out / TIMELINE_JSONL, start))]  # fmt: skip
    frames = [f.assign(_chunk=i) for i, f in enumerate(frames) if len(f)]
    if not frames:
        return _timeline_frame({})
    frame = pd.concat(frames, ignore_index=True)
    # A cell measured again after a crash left its samples twice: those of its last chunk win.
    frame = frame[frame["_chunk"] == frame.groupby("cell_id")["_chunk"].transform("max")]
    return frame[list(TIMELINE_COLUMNS)].reset_index(drop=True)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    return str(obj)


def trace_rows(result: CellResult) -> list[dict[str, Any]]:
    """Per-request rows for the traces table (token times as a list column, metrics defined in measure.metrics).
    A bunched stream (``tokens_bunched``: stamped by a stalled reader, never a simulated one) has no ``tpot_s``."""
    from kvray.measure.metrics import request_metrics, tokens_bunched

    cell_id = result.cell_id  # once: it hashes the whole cell, whose workload lists every request
    rows = []
    for t in result.traces:
        bunched = not result.simulated and tokens_bunched(t)
        metrics = request_metrics(t)
        if bunched:
            metrics["tpot_s"] = float("nan")
        rows.append({"cell_id": cell_id, **t.to_dict(), **metrics, "tokens_bunched": bunched})
    return rows


def result_from_record(record: dict[str, Any]) -> CellResult:
    """A CellResult from its dict, its cell id taken from the record (it hashes the whole cell otherwise)."""
    result = CellResult.from_dict(record)
    if "cell_id" in record:
        result.cell.__dict__["cell_id"] = record["cell_id"]  # Cell.cell_id is a cached_property
    return result


def frames_from_records(records: list[dict[str, Any]]) -> tuple[Any, Any]:
    """(cells DataFrame of flat rows, traces DataFrame) from CellResult dicts."""
    import pandas as pd

    results = [result_from_record(r) for r in records]
    cells = pd.DataFrame([r.to_row() for r in results])
    traces = pd.DataFrame([row for r in results for row in trace_rows(r)])
    return cells, traces


def load_frames(out_dir: str | Path) -> tuple[Any, Any]:
    """(cells, traces) of a folder: its parts, then the rows appended after them; every row of cells.jsonl
    when the folder has no parts (written before them, or ``kvray bench`` dropped them)."""
    import pandas as pd

    out = Path(out_dir)
    index = parts.read_index(out)
    if index is None:
        return frames_from_records(read_results(out))
    tail_cells, tail_traces = frames_from_records([upgrade_record(r) for r in _records_between(out, index.offsets)])
    cells = [f.rename(columns=RENAMED_COLUMNS) for f in (*parts.read_parts(out, index, "cells"), tail_cells) if len(f)]
    traces = [f for f in (*parts.read_parts(out, index, "traces"), tail_traces) if len(f)]
    return (pd.concat(cells, ignore_index=True) if cells else tail_cells,
            pd.concat(traces, ignore_index=True) if traces else tail_traces)  # fmt: skip


def load_dataset(out_dir: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """(cells, traces, manifest) of an output folder; a half-written sweep loads too (``load_frames``)."""
    out = Path(out_dir)
    if not out.is_dir():
        from kvray.errors import KvrayInputError

        raise KvrayInputError(f"{out} is not a results folder")
    cells, traces = load_frames(out)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return cells, traces, manifest
