"""The dataset's on-disk layout at scale (issue #18): traces apart from rows, tables appended as parts, rows
committed in groups — and folders written before any of it still load.

Results come from the synthetic backend (real runs of kvray's runner on a known schedule), so every row has
real traces and metrics; expected values are counts and the results themselves, not re-derived tables.
"""

from __future__ import annotations

import json
import threading

import pytest
from job_files import synthetic_job

from kvray.backends import get_backend
from kvray.data import parts
from kvray.data.layout import CELLS_JSONL, TRACES_JSONL
from kvray.data.reader import load_dataset, read_results
from kvray.data.writer import DatasetWriter, drop_row, encode_row
from kvray.measure.trace import CellResult
from kvray.plan.planner import plan_cells
from kvray.runner.run import run_cell


@pytest.fixture(scope="module")
def results():
    """24 measured cells: 3 requests × 4 tokens each, one repeat."""
    job = synthetic_job(
        "parts",
        options={"ttft_s": 0.0, "tpot_s": 0.0},
        grid={"prompt_toks": [8 + i for i in range(24)], "gen_toks": [4], "concurrency": [3]},
    )
    backend = get_backend("synthetic")
    return [run_cell(backend, cell) for cell in plan_cells(job)]


def _token_times(traces, cell_id):
    rows = traces[traces["cell_id"] == cell_id].sort_values("request_id")
    return [list(v) for v in rows["token_times_s"]]


def test_rows_hold_no_traces_and_every_load_gives_them_back(tmp_path, results):
    writer = DatasetWriter(tmp_path, tables=False)
    for r in results[:10]:
        assert writer.append(r)
    assert writer.flush() == 10
    for r in results[10:20]:
        writer.append(r)
    assert writer.flush() == 10
    for r in results[20:]:  # the tail: after the last part
        writer.append(r)

    lines = [json.loads(line) for line in (tmp_path / CELLS_JSONL).read_text().splitlines()]
    assert len(lines) == 24 and all("traces" not in line for line in lines)  # rows are rows' worth of bytes
    index = parts.read_index(tmp_path)
    assert index is not None and index.parts == [1, 2] and index.rows == 20

    cells, traces, _ = load_dataset(tmp_path)  # two parts + four rows parsed from the JSONL
    assert sorted(cells["cell_id"]) == sorted(r.cell_id for r in results)
    assert len(traces) == 24 * 3
    for r in (results[0], results[15], results[23]):
        expected = [t.token_times_s for t in sorted(r.traces, key=lambda t: t.request_id)]
        assert _token_times(traces, r.cell_id) == expected
        row = cells[cells["cell_id"] == r.cell_id].iloc[0]
        assert row["ttft_s_p50"] == pytest.approx(r.metrics["ttft_s_p50"])
    by_id = {rec["cell_id"]: rec for rec in read_results(tmp_path)}
    assert [t["token_times_s"] for t in by_id[results[5].cell_id]["traces"]] == [
        t.token_times_s for t in results[5].traces
    ]


def test_a_folder_written_before_parts_loads_and_grows(tmp_path, results):
    """The layout of kvray before issue #18: every record with its traces inline, no traces.jsonl, no parts."""
    with open(tmp_path / CELLS_JSONL, "w") as fh:
        for r in results[:5]:
            fh.write(json.dumps(r.to_dict()) + "\n")
    cells, traces, _ = load_dataset(tmp_path)
    assert len(cells) == 5 and len(traces) == 15
    writer = DatasetWriter(tmp_path, tables=False)
    assert writer.done_ids == {r.cell_id for r in results[:5]}
    assert not writer.append(results[0])  # still refused: it has a row
    writer.append(results[5])
    assert writer.flush() == 6  # the first part holds the old rows too
    cells, traces, _ = load_dataset(tmp_path)
    assert len(cells) == 6 and len(traces) == 18
    assert _token_times(traces, results[2].cell_id) == [t.token_times_s for t in results[2].traces]


