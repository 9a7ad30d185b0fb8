"""A dataset home from a remote cluster through Ray itself: held by a detached actor, pulled in chunks.

Job logs are a channel for text that Ray keeps "best effort": a 10,000-cell sweep is hundreds of MB, and a
log line lost or cut in the middle of a base64 stream is a dataset lost. So the remote job, once `kvray run`
has ended (well or not), packs its output folder into one tar file and hands it, chunk by chunk, to a
**detached actor** named after the launch (``kvray-dataset-<token>`` in namespace ``kvray``); it prints one
marker line with the name, the size and the SHA-256. The launcher connects to the cluster as a Ray Client
(``ray://HOST:10001``), asks the actor for each chunk in turn, writes them to a temporary file while hashing,
checks size and hash, and only then unpacks and tells the actor to go. Memory on either side is a few
chunks; an actor nobody fetches from ends itself after ``ttl_s``.

Where Ray Client cannot connect (its port not reachable, or a Ray/Python version that differs from the
cluster's — Ray Client needs both to match), the launcher falls back to a second small job that prints the
held tarball into its log (:func:`emit`), and says so; that is the old channel, kept for small results.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CHUNK_BYTES = 8 * 1024 * 1024
NAMESPACE = "kvray"
HELD = "KVRAY-DATASET-HELD "
BEGIN, END = "KVRAY-DATASET-BEGIN", "KVRAY-DATASET-END"
DEFAULT_TTL_S = 3600.0


@dataclass(frozen=True)
class Held:
    """What the remote job left for the launcher: which actor, and what the bytes must add up to."""

    actor: str
    size_bytes: int
    sha256: str
    chunks: int
    files: int

    def marker(self) -> str:
        return HELD + json.dumps(asdict(self))

    @classmethod
    def from_logs(cls, logs: str) -> Held | None:
        line = next((ln for ln in reversed(logs.splitlines()) if ln.startswith(HELD)), None)
        return cls(**json.loads(line[len(HELD) :])) if line else None


def pack(out_dir: str | Path, tar_path: str | Path) -> int:
    """The output folder as a tar.gz (level 1: JSONL shrinks ~5×, at a CPU cost far below the transfer's);
    hidden files (temp files of a writer) are left out. Returns how many files went in."""
    files = 0
    with tarfile.open(tar_path, mode="w:gz", compresslevel=1) as tar:
        for f in sorted(Path(out_dir).iterdir()):
            if f.name.startswith("."):
                continue
            tar.add(f, arcname=f.name)
            files += sum(1 for p in f.rglob("*") if p.is_file()) if f.is_dir() else 1
    return files


def unpack(tar_path: str | Path, out_dir: str | Path) -> list[str]:
    """Extract into ``out_dir`` (created); returns the member names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, mode="r:gz") as tar:
        names = tar.getnames()
        tar.extractall(out, filter="data")
    return names


def _holder_class() -> Any:
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class DatasetHolder:
        """Chunks of one packed dataset in memory, until fetched or ``ttl_s`` has passed."""

        def __init__(self, ttl_s: float) -> None:
            self._chunks: dict[int, bytes] = {}
            timer = threading.Timer(ttl_s, os._exit, args=(0,))
            timer.daemon = True
            timer.start()

        def put(self, index: int, data: bytes) -> int:
            self._chunks[index] = data
            return len(data)

        def chunk(self, index: int) -> bytes:
            return self._chunks[index]

        def release(self) -> None:
            self._chunks.clear()
            import ray as _ray

            _ray.actor.exit_actor()

    return DatasetHolder


def hold(out_dir: str | Path, name: str, ttl_s: float = DEFAULT_TTL_S) -> Held:
    """Run on the cluster after the sweep: pack ``out_dir`` and give it to a detached actor ``name``."""
    import ray

    if not ray.is_initialized():
        ray.init(address="auto", namespace=NAMESPACE, logging_level=logging.ERROR, log_to_driver=False)
    holder = _holder_class().options(name=name, namespace=NAMESPACE, lifetime="detached").remote(ttl_s)
    digest = hashlib.sha256()
    size = chunks = 0
    with tempfile.TemporaryDirectory(prefix="kvray-hold-") as tmp:
        tar_path = Path(tmp) / "dataset.tar.gz"
        files = pack(out_dir, tar_path)
        pending: list[Any] = []
        with open(tar_path, "rb") as f:
            while data := f.read(CHUNK_BYTES):
                digest.update(data)
                size += len(data)
                pending.append(holder.put.remote(chunks, data))
                chunks += 1
                if len(pending) >= 4:  # a few chunks in flight: memory stays bounded on both sides
                    ray.get(pending.pop(0))
        ray.get(pending)
    return Held(name, size, digest.hexdigest(), chunks, files)


