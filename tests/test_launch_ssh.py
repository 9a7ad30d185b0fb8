"""`kvray launch --cluster` end to end on this machine: Ray's on-premise provider (`provider: type: local`,
cluster/local.yaml) over a real sshd on 127.0.0.1 — the code path cluster/a100.yaml takes on AWS, minus the
cloud: Ray's launcher SSHes to the head, syncs its bootstrap files with rsync, runs `ray stop` / `ray start`
there; kvray reaches the dashboard, submits, brings the dataset home over Ray Client, and `--down` tears down.

Isolation. Ray's launcher runs `ray stop` on the head (before `ray start`, and at `--down`), and `ray stop`
kills every Ray process it can see — other tests' clusters included. So the "box" is a new PID and mount
namespace: sshd is its PID 1 (`unshare --pid --fork --mount-proc`), everything started over SSH lives there,
and `ray stop` walks only that namespace's /proc. The namespace's private mounts give the box its own /tmp/ray
(Ray's session files and `ray_current_cluster`, which `ray stop` deletes) and a login profile that puts this
virtualenv on PATH (what setup_commands do on a real box; Ray runs every command, `--down`'s `ray stop`
included, in a login shell) with the box's own Ray token. Killing sshd ends the namespace and every process in
it. `test_ray_stop_over_ssh_sees_only_the_node` checks the isolation with a decoy outside that `ray stop` would
kill if it saw it.

Ray token auth stays on, as on a real cluster: the head reads its token from RAY_AUTH_TOKEN_PATH (a file made
here, not ~/.ray/auth_token, which other tests' heads share) and the launcher is given the same path — a
launcher that sent another token would be refused.

Needs root (namespaces, sshd), `unshare`, openssh-server and rsync; a machine without the last two gets them
from apt-get here (.ci/run installs them too).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from ray_fixtures import SIM_JOB

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
UP_LINE = re.compile(r"kvray: cluster (\S+) up in ([\d.]+) s \(([^)]*)\)")
DECOY_MARK = "log_monitor.py"  # `ray stop` kills any process whose command line holds this (Ray's RAY_PROCESSES)

pytestmark = pytest.mark.cluster

RELAY = """\
# ssh's ProxyCommand: Ray's SSH runner has no port option, and sshd listens on a free port, not 22.
import os, socket, sys, threading
try:
    conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
except OSError as exc:
    sys.exit(f"connect to {sys.argv[1]} port {sys.argv[2]}: {exc.strerror or exc}")
