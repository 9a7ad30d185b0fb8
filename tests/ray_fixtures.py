"""One Ray per test session: 2 CPUs and 4 logical GPUs, started once (``ray.init`` costs 5–20 s on 2 cores).

Import the fixture into a test module with ``from ray_fixtures import ray_session  # noqa: F401``.
``start_local_ray`` uses ``address="local"`` (a stale ``ray_current_cluster`` file from an earlier crash
cannot make the session join a dead one) and retries a node that timed out during startup on a busy machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

NUM_CPUS = 2
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
