"""A results folder read back: rows (with or without their traces), the flat tables, the telemetry timeline.

No Ray, no torch: `kvray plot`, `kvray report` and compare read a folder with this alone (layout: kvray/data/layout.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvray.data import parts
from kvray.data.layout import (
    CELLS_JSONL,
    MANIFEST,
    RENAMED_COLUMNS,
    TIMELINE_COLUMNS,
    TIMELINE_JSONL,
    TRACES_JSONL,
    jsonl_last_wins,
    upgrade_record,
)
from kvray.measure.trace import CellResult


def read_results(out_dir: str | Path, traces: bool = True) -> list[dict[str, Any]]:
    """Every complete line of cells.jsonl (a torn last line is skipped), last record per cell_id wins.

    ``traces``: give each record its ``traces`` from traces.jsonl (records of older folders hold them inline).
    Without them a record is a row's worth of bytes: what resuming and counting need.
    """
    records = [upgrade_record(r) for r in jsonl_last_wins(Path(out_dir) / CELLS_JSONL).values()]
    if traces:
        attach_traces(out_dir, records)
    return records


def attach_traces(out_dir: str | Path, records: list[dict[str, Any]], start: int = 0) -> None:
    """Set ``traces`` on the records that lack them, from traces.jsonl (read from byte ``start``)."""
    missing = {r["cell_id"] for r in records if "traces" not in r}
    if not missing:
        return
    wanted = missing if len(missing) <= 16 else None  # a few cells: skip the other lines unparsed
    found = jsonl_last_wins(Path(out_dir) / TRACES_JSONL, start, wanted)
    for r in records:
        if "traces" not in r:
            r["traces"] = found.get(r["cell_id"], {}).get("traces", [])


def read_timeline(out_dir: str | Path, cell_id: str | None = None) -> Any:
    """timeline.jsonl as a DataFrame (TIMELINE_COLUMNS; one cell's rows with ``cell_id``): the last line per cell
    wins, a torn line is skipped, a cell whose row is gone (``kvray bench --replace`` mid-way) is kept."""
    if cell_id is None:
        return load_timeline(out_dir)
    return timeline_frame(jsonl_last_wins(Path(out_dir) / TIMELINE_JSONL, wanted={cell_id}))


def timeline_frame(by_id: dict[str, dict[str, Any]]) -> Any:
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
    frames = [
        *(parts.read_parts(out, index, "timeline") if index else []),
        timeline_frame(jsonl_last_wins(out / TIMELINE_JSONL, start)),
    ]
    frames = [f.assign(_chunk=i) for i, f in enumerate(frames) if len(f)]
    if not frames:
        return timeline_frame({})
    frame = pd.concat(frames, ignore_index=True)
    # A cell measured again after a crash left its samples twice: those of its last chunk win.
    frame = frame[frame["_chunk"] == frame.groupby("cell_id")["_chunk"].transform("max")]
    return frame[list(TIMELINE_COLUMNS)].reset_index(drop=True)


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


def records_between(out: Path, start: dict[str, int], end: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """The rows of cells.jsonl between byte offsets, each with its traces (from traces.jsonl between the same
    files' offsets; a row of an older folder holds them inline)."""
    end = end or {}
    records = list(jsonl_last_wins(out / CELLS_JSONL, start["cells"], end=end.get("cells")).values())
    if any("traces" not in r for r in records):
        found = jsonl_last_wins(out / TRACES_JSONL, start["traces"], end=end.get("traces"))
        for r in records:
            if "traces" not in r:
                r["traces"] = found.get(r["cell_id"], {}).get("traces", [])
    return records


def load_frames(out_dir: str | Path) -> tuple[Any, Any]:
    """(cells, traces) of a folder: its parts, then the rows appended after them; every row of cells.jsonl
    when the folder has no parts (written before them, or ``kvray bench`` dropped them)."""
    import pandas as pd

    out = Path(out_dir)
    index = parts.read_index(out)
    if index is None:
        return frames_from_records(read_results(out))
    tail_cells, tail_traces = frames_from_records([upgrade_record(r) for r in records_between(out, index.offsets)])
    cells = [f.rename(columns=RENAMED_COLUMNS) for f in (*parts.read_parts(out, index, "cells"), tail_cells) if len(f)]
    traces = [f for f in (*parts.read_parts(out, index, "traces"), tail_traces) if len(f)]
    return (
        pd.concat(cells, ignore_index=True) if cells else tail_cells,
        pd.concat(traces, ignore_index=True) if traces else tail_traces,
    )


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
