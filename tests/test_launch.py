"""`kvray launch --address` against a real `ray start --head` on 127.0.0.1, through the Ray Jobs API.

Recent Ray turns token authentication on by default: the head writes ~/.ray/auth_token and the launcher
must send it, as it would for a user's cluster.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvray.sweep.launch import BEGIN, END, pack_dataset, ray_auth_headers, unpack_dataset

VENV_BIN = Path(sys.executable).parent
SIM_JOB = """
name: launch_smoke
models: [kvray/tiny-llama]
backends: [sim]
dtypes: [bf16]
weights: random
hardware: any
warmup: 0
repeats: 1
grid:
  prompt_toks: [64, 128]
  gen_toks: [8]
  concurrency: [1, 2]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real head node on 127.0.0.1, in its own process group so the test can stop exactly it."""
    gcs_port, dash_port = _free_port(), _free_port()
    # Every other port a head binds gets a free one too: the suite's own local Ray already holds the
    # defaults (the dashboard agent's 52365 above all), and an agent that cannot bind leaves the Jobs API
    # answering "No available agent to submit job" for ever.
    ports = {flag: _free_port() for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--metrics-export-port", "--runtime-env-agent-port", "--ray-client-server-port",
             "--node-manager-port", "--object-manager-port")}  # fmt: skip
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")  # noqa: SIM115 - lives as long as the head
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
           "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats", "--include-dashboard=true",
           *(f"{flag}={port}" for flag, port in ports.items())]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash_port}"
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/version", timeout=2, headers=ray_auth_headers()).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, "ray start --head exited"
        time.sleep(1)
    else:
        pytest.fail("the Ray head's dashboard did not come up within 120 s")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=3)  # then SIGKILL: a test head has nothing to drain
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def test_pack_and_unpack_round_trip(tmp_path):
    src = tmp_path / "src"
    (src / "figures").mkdir(parents=True)
    (src / "cells.jsonl").write_text('{"cell_id": "a"}\n')
    (src / "figures" / "fig1.svg").write_text("<svg/>")
    (src / ".tmp").write_text("half-written")
    logs = "sweep output\n" + pack_dataset(src) + "\nmore output\n"
    assert BEGIN in logs and END in logs
    names = unpack_dataset(logs, tmp_path / "dst")
    assert (tmp_path / "dst" / "cells.jsonl").read_text() == '{"cell_id": "a"}\n'
    assert (tmp_path / "dst" / "figures" / "fig1.svg").is_file() and ".tmp" not in names


def test_launch_against_a_real_head_returns_the_dataset(ray_head, tmp_path):
    job = tmp_path / "launch_smoke.yaml"
    job.write_text(SIM_JOB)
    out = tmp_path / "results"
    env = {**os.environ, "HF_TOKEN": "hf_secret_do_not_store"}
    run = subprocess.run(
        [sys.executable, "-m", "kvray.cli", "launch", "--address", ray_head, "--job", str(job), "--output", str(out),
         "--timeout-s", "300"],
        capture_output=True, text=True, env=env, timeout=400,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    from kvray.data.store import load_dataset

    cells, traces, manifest = load_dataset(out)
    assert len(cells) == 4 and set(cells["status"]) == {"ok"} and cells["cell_id"].is_unique
    assert cells["simulated"].all() and len(traces) == 6  # 1 + 2 requests at each of two prompt lengths
    # The token reached the job's environment but none of the files that came back.
    for f in out.rglob("*"):
        if f.is_file():
            assert b"hf_secret_do_not_store" not in f.read_bytes(), f


def test_launch_rejects_bad_targets(tmp_path):
    job = tmp_path / "j.yaml"
    job.write_text(SIM_JOB)
    both = subprocess.run(
        [sys.executable, "-m", "kvray.cli", "launch", "--job", str(job)], capture_output=True, text=True
    )
    assert both.returncode == 2 and "exactly one of" in both.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "kvray.cli", "launch", "--job", str(job), "--address", "127.0.0.1:8265"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "http" in bad.stderr
    cluster = tmp_path / "c.yaml"
    cluster.write_text("cluster_name: x\nprovider: {type: aws, region: us-west-2}\nkvray: {}\n")
    rejected = subprocess.run(
        [sys.executable, "-m", "kvray.cli", "launch", "--job", str(job), "--cluster", str(cluster)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert (
        rejected.returncode == 2 and "validator" in rejected.stderr and len(rejected.stderr.strip().splitlines()) == 1
    )


def test_submit_retries_only_while_the_job_agent_is_starting(monkeypatch):
    from kvray.sweep import preflight

    monkeypatch.setattr(preflight.time, "sleep", lambda s: None)

    class Head:
        calls = 0

        def submit_job(self, **kwargs):
            self.calls += 1
            if self.calls < 3:
                raise RuntimeError("Request failed with status code 500: No available agent to submit job")
            return "raysubmit_1"

    head = Head()
    assert preflight.submit_when_agent_ready(head, entrypoint="x") == "raysubmit_1" and head.calls == 3

    class Broken:
        calls = 0

        def submit_job(self, **kwargs):
            self.calls += 1
            raise RuntimeError("Request failed with status code 400: bad runtime_env")

    broken = Broken()
    with pytest.raises(RuntimeError, match="bad runtime_env"):
        preflight.submit_when_agent_ready(broken, entrypoint="x")
    assert broken.calls == 1


def _launch(ray_head, job, out, *extra):
    return subprocess.run(
        [sys.executable, "-m", "kvray.cli", "launch", "--address", ray_head, "--job", str(job), "--output", str(out),
         "--timeout-s", "300", "--no-plots", *extra],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip


def test_preflight_reads_the_clusters_python_packages_and_gpus(ray_head):
    from ray.job_submission import JobSubmissionClient

    from kvray.sweep.preflight import DEPENDENCIES, local_versions, probe, unmet

    report = probe(JobSubmissionClient(ray_head, headers=ray_auth_headers()))
    assert report.python[:2] == sys.version_info[:2]  # the head runs this virtualenv's Python
    assert report.packages == local_versions() and set(report.packages) == set(DEPENDENCIES)
    assert unmet(report) == {}
    cluster = report.cluster()  # the head was started with --num-cpus=2 --num-gpus=0
    assert cluster.cpus == 2 and cluster.gpus == 0 and cluster.gpus_by_type == {}


def test_a_gpu_type_the_cluster_lacks_is_refused_before_submitting(ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head, headers=ray_auth_headers())
    before = {j.submission_id for j in client.list_jobs() if not (j.metadata or {}).get("kvray_preflight")}
    job = tmp_path / "h100.yaml"
    job.write_text(SIM_JOB.replace("backends: [sim]", "backends: [hf]").replace("hardware: any", "hardware: H100"))
    run = _launch(ray_head, job, tmp_path / "out")
    assert run.returncode == 2, run.stderr[-2000:]
    assert "hardware H100 is not in this Ray cluster" in run.stderr and "no GPUs at all" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    after = {j.submission_id for j in client.list_jobs() if not (j.metadata or {}).get("kvray_preflight")}
    assert after == before, "a job was submitted"
    assert not (tmp_path / "out").exists()


def test_a_job_that_fails_on_the_cluster_shows_its_status_exit_code_and_last_lines(ray_head, tmp_path):
    job = tmp_path / "launch_smoke.yaml"
    job.write_text(SIM_JOB)
    # A clean local job whose remote `kvray run` fails: an option the remote command does not know.
    from kvray.sweep.launch import RemoteJobError, launch

    with pytest.raises(RemoteJobError) as failed:
        launch(str(job), str(tmp_path / "out"), address=ray_head, extra_args=["--no-such-option"], timeout_s=300)
    text = str(failed.value)
    assert "ended FAILED (exit code 2) without a dataset" in text, text
    assert "No such option: --no-such-option" in text and "  | " in text
    assert len(text.splitlines()) <= 17  # the block: one line, then at most 15 of the log's


def test_missing_light_dependencies_are_pinned_into_the_job_or_named_in_one_line():
    """The decision on a cluster report, here one whose Python lacks typer and has an old rich: the pins are
    this machine's versions (what the job was tested with); without provisioning, one line says what to
    install. A missing heavy dependency is never installed by kvray."""
    from kvray.errors import KvrayInputError
    from kvray.plan.job import job_from_dict
    from kvray.sweep.preflight import DEPENDENCIES, ClusterReport, local_versions, pip_packages

    mine = local_versions()
    packages = {**mine, "typer": None, "rich": "12.0.0"}
    report = ClusterReport(python=(3, 11, 9), packages=packages, nodes=[("10.0.0.1", "A100", 8.0, 96.0)])
    job = job_from_dict(json.loads(json.dumps({"name": "j", "models": ["kvray/tiny-llama"], "backends": ["hf"],
                                               "hardware": "A100", "grid": {"prompt_toks": [16], "gen_toks": [4]}})))  # fmt: skip
    assert pip_packages(report, job, provision=True) == [f"typer=={mine['typer']}", f"rich=={mine['rich']}"]
    with pytest.raises(KvrayInputError, match=r"lacks kvray's dependencies \(typer missing, rich 12.0.0\)") as exc:
        pip_packages(report, job, provision=False)
    assert f"pip install typer=={mine['typer']} rich=={mine['rich']}" in str(exc.value)
    no_torch = ClusterReport((3, 11, 9), {**mine, "torch": None}, [("10.0.0.1", "A100", 8.0, 96.0)])
    with pytest.raises(KvrayInputError, match="cannot install for it .torch missing"):
        pip_packages(no_torch, job, provision=True)
    old = ClusterReport((3, 9, 18), dict.fromkeys(DEPENDENCIES, "1.0"), [])
    with pytest.raises(KvrayInputError, match="Python 3.9.18; kvray needs 3.11"):
        pip_packages(old, job, provision=True)
