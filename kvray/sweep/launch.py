"""`kvray launch`: run a job on a remote Ray cluster through the Ray Jobs API and bring the dataset home.

Two ways to reach a cluster:
  --cluster cluster/a100.yaml   bring it up with Ray's autoscaler SDK (idempotent: a running cluster is
                                reused), tunnel the dashboard and Ray Client ports over SSH (not for a head
                                on this machine), submit, optionally tear it down (--down)
  --address http://HOST:8265    an existing cluster (KubeRay, a team cluster): submit directly

The job ships the job file (working_dir) and this kvray package (py_modules). Its entrypoint runs
`kvray run` on the cluster and then hands the output folder to a detached actor; the launcher pulls it home in
chunks over Ray Client (kvray/sweep/transfer.py), so no shared filesystem, object store or log channel is
needed for results of any size.

Credentials come from the environment only: the Ray token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token — recent Ray turns token authentication on by default) is sent as a request header;
HF_TOKEN is forwarded to the job's environment when set. Neither is written to datasets or manifests.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kvray.data.location import is_uri
from kvray.errors import KvrayInputError
from kvray.units import first_line

FORWARDED_SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# For --output s3://…: the object store's standard variables, forwarded only to a job that writes there itself.
STORAGE_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                     "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")  # fmt: skip
REMOTE_OUTPUT = "kvray-output"
RAY_CLIENT_PORT = 10001  # `ray start --head`'s default --ray-client-server-port


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


def entrypoint(job_name: str, extra_args: list[str], holder: str, output: str = "") -> str:
    """The shell command the cluster runs: the sweep, then its folder handed to the detached actor ``holder``
    (kvray/sweep/transfer.py) whatever the sweep's exit status, so a failed sweep's rows still come home.
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
    hold = ["python", "-m", "kvray.sweep.transfer", "hold", output, holder]
    out = shlex.quote(output)
    return f"{shlex.join(run)}; status=$?; [ -d {out} ] && {shlex.join(hold)} && rm -rf {out}; exit $status"


class RemoteJobError(RuntimeError):
    """The job ran on the cluster and did not bring a dataset back: its status, exit code and last log lines."""


def log_tail(logs: str, lines: int = 15) -> str:
    """The last ``lines`` lines of a job's log, without kvray's dataset marker."""
    from kvray.sweep.transfer import HELD

    kept = [ln for ln in logs.rstrip().splitlines() if ln.strip() and not ln.startswith(HELD)][-lines:]
    return "\n".join(f"  | {ln}" for ln in kept) or "  | (the job printed nothing)"