def client_address(dashboard_url: str, client_port: int) -> str:
    """``ray://HOST:PORT`` for the dashboard's host: Ray Client listens on the head beside the dashboard."""
    from urllib.parse import urlparse

    return f"ray://{urlparse(dashboard_url).hostname}:{client_port}"


def fetch(address: str, held: Held, out_dir: str | Path, timeout_s: float = 60.0) -> list[str]:
    """Pull ``held`` over Ray Client at ``address`` (``ray://HOST:PORT``), check it, unpack into ``out_dir``.

    Raises ConnectionError when Ray Client cannot be reached or refuses this Ray/Python, ValueError when the
    bytes do not add up (nothing is unpacked then). Runs in a child process: a Ray Client connection, failed
    or closed, leaves Ray's process-wide state disconnected — a caller that is itself a Ray driver (an exp
    command's process, a notebook) would lose its own Ray."""
    import subprocess

    child = subprocess.run(
        [sys.executable, "-m", "kvray.launch.transfer", "fetch", address, held.marker(), str(out_dir), str(timeout_s)],
        capture_output=True,
        text=True,
    )
    last = (child.stderr.strip().splitlines() or [f"exit code {child.returncode}"])[-1]
    if child.returncode == FETCH_UNREACHABLE:
        raise ConnectionError(last)
    if child.returncode == FETCH_MISMATCH:
        raise ValueError(last)
    if child.returncode != 0:
        raise RuntimeError(f"fetching {held.actor} failed: {last}")
    return list(json.loads(child.stdout.strip().splitlines()[-1]))


FETCH_UNREACHABLE, FETCH_MISMATCH = 3, 4  # the child's exit codes for fetch's two expected failures


def _fetch_here(address: str, held: Held, out_dir: str | Path, timeout_s: float) -> list[str]:
    """:func:`fetch`'s work, in the process that runs it."""

    with contextlib.suppress(ImportError):  # Ray Client sends the cluster's token only in token mode, which a
        # driver outside the cluster enters when it has a token (RAY_AUTH_TOKEN, ~/.ray/auth_token): Ray's own
        # rule for `ray.init(address=...)`, which `ray://` addresses skip
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    ctx = _connect(address)
    try:
        with ctx:
            return _pull(held, out_dir, timeout_s)
    finally:
        ctx.disconnect()


CONNECT_TRIES = 3


def _connect(address: str) -> Any:
    """``ray.init`` over Ray Client, tried up to CONNECT_TRIES times when the server's side fails to start.

    Each Ray Client connection gets its own server process on the head, which must answer within 30 s
    (``RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S``); on a busy head it sometimes does not, and the client sees
    "Initialization failure from server" — a failure of that one try, not of the cluster. Other failures (the
    port unreachable, after Ray's own retries; a Ray/Python mismatch) are final at once."""
    import ray

    for attempt in range(1, CONNECT_TRIES + 1):
        try:
            return ray.init(address=address, namespace=NAMESPACE, logging_level=logging.ERROR, allow_multiple=True)
        except Exception as exc:  # grpc errors, version mismatch (RuntimeError), timeouts
            transient = isinstance(exc, ConnectionAbortedError) and "Initialization failure" in str(exc)
            if not transient or attempt == CONNECT_TRIES:
                raise ConnectionError(f"Ray Client at {address}: {_reason(exc)}") from None
            print(f"Ray Client at {address}: try {attempt} failed ({_reason(exc)}); trying again", file=sys.stderr)
            time.sleep(2.0 * attempt)
    raise AssertionError("unreachable")


