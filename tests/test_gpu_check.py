"""The GPU check's own logic, in-process: stage deadlines, work listed as not run, the energy summary.

The whole check runs end to end (smoke mode) on the GPU machine's stack in tests/test_gpu_stack.py; these are the
parts that decide what runs and what the summary says, checked without loading a model.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_each_stage_starts_new_work_only_before_its_share_of_the_budget(gpu_check):
    # latest starts of a 100 s budget: grid 45 s, overhead 55 s, paged 62 s, validate 80 s, serve 92 s
    at_50 = gpu_check.Budget(100.0, started=time.monotonic() - 50)
    assert [at_50.open(s) for s in gpu_check.STAGES] == [False, True, True, True, True]
    at_60 = gpu_check.Budget(100.0, started=time.monotonic() - 60)
    assert [at_60.open(s) for s in gpu_check.STAGES] == [False, False, True, True, True]
    at_85 = gpu_check.Budget(100.0, started=time.monotonic() - 85)
    assert [at_85.open(s) for s in gpu_check.STAGES] == [False, False, False, False, True]
    at_95 = gpu_check.Budget(100.0, started=time.monotonic() - 95)
    assert not any(at_95.open(s) for s in gpu_check.STAGES)
    # the default 420 s budget: the serve stage's last probe may start at 386.4 s, leaving 93.6 s of 8 minutes
    assert gpu_check.Budget(420.0).deadline_s("serve") == pytest.approx(386.4)


def test_a_spent_budget_lists_every_cell_as_not_run_and_writes_no_row(gpu_check, tmp_path):
    code = gpu_check.main(["--smoke", "--out", str(tmp_path), "--budget-s", "0"])
    assert code == 1  # no rows: nothing to show is a failed check, not a pass
    out = tmp_path / "gpu-check-smoke"
    summary = json.loads((out / "check.json").read_text())
    assert summary["cells"] == 0 and summary["partial"] is False
    # grid 3 concurrencies × 2 prompts, the overhead run, 2 paged cells, the validate stage, 1 knee search
    assert len(summary["not_run"]) == 6 + 1 + 2 + 1 + 1
    assert "validate: calibration and held-out cells" in summary["not_run"]
    assert sum("hf-paged" in x and "c16" not in x for x in summary["not_run"]) == 2
    assert not (out / "cells.jsonl").exists() or (out / "cells.jsonl").read_text() == ""


def test_the_energy_summary_adds_the_rows_measured_windows(gpu_check):
    rows = [
        {"energy_j": 12.5, "energy_basis": "nvml_counter"},
        {"energy_j": 3.0, "energy_basis": "nvml_counter"},
        {"energy_j": math.nan, "energy_reason": "no GPU"},
    ]
    lines = gpu_check.energy_lines(rows, whole_j=20.0)
    assert lines[0] == "energy: 2 rows, 15.5 J in their measured windows (nvml_counter)"
    assert "20.0 J" in lines[1]
    none = gpu_check.energy_lines([{"energy_j": math.nan, "energy_reason": "no GPU"}, {"knee_rps": 3.0}], None)
    assert none == ["energy: not measured — no GPU"]