def test_concurrent_appends_commit_together_and_a_cell_is_written_once(tmp_path, results):
    writer = DatasetWriter(tmp_path, tables=False)
    rows = [encode_row(r) for r in results]
    outcomes: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def append(row):
        written = writer.append_encoded(row)
        with lock:
            outcomes.append((row.cell_id, written))

    # every row twice, from 48 threads at once: each cell gets exactly one True
    threads = [threading.Thread(target=append, args=(row,)) for row in rows + rows]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(cid for cid, written in outcomes if written) == sorted(r.cell_id for r in results)
    assert sum(not written for _, written in outcomes) == 24
    ids = [json.loads(line)["cell_id"] for line in (tmp_path / CELLS_JSONL).read_text().splitlines()]
    assert sorted(ids) == sorted(r.cell_id for r in results)
    # every row's traces line is in traces.jsonl (it is written before the row)
    traced = {json.loads(line)["cell_id"] for line in (tmp_path / TRACES_JSONL).read_text().splitlines()}
    assert traced == set(ids)


def test_a_crash_between_traces_and_row_leaves_nothing_half_and_the_rerun_wins(tmp_path, results):
    writer = DatasetWriter(tmp_path, tables=False)
    for r in results[:3]:
        writer.append(r)
    writer.flush()
    orphan = encode_row(results[3])  # its traces line landed, its row did not (the collector died between)
    with open(tmp_path / TRACES_JSONL, "ab") as fh:
        fh.write(orphan.traces_line or b"")
        fh.write(b'{"cell_id": "torn')  # and a torn line after it
    cells, traces, _ = load_dataset(tmp_path)
    assert len(cells) == 3 and set(traces["cell_id"]) == {r.cell_id for r in results[:3]}

    writer = DatasetWriter(tmp_path, tables=False)  # the resumed run: the torn line is cut
    assert (tmp_path / TRACES_JSONL).read_bytes().endswith(b"\n")
    assert writer.append(results[3])
    writer.flush()
    cells, traces, _ = load_dataset(tmp_path)
    assert len(cells) == 4 and (traces["cell_id"] == results[3].cell_id).sum() == 3


def test_a_dropped_row_drops_the_parts_and_the_folder_loads_whole(tmp_path, results):
    writer = DatasetWriter(tmp_path, tables=False)
    for r in results[:4]:
        writer.append(r)
    writer.flush()
    assert drop_row(tmp_path, results[1].cell_id)  # kvray bench --replace
    assert parts.read_index(tmp_path) is None
    cells, traces, _ = load_dataset(tmp_path)
    assert results[1].cell_id not in set(cells["cell_id"]) and len(cells) == 3
    assert results[1].cell_id not in set(traces["cell_id"])
    DatasetWriter(tmp_path, tables=False).flush()
    assert parts.read_index(tmp_path).rows == 3


def test_the_whole_folder_tables_are_written_a_part_at_a_time_and_equal_the_rows(tmp_path, results):
    import pandas as pd

    writer = DatasetWriter(tmp_path, tables=False)
    skipped = CellResult(cell=results[0].cell, status="skipped_after_oom", reason="r")  # a row with no traces
    for r in results[1:9]:
        writer.append(r)
    writer.flush()
    writer.append(skipped)
    for r in results[9:]:
        writer.append(r)
    writer.write_tables()  # flushes the rest, then concatenates the parts
    assert len(parts.read_index(tmp_path).parts) == 2
    cells = pd.read_parquet(tmp_path / "cells.parquet")
    traces = pd.read_parquet(tmp_path / "traces.parquet")
    assert sorted(cells["cell_id"]) == sorted(r.cell_id for r in results)
    assert len(traces) == 23 * 3
    row = cells.set_index("cell_id").loc[results[12].cell_id]
    assert row["tpot_s_p50"] == pytest.approx(results[12].metrics["tpot_s_p50"], nan_ok=True)
    assert cells.set_index("cell_id").loc[results[0].cell_id, "status"] == "skipped_after_oom"
    csv = pd.read_csv(tmp_path / "traces.csv")
    first = csv[csv["cell_id"] == results[3].cell_id].sort_values("request_id")
    assert [json.loads(v) for v in first["token_times_s"]] == [
        t.token_times_s for t in sorted(results[3].traces, key=lambda t: t.request_id)
    ]
    assert len(pd.read_csv(tmp_path / "cells.csv")) == 24
