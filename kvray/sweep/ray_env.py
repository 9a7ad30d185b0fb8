"""Ray itself: importing it with kvray's settings, joining or starting a cluster, and what the cluster offers.

Every other kvray module reaches Ray through ``import_ray`` here, inside functions, so importing kvray never
imports Ray (``kvray --help`` stays fast and the scheduler stays testable without it).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kvray.errors import KvrayInputError

LOCAL_START_ATTEMPTS = 3


def import_ray() -> Any:
    """Import Ray with kvray's settings: workers start from this virtualenv, offline, without ``uv run``.

    Ray 2.60 notices a driver started by ``uv run`` and re-creates the environment in every worker with
    ``uv run`` (slow, and needs the network); kvray's workers use the driver's interpreter instead.
    """
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    return ray


@dataclass(frozen=True)
class Cluster:
    """What Ray offers: CPUs, GPUs, and GPUs per accelerator type."""

    cpus: float
    gpus: float
    gpus_by_type: dict[str, float] = field(default_factory=dict)
    # (node address, accelerator type or None, GPUs) per alive node with GPUs: where a TP group of N can sit
    nodes: tuple[tuple[str, str | None, float], ...] = ()
    # the fewest CPUs per GPU on any node with GPUs: a GPU worker asking for more CPUs than its GPU's share of
    # its node's would never be placed once that node's GPUs outnumber its CPUs (8 GPUs, 2 CPUs)
    cpus_per_gpu: float = float("inf")

    @classmethod
    def current(cls) -> Cluster:
        ray = import_ray()
        cpus = gpus = 0.0
        by_type: Counter[str] = Counter()
        nodes: list[tuple[str, str | None, float]] = []
        per_gpu = float("inf")
        for node in ray.nodes():
            if not node.get("Alive", node.get("alive", True)):
                continue
            res = node.get("Resources", {})
            cpus += res.get("CPU", 0.0)
            gpus += res.get("GPU", 0.0)
            types = [key.split(":", 1)[1] for key in res if key.startswith("accelerator_type:")]
            for gpu_type in types:
                by_type[gpu_type] += res.get("GPU", 0.0)
            if res.get("GPU", 0.0) > 0:
                where = str(node.get("NodeManagerAddress") or node.get("NodeID", "?"))
                nodes.append((f"{where} ({str(node.get('NodeID', ''))[:8]})", types[0] if types else None, res["GPU"]))
                per_gpu = min(per_gpu, res.get("CPU", 0.0) / res["GPU"])
        return cls(cpus, gpus, dict(by_type), tuple(nodes), per_gpu)

    def to_dict(self) -> dict[str, Any]:
        """For the manifest's run record."""
        return {
            "cpus": self.cpus,
            "gpus": self.gpus,
            "gpus_by_type": self.gpus_by_type,
            "gpu_nodes": [list(n) for n in self.nodes],
        }


def start_local_ray(**kwargs: Any) -> None:
    """``ray.init(address="local", …)``, tried again when the node times out during startup.

    On a busy machine Ray 2.60's raylet gives its dashboard agent a fixed ~15 s to report its ports and
    then aborts ("The current node timed out during startup", ray-project/ray#65983); a second try
    usually finds the machine warmer. ``address="local"`` always starts a fresh cluster, so a stale
    ``ray_current_cluster`` file can never make kvray join a dead one.
    """
    import logging

    # Token authentication stays on (Ray's default for a new local cluster); saying so explicitly keeps
    # Ray from printing a warning about its default on every run.
    if "ray._raylet" not in sys.modules:  # Ray reads the mode once, at import
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    ray = import_ray()
    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING, **kwargs}
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(address="local", **kwargs)
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == LOCAL_START_ATTEMPTS:
                raise
            ray.shutdown()


def ray_is_running() -> bool:
    """True when this process already joined Ray (checked without importing Ray)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def connect(address: str = "local", dashboard: bool = False) -> bool:
    """Join or start Ray; True when this call started it (and the caller should shut it down)."""
    import logging

    if ray_is_running():
        return False
    if address == "local":
        start_local_ray(include_dashboard=dashboard, dashboard_host="127.0.0.1")
        return True
    ray = import_ray()
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError) as exc:
        raise KvrayInputError(f"cannot reach Ray at {address!r}: {str(exc).splitlines()[0]}") from None
    if address.startswith("ray://"):
        quiet_grpc_threads()
    return True


def quiet_grpc_threads() -> None:
    """Silence what dies in grpc's own threads (a Ray Client driver's channel), leave every other thread's to the
    previous hook.

    A Ray Client driver cut off from its cluster stops with one kvray line (kvray/sweep/driver.py, "lost the
    connection"), but grpc's connectivity-poll thread dies first with "Cannot monitor channel state: Channel
    closed!" and Python prints its traceback beside that line. A thread whose every frame but threading's own is
    grpc's is grpc's; its end is what the driver already reports."""
    import threading
    import traceback

    previous = threading.excepthook
    if getattr(previous, "kvray_quiet_grpc", False):
        return

    def hook(args: Any) -> None:
        frames = traceback.extract_tb(args.exc_traceback) if args.exc_traceback is not None else []
        inner = [f for f in frames if not f.filename.endswith("threading.py")]
        if inner and all("grpc" in f.filename.replace("\\", "/").split("/") for f in inner):
            return
        previous(args)

    hook.kvray_quiet_grpc = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def shutdown() -> None:
    """Leave the Ray this process started."""
    import_ray().shutdown()
