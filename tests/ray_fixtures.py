"""One Ray per test session: 2 CPUs and 4 logical GPUs, started once (``ray.init`` costs 5–20 s on 2 cores); and
one real `ray start --head` per session for the tests that need a head node (``ray_head``).

A test asks for ``ray_session`` or ``ray_head`` by name (tests/conftest.py loads this module as a plugin; such a
test is integration or cluster tier).
``start_local_ray`` uses ``address="local"`` (a stale ``ray_current_cluster`` file from an earlier crash
cannot make the session join a dead one) and retries a node that timed out during startup on a busy machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvray.servers.process import free_port  # noqa: F401 - re-exported to the tests

NUM_CPUS = 2
# Four simulated cells (2 prompt lengths × 2 concurrencies; 1 + 2 requests at each length): seconds on any Ray,
# no GPU, no weights — the job every remote-run test (launch, object storage, SSH, a bare head) sends.
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
NUM_GPUS = 4  # logical: actors get CUDA_VISIBLE_DEVICES 0..3, torch still sees no CUDA


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    from kvray.sweep.ray_env import import_ray, ray_is_running, start_local_ray

    started = False
    if not ray_is_running():
        start_local_ray(num_cpus=NUM_CPUS, num_gpus=NUM_GPUS)
        started = True
    ray = import_ray()
    yield ray
    if started:
        ray.shutdown()


HEAD_PORT_FLAGS = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                   "--runtime-env-agent-port", "--ray-client-server-port", "--node-manager-port",
                   "--object-manager-port")  # fmt: skip


class HeadURL(str):
    """A Ray head's dashboard URL (what ``--address`` takes), with every port the head bound, by flag."""

    ports: dict[str, int]


_HEAD: dict[str, tuple[HeadURL, contextlib.ExitStack]] = {}  # the session's head, while a module needs it


@pytest.fixture(scope="module")
def ray_head(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeadURL]:
    """One real `ray start --head` on 127.0.0.1 for the session, running this virtualenv's Python, 2 CPUs and no
    GPU (``ray_head_process``): every module that asks for it shares it (a start is 20–30 s on 2 cores), and it
    is stopped once no module collected later asks for it — an idle head's GCS, raylet and dashboard would run
    beside every later test. A head that must differ (another Python, other resources) is a fixture of its own:
    tests/test_launch_bare.py's ``bare_head``."""
    import atexit
    import sys

    from servers_fixtures import later_items

    if "head" not in _HEAD:
        stack = contextlib.ExitStack()
        atexit.register(stack.close)  # an interrupted session still stops it
        url, ports = stack.enter_context(ray_head_process(tmp_path_factory.mktemp("head"), Path(sys.executable).parent))
        head = HeadURL(url)
        head.ports = ports
        _HEAD["head"] = (head, stack)
    yield _HEAD["head"][0]
    if not any("ray_head" in item.fixturenames for item in later_items(request)):
        _HEAD.pop("head")[1].close()


@contextlib.contextmanager
def ray_head_process(log_dir: Path, bin_dir: Path, env: dict[str, str] | None = None) -> Iterator[tuple[str, dict]]:
    """A real `ray start --head` on 127.0.0.1 whose Python is ``bin_dir``'s (its ``ray`` and ``python`` first on
    PATH), in its own process group so exactly it is stopped; yields (dashboard URL, ports by flag).

    Every port the head binds is a free one: the suite's own local Ray already holds the defaults (the
    dashboard agent's 52365 above all), and an agent that cannot bind leaves the Jobs API answering "No
    available agent to submit job" for ever."""
    import httpx

    from kvray.launch.jobs_api import ray_auth_headers

    gcs_port, dash_port = free_port(), free_port()
    ports = {flag: free_port() for flag in HEAD_PORT_FLAGS}
    base = {**os.environ, **(env or {})}
    base.pop("VIRTUAL_ENV", None)  # the head's Python is bin_dir's, not the one running the tests
    env = {**base, "PATH": f"{bin_dir}{os.pathsep}{base['PATH']}", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    log = open(log_dir / "head.log", "w")  # noqa: SIM115 - lives as long as the head
    cmd = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--disable-usage-stats",
        "--include-dashboard=true",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/api/version", timeout=2, headers=ray_auth_headers()).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, f"ray start --head exited: {(log_dir / 'head.log').read_text()[-2000:]}"
            time.sleep(1)
        else:
            pytest.fail("the Ray head's dashboard did not come up within 120 s")
        yield url, {"--port": gcs_port, "--dashboard-port": dash_port, **ports}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)  # then SIGKILL: a test head has nothing to drain
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
