"""exp9 on the simulator, in-process (no Ray), and ``kvray plan --output``: the files each leaves — exp9's Pareto
figure, its plan JSON and figure per model and the report's "Plan:" section; the plan's ``figures/pareto_plan``
with a results folder's measured cells drawn beside the predictions (``--measured``)."""

from __future__ import annotations

import json

import pytest
from job_files import synthetic_job

from kvray.cli import main
from kvray.sweep import run_job

TINY = "kvray/tiny-llama"


@pytest.fixture(autouse=True)
def no_calibration_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRAY_CALIBRATION", str(tmp_path / "absent.json"))


def test_exp9_on_sim_leaves_pareto_and_plan_figures_and_a_plan_section(tmp_path):
    """The tiny Llama on two GPU types at TP 1 (two deployments: a frontier across them), concurrency 1 and 8:
    exp9's draw writes the folder's Pareto figure and the plan's JSON and figure; the report shows the plan."""
    from kvray.analysis.dataset import Dataset
    from kvray.capacity.prices import PRICES
    from kvray.experiments.exp9 import EXP9_RATE, draw
    from kvray.plan.experiments import Common, tp_sweep_job
    from kvray.report.compose import make_report

    common = Common(model=TINY, backends=["sim"], warmup=0, repeats=1, hardware=["H100-SXM", "L4"])
    job, notes = tp_sweep_job("exp9", common, 128, 16, [1, 8], default_tp=(1,), sim_gpus=("H100-SXM", "L4"))
    assert notes == [] and job.experiment == "exp9"
    run_job(job, tmp_path, address="inprocess", progress=False)
    dataset = Dataset.load(tmp_path)
    drawn = {f.name: f for f in draw(dataset, tmp_path / "figures")}
    make_report(tmp_path, figures=False, dataset=dataset)  # embeds the figures drawn above

    figs = tmp_path / "figures"
    assert set(drawn) == {"pareto_kvray--tiny-llama", "exp9_plan_kvray--tiny-llama"}
    for name in drawn:
        assert (figs / f"{name}.png").stat().st_size > 10_000
    # the folder's figure: one series per deployment, every cell predicted (sim)
    assert set(drawn["pareto_kvray--tiny-llama"].series) == {"H100-SXM TP1 predicted", "L4 TP1 predicted"}
    plan = json.loads((figs / "exp9_plan_kvray--tiny-llama.json").read_text())
    assert plan["model"] == TINY and plan["rate_rps"] == EXP9_RATE
    assert {c["gpu"] for c in plan["candidates"]} == {"H100-SXM", "L4"} and {c["tp"] for c in plan["candidates"]} == {1}
    best = plan["best"]
    assert best is not None
    assert best["cost_per_hour"] == pytest.approx(best["replicas"] * PRICES[best["gpu"]].usd_per_gpu_hour)
    assert drawn["exp9_plan_kvray--tiny-llama"].series  # the plan's probes drawn

    report = (tmp_path / "report.md").read_text()
    section = report.split("### Plan: kvray/tiny-llama at 20 req/s", 1)[1].split("\n## ", 1)[0]
    assert f"Cheapest: {best['replicas']} × {best['gpu']} TP1" in section
    assert "What-ifs for the cheapest (predicted): CPU offload — offload" in section
    assert f"Disaggregated prefill/decode — {plan['what_ifs']['disaggregation']['verdict']}" in section
    assert "| GPU | TP | req/s per replica |" in section and "](figures/exp9_plan_kvray--tiny-llama.png)" in report
    assert "](figures/pareto_kvray--tiny-llama.png)" in report


def test_plan_output_draws_the_pareto_figure_with_measured_cells(tmp_path, capsys):
    """``--measured`` a folder of the synthetic backend (a real clock, an injected schedule: TPOT 5 ms, so at most
    1 / 5 ms = 200 tokens/s per user): its two cells of the plan's model are drawn as measured points beside the
    plan's predicted probes (the other model's two are not), and plan.json's ``pareto`` says so."""
    measured = tmp_path / "measured"
    grid = {"prompt_toks": [16], "gen_toks": [4], "concurrency": [1, 2]}
    job = synthetic_job("measured", models=[TINY, "facebook/opt-125m"], grid=grid)
    run_job(job, measured, address="inprocess", progress=False)
    out = tmp_path / "plan"
    args = ["plan", "-m", TINY, "--rate", "5", "--slo", "ttft_ms=500,tpot_ms=50", "--gpus", "L4", "--tp", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--output", str(out), "--measured", str(measured)])
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert (out / "figures" / "pareto_plan.png").stat().st_size > 10_000
    plan = json.loads((out / "plan.json").read_text())
    pareto = plan["pareto"]
    assert "figures/pareto_plan.png" in pareto["figures"] and pareto["predicted_points"] >= 1
    assert "L4 TP1 predicted" in pareto["series"] and "cpu TP1 measured" in pareto["series"]
    points = pareto["measured_points"]
    assert len(points) == 2 and {p["source"] for p in points} == {"measured (synthetic)"}
    assert all(150 < p["tokens_per_s_per_user"] <= 200 for p in points)
