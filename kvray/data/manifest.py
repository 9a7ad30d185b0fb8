"""manifest.json read back: the job, kvray's version and every run into the folder, with its workers.

The collector writes it (``DatasetWriter.write_manifest``, atomically); this module is its reader, for the
collector carrying earlier runs forward and for anyone asking how the latest run went.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvray.data.layout import MANIFEST


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The folder's manifest, {} when it has none or it cannot be read (a manifest never stops a run)."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def last_run(output_dir: str | Path) -> dict[str, Any]:
    """The manifest's record of the latest run into ``output_dir`` ({} when none)."""
    runs = read_manifest(output_dir).get("runs", [])
    return dict(runs[-1]) if runs else {}


def straggler_cells(manifest: dict[str, Any]) -> set[str]:
    """Cell ids run by a worker some run named a straggler (kvray/sweep/stragglers.py): the dataset's
    ``straggler`` column, so a figure or a finding can leave a sick GPU out of its type's numbers."""
    return {
        str(cid)
        for run in manifest.get("runs", [])
        for s in run.get("stragglers") or []
        for cid in s.get("cell_ids", [])
    }
