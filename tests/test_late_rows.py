"""A row that arrives after its worker was given up (a partition that healed) is refused, whichever comes first:
the rerun's row or the late one (kvray/sweep/late_rows.py through the collector). Plain Python collector."""

from __future__ import annotations

import json

from kvray.data.layout import CELLS_JSONL
from kvray.data.writer import encode_row
from kvray.measure.trace import CellResult
from kvray.sweep.collector import Collector
from tests.job_files import synthetic_job


def _row(cell, worker: str, e2e: float):
    return encode_row(
        CellResult(
            cell=cell,
            status="ok",
            metrics={"e2e_s_p50": e2e},
            hardware={"name": "cpu", "worker_id": worker, "node_id": worker[-1]},
        )
    )


def _lines(folder):
    return [json.loads(line) for line in (folder / CELLS_JSONL).read_text().splitlines()]


def test_the_rerun_row_stands_whether_the_late_row_comes_before_or_after_it(tmp_path):
    from kvray.plan.planner import plan_cells

    first, second = plan_cells(synthetic_job("late"))[:2]
    collector = Collector(str(tmp_path), {"name": "late"}, {}, tables_every_s=3600, node_id="n")
    try:
        # cell 1: its worker (incarnation 1) was cut off and disowned; the late row comes before the rerun's
        assert collector.disown("kvray-worker-s-0-1")
        assert collector.append_encoded(_row(first, "kvray-worker-s-0-1", 9.0)) is False
        assert collector.append_encoded(_row(first, "kvray-worker-s-1-1", 1.0)) is True
        # cell 2: the rerun's row first, the late one after it
        assert collector.append_encoded(_row(second, "kvray-worker-s-1-1", 2.0)) is True
        assert collector.append_encoded(_row(second, "kvray-worker-s-0-1", 9.0)) is False
    finally:
        collector._stop.set()
    rows = _lines(tmp_path)
    assert [(r["cell_id"], r["hardware"]["worker_id"], r["metrics"]["e2e_s_p50"]) for r in rows] == [
        (first.cell_id, "kvray-worker-s-1-1", 1.0),
        (second.cell_id, "kvray-worker-s-1-1", 2.0),
    ]
    late = [{"cell_id": c.cell_id, "worker_id": "kvray-worker-s-0-1"} for c in (first, second)]
    assert collector.late.refused == late  # what the run's record lists as late_rows_refused
    assert collector.duplicates == 0  # refused as late, before the writer
