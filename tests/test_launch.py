"""`kvray launch --address` against a real `ray start --head` on 127.0.0.1, through the Ray Jobs API.

Recent Ray turns token authentication on by default: the head writes ~/.ray/auth_token and the launcher
must send it, as it would for a user's cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from ray_fixtures import SIM_JOB

from kvray.launch.jobs_api import ray_auth_headers

# ``ray_head`` (tests/ray_fixtures.py): the session's head on 127.0.0.1, this virtualenv's Python, 2 CPUs, no GPU


def test_pack_and_unpack_round_trip(tmp_path):
    from kvray.launch.transfer import pack, unpack

    src = tmp_path / "src"
    (src / "figures").mkdir(parents=True)
    (src / "cells.jsonl").write_text('{"cell_id": "a"}\n')
    (src / "figures" / "fig1.svg").write_text("<svg/>")
    (src / ".tmp").write_text("half-written")
    assert pack(src, tmp_path / "d.tar.gz") == 2  # two files; the hidden temp file stays behind
    names = unpack(tmp_path / "d.tar.gz", tmp_path / "dst")
    assert (tmp_path / "dst" / "cells.jsonl").read_text() == '{"cell_id": "a"}\n'
    assert (tmp_path / "dst" / "figures" / "fig1.svg").is_file() and ".tmp" not in names


def _client(ray_head) -> str:
    return f"ray://127.0.0.1:{ray_head.ports['--ray-client-server-port']}"


def test_a_200_mb_result_comes_home_through_ray_intact(ray_head, tmp_path):
    """A job on the head writes 200 MiB of incompressible files (the size of a large sweep's folder) and hands
    them to a detached actor; the launcher's fetch pulls them over Ray Client in 8 MiB chunks. Every file's
    SHA-256 on the cluster's side (printed by the job) equals the one of the file that arrived, and the actor
    is gone afterwards."""
    import hashlib

    from ray.job_submission import JobStatus, JobSubmissionClient

    from kvray.launch.jobs_api import job_runtime_env, new_holder_name
    from kvray.launch.preflight import submit_when_agent_ready
    from kvray.launch.transfer import Held, fetch

    make = (
        "import hashlib, os, json; os.makedirs('big/parts', exist_ok=True); sums = {}\n"
        "for i in range(25):\n"
        "    name = f'big/parts/part-{i:02d}.bin' if i else 'big/cells.jsonl'\n"
        "    data = os.urandom(8 * 2**20)\n"
        "    open(name, 'wb').write(data); sums[name[4:]] = hashlib.sha256(data).hexdigest()\n"
        "print('SUMS ' + json.dumps(sums), flush=True)\n"
    )
    (tmp_path / "make.py").write_text(make)
    holder = new_holder_name()
    client = JobSubmissionClient(ray_head, headers=ray_auth_headers())
    env = {**job_runtime_env([]), "working_dir": str(tmp_path)}
    job_id = submit_when_agent_ready(
        client, entrypoint=f"python make.py && python -m kvray.launch.transfer hold big {holder}", runtime_env=env
    )
    deadline = time.monotonic() + 300
    while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
    sums = json.loads(next(ln for ln in logs.splitlines() if ln.startswith("SUMS "))[5:])
    held = Held.from_logs(logs)
    assert held is not None and held.files == 25 and held.size_bytes > 200 * 10**6 and held.chunks >= 25
    started = time.monotonic()
    names = fetch(_client(ray_head), held, tmp_path / "home")
    took_s = time.monotonic() - started
    got = {
        str(p.relative_to(tmp_path / "home")): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (tmp_path / "home").rglob("*")
        if p.is_file()
    }
    assert got == sums and len(got) == 25, (sorted(got), sorted(sums))
    assert "cells.jsonl" in names
    print(f"200 MiB home in {took_s:.1f} s")
    import httpx

    for _ in range(50):  # the actor ends itself once released (the State API, over the dashboard)
        answer = httpx.get(
            f"{ray_head}/api/v0/actors",
            headers=ray_auth_headers(),
            timeout=10,
            params={"filter_keys": "name", "filter_predicates": "=", "filter_values": held.actor},
        )
        states = [a["state"] for a in answer.json()["data"]["result"]["result"]]
        if states == ["DEAD"]:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"{held.actor} still holds the dataset after the fetch: {states}")


def test_a_dataset_that_does_not_add_up_is_not_unpacked(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from kvray.launch.jobs_api import job_runtime_env, new_holder_name
    from kvray.launch.preflight import submit_when_agent_ready
    from kvray.launch.transfer import Held, fetch

    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "cells.jsonl").write_text('{"cell_id": "a"}\n')
    holder = new_holder_name()
    client = JobSubmissionClient(ray_head, headers=ray_auth_headers())
    job_id = submit_when_agent_ready(
        client,
        entrypoint=f"python -m kvray.launch.transfer hold small {holder} 60",
        runtime_env={**job_runtime_env([]), "working_dir": str(tmp_path)},
    )
    while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(1)
    held = Held.from_logs(client.get_job_logs(job_id))
    assert held is not None
    forged = Held(held.actor, held.size_bytes, "0" * 64, held.chunks, held.files)
    with pytest.raises(ValueError, match="does not add up"):
        fetch(_client(ray_head), forged, tmp_path / "home")
    assert not (tmp_path / "home").exists()


def test_launch_against_a_real_head_returns_the_dataset(ray_head, tmp_path):
    job = tmp_path / "launch_smoke.yaml"
    job.write_text(SIM_JOB)
    out = tmp_path / "results"
    env = {**os.environ, "HF_TOKEN": "hf_secret_do_not_store"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvray.cli",
            "launch",
            "--address",
            ray_head,
            "--job",
            str(job),
            "--output",
            str(out),
            "--timeout-s",
            "300",
            "--ray-client-port",
            str(ray_head.ports["--ray-client-server-port"]),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "dataset home over Ray Client" in run.stdout and "SHA-256 checked" in run.stdout
    from kvray.data.reader import load_dataset

    cells, traces, manifest = load_dataset(out)
    assert len(cells) == 4 and set(cells["status"]) == {"ok"} and cells["cell_id"].is_unique
    assert cells["simulated"].all() and len(traces) == 6  # 1 + 2 requests at each of two prompt lengths
    # The token reached the job's environment but none of the files that came back.
    for f in out.rglob("*"):
        if f.is_file():
            assert b"hf_secret_do_not_store" not in f.read_bytes(), f


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
def test_launch_rejects_bad_targets(tmp_path):
    job = tmp_path / "j.yaml"
    job.write_text(SIM_JOB)
    both = subprocess.run(
        [sys.executable, "-m", "kvray.cli", "launch", "--job", str(job)], capture_output=True, text=True
    )
    assert both.returncode == 2 and "exactly one of" in both.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "kvray.cli", "launch", "--job", str(job), "--address", "127.0.0.1:8265"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "http" in bad.stderr
    cluster = tmp_path / "c.yaml"
    cluster.write_text("cluster_name: x\nprovider: {type: aws, region: us-west-2}\nkvray: {}\n")
    rejected = subprocess.run(
        [sys.executable, "-m", "kvray.cli", "launch", "--job", str(job), "--cluster", str(cluster)],
        capture_output=True,
        text=True,
    )
    assert (
        rejected.returncode == 2 and "validator" in rejected.stderr and len(rejected.stderr.strip().splitlines()) == 1
    )


def test_submit_retries_only_while_the_job_agent_is_starting(monkeypatch):
    from kvray.launch import preflight

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
        [
            sys.executable,
            "-m",
            "kvray.cli",
            "launch",
            "--address",
            ray_head,
            "--job",
            str(job),
            "--output",
            str(out),
            "--timeout-s",
            "300",
            "--no-plots",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )


def test_preflight_reads_the_clusters_python_packages_and_gpus(ray_head):
    from ray.job_submission import JobSubmissionClient

    from kvray.launch.preflight import DEPENDENCIES, local_versions, probe, unmet

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
    from kvray.launch.jobs_api import RemoteJobError, launch

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
    from kvray.launch.preflight import DEPENDENCIES, ClusterReport, local_versions, pip_packages
    from kvray.plan.job import job_from_dict

    mine = local_versions()
    packages = {**mine, "typer": None, "rich": "12.0.0"}
    report = ClusterReport(python=(3, 11, 9), packages=packages, nodes=[("10.0.0.1", "A100", 8.0, 96.0)])
    job = job_from_dict(
        json.loads(
            json.dumps(
                {
                    "name": "j",
                    "models": ["kvray/tiny-llama"],
                    "backends": ["hf"],
                    "hardware": "A100",
                    "grid": {"prompt_toks": [16], "gen_toks": [4]},
                }
            )
        )
    )
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


def test_without_ray_client_the_dataset_comes_home_through_a_jobs_log(ray_head, tmp_path, monkeypatch):
    """Ray Client unreachable (a port nothing listens on): the launcher says why and fetches the held dataset
    through a second, small job that prints it into its log — the same four rows arrive. Ray Client gives up on
    the closed port after 3 tries of 1 s each here instead of its default 5, 10 and 15 s (Ray's own settings,
    read by the fetch's child process): ~27 s of waiting that tests nothing."""
    from ray_fixtures import free_port

    from kvray.data.reader import load_dataset
    from kvray.launch.jobs_api import launch

    monkeypatch.setenv("RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S", "1")
    monkeypatch.setenv("RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S", "1")
    job = tmp_path / "launch_smoke.yaml"
    job.write_text(SIM_JOB)
    said: list[str] = []
    status, files = launch(
        str(job), str(tmp_path / "out"), address=ray_head, timeout_s=300, log=said.append, ray_client_port=free_port()
    )
    text = "".join(said)
    assert status.endswith("SUCCEEDED") and "cells.jsonl" in files
    assert "through a job's log instead" in text and "Ray Client at ray://127.0.0.1:" in text, text[-2000:]
    cells, _, _ = load_dataset(tmp_path / "out")
    assert len(cells) == 4 and set(cells["status"]) == {"ok"}


def test_a_shared_output_path_is_written_by_the_job_itself(ray_head, tmp_path):
    """--shared-output: the head shares this machine's filesystem, so the job's own collector writes the
    folder and nothing is carried home (no actor, no Ray Client)."""
    from kvray.data.reader import load_dataset
    from kvray.launch.jobs_api import launch

    job = tmp_path / "launch_smoke.yaml"
    job.write_text(SIM_JOB)
    said: list[str] = []
    status, files = launch(
        str(job), str(tmp_path / "shared"), address=ray_head, timeout_s=300, log=said.append, shared_output=True
    )
    assert status.endswith("SUCCEEDED") and "cells.jsonl" in files
    assert "Ray Client" not in "".join(said)
    cells, _, manifest = load_dataset(tmp_path / "shared")
    assert len(cells) == 4 and set(cells["status"]) == {"ok"}


def test_launch_with_an_s3_output_writes_the_bucket_from_the_cluster(ray_head, s3, tmp_path):
    """--output s3://…: the job's own collector writes the bucket (moto's server on 127.0.0.1), with the
    credentials this machine's environment forwarded to the job; figures and report go up beside the data,
    nothing is carried home, and the secret is in no object."""
    from storage_fixtures import BUCKET, SECRET

    job = tmp_path / "launch_smoke.yaml"
    job.write_text(SIM_JOB)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvray.cli",
            "launch",
            "--address",
            ray_head,
            "--job",
            str(job),
            "--output",
            f"s3://{BUCKET}/launched",
            "--timeout-s",
            "300",
        ],
        capture_output=True,
        text=True,
        env=s3.env,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"the dataset is in s3://{BUCKET}/launched" in run.stdout and "Ray Client" not in run.stdout
    keys = s3.keys("launched")
    assert "cells.jsonl" in keys and "report.html" in keys and any(k.startswith("figures/") for k in keys), keys
    from kvray.data.reader import load_dataset

    cells, _, manifest = load_dataset(s3.download("launched", tmp_path / "copy"))
    assert len(cells) == 4 and set(cells["status"]) == {"ok"}
    fs = s3.fs()
    for key in keys:
        with fs.open_input_stream(f"{BUCKET}/launched/{key}") as f:
            assert SECRET.encode() not in f.read(), key
