"""Where a cell's worker must sit, and with which actor options: the one place heterogeneous clusters touch.

A cell needs a GPU (of an accelerator type, or any) or just a CPU; ``capacity`` says how many workers a
placement gets; ``actor_options`` turns a placement into Ray actor options. Plain Python: the cluster is
read once by the driver (``Cluster.current``) and passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvray.errors import KvrayInputError
from kvray.plan.job import Job
from kvray.spec import Cell
from kvray.sweep.ray_env import Cluster


@dataclass(frozen=True)
class Placement:
    """What a worker must sit on: a GPU (of a type, or any), or just CPU."""

    gpu: bool
    accelerator_type: str | None = None

    def label(self) -> str:
        if not self.gpu:
            return "cpu"
        return f"gpu:{self.accelerator_type}" if self.accelerator_type else "gpu"


def placement(cell: Cell, cluster: Cluster) -> Placement:
    """A simulated backend and device: cpu need no GPU; on a GPU-less cluster everything runs on CPU workers."""
    from kvray.backends import backend_class

    if backend_class(cell.backend).simulated or cell.device == "cpu" or cluster.gpus < 1:
        return Placement(gpu=False)
    return Placement(gpu=True, accelerator_type=None if cell.hardware == "any" else cell.hardware)


def capacity(p: Placement, cluster: Cluster, job: Job) -> int:
    """How many workers of this placement: one per matching GPU, one on CPU, at most ``job.workers``."""
    if not p.gpu:
        return job.workers or 1
    n = int(cluster.gpus_by_type.get(p.accelerator_type, 0) if p.accelerator_type else cluster.gpus)
    return max(1, min(n, job.workers or n))


def actor_options(p: Placement, num_cpus: float) -> dict[str, Any]:
    options: dict[str, Any] = {"num_gpus": 1 if p.gpu else 0, "num_cpus": num_cpus, "max_restarts": 0}
    if p.accelerator_type:
        options["accelerator_type"] = p.accelerator_type
    return options


def requested_types(cells: list[Cell]) -> set[str]:
    """Accelerator types the cells ask for by name: every measured cell whose hardware is not ``any``
    (a simulated backend's hardware is a GPU from its table, not something the cluster must have)."""
    from kvray.backends import backend_class

    return {c.hardware for c in cells if c.hardware != "any" and not backend_class(c.backend).simulated}


def check_hardware(cells: list[Cell], cluster: Cluster) -> None:
    """Every requested accelerator type must exist before anything starts: otherwise the sweep would wait
    forever for it, or (on a cluster without GPUs) run the cell on a CPU worker and record the GPU it asked
    for beside the CPU it ran on."""
    missing = sorted(requested_types(cells) - set(cluster.gpus_by_type))
    if missing:
        present = ", ".join(sorted(cluster.gpus_by_type)) or "none"
        if cluster.gpus_by_type:
            has = ""
        elif cluster.gpus >= 1:
            has = f"; it has {cluster.gpus:g} GPUs of no declared accelerator type"
        else:
            has = "; it has no GPUs at all, only CPUs"
        raise KvrayInputError(
            f"hardware {', '.join(missing)} is not in this Ray cluster (present: {present}){has}: use hardware: "
            "any, or run where that GPU type is"
        )