def submit(
    address: str,
    job_file: str,
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
    from kvray.sweep import transfer

    say = log or (lambda text: None)
    started = time.monotonic()
    try:
        names = transfer.fetch(transfer.client_address(address, client_port), held, output)
        say(f"kvray: dataset home over Ray Client: {held.size_bytes / 2**20:.1f} MiB in {held.chunks} chunk(s), "
            f"{time.monotonic() - started:.1f} s, SHA-256 checked\n")  # fmt: skip
        return names
    except ConnectionError as exc:
        say(f"kvray: {exc}; bringing the {held.size_bytes / 2**20:.1f} MiB dataset through a job's log instead "
            f"(open port {client_port} to the head for large results)\n")  # fmt: skip
    from ray.job_submission import JobStatus, JobSubmissionClient

    from kvray.sweep.preflight import submit_when_agent_ready

    client = JobSubmissionClient(address, headers=ray_auth_headers())
    job_id = submit_when_agent_ready(
        client,
        entrypoint=shlex.join(["python", "-m", "kvray.sweep.transfer", "emit", held.actor]),
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
        from kvray.sweep.transfer import Held

        direct = shared_output or is_uri(output)
        if direct:
            remote = output if is_uri(output) else str(Path(output).resolve())
            job_id, status, logs = submit(address, job_file, extra_args, timeout_s, log, provision, "", remote)
            files = written_directly(output, status)
            held = None
        else:
            job_id, status, logs = submit(address, job_file, extra_args, timeout_s, log, provision, new_holder_name())
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
            tear_down(cluster, log, raise_errors=sys.exc_info()[0] is None)
    return status, files


class ClusterError(RemoteJobError):
    """A --cluster that could not be brought up, reached or torn down: one block and exit 1 like a failed job,
    never a traceback; Ray's own output above it says at which step."""


DEFAULT_DASHBOARD_PORT = 8265  # `ray start --head`'s default --dashboard-port
DASHBOARD_WAIT_S = 120.0  # after bring-up: `ray start --head` has returned, the dashboard follows in seconds
Reached = tuple[str, int, "subprocess.Popen[str] | None"]  # dashboard URL, Ray Client port here, SSH tunnel


def head_port(cfg: dict[str, Any], flag: str, default: int) -> int:
    """A port the head is started with (``--dashboard-port``, ``--ray-client-server-port``), read from the
    file's head_start_ray_commands — the one place it is set — else ``default`` (Ray's)."""
    pattern = re.compile(rf"{re.escape(flag)}[= ]+(\d+)")
    for command in cfg.get("head_start_ray_commands") or []:
        if match := pattern.search(str(command)):
            return int(match.group(1))
    return default


def bring_up(cluster: str, log: Any = None, ray_client_port: int = RAY_CLIENT_PORT) -> Reached:
    """Bring the cluster up, or find it running, and reach its dashboard; returns (dashboard URL, Ray Client
    port here, SSH tunnel or None).

    Idempotent: a head whose dashboard already answers is reused. Ray's updater still runs, with
    ``no_restart=True`` (a changed file or checkout is synced, Ray keeps running), so a second launch takes
    seconds, not a restart. One line says how long bring-up took and which case it was."""
    import logging

    from ray.autoscaler import sdk

    cfg = load_cluster_file(cluster)
    name = cfg.get("cluster_name", "default")
    # Ray's on-prem provider logs "ClusterState: Loaded cluster state" at INFO on stderr each time it is asked;
    # the launcher's own output reads as `ray up`'s, without the full ssh command line of every step
    logging.getLogger("ray.autoscaler._private.local.node_provider").setLevel(logging.WARNING)
    sdk.configure_logging(log_style="pretty", color_mode="true" if sys.stdout.isatty() else "false", verbosity=0)
    dash_port = head_port(cfg, "--dashboard-port", DEFAULT_DASHBOARD_PORT)
    client_port = head_port(cfg, "--ray-client-server-port", ray_client_port)
    say = log or (lambda text: None)
    started = time.monotonic()
    auth = _ssh_auth(cfg)
    head = _running_head(cluster)
    reached: Reached | None = None
    if head is not None:  # Ray's provider says a head is up: is Ray running on it?
        with contextlib.suppress(ClusterError):
            reached = _reach(auth, head, dash_port, client_port, wait_s=0.0 if _is_this_machine(head) else 15.0)
    elif cfg["provider"]["type"] == "local":  # on-prem: the head's address is known before anything starts
        check_ssh(auth, cfg["provider"]["head_ip"])
    how = "already running: reused" if reached else ("head was up, Ray restarted" if head else "new")
    try:
        sdk.create_or_update_cluster(cluster, no_restart=reached is not None, no_config_cache=False)
        head_now = _running_head(cluster)
        if head_now is None:
            raise RuntimeError("Ray reports no head node after bring-up")
        if reached is None or head_now != head:  # new, restarted, or a head Ray had to relaunch
            _close(reached)
            reached = _reach(auth, head_now, dash_port, client_port, wait_s=DASHBOARD_WAIT_S)
    except (ClusterError, KvrayInputError):  # already one line: a dashboard that did not answer, a refused token
        _close(reached)
        raise
    except (Exception, SystemExit) as exc:  # Ray's cli_logger.abort raises click exceptions; some paths exit(1)
        _close(reached)
        raise ClusterError(f"bringing up cluster {name} ({cluster}) failed: {first_line(exc)}") from None
    say(f"kvray: cluster {name} up in {time.monotonic() - started:.1f} s ({how})\n")
    return reached


def tear_down(cluster: str, log: Any = None, raise_errors: bool = True) -> None:
    """``--down``: Ray's teardown (``ray stop`` on the nodes, then the provider lets them go), timed. A failure
    is one line: raised as ClusterError, or only written when another error is already on its way out."""
    import yaml
    from ray.autoscaler import sdk

    say = log or (lambda text: None)
    name = cluster
    with contextlib.suppress(Exception):  # the file was read before; this only names it in the line
        name = str(yaml.safe_load(Path(cluster).read_text()).get("cluster_name", cluster))
    started = time.monotonic()
    try:
        sdk.teardown_cluster(cluster)
    except (Exception, SystemExit) as exc:
        message = f"tearing down {cluster} failed ({first_line(exc)}): its nodes may still run; `ray down {cluster}`"
        if raise_errors:
            raise ClusterError(message) from None
        sys.stderr.write(f"kvray: {message}\n")
        return
    say(f"kvray: cluster {name} torn down in {time.monotonic() - started:.1f} s\n")


def check_ssh(auth: dict[str, Any], host: str, timeout_s: float = 60.0) -> None:
    """One SSH round trip to an on-prem head before Ray's updater runs: the updater retries a refused connection
    or a rejected key for 15 minutes (AUTOSCALER_NODE_START_WAIT_S) before it fails; this says why in seconds."""
    user, key = auth.get("ssh_user", "?"), auth.get("ssh_private_key")
    if key and not Path(key).expanduser().is_file():
        raise KvrayInputError(f"the cluster file's auth.ssh_private_key {key} does not exist")
    target = f"{user}@{host}{f' with {key}' if key else ''}"
    try:
        run = subprocess.run(_ssh(auth, host, [], ["true"]), capture_output=True, text=True, timeout=timeout_s,
                             stdin=subprocess.DEVNULL)  # fmt: skip
    except FileNotFoundError:
        raise KvrayInputError("ssh is not installed here: Ray's cluster launcher needs it") from None
    except subprocess.TimeoutExpired:
        raise KvrayInputError(f"cannot SSH to the head node {target}: no answer within {timeout_s:g} s") from None
    if run.returncode != 0:
        raise KvrayInputError(f"cannot SSH to the head node {target}: {_ssh_error(run.stderr, run.returncode)}")


def _ssh(auth: dict[str, Any], host: str, options: list[str], command: list[str]) -> list[str]:
    """An ssh command line with the file's user, key and proxy command, and the host-key settings of Ray's own
    command runner (nodes come and go under reused addresses, so their host keys are not pinned)."""
    cmd = ["ssh", "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={os.devnull}", "-o", "IdentitiesOnly=yes",
           "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
           "-o", "LogLevel=ERROR"]  # fmt: skip
    if auth.get("ssh_private_key"):
        cmd += ["-i", str(Path(auth["ssh_private_key"]).expanduser())]
    if auth.get("ssh_proxy_command"):
        cmd += ["-o", f"ProxyCommand={auth['ssh_proxy_command']}"]
    return [*cmd, *options, f"{auth.get('ssh_user', os.environ.get('USER', 'root'))}@{host}", *command]


SSH_CAUSES = ("Permission denied", "refused", "Could not resolve", "No route to host", "timed out", "Host key",
              "Too many authentication failures", "No such file", "not accessible", "bad permissions")  # fmt: skip


def _ssh_error(stderr: str, returncode: int | None) -> str:
    """The line of ssh's stderr that says why (``Permission denied (publickey).``, a proxy command's ``Connection
    refused``) rather than its generic last one (``Connection closed by remote host``), else its exit code."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    causes = [ln for ln in lines if any(cause in ln for cause in SSH_CAUSES)]
    return (causes or lines)[-1][:300] if lines else f"ssh exited with code {returncode}"


def _ssh_auth(cfg: dict[str, Any]) -> dict[str, Any]:
    """The SSH settings Ray's launcher uses: for a cloud file Ray's bootstrap adds the key it made (the file
    names only the user); on-prem, the file's own."""
    from ray.autoscaler import sdk

    try:
        return dict(sdk.bootstrap_config(cfg, no_config_cache=False).get("auth") or {})
    except Exception:  # credentials missing and the like: create_or_update_cluster says so properly
        return dict(cfg.get("auth") or {})


def _running_head(cluster: str) -> str | None:
    """The head's address when Ray's provider reports a head node up to date, else None."""
    from ray.autoscaler import sdk

    try:
        return str(sdk.get_head_node_ip(cluster))
    except Exception:  # "Head node of cluster (…) not found!", a provider that cannot be asked
        return None


def _is_this_machine(host: str) -> bool:
    """Whether ``host`` is one of this machine's addresses: an on-prem head here is reached directly, no SSH hop."""
    import ipaddress
    import socket

    import psutil

    try:
        ip = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError):
        return False
    return ip.is_loopback or any(a.address == str(ip) for addrs in psutil.net_if_addrs().values() for a in addrs)


def _dashboard_answers(url: str) -> bool:
    """Whether a Ray dashboard answers at ``url`` (``GET /api/version``). One that refuses kvray's token is one
    clear line: it is there, kvray cannot use it."""
    import httpx

    try:
        reply = httpx.get(f"{url}/api/version", headers=ray_auth_headers(), timeout=5.0)
    except httpx.HTTPError:
        return False
    if reply.status_code in (401, 403):
        raise KvrayInputError(
            f"the Ray dashboard at {url} refuses kvray's token (HTTP {reply.status_code}): set RAY_AUTH_TOKEN, or "
            "RAY_AUTH_TOKEN_PATH to a copy of the head's ~/.ray/auth_token"
        )
    try:
        return reply.status_code == 200 and "ray_version" in reply.json()
    except ValueError:  # something else on that port
        return False


def _reach(auth: dict[str, Any], head: str, dash_port: int, client_port: int, wait_s: float) -> Reached:
    """The head's dashboard URL and Ray Client port as seen from here, with the tunnel carrying them (None for a
    head on this machine), once the dashboard answers; ClusterError when it does not within ``wait_s``."""
    tunnel = None
    if _is_this_machine(head):
        url, local_client = f"http://127.0.0.1:{dash_port}", client_port
    else:
        url, local_client, tunnel = _dashboard_tunnel(auth, head, dash_port, client_port)
    deadline = time.monotonic() + wait_s
    try:
        while not _dashboard_answers(url):
            if tunnel is not None and tunnel.poll() is not None:
                error = _ssh_error(tunnel.stderr.read() if tunnel.stderr else "", tunnel.returncode)
                raise ClusterError(f"the SSH tunnel to the head {head} closed: {error}")
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"the Ray dashboard on the head {head}:{dash_port} did not answer within {wait_s:g} s"
                )
            time.sleep(0.5)
    except BaseException:
        _close((url, local_client, tunnel))
        raise
    return url, local_client, tunnel


def _dashboard_tunnel(auth: dict[str, Any], head: str, dash_port: int, client_port: int) -> Reached:
    """``ssh -N -L`` from two free ports here to the head's dashboard and Ray Client ports (on its 127.0.0.1).
    Free local ports rather than ``ray attach -p 8265``'s same-port forward: with a local Ray holding 8265 here
    (``kvray run --dashboard``) that forward fails and the job would be submitted to the local Ray instead."""
    local_dash, local_client = _free_port(), _free_port()
    forwards = ["-N", "-o", "ExitOnForwardFailure=yes", "-L", f"127.0.0.1:{local_dash}:127.0.0.1:{dash_port}",
                "-L", f"127.0.0.1:{local_client}:127.0.0.1:{client_port}"]  # fmt: skip
    proc = subprocess.Popen(_ssh(auth, head, forwards, []), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    return f"http://127.0.0.1:{local_dash}", local_client, proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _close(reached: Reached | None) -> None:
    """Stop the tunnel of a ``Reached``, if it has one."""
    if reached is not None and reached[2] is not None:
        reached[2].terminate()
        reached[2].wait()
