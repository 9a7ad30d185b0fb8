"""A job's rows read back from its folder: the planner says which cells are the job's, the dataset counts them.

Lives in the sweep stage because it needs both the planner (which cells a job has, ``hardware: each``
expanded to the types its rows ran on) and the dataset; ``kvray.data.status`` counts any set of ids.
"""

from __future__ import annotations

from pathlib import Path

from kvray.data import status
from kvray.data.reader import read_results
from kvray.plan.job import Job
from kvray.plan.planner import plan_cells


def status_counts(output_dir: str | Path, job: Job | None = None) -> dict[str, int]:
    """Rows per status in ``output_dir`` (only the job's cells when a job is given), every status listed."""
    records = read_results(output_dir, traces=False)  # read once: the types ``each`` expanded to and the rows to count
    if job is None:
        return status.count_statuses(records)
    ids = {c.cell_id for c in plan_cells(job, status.hardware_types_in(records))}
    return status.count_statuses(r for r in records if r["cell_id"] in ids)
