"""A results folder read once: the one object figures, findings, the report and compare read.

``Dataset.load(folder)`` reads nothing yet; each part is read on first use and kept: the flat tables (cells and
traces, from the parts where the folder has them: fig1–fig7, fig8, fig11, the findings, the tables), the
manifest, the rows as written (``records``: cells.jsonl's nested dicts, which the exp4/exp6/exp7 figures read),
their traces (``records_with_traces``: exp6's per-turn figure, compare) and the telemetry timeline (fig10). So a
``kvray report`` reads each file of the folder once however many figures and sections use it (before this
object it read cells.jsonl about nine times in three shapes), and ``kvray plot --cell`` reads one cell's lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from kvray.analysis.views import View, prepare
from kvray.data.layout import MANIFEST
from kvray.data.parts import read_index
from kvray.data.reader import (
    attach_traces,
    frames_from_records,
    load_frames,
    load_timeline,
    read_results,
    read_timeline,
)
from kvray.errors import KvrayInputError
from kvray.measure.trace import CellResult


@dataclass
class Dataset:
    """One results folder's data, each part read on first use and kept: ``cells`` and ``traces`` (pandas frames of
    flat rows), ``manifest``, ``view``, ``records``, ``records_with_traces`` and ``timeline``."""

    folder: Path

    @classmethod
    def load(cls, folder: str | Path, records: list[dict[str, Any]] | None = None) -> Dataset:
        """The dataset of ``folder`` (a half-written sweep's too); an input error for a missing folder.
        ``records``: its cells.jsonl rows where a caller has read them already (``kvray plot`` checks them first)."""
        path = Path(folder)
        if not path.is_dir():
            raise KvrayInputError(f"{path} is not a results folder")
        dataset = cls(path)
        if records is not None:
            dataset.__dict__["records"] = records
        return dataset

    @classmethod
    def from_frames(
        cls,
        folder: str | Path,
        cells: Any,
        traces: Any = None,
        manifest: dict[str, Any] | None = None,
        records: list[dict[str, Any]] | None = None,
    ) -> Dataset:
        """A dataset of tables (and rows) already in memory, e.g. rows crafted or edited in a test."""
        dataset = cls(Path(folder))
        dataset.__dict__.update(tables=(cells, traces), manifest=manifest or {})
        if records is not None:
            dataset.__dict__.update(records=records, records_with_traces=records)
        return dataset

    @classmethod
    def from_records(cls, records: list[dict[str, Any]], folder: str | Path = ".") -> Dataset:
        """A dataset of rows already in memory (CellResult dicts with their traces)."""
        return cls.from_frames(folder, *frames_from_records(records), records=records)

    @cached_property
    def tables(self) -> tuple[Any, Any]:
        """(cells, traces): the parts, then the rows appended after them (kvray.data.reader.load_frames); a folder
        without parts (``kvray bench``'s, or older) from its rows, which are then read once for both."""
        cells, traces = (
            frames_from_records(self.records_with_traces)
            if read_index(self.folder) is None
            else load_frames(self.folder)
        )
        if len(cells) and "cell_id" in cells:  # marked from the manifest: rows are written before the verdict
            from kvray.data.manifest import straggler_cells

            cells["straggler"] = cells["cell_id"].isin(straggler_cells(self.manifest))
        return cells, traces

    @property
    def cells(self) -> Any:
        """One flat row per cell (CellResult.to_row), as written: a pandas DataFrame."""
        return self.tables[0]

    @property
    def traces(self) -> Any:
        """One row per request: a pandas DataFrame."""
        return self.tables[1]

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """manifest.json: the job, kvray's version, the runs and their workers ({} where there is none)."""
        import json

        path = self.folder / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else {}

    @cached_property
    def view(self) -> View:
        """The cells table made uniform (kvray.analysis.views): what fig1–fig7, the findings and tables read."""
        return prepare(self.cells, self.traces)

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        """Every row as written (cells.jsonl dicts, last per cell id), without traces."""
        return read_results(self.folder, traces=False)

    @cached_property
    def records_with_traces(self) -> list[dict[str, Any]]:
        """``records`` with each one's ``traces`` (read from traces.jsonl once, for every record)."""
        records = self.records
        attach_traces(self.folder, records)
        return records

    @cached_property
    def timeline(self) -> Any:
        """Every cell's telemetry and engine samples (TIMELINE_COLUMNS), as a pandas DataFrame."""
        return load_timeline(self.folder)

    def results(self) -> list[Any]:
        """The rows as CellResults, traces included (what ``kvray compare`` tests)."""
        return [CellResult.from_dict(r) for r in self.records_with_traces]

    def records_with_traces_of(self, cell_ids: list[str]) -> list[dict[str, Any]]:
        """The records of ``cell_ids`` with their traces: only their lines of traces.jsonl are parsed unless every
        record's traces are already read."""
        wanted = [r for r in self.records if r["cell_id"] in set(cell_ids)]
        attach_traces(self.folder, wanted)
        return wanted

    def timeline_of(self, cell_id: str) -> Any:
        """One cell's timeline samples: from ``timeline`` when it is read, else only that cell's line."""
        if "timeline" in self.__dict__:
            return self.timeline[self.timeline["cell_id"] == cell_id]
        return read_timeline(self.folder, cell_id)

    @cached_property
    def cells_worth_a_look(self) -> dict[str, str]:
        """Cell id → why its timeline (fig10) is worth a look: the most concurrent measured cell (among those, the
        highest p99 TTFT: it shows queueing and batching), and the three that preempted most."""
        cells = self.view.cells
        measured = cells[cells["status"].isin(["ok", "partial"])] if len(cells) else cells
        why: dict[str, str] = {}
        if len(measured) and "ttft_s_p99" in measured and measured["ttft_s_p99"].notna().any():
            ranked = measured[measured["ttft_s_p99"].notna()]
            load = ranked["concurrency"].fillna(0) if "concurrency" in ranked else 0
            top = ranked.assign(_load=load).sort_values(["_load", "ttft_s_p99"], ascending=False).iloc[0]
            why[str(top["cell_id"])] = (
                f"most concurrent ({int(top['_load'])} requests at once), "
                f"p99 TTFT {float(top['ttft_s_p99']) * 1e3:,.1f} ms"
            )
        timeline = self.timeline
        pre = timeline[(timeline["source"] == "engine") & (timeline["metric"] == "preemptions")]
        grew = pre.groupby("cell_id")["value"].agg(lambda v: v.max() - v.min()) if len(pre) else pre["value"]
        for cell_id, count in grew[grew > 0].sort_values(ascending=False).head(3).items():
            why[str(cell_id)] = why.get(str(cell_id), "") + f"{'; ' if cell_id in why else ''}{int(count)} preemptions"
        return why
