"""The sweep without Ray (``run_job(..., address="inprocess")``): the same planner, scheduler, worker and
collector as on Ray, in this process — every cell once, OOM skips, resume, the manifest — with Ray unimportable.

Expected values come from the job's own shape (cells planned by hand below) and the synthetic backend's
injected schedule, never from the runner."""

from __future__ import annotations

import json
import sys

import pytest
from job_files import synthetic_job

from kvray.data.layout import CELLS_JSONL
from kvray.data.reader import read_results
from kvray.errors import KvrayInputError
from kvray.plan.job import job_from_dict
from kvray.sweep import last_run, run_job, status_counts


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """``import ray`` fails for the whole test: the in-process runner must never need it."""
    monkeypatch.setitem(sys.modules, "ray", None)


def jsonl_ids(out):
    return [json.loads(line)["cell_id"] for line in (out / CELLS_JSONL).read_bytes().splitlines() if line.strip()]


def test_every_cell_once_one_model_load_and_resume_writes_nothing(tmp_path):
    job = synthetic_job("inproc", options={"ttft_s": 0.02, "tpot_s": 0.005})
    record = run_job(job, tmp_path / "out", address="inprocess", progress=False)
    out = record.output_dir
    assert out == tmp_path / "out" and record.outcome == "finished"
    assert record.run == last_run(out)  # what run_job returns is the manifest's record of this run
    ids = jsonl_ids(out)
    assert len(ids) == len(set(ids)) == 9  # 3 prompt lengths × 3 concurrencies
    assert status_counts(out, job)["ok"] == 9
    run = last_run(out)
    assert run["address"] == "inprocess" and run["ray_version"] is None and run["outcome"] == "finished"
    assert run["statuses_this_run"] == {"ok": 9} and run["cells_to_run"] == 9
    (worker,) = run["workers"]
    assert worker["cells_run"] == 9 and list(worker["model_loads"].values()) == [1]
    rows = read_results(out)
    # the synthetic engine's injected TTFT (20 ms) is a floor every request's TTFT sits on: sleeps only overshoot
    assert all(r["metrics"]["ttft_s_p50"] >= 0.02 for r in rows)
    assert all(r["hardware"]["node_id"] == "this process" for r in rows)
    import pandas as pd

    assert len(pd.read_parquet(out / "cells.parquet")) == 9  # the tables are written at the end, as on Ray
    rerun = run_job(job, out, address="inprocess", progress=False)  # a rerun finds nothing to do
    assert jsonl_ids(out) == ids and rerun.run["cells_to_run"] == 0 and rerun.run["cells_already_done"] == 9
    with pytest.raises(KvrayInputError, match="already holds results of this job"):
        run_job(job, out, address="inprocess", resume=False, progress=False)


def test_the_scheduler_policy_holds_oom_then_skips_only_cells_that_outgrow_it(tmp_path):
    job = synthetic_job(
        "skips",
        options={"ttft_s": 0.0, "tpot_s": 0.0, "oom_above_tokens": 200},
        grid={"prompt_toks": [8, 64], "gen_toks": [4], "concurrency": [1, 2, 4, 8]},
    )
    out = run_job(job, tmp_path / "out", address="inprocess", progress=False).output_dir
    by_shape = {
        (len(r["cell"]["workload"]["requests"]), r["cell"]["workload"]["requests"][0]["prompt_toks"]): r
        for r in read_results(out)
    }
    assert len(by_shape) == 8
    assert by_shape[(4, 64)]["status"] == "oom"  # 4 × (64 + 4) = 272 tokens > 200
    assert by_shape[(8, 64)]["status"] == "skipped_after_oom"  # never run: it needs more than the OOM cell
    assert by_shape[(8, 8)]["status"] == "ok"  # 8 × 12 = 96 tokens: more requests but fits, not skipped
    assert sum(r["status"] == "ok" for r in by_shape.values()) == 6


def test_a_simulated_sweep_runs_here_in_seconds(tmp_path):
    job = job_from_dict(
        {
            "name": "sim",
            "models": ["kvray/tiny-llama"],
            "backends": ["sim"],
            "dtypes": ["bf16"],
            "warmup": 0,
            "repeats": 1,
            "grid": {"prompt_toks": [64, 128], "gen_toks": [8], "concurrency": [1, 2]},
        }
    )
    out = run_job(job, tmp_path / "out", address="inprocess", progress=False).output_dir
    assert status_counts(out, job)["ok"] == 4 and last_run(out)["address"] == "inprocess"


def test_hardware_this_machine_lacks_is_one_line_before_anything_runs(tmp_path):
    job = synthetic_job("typed", hardware=["A100"])
    with pytest.raises(KvrayInputError, match=r"hardware A100 is not in this machine \(--address inprocess\)"):
        run_job(job, tmp_path / "out", address="inprocess", progress=False)
    assert not (tmp_path / "out").exists()  # a refused run leaves no folder behind
