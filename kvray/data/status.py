"""What a results folder holds, counted: rows per status, and where a job's folder is by default.

Read from cells.jsonl alone (no Ray, no torch), so a half-written or killed sweep counts too. Which cells
belong to a job is the planner's answer, a later stage: ``kvray.sweep.status_counts(out, job)`` asks it
and passes the ids here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, Protocol

from kvray.data.reader import read_results
from kvray.measure.trace import STATUSES

RESULTS_ROOT = Path("results")


class Named(Protocol):
    @property
    def name(self) -> str: ...


def default_output_dir(job: Named) -> Path:
    """``results/<job name>``: where a job's dataset goes unless told otherwise."""
    return RESULTS_ROOT / job.name


def count_statuses(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Rows per status, every known status listed (0 when absent), unknown ones after them."""
    counts = Counter(r["status"] for r in records)
    return {s: counts.get(s, 0) for s in STATUSES} | {s: n for s, n in counts.items() if s not in STATUSES}


def status_counts(output_dir: str | Path, cell_ids: Collection[str] | None = None) -> dict[str, int]:
    """Rows per status in ``output_dir`` (only the rows of ``cell_ids`` when given), every status listed."""
    records = read_results(output_dir, traces=False)
    if cell_ids is not None:
        records = [r for r in records if r["cell_id"] in cell_ids]
    return count_statuses(records)


def hardware_types_in(records: Iterable[dict[str, Any]]) -> list[str]:
    """The hardware types a ``hardware: each`` job was expanded to, read back from its rows."""
    return sorted({r["cell"].get("hardware", "any") for r in records} - {"any"})
