"""The planner: a Job becomes cells, cells become groups that one worker can run with one model load.

Cells carry deterministic ids (``Cell.cell_id``), so a rerun of the same job finds its finished cells in
the dataset. Within a group cells go from small to large predicted memory (KV + activations), so the
first out-of-memory marks the boundary and every later cell that needs at least as much on every axis
(``outgrows``) is recorded ``skipped_after_oom`` instead of being run into the same wall.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from kvray.backends import kv_layout
from kvray.model.kvmath import cached_positions, kv_bytes_batch
from kvray.model.oom import activation_bytes
from kvray.model.resolve import resolve_geometry
from kvray.plan.job import Job
from kvray.plan.reuse import multi_turn_workload, shared_prefix_workload
from kvray.spec import Cell, LoadSpec, Workload, make_options


@dataclass(frozen=True)
class GroupKey:
    """Cells that share a loaded model and a placement: one worker runs them without reloading."""

    model: str
    backend: str
    dtype: str
    weights: str
    device: str
    hardware: str
    tensor_parallel: int = 1  # a TP=N group needs its own worker (N GPUs) and its own load

    def label(self) -> str:
        where = "" if self.hardware == "any" else f" on {self.hardware}"
        tp = f" TP{self.tensor_parallel}" if self.tensor_parallel > 1 else ""
        return f"{self.model} {self.backend} {self.dtype}{tp}{where}"


def group_key(cell: Cell) -> GroupKey:
    return GroupKey(
        cell.model, cell.backend, cell.dtype, cell.weights, cell.device, cell.hardware, cell.tensor_parallel
    )


def hardware_targets(job: Job, hardware_types: Sequence[str] | None = None) -> list[str]:
    """Where the job's cells go: ["any"], the listed types, or (``each``) every type present."""
    if job.hardware == "any":
        return ["any"]
    if job.hardware == "each":
        return sorted(set(hardware_types)) if hardware_types else ["any"]
    return list(job.hardware)


# Cell fields a job sets once for all its cells, under the same name.
JOB_WIDE_CELL_FIELDS = ("weights", "device", "warmup", "repeats", "kv_dtype", "clients")


def plan_cells(job: Job, hardware_types: Sequence[str] | None = None) -> list[Cell]:
    """Every cell of the job, in a deterministic order, each once (overlapping grids are merged).

    ``hardware_types`` are the accelerator types present, used by ``hardware: each``.
    """
    options = make_options(**job.options)
    per_job = {key: getattr(job, key) for key in JOB_WIDE_CELL_FIELDS}
    cells: dict[str, Cell] = {}
    for model in job.models:
        for backend in job.backends:
            for dtype in job.dtypes:
                for hardware in hardware_targets(job, hardware_types):
                    for tp in job.tensor_parallel:
                        for grid in job.grids:
                            experiment = job.experiment if grid.experiment is None else grid.experiment
                            for workload in _workloads(grid):
                                cell = Cell(
                                    model=model,
                                    workload=workload,
                                    backend=backend,
                                    dtype=dtype,
                                    hardware=hardware,
                                    experiment=experiment,
                                    options=options,
                                    tensor_parallel=tp,
                                    **per_job,
                                )
                                cells.setdefault(cell.cell_id, cell)
    return list(cells.values())


def _workloads(grid: Any) -> Iterable[Workload]:
    if grid.reuse:
        yield from _reuse_workloads(grid)
        return
    if grid.loads or grid.slo or grid.prompt_dist or grid.gen_dist:
        yield from _serving_workloads(grid)
        return
    for gap in grid.arrival_gap_s:
        for gen in grid.gen_toks:
            for prompt in grid.prompt_toks:
                for concurrency in grid.concurrency:
                    yield Workload.uniform(concurrency, prompt, gen, arrival_gap_s=gap)
            for lengths in grid.mixed:
                yield Workload.mixed(list(lengths), gen, arrival_gap_s=gap)


def _serving_workloads(grid: Any) -> Iterable[Workload]:
    """A grid with a load, an SLO or length distributions: built by kvray/plan/loads.py (seeded)."""
    from kvray.plan.loads import build_workload

    prompts = [dict(grid.prompt_dist)] if grid.prompt_dist else list(grid.prompt_toks)
    gens = [dict(grid.gen_dist)] if grid.gen_dist else list(grid.gen_toks)
    slo = dict(grid.slo)
    for load in grid.loads or (LoadSpec(),):
        sizes = grid.concurrency if load.kind == "burst" else (1,)
        for gap in grid.arrival_gap_s if load.kind == "burst" else (0.0,):
            for gen in gens:
                for prompt in prompts:
                    for concurrency in sizes:
                        yield build_workload(load, prompt, gen, concurrency, slo, arrival_gap_s=gap)


