"""The dataset on disk: cells.jsonl (source of truth), parquet/csv tables, the manifest, status counts.

    from kvray.data import load_dataset, status_counts, last_run

Importing it is light (pandas is imported only when tables are built or loaded).
"""

from __future__ import annotations

from kvray.data.manifest import last_run, read_manifest
from kvray.data.reader import load_dataset, read_results
from kvray.data.status import count_statuses, default_output_dir, hardware_types_in, status_counts
from kvray.data.writer import DatasetWriter, write_json_atomic

__all__ = [
    "DatasetWriter",
    "count_statuses",
    "default_output_dir",
    "hardware_types_in",
    "last_run",
    "load_dataset",
    "read_manifest",
    "read_results",
    "status_counts",
    "write_json_atomic",
]
