"""Start, health-check and stop a local inference server process (vLLM, ``transformers serve``).

A server runs in its own process group with its output in a log file, so stopping it takes its engine
workers with it and a failed start can be explained from the log's last lines instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvray.errors import KvrayInputError
from kvray.measure.memory import tree_rss_bytes

# Runs detached (double fork: not a child of kvray, so a Ray worker's exit cannot take it down first) and blocks
# on a pipe whose write end only kvray holds; when kvray exits by any means, even SIGKILL, the read returns and
# the server's whole process group — API server, engine core, workers — is terminated.
_GUARDIAN = """
import os, signal, sys, time
if os.fork():
    os._exit(0)
pgid = int(sys.argv[1])
try:
    sys.stdin.buffer.read()
except Exception:
    pass
for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 0.0)):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        break
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            sys.exit(0)
        time.sleep(0.2)
"""


class ServerStartError(RuntimeError):
    """The server exited or never became healthy; the message ends with the last lines of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ServerProcess:
    """One server: ``start()`` launches ``command`` and waits for ``health_url`` to answer 200."""

    def __init__(
        self,
        command: Sequence[str],
        health_url: str,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        name: str = "server",
    ):
        self.command = list(command)
        self.health_url = health_url
        self.base_url = health_url.rsplit("/", 1)[0]  # scheme://host:port of a server whose health is /health
        self.env = env
        self.name = name
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="kvray-server-")) / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None
        self._guard_fd: int | None = None  # write end of the guardian's pipe

    def start(self, timeout_s: float = 300.0) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        import atexit

        env = {**os.environ, **(self.env or {})}
        t0 = time.perf_counter()
        atexit.register(self.stop)  # a crashed or interrupted kvray must not leave a server behind
        with open(self.log_path, "wb") as log:
            try:
                self.proc = subprocess.Popen(
                    self.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            except FileNotFoundError:
                raise KvrayInputError(f"cannot start {self.name}: {self.command[0]!r} not found") from None
        self._start_guardian(self.proc.pid)
        try:
            self.wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def _start_guardian(self, pgid: int) -> None:
        import sys

        read_fd, write_fd = os.pipe()
        os.set_inheritable(write_fd, False)
        try:
            subprocess.run(
                [sys.executable, "-c", _GUARDIAN, str(pgid)],
                stdin=read_fd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                check=True,
                timeout=30,
            )
        finally:
            os.close(read_fd)
        self._guard_fd = write_fd

    def wait_healthy(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with code {self.proc.returncode} during start-up; log {self.log_path}:\n"
                    + tail(self.log_path)
                )
            try:
                if httpx.get(self.health_url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{self.name} not healthy at {self.health_url} after {timeout_s:.0f} s; log {self.log_path}:\n"
                    + tail(self.log_path)
                )
            time.sleep(0.5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        """The server and its children (engine core, workers), for memory accounting."""
        if not self.running:
            return []
        assert self.proc is not None
        import psutil

        try:
            parent = psutil.Process(self.proc.pid)
            return [parent.pid, *(c.pid for c in parent.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def rss_bytes(self) -> int | None:
        """Resident memory of the whole server process tree (None once it has gone)."""
        return tree_rss_bytes(self.pids())

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace_s``; the guardian then exits on its own."""
        proc, self.proc = self.proc, None
        guard_fd, self._guard_fd = self._guard_fd, None
        try:
            self._stop_group(proc, grace_s)
        finally:
            if guard_fd is not None:
                os.close(guard_fd)

    @staticmethod
    def _stop_group(proc: subprocess.Popen[bytes] | None, grace_s: float) -> None:
        """The whole group: an engine core can outlive its API server, so wait for the group, not the leader."""
        if proc is None:
            return
        pgid = proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or its zombie keeps the group "alive"
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def transformers_serve_command(
    model_dir: str | Path,
    port: int,
    host: str = "127.0.0.1",
    continuous_batching: bool = False,
    device: str = "cpu",
    executable: str = "transformers",
    extra: Sequence[str] = (),
) -> list[str]:
    """``transformers serve`` (transformers ≥ 5) pinned to one model on ``host:port``."""
    cmd = [executable, "serve", str(model_dir), "--host", host, "--port", str(port), "--device", device]
    cmd.append("--continuous-batching" if continuous_batching else "--no-continuous-batching")
    return cmd + list(extra)