conn.settimeout(None)
def up():
    try:
        while data := os.read(0, 65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
threading.Thread(target=up, daemon=True).start()
try:
    while data := conn.recv(65536):
        os.write(1, data)
except OSError:
    pass
"""

NODE_INIT = """\
#!/bin/sh
# PID 1 of the node's namespace: its private mounts, then sshd in the foreground (it reaps Ray's daemons).
set -e
mkdir -p /run/sshd
mount --bind {tmp_ray} /tmp/ray
for f in /etc/profile {home}/.bash_profile {home}/.bash_login {home}/.profile {home}/.bashrc; do
  if [ -e "$f" ]; then mount --bind {profile} "$f"; fi
done
exec {sshd} -D -e -f {config}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sshd_path() -> str | None:
    return shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/bin/sshd") if os.path.exists(p)), None)


def _ensure_tools() -> str:
    """sshd, ssh, ssh-keygen and rsync, from Debian's packages when missing (as .ci/run does): a fresh
    machine running the README's test command runs this test too. The service is not started (policy-rc.d)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a PID namespace for the node and an sshd that logs in as this user")
    if _sshd_path() and shutil.which("rsync") and shutil.which("ssh-keygen"):
        return str(_sshd_path())
    if not shutil.which("apt-get"):
        pytest.skip("openssh-server and rsync are missing and there is no apt-get to install them")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:  # Debian's postinst would otherwise start sshd on port 22 for the whole machine
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        install = ["apt-get", "install", "-y", "-qq", "openssh-server", "rsync"]
        run = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
        if run.returncode != 0:  # stale package lists on a fresh machine
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=600)
            run = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    finally:
        if made_policy:
            policy.unlink()
    assert run.returncode == 0 and _sshd_path(), f"apt-get install openssh-server rsync failed:\n{run.stderr[-2000:]}"
    return str(_sshd_path())


@dataclass
class Node:
    """The SSH-reachable box: its namespace, its key and proxy command, and its files."""

    dir: Path
    port: int
    key: Path
    proxy: str
    token: Path
    tmp_ray: Path
    proc: subprocess.Popen
    decoy: subprocess.Popen | None = None  # outside the namespace, matching `ray stop`'s list

    def ssh(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """``command`` on the node, in a login shell like Ray's runner (the node's PATH and token)."""
        cmd = [
            "ssh",
            "-i",
            str(self.key),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            f"ProxyCommand={self.proxy}",
            f"{getpass.getuser()}@127.0.0.1",
            f"bash --login -c {command!r}",
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def logs(self) -> str:
        """What to read when a launch fails: sshd's log and the head's autoscaler/dashboard logs, tails."""
        parts = [f"--- sshd\n{_tail(self.dir / 'sshd.log')}"]
        latest = self.tmp_ray / "session_latest"  # a link to /tmp/ray/session_…, a path inside the namespace
        session = self.tmp_ray / Path(os.readlink(latest)).name / "logs" if latest.is_symlink() else latest
        names = ["monitor.log", "monitor.out", "monitor.err", "dashboard.log", "raylet.out", "gcs_server.out"]
        for path in [*(session / name for name in names), *sorted(session.glob("ray_client_server*.err"))]:
            if path.is_file():
                parts.append(f"--- {path.name}\n{_tail(path)}")
        return "\n".join(parts)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    sshd = _ensure_tools()
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    if probe.returncode != 0:  # without the namespace, `ray stop` over SSH would stop every Ray on this machine
        pytest.skip(f"cannot make a PID namespace here: {probe.stderr.strip()[:200]}")
    d = tmp_path_factory.mktemp("sshnode")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    token = d / "auth_token"
    token.write_text(secrets.token_hex(32))
    (d / "profile").write_text(
        "# The node's login profile, bind-mounted over the real ones inside its namespace only.\n"
        f'export PATH="{VENV_BIN}:$PATH"\nexport RAY_AUTH_TOKEN_PATH="{token}"\nexport RAY_ENABLE_UV_RUN_RUNTIME_ENV=0\n'
    )
    (d / "relay.py").write_text(RELAY)
    tmp_ray = d / "node-tmp-ray"
    tmp_ray.mkdir()
    Path("/tmp/ray").mkdir(exist_ok=True)  # the bind mount's target
    port = _free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"UsePAM no\nStrictModes no\nPidFile {d / 'sshd.pid'}\nPrintMotd no\nMaxStartups 100\nMaxSessions 100\n"
    )  # PidFile holds the namespace's PID (1): never signal it from outside
    (d / "init.sh").write_text(
        NODE_INIT.format(tmp_ray=tmp_ray, home=Path.home(), profile=d / "profile", sshd=sshd, config=d / "sshd_config")
    )
    log = open(d / "sshd.log", "w")  # noqa: SIM115 - lives as long as the node
    # --kill-child: when unshare dies (SIGKILL at the end, or pytest interrupted), sshd — the namespace's PID 1 —
    # is killed, and with it every process in the namespace.
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", str(d / "init.sh")],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    n = Node(d, port, d / "client_key", f"{sys.executable} {d / 'relay.py'} 127.0.0.1 {port}", token, tmp_ray, proc)
    home_files = {p: (p.read_bytes() if p.exists() else None) for p in _bootstrap_files()}
    try:
        deadline = time.monotonic() + 30
        while (ready := n.ssh("true", timeout=20)).returncode != 0:
            assert proc.poll() is None, f"sshd exited:\n{_tail(d / 'sshd.log')}"
            assert time.monotonic() < deadline, f"no SSH login within 30 s: {ready.stderr}\n{n.logs()}"
            time.sleep(0.5)
        n.decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", DECOY_MARK])
        yield n
    finally:
        proc.kill()  # unshare: its --kill-child takes the namespace down
        proc.wait(timeout=30)
        log.close()
        if n.decoy is not None:
            n.decoy.kill()
            n.decoy.wait()
        for p, content in home_files.items():  # Ray's launcher rsyncs these into the head's (this) home
            if content is None:
                p.unlink(missing_ok=True)
            else:
                p.write_bytes(content)


def _bootstrap_files() -> list[Path]:
    return [Path.home() / "ray_bootstrap_config.yaml", Path.home() / "ray_bootstrap_key.pem"]


def _cluster_file(node: Node, path: Path, **auth) -> tuple[Path, dict]:
    """The repo's cluster/local.yaml with this node filled in: 127.0.0.1, no workers, the test's key and proxy
    command, a unique name, free ports for everything the head binds (the suite's own Ray holds the defaults),
    and no file_mounts/setup_commands (same machine: the checkout and its virtualenv are already there)."""
    cfg = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
    ports = {
        flag: _free_port()
        for flag in (
            "--port",
            "--dashboard-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--metrics-export-port",
            "--runtime-env-agent-port",
            "--ray-client-server-port",
            "--node-manager-port",
            "--object-manager-port",
        )
    }
    cfg["cluster_name"] = f"kvray-ssh-test-{uuid.uuid4().hex[:8]}"
    cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    cfg["auth"] = {
        "ssh_user": getpass.getuser(),
        "ssh_private_key": str(node.key),
        "ssh_proxy_command": node.proxy,
        **auth,
    }
    cfg["file_mounts"], cfg["setup_commands"] = {}, []
    start = [
        "ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --num-cpus=2 --num-gpus=0",
        "--disable-usage-stats",
        *(f"{flag}={port}" for flag, port in ports.items()),
        "--autoscaling-config=~/ray_bootstrap_config.yaml",
    ]
    cfg["head_start_ray_commands"] = ["ray stop", " ".join(start)]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, {"name": cfg["cluster_name"], **ports}


def _forget_cluster(name: str) -> None:
    """The launcher's own files for cluster ``name``: the local provider's state, Ray's config cache, the SSH
    control sockets (their ssh masters end with the node or 10 s after last use)."""
    for suffix in ("state", "lock"):
        Path(f"/tmp/ray/cluster-{name}.{suffix}").unlink(missing_ok=True)
    for cache in Path(tempfile.gettempdir()).glob("ray-config-*"):
        if f'"{name}"' in cache.read_text(errors="replace"):
            cache.unlink(missing_ok=True)
    user_hash = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    cluster_hash = hashlib.sha256(name.encode()).hexdigest()[:10]
    shutil.rmtree(f"/tmp/ray_ssh_{user_hash}/{cluster_hash}", ignore_errors=True)
    with contextlib.suppress(OSError):  # the per-user parent, when no other cluster's sockets are in it
        os.rmdir(f"/tmp/ray_ssh_{user_hash}")


def _launch(cluster: Path, node: Node, job: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "RAY_AUTH_TOKEN_PATH": str(node.token),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_AUTH_TOKEN", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kvray.cli",
            "launch",
            "--cluster",
            str(cluster),
            "--job",
            str(job),
            "--output",
            str(out),
            "--no-plots",
            "--timeout-s",
            "300",
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=420,
        cwd=REPO,
    )


def _explain(run: subprocess.CompletedProcess, node: Node) -> str:
    return f"exit {run.returncode}\n--- stdout\n{run.stdout[-4000:]}\n--- stderr\n{run.stderr[-4000:]}\n{node.logs()}"


def _up(run: subprocess.CompletedProcess, node: Node) -> tuple[float, str]:
    match = UP_LINE.search(run.stdout)
    assert match, f"no bring-up line\n{_explain(run, node)}"
    return float(match.group(2)), match.group(3)


def _came_home(run: subprocess.CompletedProcess, node: Node, out: Path, client_port: int) -> None:
    """Four ok rows in ``out``, over Ray Client on the port the file gives the head — or, when Ray Client did not
    connect, through the fallback job's log after a line naming that same port. (Ray Client's proxy now and then
    loses the server process it has just spawned for a client on a loaded machine; the fallback is the
    launcher's answer to exactly that.)"""
    from kvray.data.reader import load_dataset

    via_client = "dataset home over Ray Client" in run.stdout
    assert via_client or f"Ray Client at ray://127.0.0.1:{client_port}:" in run.stdout, _explain(run, node)
    cells, _, _ = load_dataset(out)
    assert len(cells) == 4 and set(cells["status"]) == {"ok"}, cells[["cell_id", "status"]]


def _raylet_pids(node: Node) -> list[int]:
    ps = node.ssh("pgrep -x raylet || true")
    assert ps.returncode == 0, ps.stderr
    return [int(p) for p in ps.stdout.split()]


def test_ray_stop_over_ssh_sees_only_the_node(node):
    """`ray stop` and a `pkill` over SSH leave a process outside the namespace alone — a decoy whose command line
    matches Ray's own stop list, so a `ray stop` that saw it would kill it."""
    inside = node.ssh("ps -e -o pid= | wc -l; ls /tmp/ray")
    assert inside.returncode == 0, inside.stderr
    assert int(inside.stdout.split()[0]) < 20  # sshd, this session, ps: not the machine's processes
    stop = node.ssh("pkill -f 'log_monitor[.]py'; ray stop")  # [.]: not this shell's own command line
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "Did not find any active Ray processes" in stop.stdout + stop.stderr
    assert node.decoy.poll() is None, "ray stop over SSH killed a process outside the node's namespace"


def test_launch_brings_up_reuses_and_tears_down(node, tmp_path):
    job = tmp_path / "launch_smoke.yaml"
    job.write_text(SIM_JOB)
    cluster, ports = _cluster_file(node, tmp_path / "local.yaml")
    name = ports["name"]
    try:
        first = _launch(cluster, node, job, tmp_path / "out1")
        assert first.returncode == 0, _explain(first, node)
        first_s, how = _up(first, node)
        assert how == "new", _explain(first, node)
        _came_home(first, node, tmp_path / "out1", ports["--ray-client-server-port"])
        raylets = _raylet_pids(node)
        assert len(raylets) == 1

        second = _launch(cluster, node, job, tmp_path / "out2")
        assert second.returncode == 0, _explain(second, node)
        second_s, how = _up(second, node)
        assert how == "already running: reused", _explain(second, node)
        assert second_s < first_s / 2, (first_s, second_s)
        assert _raylet_pids(node) == raylets, "the second launch restarted Ray"
        _came_home(second, node, tmp_path / "out2", ports["--ray-client-server-port"])
        print(f"bring-up: {first_s:.1f} s new, {second_s:.1f} s reused")

        _check_tunnel(node, cluster, ports)

        third = _launch(cluster, node, job, tmp_path / "out3", "--down")
        assert third.returncode == 0, _explain(third, node)
        assert _up(third, node)[1] == "already running: reused"
        down = re.search(rf"kvray: cluster {name} torn down in ([\d.]+) s", third.stdout)
        assert down, _explain(third, node)
        print(f"teardown: {down.group(1)} s")
        _came_home(third, node, tmp_path / "out3", ports["--ray-client-server-port"])
        from kvray.launch.cluster_up import _dashboard_answers

        assert not _dashboard_answers(f"http://127.0.0.1:{ports['--dashboard-port']}")
        assert _raylet_pids(node) == [], "--down left a raylet on the node"
        assert node.decoy.poll() is None, "a `ray stop` on the node killed a process outside it"
    finally:
        node.ssh("ray stop --force")  # after a failure: nothing of this cluster keeps running
        _forget_cluster(name)


def _check_tunnel(node: Node, cluster: Path, ports: dict) -> None:
    """The path a remote head takes (the head here is reached directly): kvray's SSH tunnel from free local ports
    to the head's dashboard and Ray Client ports, with Ray Client answering through it."""
    from kvray.launch import cluster_up

    cfg = yaml.safe_load(cluster.read_text())
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(node.token)  # what the launcher would send
    try:
        reached = cluster_up._dashboard_tunnel(
            cfg["auth"], "127.0.0.1", ports["--dashboard-port"], ports["--ray-client-server-port"]
        )
        url, client_port, tunnel = reached
        try:
            deadline = time.monotonic() + 30
            while not cluster_up._dashboard_answers(url):
                assert tunnel.poll() is None, tunnel.stderr.read()
                assert time.monotonic() < deadline, "the dashboard did not answer through the tunnel"
                time.sleep(0.5)
            assert url != f"http://127.0.0.1:{ports['--dashboard-port']}"
            code = (
                "from ray._private.authentication.authentication_token_setup import "
                "maybe_enable_token_auth_if_token_available as f; f(warn_if_disabled=False); import ray; "
                f"ray.init('ray://127.0.0.1:{client_port}', logging_level='ERROR'); "
                "print('CPUS', ray.cluster_resources().get('CPU'))"
            )
            env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}  # else Ray Client's server runs `uv run`
            for _ in range(2):  # a second try for Ray Client's occasional lost server (see _came_home)
                client = subprocess.run(
                    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
                )
                if "CPUS 2.0" in client.stdout:
                    break
            assert "CPUS 2.0" in client.stdout, client.stdout[-2000:] + client.stderr[-2000:]
        finally:
            cluster_up._close(reached)
    finally:
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)


