"""Faults survived, with real processes: Ctrl-C (once, twice), two runs into one folder, a full disk, a job
edited before its resume, asked-for hardware the cluster lacks, a server that stalls or answers slowly
(per-request timeouts), a server killed mid-cell, a collector killed mid-sweep, and credentials kept out of
every output.

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

from kvray.data.layout import CELLS_JSONL
from kvray.data.reader import read_results
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


def as_from_a_terminal() -> None:
    """SIGINT as a terminal leaves it: pytest started in the background (``pytest &``) ignores SIGINT, and a
    child inherits that, so Python would never install its KeyboardInterrupt handler and Ctrl-C would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kvray_cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "kvray.cli", *args], env=env, text=True, preexec_fn=as_from_a_terminal, **kwargs
    )


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


def test_ctrl_c_stops_writes_tables_says_how_to_resume_and_a_second_run_is_refused(ray_session, tmp_path):
    job_file = write_job(tmp_path / "faults.yaml")
    out = tmp_path / "out"
    planned = {c.cell_id for c in plan_cells(load_job(job_file))}
    # Its own Ray in its own session: a terminal's Ctrl-C reaches the whole process group, Ray's processes too.
    first = kvray_cli(
        "run",
        str(job_file),
        "--output",
        str(out),
        "--no-plots",
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_rows(out, first, 2)
        lock = json.loads((out / ".kvray-run.lock").read_text())
        assert lock["pid"] == first.pid
        # A second run into the same folder refuses at once, with one line, and writes nothing.
        t0 = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "kvray.cli", "run", str(job_file), "--output", str(out)],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
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
        [
            sys.executable,
            "-m",
            "kvray.cli",
            "run",
            str(job_file),
            "--output",
            str(out),
            "--no-plots",
            "--address",
            session_address(ray_session),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ids = jsonl_ids(out)
    assert set(ids) == planned and len(ids) == len(planned)  # nothing lost, nothing doubled
    after = {r["cell_id"]: r["started_at"] for r in read_results(out)}
    assert {k: after[k] for k in before} == before


def test_a_second_ctrl_c_quits_at_once_and_keeps_every_row(ray_session, tmp_path):
    job_file = write_job(tmp_path / "faults.yaml")
    out = tmp_path / "out"
    proc = kvray_cli(
        "run",
        str(job_file),
        "--output",
        str(out),
        "--no-plots",
        "--address",
        session_address(ray_session),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
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


def test_disk_full_stops_with_one_line_and_the_rerun_resumes_without_duplicates(ray_session, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        job_file = write_job(
            tmp_path / "faults.yaml", gen=200, **{"ttft_s: 0.2, tpot_s: 0.05": "ttft_s: 0.01, tpot_s: 0.001"}
        )
        out = disk / "out"
        planned = {c.cell_id for c in plan_cells(load_job(job_file))}
        args = [
            sys.executable,
            "-m",
            "kvray.cli",
            "run",
            str(job_file),
            "--output",
            str(out),
            "--no-plots",
            "--address",
            session_address(ray_session),
        ]
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


def test_an_edited_job_says_which_cells_are_new_and_gone(ray_session, tmp_path):
    job_file = write_job(tmp_path / "faults.yaml", gen=2, **{"[8, 16, 32, 64]": "[8]", "[1, 2, 3]": "[1, 2]"})
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "kvray.cli",
        "run",
        str(job_file),
        "--output",
        str(out),
        "--no-plots",
        "--address",
        session_address(ray_session),
    ]
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


@pytest.mark.integration  # a `kvray` child process
def test_requested_gpu_on_a_cluster_without_gpus_stops_before_anything_starts(tmp_path):
    """#12 item 8: hardware: [A100] on a local Ray with no GPUs used to run on a CPU worker and record
    hardware_requested A100 beside hardware cpu. Now: one line naming what the cluster has, exit 2, no folder."""
    job_file = write_job(tmp_path / "faults.yaml", **{"warmup: 0": "warmup: 0\nhardware: [A100]"})
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "kvray.cli", "run", str(job_file), "--output", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
        start_new_session=True,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "hardware A100 is not in this Ray cluster (present: none)" in lines[0] and "no GPUs at all" in lines[0]
    assert not out.exists()


@pytest.mark.integration  # a `kvray` child process
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
            [
                "bench",
                "--model",
                str(model_dir),
                "--backend",
                "openai",
                "--base-url",
                f"{fake.url}/auth",
                "--api-key-env",
                "KVRAY_TEST_KEY",
                "--dtype",
                "fp32",
                "--prompt-toks",
                "8",
                "--gen-toks",
                "4",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--output",
                str(out),
            ],
            ["plot", str(out)],
            ["report", str(out)],
        ):
            done = subprocess.run([sys.executable, "-m", "kvray.cli", *args], capture_output=True, env=env, timeout=300)
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
    import re

    from kvray.backends import vllm
    from kvray.servers import process
    from kvray.sweep import ray_env

    assert 'dashboard_host="127.0.0.1"' in inspect.getsource(ray_env.connect)
    assert re.search(r'"--host",\s*"127\.0\.0\.1"', inspect.getsource(vllm))
    assert inspect.signature(process.transformers_serve_command).parameters["host"].default == "127.0.0.1"


def _http_cell(model_dir: Path, url: str, n: int, gen: int, timeout_s: float):
    from kvray.spec import Cell, Workload, make_options

    return Cell(
        model=str(model_dir),
        workload=Workload.uniform(n, 8, gen),
        backend="openai",
        dtype="fp32",
        warmup=0,
        repeats=1,
        options=make_options(base_url=url, timeout_s=timeout_s),
    )


def test_a_stalled_server_times_out_each_request_and_the_row_counts_them(tmp_path):
    """A server that accepts and never answers: every request ends at its own timeout (per request, not per
    cell), its trace says so, and the row's requests_failed / failure_rate count exactly the stalled ones."""
    from servers_fixtures import FakeOpenAIServer, build_tiny_model_dir

    from kvray.backends.http import OpenAIBackend
    from kvray.data.writer import DatasetWriter
    from kvray.runner.run import run_cell

    model_dir = build_tiny_model_dir(tmp_path / "models")
    backend = OpenAIBackend()
    timeout_s = 1.0
    try:
        with FakeOpenAIServer() as fake:
            backend.load(_http_cell(model_dir, f"{fake.url}/ok", 1, 4, timeout_s))  # tokenizer loaded off the clock
            every = _http_cell(model_dir, f"{fake.url}/stall", 3, 4, timeout_s)  # each request stalls
            started = time.monotonic()
            result = run_cell(backend, every)
            took_s = time.monotonic() - started
            assert fake.stalled == 3
            assert result.status == "error" and took_s < timeout_s + 5, (result.status, took_s)
            assert [t.status for t in result.traces] == ["error"] * 3
            assert all(t.error == "timeout after 1 s (TimeoutError)" for t in result.traces), result.traces
            # each request's own clock: it ended at its timeout after it was sent, not at a cell-wide deadline
            assert all(timeout_s <= t.end_s - t.start_s < timeout_s + 3 for t in result.traces)
            assert result.metrics["requests_failed"] == 3 and result.metrics["failure_rate"] == 1.0

            fake.streamed = fake.stalled = 0
            mix = _http_cell(model_dir, f"{fake.url}/stall2", 4, 4, timeout_s)  # the 2nd and 4th to arrive stall
            started = time.monotonic()
            result = run_cell(backend, mix)
            took_s = time.monotonic() - started
            assert fake.streamed == 4 and fake.stalled == 2
    finally:
        backend.close()
    assert result.status == "partial" and took_s < timeout_s + 5, (result.status, took_s)
    assert result.reason == "2 of 4 requests failed: timeout after 1 s (TimeoutError)"
    assert sorted(t.status for t in result.traces) == ["error", "error", "ok", "ok"]
    assert all(t.output_toks == 4 for t in result.traces if t.status == "ok")
    assert all(t.error.startswith("timeout after 1 s") and t.output_toks == 0 for t in result.traces if t.error)
    DatasetWriter(tmp_path / "out", tables=False).append(result)
    (row,) = read_results(tmp_path / "out")
    assert row["status"] == "partial"
    assert row["metrics"]["requests_failed"] == 2 and row["metrics"]["failure_rate"] == 0.5
    assert row["metrics"]["requests_ok"] == 2 and row["metrics"]["ttft_s_n"] == 2  # percentiles pool the 2 ok


def test_a_slow_server_is_measured_and_times_out_per_request_keeping_the_tokens_it_got(tmp_path):
    """A server that answers, slowly (a line every SLOW_GAP_S): with room it is a slow but ok measurement;
    with a timeout shorter than the stream each request is an error that keeps the tokens that arrived."""
    from servers_fixtures import SLOW_GAP_S, FakeOpenAIServer, build_tiny_model_dir

    from kvray.backends.http import OpenAIBackend
    from kvray.runner.run import run_cell

    model_dir = build_tiny_model_dir(tmp_path / "models")
    backend = OpenAIBackend()
    try:
        with FakeOpenAIServer() as fake:
            backend.load(_http_cell(model_dir, f"{fake.url}/ok", 1, 4, 30.0))
            # 4 tokens: 3 token lines, usage and [DONE], each followed by a SLOW_GAP_S pause
            roomy = run_cell(backend, _http_cell(model_dir, f"{fake.url}/slow", 2, 4, 30.0))
            started = time.monotonic()
            short = run_cell(backend, _http_cell(model_dir, f"{fake.url}/slow", 2, 4, 0.7))
            took_s = time.monotonic() - started
    finally:
        backend.close()
    assert roomy.status == "ok" and [t.output_toks for t in roomy.traces] == [4, 4]
    assert all(t.end_s - t.start_s >= 4 * SLOW_GAP_S - 0.05 for t in roomy.traces)  # [DONE] comes after 4 gaps
    assert short.status == "error" and took_s < 0.7 + 5, took_s
    for t in short.traces:
        assert t.error == "timeout after 0.7 s (TimeoutError)"
        assert 2 <= t.output_toks < 4, t  # the first chunk (2 tokens) at once, the 4th token not before 2 gaps
        assert t.token_times_s[0] < SLOW_GAP_S  # kept with its arrival time


def test_a_killed_collector_stops_the_sweep_with_one_line_and_the_rerun_completes_it(ray_session, tmp_path):
    """ray.kill of the collector (the one writer of the folder) mid-sweep: the sweep stops with CollectorLost
    saying so, no worker of it is left, cells.jsonl is whole lines with no cell twice, and a rerun completes
    the job with every planned cell exactly once."""
    import threading

    from kvray.sweep.driver import COLLECTOR_NAME_PREFIX, WORKER_NAME_PREFIX, CollectorLost, run_job

    ray = ray_session
    job = load_job(write_job(tmp_path / "faults.yaml"))  # 12 synthetic cells of ~0.5 s
    planned = {c.cell_id for c in plan_cells(job)}
    out = tmp_path / "out"
    errors: list[BaseException] = []

    def sweep() -> None:
        try:
            run_job(job, out, progress=False)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=sweep)
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and killed is None and thread.is_alive():
        if (out / CELLS_JSONL).is_file() and len(read_results(out)) >= 2:
            names = [a for a in ray.util.list_named_actors() if a.startswith(COLLECTOR_NAME_PREFIX)]
            if names:
                killed = names[0]
                ray.kill(ray.get_actor(killed), no_restart=True)
        time.sleep(0.05)
    killed_at = time.monotonic()
    thread.join(timeout=60)
    stopped_s = time.monotonic() - killed_at
    assert killed is not None and not thread.is_alive(), "the collector was never killed or the sweep hung"
    assert len(errors) == 1 and isinstance(errors[0], CollectorLost), errors
    message = str(errors[0])
    assert "collector" in message and "died mid-sweep" in message and "rerun the same command" in message
    assert "\n" not in message and stopped_s < 30, stopped_s
    sweep_id = killed.removeprefix(COLLECTOR_NAME_PREFIX)
    left = [a for a in ray.util.list_named_actors() if a.startswith(f"{WORKER_NAME_PREFIX}-{sweep_id}")]
    assert not left, left  # every worker of the stopped sweep was killed
    first = jsonl_ids(out)
    assert 2 <= len(first) < len(planned) and len(set(first)) == len(first) and set(first) <= planned
    assert (out / "cells.parquet").is_file()  # tables rebuilt from cells.jsonl by the driver
    assert not (out / ".kvray-run.lock").exists()

    run_job(job, out, progress=False)  # the rerun: only the cells without a row
    ids = jsonl_ids(out)
    assert ids[: len(first)] == first  # the first run's rows untouched
    assert len(ids) == len(planned) == 12 and set(ids) == planned  # none lost, none twice


