"""The dataset on disk: written as results arrive, never corrupt, resumable, readable without Ray or torch.

Layout of an output folder:
  cells.jsonl      one CellResult.to_dict() per line — the source of truth, append-only, fsync'ed
  cells.parquet    flat rows (CellResult.to_row), regenerated atomically from cells.jsonl
  cells.csv        the same rows as CSV
  traces.parquet   one row per request (RunTrace fields + per-request metrics), list column token_times_s
  traces.csv       the same, token_times_s as a JSON list
  timeline.jsonl   one line per cell: its telemetry and engine samples as columns (kvray/bench/timeline.py),
                   appended (fsync'ed) before the cell's row; the last line per cell_id wins
  timeline.parquet one row per sample (cell_id, repeat, t_s, source, metric, value), regenerated with the tables
  manifest.json    job, kvray version, workers' environments (written atomically)

A line is appended with a single write of the whole line; a crash can at worst leave a partial last line,
which the next writer truncates and the loader ignores. Each cell_id appears at most once.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from kvray.measure.telemetry import ENERGY_TEXT_COLUMNS
from kvray.measure.trace import CellResult

CELLS_JSONL = "cells.jsonl"
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
    "load", "slo", "lengths", "gen_toks_list", "probe_offered_rps", "probe_achieved_rps", "search_stopped",
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


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete line of cells.jsonl (a torn last line is skipped), last record per cell_id wins."""
    path = Path(out_dir) / CELLS_JSONL
    if not path.is_file():
        return []
    by_id: dict[str, dict[str, Any]] = {}
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line from a crash mid-write
        by_id[record["cell_id"]] = record
    return list(by_id.values())


def drop_row(out_dir: str | Path, cell_id: str) -> bool:
    """Remove ``cell_id``'s row from cells.jsonl (replaced atomically); True when there was one.

    For ``kvray bench --replace``, after the new measurement: lines that are not kvray rows are kept as they are.
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
        _atomic_write_bytes(path, b"".join(kept))
    return dropped


class DatasetWriter:
    """Appends CellResults to an output folder and keeps the flat tables current."""

    def __init__(self, out_dir: str | Path, tables: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tables = tables
        self._path = self.out_dir / CELLS_JSONL
        self._repair_tail()
        self._ids = {r["cell_id"] for r in read_results(self.out_dir)}

    def _repair_tail(self) -> None:
        """Cut a torn last line so the next append starts on a line boundary."""
        for path in (self._path, self.out_dir / TIMELINE_JSONL):
            if not path.is_file():
                continue
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                with open(path, "r+b") as fh:
                    fh.truncate(keep)

    @property
    def done_ids(self) -> set[str]:
        return set(self._ids)

    def append(self, result: CellResult) -> bool:
        """Write one result; False (and nothing written) if this cell_id is already in the dataset."""
        if result.cell_id in self._ids:
            return False
        record = result.to_dict()
        timeline = record["extra"].pop("timeline", None)  # samples go to timeline.jsonl, not the row
        if timeline:  # first: a crash between the two lines leaves a timeline the cell's rerun replaces
            _append_line(self.out_dir / TIMELINE_JSONL, {"cell_id": result.cell_id, **timeline})
        _append_line(self._path, record)
        self._ids.add(result.cell_id)
        if self.tables:
            self.write_tables()
        return True

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json_atomic(self.out_dir / MANIFEST, manifest)

    def write_tables(self) -> None:
        """Regenerate cells/traces parquet + csv from cells.jsonl, timeline.parquet from timeline.jsonl (each file
        replaced atomically)."""
        if (self.out_dir / TIMELINE_JSONL).is_file():
            tmp = self.out_dir / f".timeline.parquet.tmp{os.getpid()}"
            read_timeline(self.out_dir).to_parquet(tmp, index=False)
            os.replace(tmp, self.out_dir / "timeline.parquet")
        cells, traces = frames_from_records(read_results(self.out_dir))
        for name, frame in (("cells", cells), ("traces", traces)):
            csv_frame = frame.copy()
            if "token_times_s" in csv_frame:
                csv_frame["token_times_s"] = csv_frame["token_times_s"].map(json.dumps)
            _atomic_write_bytes(self.out_dir / f"{name}.csv", csv_frame.to_csv(index=False).encode())
            tmp = self.out_dir / f".{name}.parquet.tmp{os.getpid()}"
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, self.out_dir / f"{name}.parquet")


def _append_line(path: Path, obj: Any) -> None:
    """Append ``obj`` as one JSON line with a single write, fsync'ed; a failed write leaves whole lines only."""
    line = (json.dumps(obj, default=_json_default) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    try:
        written = 0
        while written < len(line):  # a full disk can take part of the line before it raises
            written += os.write(fd, line[written:])
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
    import pandas as pd

    path = Path(out_dir) / TIMELINE_JSONL
    by_id: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_bytes().split(b"\n"):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and (cell_id is None or record.get("cell_id") == cell_id):
                by_id[record["cell_id"]] = record
    frames = [pd.DataFrame({k: r[k] for k in TIMELINE_COLUMNS[1:]}).assign(cell_id=cid) for cid, r in by_id.items()]
    if not frames:
        return pd.DataFrame({k: [] for k in TIMELINE_COLUMNS})
    return pd.concat(frames, ignore_index=True)[list(TIMELINE_COLUMNS)]


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    return str(obj)


def trace_rows(result: CellResult) -> list[dict[str, Any]]:
    """Per-request rows for the traces table (token times as a list column, metrics defined in measure.metrics)."""
    from kvray.measure.metrics import request_metrics

    cell_id = result.cell_id  # once: it hashes the whole cell, whose workload lists every request
    return [{"cell_id": cell_id, **t.to_dict(), **request_metrics(t)} for t in result.traces]


def frames_from_records(records: list[dict[str, Any]]) -> tuple[Any, Any]:
    """(cells DataFrame of flat rows, traces DataFrame) from CellResult dicts."""
    import pandas as pd

    results = [CellResult.from_dict(r) for r in records]
    cells = pd.DataFrame([r.to_row() for r in results])
    traces = pd.DataFrame([row for r in results for row in trace_rows(r)])
    return cells, traces


def load_dataset(out_dir: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """(cells, traces, manifest) of an output folder, from cells.jsonl so a half-written sweep loads too."""
    out = Path(out_dir)
    if not out.is_dir():
        from kvray.errors import KvrayInputError

        raise KvrayInputError(f"{out} is not a results folder")
    cells, traces = frames_from_records(read_results(out))
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return cells, traces, manifest
