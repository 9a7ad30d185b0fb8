"""`kvray launch`: run a job on a remote Ray cluster through the Ray Jobs API and bring the dataset home.

Two ways to reach a cluster:
  --cluster cluster/a100.yaml   bring it up with Ray's autoscaler SDK (idempotent: a running cluster is
                                reused), tunnel the dashboard and Ray Client ports over SSH (not for a head
                                on this machine), submit, optionally tear it down (--down)
  --address http://HOST:8265    an existing cluster (KubeRay, a team cluster): submit directly

The job ships the job file (working_dir) and this kvray package (py_modules). Its entrypoint runs
`kvray run` on the cluster and then hands the output folder to a detached actor; the launcher pulls it home in
chunks over Ray Client (kvray/launch/transfer.py), so no shared filesystem, object store or log channel is
needed for results of any size.

Credentials come from the environment only: the Ray token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token — recent Ray turns token authentication on by default) is sent as a request header;
HF_TOKEN is forwarded to the job's environment when set. Neither is written to datasets or manifests.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kvray.data.location import is_uri
from kvray.errors import KvrayInputError
from kvray.launch.remote import RAY_CLIENT_PORT, RemoteJobError, ray_auth_headers
from kvray.launch.transfer import HELD
from kvray.units import first_line

FORWARDED_SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# For --output s3://…: the object store's standard variables, forwarded only to a job that writes there itself.
STORAGE_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                     "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")  # fmt: skip
REMOTE_OUTPUT = "kvray-output"


def entrypoint(job_name: str, extra_args: list[str], holder: str, output: str = "") -> str:
    """The shell command the cluster runs: the sweep, then its folder handed to the detached actor ``holder``
    (kvray/launch/transfer.py) whatever the sweep's exit status, so a failed sweep's rows still come home.
    Without a holder the sweep writes straight to ``output`` (object storage, a shared filesystem).

    Jobs with the same job file share one working directory on the head (Ray keys it by the package's hash), so
    the folder is named for this launch: a fixed name would let a later launch resume — skip every cell of — an
    earlier launch's folder, or carry its rows home as if they were new. Once held, the folder is removed."""
    output = output or f"{REMOTE_OUTPUT}-{holder.rsplit('-', 1)[-1]}"
    run = [
        "python",
        "-m",
        "kvray.cli",
        "run",
        job_name,
        "--address",
        "auto",
        "--output",
        output,
        "--no-plots",
        *extra_args,
    ]  # --no-plots: figures are drawn locally, from the dataset that comes back
    if not holder:
        return shlex.join(run)
    hold = ["python", "-m", "kvray.launch.transfer", "hold", output, holder]
    out = shlex.quote(output)
    return f"{shlex.join(run)}; status=$?; [ -d {out} ] && {shlex.join(hold)} && rm -rf {out}; exit $status"


def log_tail(logs: str, lines: int = 15) -> str:
    """The last ``lines`` lines of a job's log, without kvray's dataset marker."""
    kept = [ln for ln in logs.rstrip().splitlines() if ln.strip() and not ln.startswith(HELD)][-lines:]
    return "\n".join(f"  | {ln}" for ln in kept) or "  | (the job printed nothing)"


def submit(
    address: str,
    job_file: str,
    *,
    extra_args: list[str] | None = None,
    timeout_s: float = 3600.0,
    log: Any = None,
    provision: bool = True,
    holder: str = "",
    output: str = "",
) -> tuple[str, str, str]:
    """Probe the cluster, submit the job, follow its logs until it ends; returns (job id, final status, logs).
    The job leaves its dataset with the detached actor named ``holder``, or, without one, writes it to
    ``output`` on the cluster.

    Ctrl-C asks the cluster to stop the job before it is re-raised; past ``timeout_s`` the job is stopped and
    RemoteJobError says so."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from kvray.launch.preflight import pip_packages, probe, submit_when_agent_ready
    from kvray.plan.job import load_job

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
        say(
            f"kvray: the cluster's Python lacks {', '.join(pins)}: added to the job's environment (--no-provision: "
            "don't)\n"
        )
    runtime_env = job_runtime_env(pins, output)
    with tempfile.TemporaryDirectory(prefix="kvray-job-") as workdir:
        (Path(workdir) / job_path.name).write_bytes(job_path.read_bytes())
        job_id = submit_when_agent_ready(
            client,
            entrypoint=entrypoint(job_path.name, extra_args or [], holder, output),
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
                log(logs[printed:])
                printed = len(logs)
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


def job_runtime_env(pins: list[str], output: str = "") -> dict[str, Any]:
    """What every kvray job carries: this kvray package, the forwarded secrets, and the preflight's pins; the
    object store's credentials too when the job writes ``output`` there itself."""
    env_vars = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "PYTHONUNBUFFERED": "1"}
    forwarded = FORWARDED_SECRETS + (STORAGE_VARIABLES if is_uri(output) else ())
    env_vars.update({k: os.environ[k] for k in forwarded if os.environ.get(k)})
    runtime_env: dict[str, Any] = {"py_modules": [str(Path(__file__).parents[1])], "env_vars": env_vars}
    if pins:
        runtime_env["pip"] = {"packages": pins, "pip_check": False}
    return runtime_env


def new_holder_name() -> str:
    """The detached actor's name for one launch: unique, so launches never take each other's datasets."""
    return f"kvray-dataset-{uuid.uuid4().hex[:12]}"


