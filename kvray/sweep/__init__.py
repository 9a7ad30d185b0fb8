"""Everything that touches Ray in a local or joined sweep: the scheduler, worker pool and driver, the collector, placement.

    from kvray.sweep import run_job, status_counts, last_run

The names below are imported on first use, so ``import kvray.sweep`` imports neither Ray nor the planner.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvray.data.manifest import last_run
    from kvray.data.status import default_output_dir
    from kvray.sweep.driver import RunRecord, Sweep, SweepError, run_job
    from kvray.sweep.ray_env import Cluster, connect, import_ray, ray_is_running, start_local_ray
    from kvray.sweep.results import status_counts

__all__ = [
    "Cluster",
    "RunRecord",
    "Sweep",
    "SweepError",
    "connect",
    "default_output_dir",
    "import_ray",
    "last_run",
    "ray_is_running",
    "run_job",
    "start_local_ray",
    "status_counts",
]

_HOMES = {
    "RunRecord": "kvray.sweep.driver",
    "Sweep": "kvray.sweep.driver",
    "SweepError": "kvray.sweep.driver",
    "run_job": "kvray.sweep.driver",
    "Cluster": "kvray.sweep.ray_env",
    "connect": "kvray.sweep.ray_env",
    "import_ray": "kvray.sweep.ray_env",
    "ray_is_running": "kvray.sweep.ray_env",
    "start_local_ray": "kvray.sweep.ray_env",
    "status_counts": "kvray.sweep.results",
    "last_run": "kvray.data.manifest",
    "default_output_dir": "kvray.data.status",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
