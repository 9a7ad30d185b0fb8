"""`kvray launch --cluster FILE.yaml`: bring a Ray cluster-launcher file's cluster up (or find it running), reach
its dashboard and Ray Client ports, and tear it down on `--down` — for a cloud file (AWS) and an on-premise one
(`provider: type: local`, boxes by address over SSH) alike, through Ray's own autoscaler SDK.

Kept apart from kvray/launch/jobs_api.py (the Jobs API side), which calls :func:`bring_up` and :func:`tear_down`.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvray.errors import KvrayInputError
from kvray.launch.remote import RAY_CLIENT_PORT, RemoteJobError, ray_auth_headers
from kvray.servers.process import free_port
from kvray.units import first_line


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
        run = subprocess.run(
            _ssh(auth, host, [], ["true"]), capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise KvrayInputError("ssh is not installed here: Ray's cluster launcher needs it") from None
    except subprocess.TimeoutExpired:
        raise KvrayInputError(f"cannot SSH to the head node {target}: no answer within {timeout_s:g} s") from None
    if run.returncode != 0:
        raise KvrayInputError(f"cannot SSH to the head node {target}: {_ssh_error(run.stderr, run.returncode)}")


def _ssh(auth: dict[str, Any], host: str, options: list[str], command: list[str]) -> list[str]:
    """An ssh command line with the file's user, key and proxy command, and the host-key settings of Ray's own
    command runner (nodes come and go under reused addresses, so their host keys are not pinned)."""
    cmd = [
        "ssh",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        f"UserKnownHostsFile={os.devnull}",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=20",
        "-o",
        "ServerAliveInterval=5",
        "-o",
        "ServerAliveCountMax=3",
        "-o",
        "LogLevel=ERROR",
    ]
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
    local_dash, local_client = free_port(), free_port()
    forwards = [
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        "-L",
        f"127.0.0.1:{local_dash}:127.0.0.1:{dash_port}",
        "-L",
        f"127.0.0.1:{local_client}:127.0.0.1:{client_port}",
    ]
    proc = subprocess.Popen(
        _ssh(auth, head, forwards, []),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return f"http://127.0.0.1:{local_dash}", local_client, proc


def _close(reached: Reached | None) -> None:
    """Stop the tunnel of a ``Reached``, if it has one."""
    if reached is not None and reached[2] is not None:
        reached[2].terminate()
        reached[2].wait()
