"""Faults survived, with real processes: Ctrl-C (once, twice), two runs into one folder, a full disk, a job
edited before its resume, asked-for hardware the cluster lacks, and credentials kept out of every output.

Each ``kvray run`` is a real ``python -m kvray.cli`` process. Runs that must own their Ray (a terminal Ctrl-C
reaches Ray's processes too; a cluster without GPUs) start one in their own session; the rest join the test
session's Ray by address, which saves 10–20 s of Ray start-up per run on 2 cores. Rows are counted from
cells.jsonl itself: every line must parse, and no cell_id may appear twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_fixtures import ray_session  # noqa: F401

from kvray.data.store import CELLS_JSONL, read_results
from kvray.plan.job import load_job
from kvray.plan.planner import plan_cells

SLOW_JOB = """
name: faults
models: [kvray/tiny-llama]
backends: [synthetic]
dtypes: [fp32]
warmup: 0
repeats: 1
options: {{ttft_s: 0.2, tpot_s: 0.05}}
grid:
  prompt_toks: [8, 16, 32, 64]
  gen_toks: [{gen}]
  concurrency: [1, 2, 3]
"""


def write_job(path: Path, gen: int = 8, **replace: str) -> Path:
    text = SLOW_JOB.format(gen=gen)
    for old, new in replace.items():
        text = text.replace(old, new)
    path.write_text(text)
    return path


def kvray_cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "kvray.cli", *args], env=env, text=True, **kwargs)


def jsonl_ids(out: Path) -> list[str]:
    """Every line of cells.jsonl parsed (a torn or garbage line fails the test): the cell ids in order."""
    lines = (out / CELLS_JSONL).read_bytes().splitlines()
    return [json.loads(line)["cell_id"] for line in lines if line.strip()]


def wait_rows(out: Path, proc: subprocess.Popen, n: int, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None and len(read_results(out)) < n:
        time.sleep(0.05)
    assert proc.poll() is None and len(read_results(out)) >= n, proc.stderr.read() if proc.stderr else ""


def session_address(ray) -> str:
    return ray.get_runtime_context().gcs_address


def test_ctrl_c_stops_writes_tables_says_how_to_resume_and_a_second_run_is_refused(ray_session, tmp_path):  # noqa: F811
    job_file = write_job(tmp_path / "faults.yaml")
    out = tmp_path / "out"
    planned = {c.cell_id for c in plan_cells(load_job(job_file))}
    # Its own Ray in its own session: a terminal's Ctrl-C reaches the whole process group, Ray's processes too.
    first = kvray_cli("run", str(job_file), "--output", str(out), "--no-plots", start_new_session=True,
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_rows(out, first, 2)
        lock = json.loads((out / ".kvray-run.lock").read_text())
        assert lock["pid"] == first.pid
        # A second run into the same folder refuses at once, with one line, and writes nothing.
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "kvray.cli", "run", str(job_file), "--output", str(out)],
                                capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
        assert second.returncode == 2 and time.monotonic() - t0 < 30, second.stderr
        assert (
            second.stderr.strip().splitlines()
            == [line for line in second.stderr.splitlines() if "in use by another kvray run" in line]
            and f"pid {first.pid}" in second.stderr
        )
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C
        _, stderr = first.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "resume with: kvray run" in last and str(out) in last, stderr[-3000:]
    ids = jsonl_ids(out)
    assert 2 <= len(ids) < len(planned) and len(set(ids)) == len(ids)
    import pandas as pd

    assert sorted(pd.read_parquet(out / "cells.parquet")["cell_id"]) == sorted(ids)  # the tables were written
    assert not (out / ".kvray-run.lock").exists()
    time.sleep(2.0)
    left = subprocess.run(["pgrep", "-s", str(first.pid)], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes of the interrupted run still alive: {left}"  # workers and Ray stopped
    # Resume: only the missing cells run; the first run's rows are untouched.
    before = {r["cell_id"]: r["started_at"] for r in read_results(out)}
    resumed = subprocess.run(
        [sys.executable, "-m", "kvray.cli", "run", str(job_file), "--output", str(out), "--no-plots",
         "--address", session_address(ray_session)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ids = jsonl_ids(out)
    assert set(ids) == planned and len(ids) == len(planned)  # nothing lost, nothing doubled
    after = {r["cell_id"]: r["started_at"] for r in read_results(out)}
    assert {k: after[k] for k in before} == before


def test_a_second_ctrl_c_quits_at_once_and_keeps_every_row(ray_session, tmp_path):  # noqa: F811
    job_file = write_job(tmp_path / "faults.yaml")
    out = tmp_path / "out"
    proc = kvray_cli("run", str(job_file), "--output", str(out), "--no-plots", "--address",
                     session_address(ray_session), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_rows(out, proc, 2)
        os.kill(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        _ = deadline
        time.sleep(0.3)
        t0 = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        quit_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert quit_s < 10.0, quit_s
    assert "quit at once" in stderr or "resume with" in stderr, stderr[-3000:]
    ids = jsonl_ids(out)  # every line parses: nothing torn
    assert len(ids) >= 2 and len(set(ids)) == len(ids)


def test_disk_full_stops_with_one_line_and_the_rerun_resumes_without_duplicates(ray_session, tmp_path):  # noqa: F811
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        job_file = write_job(tmp_path / "faults.yaml", gen=200, **{"ttft_s: 0.2, tpot_s: 0.05": "ttft_s: 0.01, "
                                                                   "tpot_s: 0.001"})  # fmt: skip
        out = disk / "out"
        planned = {c.cell_id for c in plan_cells(load_job(job_file))}
        args = [sys.executable, "-m", "kvray.cli", "run", str(job_file), "--output", str(out), "--no-plots",
                "--address", session_address(ray_session)]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        full = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert full.returncode == 1, full.stderr[-3000:]
        assert "no space left" in full.stderr.lower() and "Traceback" not in full.stderr, full.stderr[-3000:]
        ids = jsonl_ids(out)  # every line whole
        assert len(ids) < len(planned) and len(set(ids)) == len(ids)
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)  # space freed
        again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        ids_after = jsonl_ids(out)
        assert set(ids_after) == planned and len(ids_after) == len(planned) and ids_after[: len(ids)] == ids
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_an_edited_job_says_which_cells_are_new_and_gone(ray_session, tmp_path):  # noqa: F811
    job_file = write_job(tmp_path / "faults.yaml", gen=2, **{"[8, 16, 32, 64]": "[8]", "[1, 2, 3]": "[1, 2]"})
    out = tmp_path / "out"
    args = [sys.executable, "-m", "kvray.cli", "run", str(job_file), "--output", str(out), "--no-plots",
            "--address", session_address(ray_session)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0 and "job changed" not in first.stderr, first.stderr[-3000:]
    write_job(job_file, gen=2, **{"[8, 16, 32, 64]": "[8]", "[1, 2, 3]": "[2, 4]"})  # c=1 gone, c=4 new
    second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    note = [line for line in second.stderr.splitlines() if "job changed" in line]
    assert len(note) == 1 and "1 new cell(s)" in note[0] and "1 cell(s) gone" in note[0], second.stderr
    assert "c=4" in note[0] or "4" in note[0]
    manifest = json.loads((out / "manifest.json").read_text())
    hashes = [run["job_sha256"] for run in manifest["runs"]]
    assert len(hashes) == 2 and hashes[0] != hashes[1]  # which job wrote which rows stays on record
    ids = jsonl_ids(out)
    assert len(ids) == len(set(ids)) == 3


def test_requested_gpu_on_a_cluster_without_gpus_stops_before_anything_starts(tmp_path):
    """#12 item 8: hardware: [A100] on a local Ray with no GPUs used to run on a CPU worker and record
    hardware_requested A100 beside hardware cpu. Now: one line naming what the cluster has, exit 2, no folder."""
    job_file = write_job(tmp_path / "faults.yaml", **{"warmup: 0": "warmup: 0\nhardware: [A100]"})
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "kvray.cli", "run", str(job_file), "--output", str(out)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=300, start_new_session=True)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "hardware A100 is not in this Ray cluster (present: none)" in lines[0] and "no GPUs at all" in lines[0]
    assert not out.exists()


def test_credentials_never_reach_any_output(tmp_path):
    """A bench that used a secret API key, then plot and report: no byte of the secret in any file written,
    nor in what the commands print."""
    from servers_fixtures import FakeOpenAIServer, build_tiny_model_dir

    secret = "sk-kvray-test-5f1c0d9e7b"
    model_dir = build_tiny_model_dir(tmp_path / "models")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KVRAY_TEST_KEY": secret, "HF_TOKEN": "hf_secret_token_42"}
    printed = ""
    with FakeOpenAIServer(expected_key=secret) as fake:
        for args in (
            ["bench", "--model", str(model_dir), "--backend", "openai", "--base-url", f"{fake.url}/auth",
             "--api-key-env", "KVRAY_TEST_KEY", "--dtype", "fp32", "--prompt-toks", "8", "--gen-toks", "4",
             "--repeats", "1", "--warmup", "0", "--output", str(out)],
            ["plot", str(out)],
            ["report", str(out)],
        ):  # fmt: skip
            done = subprocess.run([sys.executable, "-m", "kvray.cli", *args], capture_output=True, env=env,
                                  timeout=300)  # fmt: skip
            assert done.returncode == 0, done.stderr.decode()[-3000:]
            printed += done.stdout.decode() + done.stderr.decode()
        assert fake.seen_headers and fake.seen_headers[-1].get("Authorization") == f"Bearer {secret}"  # it was used
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"cells.jsonl", "cells.parquet", "report.md", "report.html"} <= {p.name for p in files}
    for path in files:
        data = path.read_bytes()
        assert secret.encode() not in data and b"hf_secret_token_42" not in data, path
    assert secret not in printed and "hf_secret_token_42" not in printed
    assert "KVRAY_TEST_KEY" in (out / "cells.jsonl").read_text()  # the variable's name is recorded, not its value


def test_kvray_binds_its_servers_and_dashboard_to_loopback():
    """Ray's dashboard (``--dashboard``) and the servers kvray starts listen on 127.0.0.1 only."""
    import inspect

    from kvray.backends import vllm
    from kvray.servers import process
    from kvray.sweep import ray_env

    assert 'dashboard_host="127.0.0.1"' in inspect.getsource(ray_env.connect)
    assert '"--host", "127.0.0.1"' in inspect.getsource(vllm)
    assert inspect.signature(process.transformers_serve_command).parameters["host"].default == "127.0.0.1"
