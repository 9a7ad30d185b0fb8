"""kvray exp1/exp2/exp3: the jobs they build, the seed's space-separated flags, --dry-run, and a real
tiny-model run through Ray that ends in figures and a report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kvray.errors import KvrayInputError
from kvray.experiments.exp1 import exp1_job
from kvray.experiments.exp2 import exp2_job
from kvray.experiments.exp3 import exp3_job
from kvray.plan.experiments import Common, hardware_arg
from kvray.plan.planner import plan_cells


def kvray(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "kvray.cli", *args], capture_output=True, text=True, env=env)


def test_exp1_job_is_a_concurrency_sweep():
    job = exp1_job(Common(), 512, 64, [8, 1, 4, 2, 2])
    cells = plan_cells(job)
    assert job.name == "exp1-facebook--opt-1.3b" and job.experiment == "exp1"
    assert sorted(c.concurrency for c in cells) == [1, 2, 4, 8]
    assert {(c.prompt_toks, c.gen_toks, c.experiment, c.workload.kind) for c in cells} == {(512, 64, "exp1", "uniform")}


def test_exp2_drops_lengths_the_model_cannot_hold():
    job, notes = exp2_job(Common(), [128, 512, 1024, 2048, 4096], 64)
    assert sorted(c.prompt_toks for c in plan_cells(job)) == [128, 512, 1024]
    assert notes == [
        "dropped --seqlens 2048 4096: prompt + 64 generated tokens exceed facebook/opt-1.3b's 2048 positions"
    ]
    with pytest.raises(KvrayInputError, match="largest possible prompt: 1985"):
        exp2_job(Common(), [4096], 64)


def test_exp3_short_alone_and_mixed_with_long():
    job, notes = exp3_job(Common(model="meta-llama/Meta-Llama-3-8B"), 128, 4096, 64, n_short=3, n_long=1)
    assert notes == []
    shapes = sorted((c.workload.kind, tuple(r.prompt_toks for r in c.workload.requests)) for c in plan_cells(job))
    assert shapes == [("mixed", (128, 128, 128, 4096)), ("uniform", (128, 128, 128))]
    # The seed's --long 4096 on a 2048-position OPT becomes the longest prompt it holds, with a note.
    job, notes = exp3_job(Common(), 128, 4096, 64)
    assert max(c.prompt_toks for c in plan_cells(job)) == 1985 and "using --long 1985" in notes[0]
    with pytest.raises(KvrayInputError, match="must be longer"):
        exp3_job(Common(), 512, 256, 64)


def test_hardware_flag_values():
    assert hardware_arg(None) == "any" and hardware_arg(["each"]) == "each"
    assert hardware_arg(["H100", "A100"]) == ["H100", "A100"] and hardware_arg(["H100,L4"]) == ["H100", "L4"]
    with pytest.raises(KvrayInputError, match="not a mix"):
        hardware_arg(["each", "H100"])


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
def test_seed_commands_parse_space_separated_lists():
    out = kvray(
        "exp1",
        "--model",
        "facebook/opt-1.3b",
        "--prompt-toks",
        "512",
        "--gen-toks",
        "64",
        "--concurrency",
        "1",
        "2",
        "4",
        "8",
        "--dry-run",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    cells = json.loads(out.stdout)["cells"]
    assert [c["concurrency"] for c in cells] == [1, 2, 4, 8]
    # KV of opt-1.3b bf16: 196,608 B per token × (512 + 64) tokens per request, as the pre-flight check counts.
    assert cells[3]["kv_gb"] == pytest.approx(8 * 576 * 196_608 / 2**30)

    out = kvray(
        "exp2",
        "--model",
        "facebook/opt-1.3b",
        "--seqlens",
        "128",
        "512",
        "1024",
        "2048",
        "4096",
        "--gen-toks",
        "64",
        "--backend",
        "sim",
        "--hardware",
        "H100",
        "A100",
        "--dry-run",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    cells = json.loads(out.stdout)["cells"]
    assert {(c["hardware"], c["prompt_toks"]) for c in cells} == {
        (h, p) for h in ("H100", "A100") for p in (128, 512, 1024)
    }
    assert {c["available_gb"] for c in cells if c["hardware"] == "A100"} == {40.0}
    assert "dropped --seqlens 2048 4096" in out.stderr

    out = kvray(
        "exp3", "--model", "facebook/opt-1.3b", "--short", "128", "--long", "4096", "--gen-toks", "64", "--dry-run"
    )
    assert out.returncode == 0, out.stderr
    assert "128,128,128,1985" in out.stdout and "dry run" in out.stdout


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
def test_list_flags_accept_commas_and_repeats():
    out = kvray("exp1", "-c", "1,2", "--concurrency", "16", "--dry-run", "--json")
    assert [c["concurrency"] for c in json.loads(out.stdout)["cells"]] == [1, 2, 16]


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["exp1", "--concurrency", "0", "2"], "must be positive"),
        (["exp1", "--concurrency", "--dry-run"], "--concurrency"),
        (["exp1", "--concurrency", "two"], "--concurrency"),
        (["exp2", "--seqlens", "4096", "--model", "gpt2"], "largest possible prompt"),
        (["exp3", "--short", "512", "--long", "256"], "must be longer"),
        (["exp1", "--backend", "nope"], "nope"),
        (["exp1", "--hardware", "each", "H100"], "not a mix"),
    ],
)
def test_bad_flags_are_one_line_exit_2(args, needle):
    out = kvray(*args, "--dry-run")
    assert out.returncode == 2, out.stdout
    assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_dry_run_imports_neither_torch_nor_ray():
    code = (
        "import sys, io, contextlib\n"
        "from kvray.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['exp1', '--concurrency', '1', '2', '--dry-run'])\n"
        "    except SystemExit as e: assert e.code == 0\n"
        "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


def run_cli(*args: str) -> None:
    from kvray.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == 0


TINY = ("--model", "kvray/tiny-llama", "--dtype", "fp32", "--device", "cpu", "--warmup", "0", "--no-progress")


def test_real_tiny_model_run_ends_in_figures_and_report(ray_session, tmp_path):
    """exp1, exp2 and exp3 on a real (random-weight) model through Ray, into one folder; exp3 goes through
    the command line and ends in the figures and the report, whose numbers must be the dataset's."""
    from dataclasses import replace

    from kvray.analysis.views import prepare
    from kvray.data.reader import load_dataset
    from kvray.experiments import compute_findings
    from kvray.measure.metrics import describe
    from kvray.sweep import run_job

    out = str(tmp_path / "tiny")
    common = Common(model="kvray/tiny-llama", dtype="fp32", device="cpu", warmup=0, repeats=2)
    exp1, (exp2, _) = exp1_job(common, 16, 4, [1, 2, 4]), exp2_job(common, [16, 64, 256], 4)
    grids = [replace(g, experiment="exp1") for g in exp1.grids] + [replace(g, experiment="exp2") for g in exp2.grids]
    run_job(replace(exp1, name="tiny", grids=grids), out, progress=False)  # one worker start for both sweeps
    run_cli(
        "exp3",
        *TINY,
        "--short",
        "16",
        "--long",
        "512",
        "--gen-toks",
        "4",
        "--n-short",
        "2",
        "--repeats",
        "2",
        "--output-dir",
        out,
    )

    cells, traces, _ = load_dataset(out)
    assert len(cells) == 3 + 3 + 2 and set(cells["status"]) == {"ok"} and set(cells["hardware"]) == {"cpu"}
    from pathlib import Path

    figures = Path(out) / "figures"
    names = sorted(p.name for p in figures.iterdir())
    timelines = [n for n in names if n.startswith("fig10_timeline_")]  # the report's most interesting cells
    assert len(timelines) == 2 and {n.rsplit(".", 1)[1] for n in timelines} == {"png", "svg"}
    assert [n for n in names if n not in timelines] == sorted(
        f"fig{i}_{n}.{e}"
        for i, n in enumerate(
            (
                "mem_vs_concurrency",
                "tps_vs_concurrency",
                "latency_vs_seqlen",
                "mem_vs_seqlen",
                "mixed_lengths_latency",
                "cross_hardware",
                "kv_predicted_vs_measured",
            ),
            1,
        )
        for e in ("png", "svg")
    )
    from test_plots import group_ids, markers_in, svg_text

    fig1 = figures / "fig1_mem_vs_concurrency.png"
    assert {"peak-0", "kv_measured-0", "kv_predicted-0", "weights-0"} <= group_ids(fig1)
    assert "kvray/tiny-llama · fp32 · hf · cpu" in svg_text(fig1) and "process RSS peak" in svg_text(fig1)
    assert markers_in(figures / "fig7_kv_predicted_vs_measured.png", "kv-points-0") == 8
    assert "bar-mixed-ttft_s-0" in group_ids(figures / "fig5_mixed_lengths_latency.png")
    assert "at least two hardware types" in svg_text(figures / "fig6_cross_hardware.png")

    md = (Path(out) / "report.md").read_text()
    html = (Path(out) / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 7 + 1  # fig1–fig7 and the slowest cell's fig10
    view = prepare(cells, traces)
    findings = {f.key: f for f in compute_findings(view)}
    # "sanity" may join them: with warmup 0 on a shared 2-core machine the first cell after the model load can
    # measure a slower TPOT at c=1 than at c=4, which the sanity finding rightly flags instead of reporting.
    assert set(findings) - {"sanity"} == {
        "memory_slope",
        "oom_boundary",
        "throughput_plateau",
        "latency_exponent",
        "mixed_penalty",
        "kv_error",
    }
    for f in findings.values():
        assert f.text in md
    # The numbers are the data's: KV error from the rows, the short requests' TTFT from their traces.
    err = cells["kv_rel_error"].astype(float).abs()
    assert findings["kv_error"].values["mean_abs_rel_error"] == pytest.approx(err.mean())
    mixed = cells[cells["workload"] == "mixed"]["cell_id"].iloc[0]
    alone = cells[(cells["experiment"] == "exp3") & (cells["workload"] == "uniform")]["cell_id"].iloc[0]
    short_ttft = {
        cid: traces[(traces["cell_id"] == cid) & (traces["prompt_toks"] == 16)]["ttft_s"] for cid in (mixed, alone)
    }
    expected = describe(short_ttft[mixed], "t")["t_p99"] / describe(short_ttft[alone], "t")["t_p99"]
    assert findings["mixed_penalty"].values["ttft_s_p99_ratio"] == pytest.approx(expected)
    exp2 = cells[cells["experiment"] == "exp2"].sort_values("prompt_toks")
    b, _ = np.polyfit(np.log(exp2["prompt_toks"]), np.log(exp2["ttft_s_p50"]), 1)
    assert findings["latency_exponent"].values["ttft_s_exponent"] == pytest.approx(b)


def test_job_file_for_a_remote_cluster_round_trips(tmp_path):
    """--cluster / --address http://… ship the experiment as a job file: the same cells come back from it."""
    from kvray.plan.experiments import write_job_file
    from kvray.plan.job import load_job

    job, _ = exp3_job(Common(hardware=["A100", "H100"], repeats=2), 128, 1024, 32)
    loaded = load_job(write_job_file(job, tmp_path))
    assert loaded.name == "exp3-facebook--opt-1.3b"
    assert [c.cell_id for c in plan_cells(loaded)] == [c.cell_id for c in plan_cells(job)]


RUN_JOB = """
name: hooked
models: [kvray/tiny-llama]
backends: [synthetic]
dtypes: [fp32]
warmup: 0
repeats: 2
options: {ttft_s: 0.02, tpot_s: 0.005}
grid:
  experiment: exp1
  prompt_toks: [16]
  gen_toks: [4]
  concurrency: [1, 2, 4]
"""


def test_run_command_ends_with_figures_and_report(ray_session, tmp_path):
    import shutil

    from test_plots import group_ids

    job_file = tmp_path / "hooked.yaml"
    job_file.write_text(RUN_JOB)
    out = tmp_path / "out"
    run_cli("run", str(job_file), "--output", str(out))
    assert {"tps-0", "tpot-0"} <= group_ids(out / "figures" / "fig2_tps_vs_concurrency.png")
    md = (out / "report.md").read_text()
    assert md.startswith("# kvray report — hooked") and "no OOM up to concurrency 4" in md
    assert (out / "report.html").is_file()
    # --no-plots: a rerun (every cell already done, so nothing starts) leaves no figures or report behind.
    shutil.rmtree(out / "figures")
    (out / "report.md").unlink()
    run_cli("run", str(job_file), "--output", str(out), "--no-plots")
    assert not (out / "figures").exists() and not (out / "report.md").exists()


def test_submit_chooses_local_or_remote_from_the_run_settings(tmp_path, monkeypatch):
    """kvray/launch/submit.py: a dashboard URL or a cluster file goes through the Jobs API as a job file;
    anything else runs here. No Ray starts in this test: both paths are replaced."""
    import kvray.launch.jobs_api
    import kvray.sweep.driver
    from kvray.launch.submit import RunSettings, submit_job
    from kvray.plan.job import load_job

    assert not any(RunSettings(address=a).remote for a in ("local", "auto", "ray://10.0.0.1:10001"))
    assert RunSettings(address="http://head:8265").remote and RunSettings(cluster="cluster/a100.yaml").remote
    calls = []

    def fake_launch(job_file, output, address=None, cluster=None, extra_args=None, log=None, **_):
        calls.append(("launch", load_job(job_file).name, output, address, cluster, extra_args))
        return "SUCCEEDED", []

    def fake_run_job(job, output_dir=None, address="local", check_oom=True, progress=True, **_):
        calls.append(("run_job", job.name, output_dir, address, check_oom, progress))
        return kvray.sweep.driver.RunRecord(tmp_path / "here")

    monkeypatch.setattr(kvray.launch.jobs_api, "launch", fake_launch)
    monkeypatch.setattr(kvray.sweep.driver, "run_job", fake_run_job)
    job = exp1_job(Common(), 16, 4, [1, 2])
    remote = submit_job(job, RunSettings(address="https://head:8265", check_oom=False))
    assert remote.remote_status == "SUCCEEDED" and str(remote.output_dir) == "results/exp1-facebook--opt-1.3b"
    local = submit_job(job, RunSettings(output_dir=tmp_path / "out", address="auto", progress=False))
    assert local.remote_status is None and local.output_dir == tmp_path / "here"
    assert calls == [
        ("launch", job.name, "results/exp1-facebook--opt-1.3b", "https://head:8265", None, ["--no-check-oom"]),
        ("run_job", job.name, tmp_path / "out", "auto", True, False),
    ]
