"""`kvray launch`: run a job on a remote Ray cluster through the Ray Jobs API and bring the dataset home.

Two ways to reach a cluster:
  --cluster cluster/a100.yaml   bring it up with Ray's autoscaler SDK (idempotent), tunnel the dashboard
                                port over SSH, submit, optionally tear it down (--down)
  --address http://HOST:8265    an existing cluster (KubeRay, a team cluster): submit directly

The job ships the job file (working_dir) and this kvray package (py_modules). Its entrypoint runs
`kvray run` on the cluster and then prints the dataset as a base64 tarball between two marker lines; the
launcher reads it back from the job's logs, so no shared filesystem or object store access is needed.

Credentials come from the environment only: the Ray token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token — recent Ray turns token authentication on by default) is sent as a request header;
HF_TOKEN is forwarded to the job's environment when set. Neither is written to datasets or manifests.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shlex
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from kvray.errors import KvrayInputError
from kvray.units import first_line

BEGIN, END = "KVRAY-DATASET-BEGIN", "KVRAY-DATASET-END"
FORWARDED_SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
REMOTE_OUTPUT = "kvray-output"


def ray_auth_headers() -> dict[str, str]:
    """The Authorization header for a token-authenticated cluster, from the environment or Ray's token file."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).expanduser()
        token = path.read_text().strip() if path.is_file() else None
    return {"Authorization": f"Bearer {token}"} if token else {}


def load_cluster_file(path: str) -> dict[str, Any]:
    """Read and validate a Ray cluster-launcher file with Ray's own validator."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise KvrayInputError(f"cluster file {path} does not exist")
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise KvrayInputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    import logging

    from ray.autoscaler._private.util import prepare_config, validate_config

    logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)  # it logs INFO per node type
    try:
        validate_config(prepare_config(cfg))
    except Exception as exc:  # jsonschema.ValidationError and friends
        raise KvrayInputError(f"{path}: rejected by Ray's cluster validator: {str(exc).splitlines()[0]}") from None
    return cfg


def pack_dataset(out_dir: str | Path) -> str:
    """The output folder as a base64 tar.gz between marker lines (printed by the remote entrypoint)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(Path(out_dir).iterdir()):
            if not f.name.startswith("."):  # files and figure folders; not temp files
                tar.add(f, arcname=f.name)
    blob = base64.b64encode(buf.getvalue()).decode()
    lines = [blob[i : i + 100] for i in range(0, len(blob), 100)]
    return "\n".join([BEGIN, *lines, END])


def unpack_dataset(logs: str, out_dir: str | Path) -> list[str]:
    """Extract the last packed dataset in ``logs`` into ``out_dir``; returns the file names."""
    start = logs.rfind(BEGIN)
    stop = logs.find(END, start)
    if start < 0 or stop < 0:
        raise RuntimeError("the job's logs hold no dataset (did `kvray run` fail on the cluster?)")
    blob = "".join(line.strip() for line in logs[start + len(BEGIN) : stop].splitlines())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(blob)), mode="r:gz") as tar:
        names = tar.getnames()
        tar.extractall(out, filter="data")
    return names


def entrypoint(job_name: str, extra_args: list[str]) -> str:
    """The shell command the cluster runs: the sweep, then the dataset printed for the launcher."""
    run = [
        "python",
        "-m",
        "kvray.cli",
        "run",
        job_name,
        "--address",
        "auto",
        "--output",
        REMOTE_OUTPUT,
        "--no-plots",
        *extra_args,
    ]  # --no-plots: figures are drawn locally, from the dataset that comes back
    pack = ["python", "-m", "kvray.sweep.launch", "pack", REMOTE_OUTPUT]
    return f"{shlex.join(run)}; status=$?; {shlex.join(pack)}; exit $status"


class RemoteJobError(RuntimeError):
    """The job ran on the cluster and did not bring a dataset back: its status, exit code and last log lines."""


def log_tail(logs: str, lines: int = 15) -> str:
    """The last ``lines`` lines of a job's log, without a packed dataset."""
    start = logs.find(BEGIN)
    if start >= 0:
        stop = logs.find(END, start)
        logs = logs[:start] + (logs[stop + len(END) :] if stop >= 0 else "")
    kept = [ln for ln in logs.rstrip().splitlines() if ln.strip()][-lines:]
    return "\n".join(f"  | {ln}" for ln in kept) or "  | (the job printed nothing)"


