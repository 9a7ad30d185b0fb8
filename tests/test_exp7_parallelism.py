"""exp7 on the sim backend, in-process (no Ray): its job, its cells' per-GPU figures, and its figure per model."""

from __future__ import annotations

import pytest

from kvray.analysis.dataset import Dataset
from kvray.backends import get_backend
from kvray.data.writer import DatasetWriter
from kvray.errors import KvrayInputError
from kvray.experiments.exp7 import exp7_job
from kvray.figures.parallelism import stops_paying, tp_figures
from kvray.plan.experiments import Common
from kvray.plan.job import load_job
from kvray.plan.planner import plan_cells
from kvray.runner.run import run_cell

MODEL = "meta-llama/Llama-3.1-70B"


@pytest.fixture(autouse=True)
def no_calibration_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRAY_CALIBRATION", str(tmp_path / "absent.json"))


def test_exp7_job_sweeps_tp_on_h100_and_a100_and_matches_the_job_file():
    job, notes = exp7_job(Common(model=MODEL, backends=["sim"], warmup=0, repeats=1))
    assert notes == [] and job.tensor_parallel == [1, 2, 4, 8] and job.hardware == ["H100-SXM", "A100-80GB-SXM"]
    cells = plan_cells(job)
    assert len(cells) == 4 * 2 * 3  # TP × GPUs × concurrency
    assert {c.tensor_parallel for c in cells} == {1, 2, 4, 8} and {c.option_dict["layout"] for c in cells} == {"paged"}
    file_cells = plan_cells(load_job("jobs/exp7_parallelism.yaml"))
    assert {c.cell_id for c in file_cells} == {c.cell_id for c in cells}  # the command and the file: one sweep


def test_degrees_the_heads_refuse_are_dropped_with_a_note():
    job, notes = exp7_job(Common(model="Qwen/Qwen2.5-7B", backends=["sim"]))  # 28 heads, 4 KV heads
    assert job.tensor_parallel == [1, 2, 4] and len(notes) == 1 and "TP 8 dropped" in notes[0]
    with pytest.raises(KvrayInputError, match="no tensor parallel degree"):
        exp7_job(Common(model="Qwen/Qwen2.5-7B", backends=["sim"], tensor_parallel=[8]))


def test_exp7_runs_in_seconds_on_sim_and_draws_where_tp_stops_paying(tmp_path):
    job, _ = exp7_job(Common(model=MODEL, backends=["sim"], warmup=0, repeats=1), concurrency=[1, 32])
    backend = get_backend("sim")
    writer = DatasetWriter(tmp_path, tables=False)
    results = {}
    try:
        for cell in plan_cells(job):
            result = run_cell(backend, cell)
            writer.append(result)
            results[cell.hardware, cell.tensor_parallel, cell.concurrency] = result
    finally:
        backend.close()
    # TP 1 does not fit 80 GB (the pool cannot even be allocated); TP 2–8 run.
    assert {results[g, 1, c].status for g in job.hardware for c in (1, 32)} == {"oom"}
    assert {results[g, n, c].status for g in job.hardware for n in (2, 4, 8) for c in (1, 32)} == {"ok"}
    # KV pool per GPU grows with TP: weights per GPU shrink and each GPU caches fewer KV heads.
    pools = [results["H100-SXM", n, 1].extra["sim"]["kv_cache_size_tokens"] for n in (2, 4, 8)]
    assert pools == sorted(pools) and pools[-1] > 20 * pools[0]
    figures = tp_figures(Dataset.load(tmp_path), tmp_path / "figures")
    assert len(figures) == 1 and figures[0].name == "exp7_tp_scaling_meta-llama--Llama-3.1-70B"
    fig = figures[0]
    assert len(fig.series) == 4 and fig.oom_markers == 4  # H100/A100 × c1/c32; the TP 1 cells
    assert all(p.suffix in (".png", ".svg") and p.is_file() for p in fig.paths)
    assert len([n for n in fig.notes if "TP stops paying" in n or "TP pays" in n]) == 4


def test_stops_paying_rule():
    # TPOT halves with each doubling: efficiency 1, pays throughout; 10 → 6 → 4.5 ms: 0.83 at 4, 0.56 at 8.
    assert stops_paying([(2, 0.010), (4, 0.005), (8, 0.0025)]) is None
    assert stops_paying([(2, 0.010), (4, 0.006), (8, 0.0045)]) == 8
    assert stops_paying([(2, 0.010)]) is None
