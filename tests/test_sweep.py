"""Sweeps on a real Ray (2 CPUs, 4 logical GPUs): every cell once, one model load per worker, faults survived."""

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import job_files
import pytest
from tiny_models import tiny_config, write_model_dir

from kvray.data.layout import CELLS_JSONL
from kvray.data.reader import read_results
from kvray.errors import KvrayInputError
from kvray.plan.job import job_from_dict
from kvray.plan.planner import plan_cells
from kvray.sweep import last_run, run_job, status_counts
from kvray.sweep.pool import WORKER_NAME_PREFIX
from kvray.sweep.workers import limit_memory


def synthetic_job(name, models=("kvray/tiny-llama",), **overrides):
    return job_files.synthetic_job(name, models=list(models), **overrides)


def jsonl_ids(out: Path) -> list[str]:
    lines = (out / CELLS_JSONL).read_bytes().splitlines()
    return [json.loads(line)["cell_id"] for line in lines if line.strip()]


def test_four_gpus_every_cell_once_and_one_load_per_model_per_worker(ray_session, tmp_path):
    job = synthetic_job("four", models=("kvray/tiny-llama", "gpt2"), options={"ttft_s": 0.05, "tpot_s": 0.05})
    out = run_job(job, tmp_path / "out", progress=False).output_dir
    planned = {c.cell_id for c in plan_cells(job)}
    ids = jsonl_ids(out)
    assert len(ids) == len(planned) == 18 and set(ids) == planned
    assert status_counts(out, job)["ok"] == 18
    run = last_run(out)
    workers = run["workers"]  # those that came up before the cells ran out (all four, unless the host is busy)
    gpus = [w["gpu_ids"][0] for w in workers]
    assert (
        run["workers_planned"] == 4 and len(workers) >= 2 and len(set(gpus)) == len(gpus) and set(gpus) <= set("0123")
    )
    assert all(n == 1 for w in workers for n in w["model_loads"].values())
    assert sum(w["cells_run"] for w in workers) == 18 and all(w["ended"] == "finished" for w in workers)
    loaded = {key.split("|")[0] for w in workers for key in w["model_loads"]}
    assert loaded == {"kvray/tiny-llama", "gpt2"}
    import pandas as pd

    cells = pd.read_parquet(out / "cells.parquet")
    assert len(cells) == 18 and cells["node_id"].notna().all() and set(cells["hardware"]) == {"cpu"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job"]["spec"]["name"] == "four" and manifest["kvray_version"]
    assert workers[0]["environment"]["python"]
    # Rerunning into the same folder finds nothing to do and writes nothing.
    run_job(job, out, progress=False)
    assert jsonl_ids(out) == ids and last_run(out)["cells_to_run"] == 0
    with pytest.raises(KvrayInputError, match="already holds results of this job"):
        run_job(job, out, resume=False, progress=False)


def test_oom_skips_only_cells_that_outgrow_it(ray_session, tmp_path):
    job = synthetic_job(
        "skips",
        workers=1,
        options={"ttft_s": 0.0, "tpot_s": 0.0, "oom_above_tokens": 200},
        grid={"prompt_toks": [8, 64], "gen_toks": [4], "concurrency": [1, 2, 4, 8]},
    )
    out = run_job(job, tmp_path / "out", progress=False).output_dir
    by_shape = {
        (r["cell"]["workload"]["requests"].__len__(), r["cell"]["workload"]["requests"][0]["prompt_toks"]): r
        for r in read_results(out)
    }
    assert len(by_shape) == 8
    assert by_shape[(4, 64)]["status"] == "oom"  # 4 × 68 tokens > 200
    assert by_shape[(8, 64)]["status"] == "skipped_after_oom"
    assert by_shape[(4, 64)]["cell_id"] in by_shape[(8, 64)]["reason"]
    assert by_shape[(8, 8)]["status"] == "ok"  # more requests but shorter: not skipped, and fits
    assert sum(r["status"] == "ok" for r in by_shape.values()) == 6


def test_hardware_missing_from_the_cluster_is_an_input_error(ray_session, tmp_path):
    job = synthetic_job("typed", hardware=["A100"])
    with pytest.raises(KvrayInputError, match=r"hardware A100 is not in this Ray cluster \(present: none\)"):
        run_job(job, tmp_path / "out", progress=False)


def test_a_cell_past_its_timeout_is_an_error_and_the_worker_is_replaced(ray_session, tmp_path):
    job = synthetic_job(
        "slow",
        workers=1,
        cell_timeout_s=3.0,
        options={"ttft_s": 0.0, "tpot_s": 0.05},
        # The slow cell (200 tokens: 10 s) needs the least memory, so it runs first; the quick ones (0.1 s)
        # run on the replacement, whose imports happen before it reports ready (not on a cell's clock).
        grid=[{"prompt_toks": [8], "gen_toks": [200]}, {"prompt_toks": [512, 1024], "gen_toks": [2]}],
    )
    out = run_job(job, tmp_path / "out", progress=False).output_dir
    rows = {r["cell"]["workload"]["requests"][0]["prompt_toks"]: r for r in read_results(out)}
    assert rows[8]["status"] == "error" and "timed out after 3 s" in rows[8]["reason"]
    assert rows[512]["status"] == rows[1024]["status"] == "ok"
    assert [w["ended"] for w in last_run(out)["workers"]] == ["replaced", "finished"]


def test_killed_worker_is_replaced_and_no_row_is_lost_or_doubled(ray_session, tmp_path):
    ray = ray_session
    job = synthetic_job(
        "kill",
        workers=2,
        # ~1 s a cell: after the kill ≥ 13 cells (≥ 6.5 s on the other worker) remain for a replacement to
        # share, longer than an actor takes to start on a loaded 2-core machine (0.4 s cells raced it there)
        # — with nothing left to do, a dead worker is (rightly) not replaced
        options={"ttft_s": 0.1, "tpot_s": 0.3},
        grid={"prompt_toks": [8, 16, 32, 64], "gen_toks": [4], "concurrency": [1, 2, 3, 4]},
    )
    out = tmp_path / "out"
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _run_catching(errors, job, out))
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and killed is None:
        if len(read_results(out)) >= 2:
            names = sorted(a for a in ray.util.list_named_actors() if a.startswith(WORKER_NAME_PREFIX))
            if names:
                killed = names[0]
                ray.kill(ray.get_actor(killed))
        time.sleep(0.05)
    thread.join(timeout=180)
    assert not thread.is_alive() and not errors, errors
    assert killed is not None
    planned = {c.cell_id for c in plan_cells(job)}
    ids = jsonl_ids(out)
    assert len(ids) == len(planned) == 16 and set(ids) == planned  # complete, no duplicates
    workers = last_run(out)["workers"]
    assert any(w["worker_id"] == killed and w["ended"] == "replaced" for w in workers)
    assert len(workers) == 3  # two slots, one replacement
    assert status_counts(out, job)["ok"] == 16  # the interrupted cell was retried and succeeded