def test_bring_up_failures_are_one_line(node, tmp_path):
    """No SSH to the head — refused, a key it does not accept, a key file that is not there — is one line and a
    nonzero exit in seconds, before Ray's updater (which would retry for 15 minutes), with nothing started."""
    job = tmp_path / "j.yaml"
    job.write_text(SIM_JOB)
    stranger = tmp_path / "stranger_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    closed = _free_port()
    cases = {
        "refused": ({"ssh_proxy_command": f"{sys.executable} {node.dir / 'relay.py'} 127.0.0.1 {closed}"}, "refused"),
        "bad key": ({"ssh_private_key": str(stranger)}, "Permission denied"),
        "no key file": ({"ssh_private_key": str(tmp_path / "missing_key")}, "does not exist"),
    }
    for case, (auth, expected) in cases.items():
        cluster, ports = _cluster_file(node, tmp_path / f"{case.replace(' ', '_')}.yaml", **auth)
        try:
            started = time.monotonic()
            run = _launch(cluster, node, job, tmp_path / "out")
            took = time.monotonic() - started
        finally:
            _forget_cluster(ports["name"])
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and expected in lines[0], (case, _explain(run, node))
        assert "Traceback" not in run.stdout + run.stderr and lines[0].startswith("kvray: error: ")
        assert took < 60, (case, took)
    assert not (tmp_path / "out").exists()