def _reason(exc: BaseException) -> str:
    """The first line of ``exc`` and, for a server-side traceback, its last line (the error itself)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    return (lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}")[:300]


def _pull(held: Held, out_dir: str | Path, timeout_s: float) -> list[str]:
    """The chunks of ``held``, in order, next one in flight, into a checked tarball, unpacked into ``out_dir``."""
    import ray

    holder = ray.get_actor(held.actor, namespace=NAMESPACE)
    digest = hashlib.sha256()
    size = 0
    with tempfile.TemporaryDirectory(prefix="kvray-fetch-") as tmp:
        tar_path = Path(tmp) / "dataset.tar.gz"
        with open(tar_path, "wb") as f:
            nxt: Any = holder.chunk.remote(0)
            for i in range(held.chunks):
                data = ray.get(nxt, timeout=timeout_s)
                if i + 1 < held.chunks:
                    nxt = holder.chunk.remote(i + 1)  # the next chunk in flight while this one is written
                digest.update(data)
                size += len(data)
                f.write(data)
        if size != held.size_bytes or digest.hexdigest() != held.sha256:
            raise ValueError(
                f"the dataset from {held.actor} does not add up: {size} bytes, sha256 {digest.hexdigest()[:12]}… "
                f"(the job said {held.size_bytes} bytes, {held.sha256[:12]}…); nothing was unpacked"
            )
        names = unpack(tar_path, out_dir)
    with contextlib.suppress(Exception):
        holder.release.remote()
    return names


def emit(name: str) -> None:
    """The fallback channel, run as its own small job: the held tarball printed as base64 between markers."""
    import ray

    ray.init(address="auto", namespace=NAMESPACE, logging_level=logging.ERROR, log_to_driver=False)
    holder = ray.get_actor(name, namespace=NAMESPACE)
    print(BEGIN, flush=True)
    i = 0
    while True:
        try:
            data = bytes(ray.get(holder.chunk.remote(i)))
        except Exception:  # KeyError inside the actor: past the last chunk
            break
        blob = base64.b64encode(data).decode()
        print("\n".join(blob[j : j + 100] for j in range(0, len(blob), 100)), flush=True)
        i += 1
    print(END, flush=True)
    holder.release.remote()
    time.sleep(0.5)


def unpack_logs(logs: str, out_dir: str | Path) -> list[str]:
    """Extract the base64 tarball :func:`emit` printed into ``logs``; returns the member names."""
    start = logs.rfind(BEGIN)
    stop = logs.find(END, start)
    if start < 0 or stop < 0:
        raise ValueError("the job's log holds no dataset")
    blob = "".join(line.strip() for line in logs[start + len(BEGIN) : stop].splitlines())
    with tempfile.TemporaryDirectory(prefix="kvray-fetch-") as tmp:
        tar_path = Path(tmp) / "dataset.tar.gz"
        tar_path.write_bytes(base64.b64decode(blob))
        return unpack(tar_path, out_dir)


def main(argv: list[str]) -> int:
    """``python -m kvray.launch.transfer hold DIR NAME [TTL_S]`` (after the sweep, on the cluster) or
    ``… emit NAME`` (the fallback job)."""
    if len(argv) >= 3 and argv[0] == "hold":
        if not Path(argv[1]).is_dir():
            print(f"kvray: nothing to hold: {argv[1]} is not a folder", file=sys.stderr)
            return 1
        held = hold(argv[1], argv[2], float(argv[3]) if len(argv) > 3 else DEFAULT_TTL_S)
        print(held.marker(), flush=True)
        return 0
    if len(argv) == 5 and argv[0] == "fetch":
        held = Held(**json.loads(argv[2][len(HELD) :]))
        try:
            names = _fetch_here(argv[1], held, argv[3], float(argv[4]))
        except ConnectionError as exc:
            print(exc, file=sys.stderr)
            return FETCH_UNREACHABLE
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return FETCH_MISMATCH
        print(json.dumps(names), flush=True)
        return 0
    if len(argv) == 2 and argv[0] == "emit":
        emit(argv[1])
        return 0
    print(
        "usage: python -m kvray.launch.transfer hold DIR NAME [TTL_S] | emit NAME | fetch ADDRESS MARKER DIR TIMEOUT_S",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
