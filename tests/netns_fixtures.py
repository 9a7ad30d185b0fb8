"""A multi-node Ray cluster on this machine whose nodes live in their own network namespaces, so that a node can
be cut off (its link down) mid-sweep and reconnected later: a network partition, not a process death.

Topology (every name and address made here, removed on exit): a Linux bridge in the root namespace, and per
node a namespace ``kvp<token>-<node>`` joined to the bridge by a veth pair, with an address 10.<a>.<b>.<n>/24
on a subnet no interface of this machine has. The head (GCS, its raylet, the driver and so the collector) is
node ``head``; the workers are ``w1``, ``w2``… Cutting a node is ``ip link set <its bridge-side veth> down``:
its processes run on, and nothing they send arrives, as when a switch port or a cable goes.

Each namespace has its own port space, so every Ray process uses Ray's default ports there, none shared with
anything else on the machine; the cluster's files live in its own RAY_TMPDIR (no /tmp/ray/ray_current_cluster
for other sessions to join), and token authentication is off (RAY_AUTH_MODE=disabled: ~/.ray is untouched).
Ray's processes are started with ``ray start --block`` in their own process group and stopped by that group.

``netns_available()`` says, with the exact error, when this machine cannot make namespaces or veth pairs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

GCS_PORT = 6379  # Ray's default: the head's namespace has nothing else on it
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_USAGE_STATS_ENABLED": "0"}
START_TRIES = 3  # `ray start` gives a raylet 30 s to register: on a loaded 2-core machine it sometimes needs more


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def netns_available() -> str | None:
    """None when this machine can make a network namespace and a veth pair; else the exact error."""
    name = f"kvprobe{secrets.token_hex(3)}"
    try:
        made = _ip("netns", "add", name, check=False)
        if made.returncode:
            return f"ip netns add: {made.stderr.strip()}"
        veth = _ip("link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b", check=False)
        if veth.returncode:
            return f"ip link add … type veth: {veth.stderr.strip()}"
        _ip("link", "del", f"{name}a", check=False)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        _ip("netns", "del", name, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that no interface of this machine is on."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{secrets.randbelow(200) + 50}.{secrets.randbelow(250) + 1}.0/24")
        if f" {str(net.network_address).rsplit('.', 1)[0]}." not in used:
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet")


@dataclass
class Node:
    name: str
    netns: str
    address: str
    veth: str  # the bridge-side end: down = the node is cut off
    procs: list[subprocess.Popen] = field(default_factory=list)


@dataclass
class PartitionLab:
    """The namespaces, the bridge and Ray's processes of one test; ``close`` removes all of it."""

    token: str
    folder: Path
    bridge: str
    subnet: ipaddress.IPv4Network
    nodes: dict[str, Node] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, folder: Path, workers: int) -> PartitionLab:
        token = secrets.token_hex(2)
        tmp = Path(f"/tmp/kvp{token}")  # short: Ray's unix sockets live under it (108-byte path limit)
        tmp.mkdir()
        env = {
            **os.environ,
            **RAY_ENV,
            "RAY_TMPDIR": str(tmp),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
        lab = cls(token=token, folder=folder, bridge=f"kvpbr{token}", subnet=_free_subnet(), env=env)
        try:
            _ip("link", "add", lab.bridge, "type", "bridge")
            _ip("link", "set", lab.bridge, "up")
            for i, name in enumerate(["head", *(f"w{k}" for k in range(1, workers + 1))], start=1):
                lab._add_node(name, i)
        except BaseException:
            lab.close()
            raise
        return lab

    def add_node(self, name: str) -> Node:
        """One more namespace on the bridge (no Ray in it: a machine that only runs a driver, say)."""
        self._add_node(name, len(self.nodes) + 1)
        return self.nodes[name]

    def _add_node(self, name: str, index: int) -> None:
        netns, outer, inner = f"kvp{self.token}-{name}", f"kvp{self.token}{name}", f"kvp{self.token}{name}i"
        address = str(self.subnet.network_address + index)
        _ip("netns", "add", netns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", netns)
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")
        _ip("addr", "add", f"{address}/24", "dev", inner, netns=netns)
        _ip("link", "set", inner, "up", netns=netns)
        _ip("link", "set", "lo", "up", netns=netns)
        self.nodes[name] = Node(name, netns, address, outer)

    @property
    def head(self) -> Node:
        return self.nodes["head"]

    @property
    def gcs_address(self) -> str:
        return f"{self.head.address}:{GCS_PORT}"

    def popen(self, node: str, cmd: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """``cmd`` in ``node``'s namespace, its own process group, output to ``log`` in the lab's folder."""
        out = open(self.folder / log, "a")  # noqa: SIM115 - lives as long as the process
        cmd = ["ip", "netns", "exec", self.nodes[node].netns, *cmd]
        env = {**self.env, **(env or {})}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.nodes[node].procs.append(proc)
        return proc

    def start_head(self, *, env: dict[str, str] | None = None, num_cpus: int = 1) -> None:
        """The head (GCS and a raylet with ``num_cpus`` CPUs, no GPU, no dashboard); returns once it is up."""
        cmd = ["ray", "start", "--head", "--block", f"--node-ip-address={self.head.address}", f"--port={GCS_PORT}"]
        cmd += [f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"]
        self._start("head", cmd, env)

    def start_worker(
        self,
        node: str,
        *,
        num_gpus: int = 1,
        resources: dict[str, float] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """A worker node joining the head: one CPU, ``num_gpus`` logical GPUs; returns once it is up."""
        import json

        cmd = ["ray", "start", "--block", f"--address={self.gcs_address}"]
        cmd += [f"--node-ip-address={self.nodes[node].address}", "--num-cpus=1", f"--num-gpus={num_gpus}"]
        cmd += ["--disable-usage-stats", *([f"--resources={json.dumps(resources)}"] if resources else [])]
        self._start(node, cmd, env)

    def _start(self, node: str, cmd: list[str], env: dict[str, str] | None) -> None:
        log = self.folder / f"{node}.log"
        for _ in range(START_TRIES):
            start = log.stat().st_size if log.exists() else 0
            proc = self.popen(node, cmd, log.name, env)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if "Ray runtime started" in log.read_text()[start:]:
                    return
                time.sleep(0.5)
            self.stop_node(node)  # timed out registering (a loaded machine), or exited: once more
        raise RuntimeError(f"ray start on {node} failed {START_TRIES} times: {log.read_text()[-1500:]}")

    def stop_node(self, node: str) -> None:
        """Every process started on ``node`` (its Ray), by process group: SIGTERM, then SIGKILL."""
        for proc in self.nodes[node].procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.nodes[node].procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.nodes[node].procs.clear()

    def crash_node(self, node: str) -> float:
        """SIGKILL to the Ray started on ``node`` (its ``ray start`` process group; a driver started there runs
        on): a machine's Ray gone at once, no drain. Returns when it happened (time.time())."""
        at = time.time()
        for proc in self.nodes[node].procs:
            if proc.args[4:6] == ["ray", "start"]:  # ip netns exec NS ray start …: Ray's processes, not a driver
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.nodes[node].procs = [p for p in self.nodes[node].procs if p.poll() is None]
        return at

    def cut(self, node: str) -> float:
        """The node's link down: a partition. Returns the time it happened (time.time())."""
        _ip("link", "set", self.nodes[node].veth, "down")
        return time.time()

    def reconnect(self, node: str) -> float:
        _ip("link", "set", self.nodes[node].veth, "up")
        return time.time()

    def close(self) -> None:
        for name in list(self.nodes):
            self.stop_node(name)
        for node in self.nodes.values():
            _ip("link", "del", node.veth, check=False)
            # a process the group kill missed would keep the namespace's sockets: kill what is left in it
            pids = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", node.netns, check=False)
        _ip("link", "del", self.bridge, check=False)
        subprocess.run(["rm", "-rf", f"/tmp/kvp{self.token}"], check=False)


@pytest.fixture
def partition_lab(tmp_path: Path) -> Iterator[PartitionLab]:
    """Namespaces and a bridge for a head and two workers (Ray not started: each test starts what it needs)."""
    problem = netns_available()
    if problem is not None:
        pytest.fail(f"network namespaces are not available on this machine: {problem}")
    lab = PartitionLab.create(tmp_path, workers=2)
    try:
        yield lab
    finally:
        lab.close()
