"""The prepared GPU check (benchmarks/gpu_check.py) runs end to end in its CPU smoke mode, without Ray.

The GPU machine it is meant for has no Ray and no network; a broken script would waste the few minutes a
GPU is lent for, so its whole path — bench cells on one loaded model, rows written as they finish,
calibrate on one half, roofline error on the other, the table — is exercised here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]

RUN_WITHOUT_RAY = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is blocked: the GPU machine has none")
sys.meta_path.insert(0, Block())
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_gpu_check_smoke_runs_without_ray(tmp_path: Path) -> None:
    script = REPO / "benchmarks" / "gpu_check.py"
    proc = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_RAY, str(script), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "gpu-check-smoke"
    summary = json.loads((out / "check.json").read_text())
    # smoke grid: concurrency 1 2 4 × prompt 16 64 → 6 cells, none dropped by the budget
    assert summary["cells"] == 6 and summary["not_run"] == []
    # calibrated on prompt 16, predicted for the 3 prompt-64 cells
    assert sorted(e["concurrency"] for e in summary["roofline_errors"]) == [1, 2, 4]
    assert all(e["prompt_toks"] == 64 for e in summary["roofline_errors"])
    cells = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert len(cells) == 6 and all(c["status"] == "ok" for c in cells)
    assert "roofline after calibrating on prompt 16" in proc.stdout
    # the energy path: every cell carries the energy columns; on a CPU without readable RAPL they are NaN with
    # the reason, which the script prints instead of a number
    assert "J/tok" in proc.stdout and summary["energy"]["lines"][0].startswith("energy: ")
    rows = pd.read_parquet(out / "cells.parquet")
    measured = rows["energy_j"].notna()
    assert (measured | rows["energy_reason"].notna()).all() and (rows["telemetry_samples"] >= 2).all()
    if not measured.any():
        assert "energy: not measured — " in proc.stdout
