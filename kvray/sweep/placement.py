"""Where a cell's worker must sit, and with which actor options: the one place heterogeneous clusters touch.

A cell needs GPUs (of an accelerator type, or any; one, or ``tensor_parallel`` of them on one node) or just a
CPU; ``capacity`` says how many workers a placement gets; ``actor_options`` turns a placement into Ray actor
options. Plain Python: the cluster is read once by the driver (``Cluster.current``) and passed in.

A tensor-parallel worker (``gpus`` > 1) reserves its GPUs with a Ray placement group of one bundle of N GPUs,
strategy STRICT_PACK: all N on one node, reserved at once (never half a group holding GPUs while it waits for
the rest), and the worker process sees all N (Ray sets CUDA_VISIBLE_DEVICES to them), so a vLLM server it starts
runs ``--tensor-parallel-size N`` over exactly those. ``check_hardware`` refuses, before anything starts, a TP
degree larger than every node's GPUs of the type asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvray.backends import backend_class
from kvray.errors import KvrayInputError
from kvray.plan.job import Job
from kvray.spec import Cell
from kvray.sweep.ray_env import Cluster


@dataclass(frozen=True)
class Placement:
    """What a worker must sit on: GPUs (of a type, or any; ``gpus`` of them on one node), or just CPU."""

    gpu: bool
    accelerator_type: str | None = None
    gpus: int = 1  # a TP=N cell's worker holds N GPUs of one node

    def label(self) -> str:
        if not self.gpu:
            return "cpu"
        where = f"gpu:{self.accelerator_type}" if self.accelerator_type else "gpu"
        return f"{where} ×{self.gpus}" if self.gpus > 1 else where


def placement(cell: Cell, cluster: Cluster) -> Placement:
    """A simulated backend and device: cpu need no GPU; on a GPU-less cluster everything runs on CPU workers
    (a TP cell there runs its ranks as CPU processes, as vLLM's CPU build does)."""
    if backend_class(cell.backend).simulated or cell.device == "cpu" or cluster.gpus < 1:
        return Placement(gpu=False)
    gpu_type = None if cell.hardware == "any" else cell.hardware
    return Placement(gpu=True, accelerator_type=gpu_type, gpus=cell.tensor_parallel)


def node_gpus(p: Placement, cluster: Cluster) -> list[tuple[str, float]]:
    """(node, GPUs) of every node that can hold this placement's type, largest first."""
    nodes = [(name, n) for name, gpu_type, n in cluster.nodes if p.accelerator_type in (None, gpu_type)]
    return sorted(nodes, key=lambda node: -node[1])


def capacity(p: Placement, cluster: Cluster, job: Job) -> int:
    """How many workers of this placement: one per matching GPU (per whole group of ``gpus`` GPUs on one
    node for TP), one on CPU, at most ``job.workers``."""
    if not p.gpu:
        return job.workers or 1
    if p.gpus > 1 and cluster.nodes:
        n = sum(int(gpus // p.gpus) for _, gpus in node_gpus(p, cluster))
    else:
        total = cluster.gpus_by_type.get(p.accelerator_type, 0) if p.accelerator_type else cluster.gpus
        n = int(total // p.gpus)
    return max(1, min(n, job.workers or n))


def actor_options(p: Placement, num_cpus: float) -> dict[str, Any]:
    """Ray actor options of a one-GPU or CPU worker; a TP worker gets ``tp_placement_group``'s instead."""
    options: dict[str, Any] = {"num_gpus": 1 if p.gpu else 0, "num_cpus": num_cpus, "max_restarts": 0}
    if p.accelerator_type:
        options["accelerator_type"] = p.accelerator_type
    return options


def tp_placement_group(ray: Any, p: Placement, num_cpus: float, name: str) -> tuple[Any, dict[str, Any]]:
    """(placement group, actor options) of a TP worker: one bundle of ``p.gpus`` GPUs, STRICT_PACK on one node.

    The accelerator type is a custom resource of the bundle (Ray's ``accelerator_type`` option asks 0.001 of it)
    so the group lands on a node of that type; the actor takes the whole bundle.
    """
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle: dict[str, float] = {"GPU": float(p.gpus), "CPU": num_cpus}
    if p.accelerator_type:
        bundle[f"accelerator_type:{p.accelerator_type}"] = 0.001
    group = ray.util.placement_group([bundle], strategy="STRICT_PACK", name=name)
    options: dict[str, Any] = {
        "num_gpus": p.gpus,
        "num_cpus": num_cpus,
        "max_restarts": 0,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        ),
    }
    if p.accelerator_type:
        options["resources"] = {f"accelerator_type:{p.accelerator_type}": 0.001}
    return group, options


def requested_types(cells: list[Cell]) -> set[str]:
    """Accelerator types the cells ask for by name: every measured cell whose hardware is not ``any``
    (a simulated backend's hardware is a GPU from its table, not something the cluster must have)."""
    return {c.hardware for c in cells if c.hardware != "any" and not backend_class(c.backend).simulated}


def check_hardware(cells: list[Cell], cluster: Cluster, *, where: str = "this Ray cluster") -> None:
    """Every requested accelerator type must exist before anything starts: otherwise the sweep would wait
    forever for it, or (on a cluster without GPUs) run the cell on a CPU worker and record the GPU it asked
    for beside the CPU it ran on. Likewise a TP degree must fit on one node of its type."""
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
            f"hardware {', '.join(missing)} is not in {where} (present: {present}){has}: use hardware: "
            "any, or run where that GPU type is"
        )
    check_tensor_parallel_fits(cells, cluster)


def check_tensor_parallel_fits(cells: list[Cell], cluster: Cluster) -> None:
    """A TP=N cell needs N GPUs of its type on one node: refused before the run when no node has them."""
    seen: set[Placement] = set()
    for cell in cells:
        p = placement(cell, cluster)
        if not p.gpu or p.gpus <= 1 or p in seen:
            continue
        seen.add(p)
        nodes = node_gpus(p, cluster)
        if not cluster.nodes:  # no per-node view (a cluster described by totals): the totals bound it
            total = cluster.gpus_by_type.get(p.accelerator_type, 0) if p.accelerator_type else cluster.gpus
            nodes = [("the whole cluster", total)]
        if not nodes or nodes[0][1] < p.gpus:
            kind = f"{p.accelerator_type} GPUs" if p.accelerator_type else "GPUs"
            largest = f"the largest node, {nodes[0][0]}, has {nodes[0][1]:g}" if nodes else f"no node has {kind}"
            raise KvrayInputError(
                f"tensor_parallel {p.gpus} ({cell.label()}) needs {p.gpus} {kind} on one node; {largest}: "
                "use a smaller tensor_parallel or a bigger node"
            )
