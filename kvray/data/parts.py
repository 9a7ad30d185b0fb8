"""The flat tables as parts: each flush writes the rows appended since the previous one as Parquet files.

    parts/cells-000001.parquet     rows of cells.jsonl bytes [previous offset, offset)
    parts/traces-000001.parquet    their requests
    parts/timeline-000001.parquet  their telemetry samples (absent when the cells had none)
    parts/index.json               which parts are whole, and how many bytes of each JSONL file they hold

A flush costs what it adds, not what the folder holds, so the 10,000th row is appended as cheaply as the
10th; a reader concatenates the parts and parses only the JSONL written after the last one. The JSONL files
stay the truth: the index is written (atomically) after its parts, so a crash mid-flush leaves parts the
index does not name, which the next flush overwrites; an index whose offsets no longer fit its files (a row
dropped by ``kvray bench --replace``, a file cut back) is not used, and ``drop_parts`` removes the parts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PARTS_DIR = "parts"
INDEX_NAME = "index.json"
KINDS = ("cells", "traces", "timeline")
SOURCES = {"cells": "cells.jsonl", "traces": "traces.jsonl", "timeline": "timeline.jsonl"}


@dataclass
class PartsIndex:
    """Which parts are whole, and the bytes of each JSONL file (``SOURCES``) they hold."""

    parts: list[int] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    rows: int = 0


def part_path(out_dir: Path, kind: str, number: int) -> Path:
    return out_dir / PARTS_DIR / f"{kind}-{number:06d}.parquet"


def jsonl_sizes(out_dir: Path) -> dict[str, int]:
    """The current byte size of each JSONL file (0 when absent)."""
    sizes = {}
    for kind, name in SOURCES.items():
        try:
            sizes[kind] = (out_dir / name).stat().st_size
        except FileNotFoundError:
            sizes[kind] = 0
    return sizes


def read_index(out_dir: Path) -> PartsIndex | None:
    """The folder's parts index, or None when there is none or it no longer fits the JSONL files."""
    try:
        raw = json.loads((out_dir / PARTS_DIR / INDEX_NAME).read_text())
        index = PartsIndex(
            parts=[int(n) for n in raw["parts"]],
            offsets={k: int(raw["offsets"][k]) for k in KINDS},
            rows=int(raw.get("rows", 0)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    sizes = jsonl_sizes(out_dir)
    if any(index.offsets[k] > sizes[k] for k in KINDS):
        return None
    if not all(part_path(out_dir, "cells", n).is_file() for n in index.parts):
        return None
    return index


def write_part(out_dir: Path, index: PartsIndex, frames: dict[str, Any], offsets: dict[str, int], rows: int) -> None:
    """Write ``frames`` (kind → DataFrame) as the next part, then the index that names it (``index`` updated)."""
    number = (max(index.parts) + 1) if index.parts else 1
    (out_dir / PARTS_DIR).mkdir(exist_ok=True)
    for kind, frame in frames.items():
        path = part_path(out_dir, kind, number)
        if frame is None or not len(frame):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a leftover of a flush the index never named
            continue
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    index.parts.append(number)
    index.offsets = dict(offsets)
    index.rows += rows
    path = out_dir / PARTS_DIR / INDEX_NAME
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(index)))
    os.replace(tmp, path)


def read_parts(out_dir: Path, index: PartsIndex, kind: str) -> list[Any]:
    """The DataFrames of ``kind`` in the index's parts, in order (list columns back as Python lists)."""
    import pandas as pd

    frames = []
    for number in index.parts:
        path = part_path(out_dir, kind, number)
        if path.is_file():
            frame = pd.read_parquet(path)
            if "token_times_s" in frame:
                frame["token_times_s"] = [v.tolist() if v is not None else [] for v in frame["token_times_s"]]
            frames.append(frame)
    return frames


def write_whole(out_dir: Path, index: PartsIndex, kind: str, parquet_path: Path, csv_path: Path | None) -> bool:
    """One Parquet file (a row group per part) and optionally one CSV of every part of ``kind``, a part at a
    time: memory stays that of one part however many the folder holds. The parts' schemas are unified first
    (a column a part lacks is null there; a column all-null in one part takes the others' type). Each file is
    replaced atomically. False when there is no part of ``kind``."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    paths = [p for p in (part_path(out_dir, kind, n) for n in index.parts) if p.is_file()]
    if not paths:
        return False
    schema = pa.unify_schemas([pq.read_schema(p) for p in paths], promote_options="permissive")
    schema = pa.schema([f for f in schema if not f.name.startswith("__index_level")])
    csv_schema = pa.schema([pa.field(f.name, pa.string()) if _nested(f.type) else f for f in schema])
    tmp = parquet_path.with_name(f".{parquet_path.name}.tmp{os.getpid()}")
    csv_tmp = csv_path.with_name(f".{csv_path.name}.tmp{os.getpid()}") if csv_path else None
    csv_writer = None
    with pq.ParquetWriter(tmp, schema) as writer:
        for path in paths:
            table = pq.read_table(path)
            columns = [
                table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
                for f in schema
            ]
            aligned = pa.Table.from_arrays(columns, schema=schema)
            writer.write_table(aligned)
            if csv_tmp is not None:
                if csv_writer is None:
                    csv_writer = pacsv.CSVWriter(csv_tmp, csv_schema)
                csv_writer.write_table(_csv_ready(aligned, csv_schema))
    if csv_writer is not None:
        csv_writer.close()
    os.replace(tmp, parquet_path)
    if csv_tmp is not None and csv_path is not None:
        os.replace(csv_tmp, csv_path)
    return True


def _nested(t: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_struct(t) or pa.types.is_map(t))


def _csv_ready(table: Any, csv_schema: Any) -> Any:
    """List columns (a request's token times) as JSON text: what a CSV cell holds."""
    import pyarrow as pa

    columns = []
    for column in table.columns:
        if _nested(column.type):
            column = pa.array([None if v is None else json.dumps(v) for v in column.to_pylist()], pa.string())
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=csv_schema)  # the schema names the JSON columns strings


def drop_parts(out_dir: Path) -> None:
    """Forget the parts (a row was removed from cells.jsonl): the next flush writes them anew."""
    shutil.rmtree(out_dir / PARTS_DIR, ignore_errors=True)
