"""The dataset on disk, its layout: written as results arrive, never corrupt, resumable, readable without Ray or torch.

Layout of an output folder:
  cells.jsonl      one CellResult.to_dict() per line, without its traces — the source of truth, append-only,
                   fsync'ed; folders written before kvray 0.x's issue #18 hold the traces inline, and still load
  traces.jsonl     one line per cell: {"cell_id", "traces": [RunTrace.to_dict()…]}, appended (fsync'ed) before
                   the cell's row; the last line per cell_id wins (a rerun of a cell whose row never landed)
  timeline.jsonl   one line per cell: its telemetry and engine samples as columns (kvray/runner/timeline.py),
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

The writer is kvray/data/writer.py (one per folder, the collector's or `kvray bench`'s), the reader
kvray/data/reader.py (every stage after the sweep); this module holds what both agree on: file names, columns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvray.measure.telemetry import ENERGY_TEXT_COLUMNS

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
BASIS_COLUMNS = ("ttft_basis", "memory_scope", "kv_layout")
# Text that says what load a cell served (kvray/measure/serving.py, kvray/runner/saturation.py).
SERVING_TEXT_COLUMNS = (
    "load", "slo", "lengths", "gen_toks_list", "probe_offered_rps", "probe_offered_rps_realised", "probe_achieved_rps",
    "search_stopped",
    "client_lag_s_p99_by_client", "client_requests_by_client",  # K client actors (kvray/backends/http/clients.py)
)  # fmt: skip
TEXT_COLUMNS = LABEL_COLUMNS + PLACEMENT_COLUMNS + BASIS_COLUMNS + ENERGY_TEXT_COLUMNS + SERVING_TEXT_COLUMNS


def jsonl_last_wins(
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