def bring_home(address: str, held: Any, output: str, client_port: int, log: Any = None) -> list[str]:
    """The held dataset into ``output``: over Ray Client when it connects, else through a small job that prints
    it into its log (said, with the reason: that channel is for small results)."""
    from kvray.launch import transfer

    say = log or (lambda text: None)
    started = time.monotonic()
    try:
        names = transfer.fetch(transfer.client_address(address, client_port), held, output)
        say(
            f"kvray: dataset home over Ray Client: {held.size_bytes / 2**20:.1f} MiB in {held.chunks} chunk(s), "
            f"{time.monotonic() - started:.1f} s, SHA-256 checked\n"
        )
        return names
    except ConnectionError as exc:
        say(
            f"kvray: {exc}; bringing the {held.size_bytes / 2**20:.1f} MiB dataset through a job's log instead "
            f"(open port {client_port} to the head for large results)\n"
        )
    from ray.job_submission import JobStatus, JobSubmissionClient

    from kvray.launch.preflight import submit_when_agent_ready

    client = JobSubmissionClient(address, headers=ray_auth_headers())
    job_id = submit_when_agent_ready(
        client,
        entrypoint=shlex.join(["python", "-m", "kvray.launch.transfer", "emit", held.actor]),
        runtime_env=job_runtime_env([]),
        metadata={"kvray_fetch": held.actor},
    )
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    try:
        return transfer.unpack_logs(logs, output)
    except ValueError:
        raise RemoteJobError(
            f"the dataset held by {held.actor} could not be fetched (job {job_id} ended {status}); its last lines:\n"
            f"{log_tail(logs)}"
        ) from None


def written_directly(output: str, status: str) -> list[str]:
    """What a job that wrote ``output`` itself left there, as seen from here; a shared path this machine does
    not see (not shared after all) is said in one block, with the job's status."""
    if is_uri(output):
        return [output]
    found = sorted(str(p.relative_to(output)) for p in Path(output).rglob("*") if p.is_file())
    if not found and status.endswith("SUCCEEDED"):
        raise RemoteJobError(
            f"the job ended {status.rsplit('.', 1)[-1]} writing to {Path(output).resolve()} on the cluster, but "
            "this machine sees nothing there: --shared-output needs a path the cluster and this machine share"
        )
    return found


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
    *,
    address: str | None = None,
    cluster: str | None = None,
    down: bool = False,
    extra_args: list[str] | None = None,
    timeout_s: float = 3600.0,
    log: Any = None,
    provision: bool = True,
    ray_client_port: int = RAY_CLIENT_PORT,
    shared_output: bool = False,
) -> tuple[str, list[str]]:
    """Run ``job_file`` on a cluster and unpack its dataset into ``output``; returns (status, files).

    Where ``output`` is object storage (``s3://…``), or ``shared_output`` says the path is on a filesystem the
    cluster shares, the sweep writes there itself and nothing is carried home.

    A job that fails on the cluster is a RemoteJobError: its status, exit code and the last lines of its log,
    in one short block — after whatever rows it did write have been brought home into ``output``."""
    from kvray.plan.job import load_job

    load_job(job_file)  # validate here, before any cluster is touched
    if bool(address) == bool(cluster):
        raise KvrayInputError("give exactly one of --address http://HOST:8265 or --cluster FILE.yaml")
    tunnel = None
    if cluster:
        from kvray.launch.cluster_up import ClusterError, bring_up, tear_down

        try:
            address, ray_client_port, tunnel = bring_up(cluster, log, ray_client_port)
        except ClusterError:
            if down:  # a half-created cluster still costs money: --down means down
                tear_down(cluster, log, raise_errors=False)
            raise
    assert address is not None
    if not address.startswith(("http://", "https://")):
        raise KvrayInputError(f"--address must be the dashboard's http(s)://HOST:8265 URL, got {address!r}")
    try:
        from kvray.launch.transfer import Held

        direct = shared_output or is_uri(output)
        # written where the driver reads it (object storage, a shared folder), or held on the cluster and pulled
        if direct:
            where = {"output": output if is_uri(output) else str(Path(output).resolve())}
        else:
            where = {"holder": new_holder_name()}
        job_id, status, logs = submit(
            address, job_file, extra_args=extra_args, timeout_s=timeout_s, log=log, provision=provision, **where
        )
        if direct:
            files = written_directly(output, status)
            held = None
        else:
            held = Held.from_logs(logs)
            files = bring_home(address, held, output, ray_client_port, log) if held else []
        if not status.endswith("SUCCEEDED") or (held is None and not files):
            code = exit_code(address, job_id)
            kept = f"; the {len(files)} files it wrote are in {output}" if files else " without a dataset"
            raise RemoteJobError(
                f"job {job_id} on {address} ended {status.rsplit('.', 1)[-1]}"
                f"{f' (exit code {code})' if code is not None else ''}{kept}; its last lines:\n{log_tail(logs)}"
            )
    finally:
        if tunnel is not None:
            tunnel.terminate()
            tunnel.wait()
        if cluster and down:  # a failure here is raised only when nothing else failed first
            from kvray.launch.cluster_up import tear_down

            tear_down(cluster, log, raise_errors=sys.exc_info()[0] is None)
    return status, files