@pytest.mark.integration
def test_a_server_killed_mid_cell_ends_the_cell_with_the_reason_at_once(tmp_path):
    """kill -9 of a real ``transformers serve`` while a cell streams from it: every request in flight is an
    error saying the connection ended (not a wait for its 60 s timeout), and the cell ends within seconds."""
    import threading

    from servers_fixtures import build_tiny_model_dir, start_transformers_serve

    from kvray.backends.http import OpenAIBackend
    from kvray.runner.run import run_cell

    model_dir = build_tiny_model_dir(tmp_path / "models")
    server = start_transformers_serve(model_dir, continuous_batching=True)
    backend = OpenAIBackend()
    kill_after_s, timeout_s = 1.5, 60.0
    try:
        warm = run_cell(backend, _http_cell(model_dir, server.base_url, 1, 4, timeout_s))  # loads, probes flavor
        assert warm.status == "ok", warm.reason
        pgid = server.proc.pid  # the server's own session: its whole group, as kill -9 of a crashed server
        timer = threading.Timer(kill_after_s, lambda: os.killpg(pgid, signal.SIGKILL))
        started = time.monotonic()
        timer.start()
        result = run_cell(backend, _http_cell(model_dir, server.base_url, 2, 2000, timeout_s))
        took_s = time.monotonic() - started
        timer.join()
    finally:
        backend.close()
        server.stop(grace_s=2)
    assert result.status == "error" and took_s < kill_after_s + 10, (result.status, took_s)
    assert [t.status for t in result.traces] == ["error", "error"]
    for t in result.traces:  # the stream cut (mid-body) or, for one not yet sent, the connection refused
        assert t.error.startswith(("malformed stream", "connection refused", "connect error")), t.error
        assert t.output_toks < 2000