def _run_catching(errors, job, out):
    try:
        run_job(job, out, progress=False)
    except BaseException as exc:  # surfaced by the test thread
        errors.append(exc)


def test_real_allocation_failure_is_an_oom_row_and_the_sweep_goes_on(ray_session, tmp_path):
    # Eager attention materialises 8 × 4 heads × 4096² fp32 scores (2 GiB): beyond a 1 GiB address-space cap.
    model = write_model_dir(
        tmp_path / "opt-eager", tiny_config("opt", max_position_embeddings=8192, attn_implementation="eager")
    )
    job = job_from_dict(
        {
            "name": "realoom",
            "models": [str(model)],
            "backends": ["hf"],
            "dtypes": ["fp32"],
            "device": "cpu",
            "workers": 1,
            "warmup": 0,
            "repeats": 1,
            "grid": [
                {"prompt_toks": [8], "gen_toks": [2], "concurrency": [1, 8]},
                {"prompt_toks": [4096], "gen_toks": [2, 3], "concurrency": [8]},
            ],
        }
    )
    out = run_job(
        job, tmp_path / "out", progress=False, check_oom=False, worker_setup=functools.partial(limit_memory, 2**30)
    ).output_dir
    rows = {
        (
            len(r["cell"]["workload"]["requests"]),
            r["cell"]["workload"]["requests"][0]["prompt_toks"],
            r["cell"]["workload"]["requests"][0]["gen_toks"],
        ): r
        for r in read_results(out)
    }
    assert rows[(8, 4096, 2)]["status"] == "oom", rows[(8, 4096, 2)]["reason"]
    assert "can't allocate memory" in rows[(8, 4096, 2)]["reason"]
    assert rows[(8, 4096, 3)]["status"] == "skipped_after_oom"
    assert rows[(1, 8, 2)]["status"] == "ok" and rows[(8, 8, 2)]["status"] == "ok"
    assert len(last_run(out)["workers"]) == 1  # the OOM did not take the worker down


DRIVER_JOB = """
name: resumable
models: [kvray/tiny-llama]
backends: [synthetic]
dtypes: [fp32]
warmup: 0
repeats: 1
options: {ttft_s: 0.1, tpot_s: 0.05}
grid:
  prompt_toks: [8, 16, 32, 64]
  gen_toks: [4]
  concurrency: [1, 2, 3]
"""


def settled_rows(out: Path) -> dict[str, str]:
    """Rows once nothing is writing any more (a worker can outlive its killed driver by a moment)."""
    rows, still = {}, 0.0
    deadline = time.monotonic() + 30
    while still < 2.0 and time.monotonic() < deadline:
        time.sleep(0.25)
        now = {r["cell_id"]: r["started_at"] for r in read_results(out)}
        still = still + 0.25 if now == rows else 0.0
        rows = now
    return rows


def kvray_cli(*args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "kvray.cli", *args], env=env, **kwargs)


def test_killed_driver_then_resume_runs_only_the_missing_cells(ray_session, tmp_path):
    job_file = tmp_path / "resumable.yaml"
    job_file.write_text(textwrap.dedent(DRIVER_JOB))
    out = tmp_path / "out"
    # Its own Ray (no GPUs: CPU workers), in its own session so the kill takes Ray's processes with it.
    first = kvray_cli(
        "run",
        str(job_file),
        "--output",
        str(out),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and first.poll() is None:
            if len(read_results(out)) >= 3:
                break
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read().decode()[-2000:] if first.stderr else ""
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    before = settled_rows(out)
    assert 3 <= len(before) < 12
    # The rerun joins the session's Ray by address (starting another would cost 10–20 s on 2 cores).
    address = ray_session.get_runtime_context().gcs_address
    second = kvray_cli(
        "run",
        str(job_file),
        "--output",
        str(out),
        "--resume",
        "--address",
        address,
        "--no-plots",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr[-2000:]
    ids = jsonl_ids(out)
    assert len(ids) == len(set(ids)) == 12
    after = {r["cell_id"]: r["started_at"] for r in read_results(out)}
    assert {k: after[k] for k in before} == before  # the first run's rows are untouched
    run = last_run(out)
    assert run["cells_already_done"] == len(before) and run["cells_to_run"] == 12 - len(before)
    assert run["rows_appended"] == 12 - len(before) and run["workers"][0]["name"] == "cpu"
    assert "ok" in stdout and "12 cells" in stdout and "already done" in stdout