def submit(
    address: str,
    job_file: str,
    extra_args: list[str] | None = None,
    timeout_s: float = 3600.0,
    log: Any = None,
    provision: bool = True,
) -> tuple[str, str, str]:
    """Probe the cluster, submit the job, follow its logs until it ends; returns (job id, final status, logs).

    Ctrl-C asks the cluster to stop the job before it is re-raised; past ``timeout_s`` the job is stopped and
    RemoteJobError says so."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from kvray.plan.job import load_job
    from kvray.sweep.preflight import pip_packages, probe, submit_when_agent_ready

    job_path = Path(job_file)
    try:
        client = JobSubmissionClient(address, headers=ray_auth_headers())
    except (ConnectionError, OSError, RuntimeError, ValueError) as exc:  # nothing listening, not a dashboard
        raise KvrayInputError(f"cannot reach the Ray dashboard at {address}: {first_line(exc)}") from None
    report = probe(client)
    pins = pip_packages(report, load_job(job_file), provision)
    say = log or (lambda text: None)
    say(f"kvray: cluster at {address}: {report.describe()}\n")
    if pins:
        say(f"kvray: the cluster's Python lacks {', '.join(pins)}: added to the job's environment (--no-provision: "
            "don't)\n")  # fmt: skip
    env_vars = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "PYTHONUNBUFFERED": "1"}
    env_vars.update({k: os.environ[k] for k in FORWARDED_SECRETS if os.environ.get(k)})
    runtime_env: dict[str, Any] = {"py_modules": [str(Path(__file__).parents[1])], "env_vars": env_vars}
    if pins:
        runtime_env["pip"] = {"packages": pins, "pip_check": False}
    with tempfile.TemporaryDirectory(prefix="kvray-job-") as workdir:
        (Path(workdir) / job_path.name).write_bytes(job_path.read_bytes())
        job_id = submit_when_agent_ready(
            client,
            entrypoint=entrypoint(job_path.name, extra_args or []),
            runtime_env={"working_dir": workdir, **runtime_env},
            metadata={"kvray_job": job_path.name},
        )
    deadline = time.monotonic() + timeout_s
    printed = 0
    try:
        while True:
            status = client.get_job_status(job_id)
            logs = client.get_job_logs(job_id)
            if log is not None:
                fresh = logs[printed:]
                cut = fresh.find(BEGIN)
                log(fresh if cut < 0 else fresh[:cut])
                printed = len(logs) if cut < 0 else printed + cut
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return job_id, str(status), logs
            if time.monotonic() > deadline:
                client.stop_job(job_id)
                raise RemoteJobError(
                    f"job {job_id} did not finish within --timeout-s {timeout_s:g} s: kvray asked the cluster to "
                    f"stop it; its last lines:\n{log_tail(logs)}"
                )
            time.sleep(1.0)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            client.stop_job(job_id)
            sys.stderr.write(f"\nkvray: interrupted: asked the cluster at {address} to stop job {job_id}\n")
        raise


def exit_code(address: str, job_id: str) -> int | None:
    """The job's driver exit code, where this Ray reports it."""
    from ray.job_submission import JobSubmissionClient

    with contextlib.suppress(Exception):
        code = JobSubmissionClient(address, headers=ray_auth_headers()).get_job_info(job_id).driver_exit_code
        return int(code) if code is not None else None
    return None


def launch(
    job_file: str,
    output: str,
    address: str | None = None,
    cluster: str | None = None,
    down: bool = False,
    extra_args: list[str] | None = None,
    timeout_s: float = 3600.0,
    log: Any = None,
    provision: bool = True,
) -> tuple[str, list[str]]:
    """Run ``job_file`` on a cluster and unpack its dataset into ``output``; returns (status, files).

    A job that fails on the cluster, or ends without a dataset, is a RemoteJobError: its status, exit code and
    the last lines of its log, in one short block."""
    from kvray.plan.job import load_job

    load_job(job_file)  # validate here, before any cluster is touched
    if bool(address) == bool(cluster):
        raise KvrayInputError("give exactly one of --address http://HOST:8265 or --cluster FILE.yaml")
    tunnel = None
    if cluster:
        load_cluster_file(cluster)
        from ray.autoscaler import sdk

        sdk.create_or_update_cluster(cluster, no_restart=True, no_config_cache=False)
        tunnel = _dashboard_tunnel(cluster)
        address = "http://127.0.0.1:8265"
    assert address is not None
    if not address.startswith(("http://", "https://")):
        raise KvrayInputError(f"--address must be the dashboard's http(s)://HOST:8265 URL, got {address!r}")
    try:
        job_id, status, logs = submit(address, job_file, extra_args, timeout_s, log, provision)
        if not status.endswith("SUCCEEDED") or BEGIN not in logs:
            code = exit_code(address, job_id)
            raise RemoteJobError(
                f"job {job_id} on {address} ended {status.rsplit('.', 1)[-1]}"
                f"{f' (exit code {code})' if code is not None else ''} without a dataset; its last lines:\n"
                f"{log_tail(logs)}"
            )
        files = unpack_dataset(logs, output)
    finally:
        if tunnel is not None:
            tunnel.terminate()
        if cluster and down:
            from ray.autoscaler import sdk

            sdk.teardown_cluster(cluster)
    return status, files


def _dashboard_tunnel(cluster: str) -> Any:
    """`ray attach -p 8265` in the background: the dashboard stays bound to 127.0.0.1 on the head."""
    import subprocess

    ray_exe = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen([str(ray_exe), "attach", cluster, "-p", "8265", "--no-config-cache"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(5.0)
    return proc


if __name__ == "__main__":  # `python -m kvray.sweep.launch pack DIR`, run on the cluster after the sweep
    if len(sys.argv) == 3 and sys.argv[1] == "pack":
        print(pack_dataset(sys.argv[2]), flush=True)
    else:
        sys.exit("usage: python -m kvray.sweep.launch pack DIR")