def _reuse_workloads(grid: Any) -> Iterable[Workload]:
    """shared_prefix (under any load: the load sets arrivals and how many) and multi_turn blocks."""
    import dataclasses
    from itertools import product

    from kvray.plan.loads import apply_load, request_count

    reuse = dict(grid.reuse)
    slo = tuple(sorted(grid.slo))
    if reuse["workload"] in ("trace", "sessions"):  # a replayed trace, staggered sessions (kvray/plan/replay.py)
        from kvray.plan.replay import grid_workloads

        yield from grid_workloads(grid)
        return
    if reuse["workload"] == "multi_turn":
        for conv, turns, user, gen, think in product(
            reuse["conversations"], reuse["turns"], reuse["user_toks"], grid.gen_toks, reuse["think_s"]
        ):
            yield dataclasses.replace(multi_turn_workload(conv, turns, user, gen, think), slo=slo)
        return
    for load in grid.loads or (LoadSpec(),):
        sizes = grid.concurrency if load.kind == "burst" else (1,)
        for prefix, suffix, groups, gen, size in product(
            reuse["prefix_toks"], reuse["suffix_toks"], reuse["groups"], grid.gen_toks, sizes
        ):
            n = request_count(load, size)
            gap = grid.arrival_gap_s[0] if load.kind == "burst" else 0.0
            base = shared_prefix_workload(n, min(groups, n), prefix, suffix, gen, arrival_gap_s=gap)
            yield apply_load(base, load, slo)


@lru_cache(maxsize=64)
def _geometry(model: str) -> Any:
    return resolve_geometry(model)


def predicted_bytes(cell: Cell) -> int:
    """KV plus prefill activations the cell needs beside the weights — the order cells run in.

    Falls back to tokens in flight when the model's geometry is unknown, which orders the same way.
    """
    wl = cell.workload
    try:
        g = _geometry(cell.model)
    except Exception:
        return wl.concurrency * wl.max_seq_len
    layout = kv_layout(cell.backend, cell.option_dict)  # as the backend declares it (kvray/backends/base.py)
    positions = [cached_positions(r.prompt_toks, r.gen_toks) for r in wl.requests]
    kv = kv_bytes_batch(g, positions, cell.kv_dtype or cell.dtype, layout)
    return int(kv + activation_bytes(g, wl.concurrency, wl.prompt_toks, cell.dtype))


def _size_order(cell: Cell) -> tuple[Any, ...]:
    wl = cell.workload
    return (predicted_bytes(cell), wl.concurrency, wl.prompt_toks, wl.gen_toks, cell.cell_id)


def group_cells(cells: Iterable[Cell]) -> dict[GroupKey, list[Cell]]:
    """Cells by group, groups in first-seen order, each group's cells from small to large memory."""
    groups: dict[GroupKey, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(group_key(cell), []).append(cell)
    return {key: sorted(members, key=_size_order) for key, members in groups.items()}


def _arrival_gap_s(wl: Workload) -> float:
    return wl.requests[1].arrival_s - wl.requests[0].arrival_s if len(wl.requests) > 1 else 0.0


def outgrows(cell: Cell, oomed: Cell) -> bool:
    """True when ``cell`` needs at least what ``oomed`` needed on every axis, so it would run out too.

    Same group, KV dtype and options; at least as many requests, the longest prompts at least as long
    (compared longest to longest), at least as many generated tokens, arriving no more spread out.
    """
    if group_key(cell) != group_key(oomed) or cell.kv_dtype != oomed.kv_dtype or cell.options != oomed.options:
        return False
    a, b = oomed.workload, cell.workload
    if len(b.requests) < len(a.requests) or b.gen_toks < a.gen_toks:
        return False
    if _arrival_gap_s(b) > _arrival_gap_s(a):
        return False
    longest_a = sorted((r.prompt_toks for r in a.requests), reverse=True)
    longest_b = sorted((r.prompt_toks for r in b.requests), reverse=True)
    return all(pb >= pa for pa, pb in zip(longest_a, longest_b, strict=False))


def skip_reason(cell: Cell, oomed: Iterable[Cell], hardware_name: str) -> str | None:
    """Why ``cell`` is not run after an OOM on the same hardware, or None when it should run."""
    for prior in oomed:
        if outgrows(cell, prior):
            return (
                f"skipped after OOM: needs at least what cell {prior.cell_id} ({prior.label()}) needed, "
                f"which ran out of memory on {hardware_name}"
            )
    return None
