"""exp5 — serving load — on the simulator for three GPU types: the job, its rows, fig11/fig12 and the report's
Serving section; and no serving figures for a folder without serving rows.

The sweep runs in this process (``run_job(..., address="inprocess")``: the Ray sweep's planner, scheduler, worker
and collector without Ray): the simulator needs no device, so Ray would add only its start-up. Expected orderings come from the GPUs' published specs (H100-SXM
3.35 TB/s and 989 TFLOP/s bf16 > A100-80GB-SXM 2.04 TB/s, 312 > L4 0.3 TB/s, 121), not from the code under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvray.experiments.exp5 import EXP5_GPUS, exp5_job
from kvray.plan.experiments import Common
from kvray.sweep import run_job

MODEL = "meta-llama/Meta-Llama-3-8B"


@pytest.fixture(scope="module")
def exp5_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exp5")
    common = Common(model=MODEL, backends=["sim"], warmup=0, repeats=1)
    job = exp5_job(common, 256, 16, users=[1, 16], requests_per_user=4, requests=60)
    run_job(job, out, address="inprocess", progress=False)
    from kvray.report import make_all

    make_all(out)
    return out


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
def test_exp5_default_is_sim_on_three_gpus_from_the_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "kvray.cli", "exp5", "--model", MODEL, "--dry-run", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    cells = json.loads(out.stdout)["cells"]
    assert {c["hardware"] for c in cells} == set(EXP5_GPUS) == {"H100-SXM", "A100-80GB-SXM", "L4"}
    assert {c["backend"] for c in cells} == {"sim"}
    per_gpu = sorted(c["load"] for c in cells if c["hardware"] == "L4")
    assert per_gpu == ["closed"] * 4 + ["poisson auto"]  # users 1 4 16 64, one saturation search
    assert sorted(c["concurrency"] for c in cells if c["hardware"] == "L4" and c["load"] == "closed") == [1, 4, 16, 64]


def test_exp5_job_file_plans_what_the_command_plans():
    from kvray.plan.job import load_job
    from kvray.plan.planner import plan_cells

    from_file = {c.cell_id for c in plan_cells(load_job(Path(__file__).parents[1] / "jobs" / "exp5_serving.yaml"))}
    common = Common(model=MODEL, backends=["sim"], warmup=0, repeats=1)
    assert from_file == {c.cell_id for c in plan_cells(exp5_job(common, 512, 32, requests=200))}


def test_exp5_on_sim_leaves_rows_figures_and_a_serving_section(exp5_folder):
    from kvray.data.reader import load_dataset

    cells, _, _ = load_dataset(exp5_folder)
    searches = cells[cells["knee_rps"].notna()].set_index("hardware")
    assert set(searches.index) == set(EXP5_GPUS) and (searches["status"] == "ok").all()
    # more bandwidth and compute, more requests/s before saturating: H100 > A100 > L4
    assert searches.loc["H100-SXM", "saturation_rps"] > searches.loc["A100-80GB-SXM", "saturation_rps"]
    assert searches.loc["A100-80GB-SXM", "saturation_rps"] > searches.loc["L4", "saturation_rps"]
    closed = cells[cells["load"] == "closed"]
    assert len(closed) == 2 * 3 and set(closed["requests_steady"]) == {2 * 1, 2 * 16}  # 4 each: first, last out

    figs = exp5_folder / "figures"
    for name in ("fig11_latency_vs_throughput", "fig12_pareto"):
        assert (figs / f"{name}.png").stat().st_size > 10_000 and (figs / f"{name}.svg").is_file()
    report = (exp5_folder / "report.md").read_text()
    section = report.split("## Serving — goodput under SLOs", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| sim |")]
    assert {line.split(" | ")[1] for line in table} == set(EXP5_GPUS)
    for line in table:  # the knee and saturation of each GPU's search, as its row recorded them
        gpu = line.split(" | ")[1]
        assert f"{searches.loc[gpu, 'knee_rps']:,.2f}" in line and f"{searches.loc[gpu, 'saturation_rps']:,.2f}" in line
        assert "tpot_ms=50,ttft_ms=500" in line
    assert "fig11_latency_vs_throughput.png" in section and "fig12_pareto.png" in section


def test_fig11_marks_each_knee_and_says_its_counts(exp5_folder, tmp_path):
    from kvray.data.reader import load_dataset
    from kvray.figures.serving import fig11_latency_vs_throughput, fig12_pareto

    cells, _, _ = load_dataset(exp5_folder)
    fig = fig11_latency_vs_throughput(cells, tmp_path)
    assert sorted(fig.series) == sorted(f"sim · {g}" for g in EXP5_GPUS)
    for gpu, knee in cells[cells["knee_rps"].notna()].set_index("hardware")["knee_rps"].items():
        assert any(n.startswith(f"knee sim · {gpu}: {knee:.3g} req/s offered") for n in fig.notes), fig.notes
    assert any("requests behind each percentile" in n for n in fig.notes)
    assert not any("client fell behind" in n for n in fig.notes)  # the simulator's client is never late
    pareto = fig12_pareto(cells, tmp_path)
    assert len(pareto.series) == 3 and not pareto.empty


def test_a_row_whose_client_fell_behind_is_flagged_in_fig11(exp5_folder, tmp_path):
    """A row marked client_behind (as serving_summary marks one whose p99 lag passed the limit) is ringed and
    counted; the rows are the real ones, one flag set, so only the drawing is under test here."""
    from kvray.data.reader import frames_from_records, read_results
    from kvray.figures.serving import fig11_latency_vs_throughput

    records = read_results(exp5_folder)
    target = next(r for r in records if (r["metrics"] or {}).get("load") == "poisson" and r["status"] == "ok")
    target["metrics"]["client_behind"] = True
    cells, _ = frames_from_records(records)
    fig = fig11_latency_vs_throughput(cells, tmp_path)
    assert any(n.startswith("1 rows whose client fell behind") for n in fig.notes), fig.notes


def test_no_serving_rows_no_serving_figures_nor_section(tmp_path):
    """An exp1-only folder (bursts) gets neither fig11/fig12 nor a Serving section, not even placeholders."""
    from kvray.analysis.dataset import Dataset
    from kvray.experiments import get
    from kvray.experiments.exp1 import exp1_job
    from kvray.report import make_all

    job = exp1_job(Common(model=MODEL, backends=["sim"], hardware=["L4"], warmup=0, repeats=1), 128, 8, [1, 2])
    run_job(job, tmp_path, address="inprocess", progress=False)
    assert get("exp5").draw(Dataset.load(tmp_path), tmp_path / "figures") == []
    make_all(tmp_path)
    assert not (tmp_path / "figures" / "fig11_latency_vs_throughput.png").exists()
    assert "Serving" not in (tmp_path / "report.md").read_text()


def test_a_client_bound_knee_reads_as_a_lower_bound_in_the_table():
    """Two searches of one configuration: the higher knee (12 req/s) was bounded by the client, so the table
    says "≥ 12.00"; the same rows without the flag read "12.00"."""
    import pandas as pd

    from kvray.experiments.exp5 import knee_cell

    rows = pd.DataFrame({"knee_rps": [8.0, 12.0], "knee_client_bound": [False, True]})
    assert knee_cell(rows) == "≥ 12.00"
    assert knee_cell(rows.assign(knee_client_bound=[True, False])) == "12.00"
    assert knee_cell(rows.drop(columns="knee_client_bound")) == "12.00"
