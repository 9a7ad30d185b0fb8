"""Stragglers: a worker whose cells ran far slower than its peers' on the same GPU type (a throttled, shared or
sick GPU), named so that cross-hardware figures do not average it into a healthy type.

Pure Python and numpy, no Ray, like scheduler.py: the collector calls ``find_stragglers`` on the folder's rows at
the end of a run, the run's record (manifest.json) keeps what it returns, and the dataset's ``straggler`` column
marks those workers' cells (kvray/data/manifest.py ``straggler_cells``).

Peers of one GPU type run different cells (each cell runs once per type), so a worker is compared with what its
peers' cells say a cell of its shape should take: for each worker, a least-squares fit of log E2E p50 on its
peers' ok cells — an intercept per cell family (model, backend, dtypes, weights, TP degree, workload kind) plus
log concurrency, log prompt and log generated tokens — predicts its own cells (leave-one-worker-out, so a sick
worker never lowers the bar it is measured against; a healthy worker beside a sick one looks faster than its
fit). Its slowdown is the median of measured / predicted over its cells inside what the peers ran (the same
family, each of concurrency, prompt and generated tokens within the range the peers' cells span: the fit
interpolates, never extrapolates). A worker is a
straggler when that median is at least ``threshold`` (1.5×) over at least ``min_cells`` (3) cells and at least
two thirds of those cells are each ``threshold``× slower — one slow cell (a page fault, a compile) is not a
sick GPU. With two workers of a type the slower one can be named, the faster never: a throttled GPU is slow.

Simulated rows (timestamps predicted, not measured) are never judged; rows are grouped by the GPU the worker
had (its ``accelerator_type``, else the device name) and by worker id.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from kvray.data.reader import read_results

THRESHOLD = 1.5  # measured / predicted at which a worker is a straggler
MIN_CELLS = 3  # cells a worker must have (whose family its peers ran) before it is judged
SLOW_SHARE = 2 / 3  # of those cells, the share that must each be THRESHOLD× slower
METRIC = "e2e_s_p50"  # the latency compared: each request's whole time, so prefill and decode both count


@dataclass(frozen=True)
class Straggler:
    """One slow worker: who and where it was, how much slower than its peers' fit, and its cells."""

    worker_id: str
    gpu_type: str
    node_id: str | None
    gpu_ids: list[str]
    slowdown: float  # median measured / predicted E2E p50 over ``cells_judged`` cells
    cells_judged: int
    peers: int  # other workers of the same GPU type whose cells made the fit
    cell_ids: list[str] = field(default_factory=list)  # every cell this worker ran (all marked)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        where = f" on node {self.node_id[:12]}" if self.node_id else ""
        gpus = f" GPU {','.join(self.gpu_ids)}" if self.gpu_ids else ""
        return (
            f"{self.worker_id} ({self.gpu_type}{gpus}{where}): {self.slowdown:.1f}× slower than {self.peers} "
            f"peer worker(s) of the same type over {self.cells_judged} cells; its {len(self.cell_ids)} cells "
            "are marked (column straggler)"
        )


@dataclass(frozen=True)
class _Cell:
    cell_id: str
    worker: str
    family: tuple[Any, ...]
    shape: tuple[float, float, float]  # log concurrency, log prompt, log generated tokens
    log_latency: float | None  # None: not judged (not ok, no metric), still marked if its worker is slow


def _cell_of(record: dict[str, Any]) -> tuple[str, _Cell] | None:
    """(GPU type, cell) of one cells.jsonl record; None for rows no worker measured."""
    hardware = record.get("hardware") or {}
    worker = hardware.get("worker_id")
    if not worker or record.get("simulated"):
        return None
    cell = record.get("cell") or {}
    workload = cell.get("workload") or {}
    requests = workload.get("requests") or []
    concurrency = max(1, len(requests) if requests else int(cell.get("concurrency") or 1))
    prompt = max(1.0, sum(float(r.get("prompt_toks", 1)) for r in requests) / len(requests)) if requests else 1.0
    gen = max(1.0, sum(float(r.get("gen_toks", 1)) for r in requests) / len(requests)) if requests else 1.0
    family = tuple(
        str(cell.get(k)) for k in ("model", "backend", "dtype", "kv_dtype", "weights", "tensor_parallel")
    ) + (str(workload.get("kind")),)
    value = (record.get("metrics") or {}).get(METRIC)
    latency = float(value) if isinstance(value, int | float) else math.nan
    ok = record.get("status") == "ok" and latency > 0 and math.isfinite(latency)
    gpu_type = str(hardware.get("accelerator_type") or hardware.get("name") or "cpu")
    shape = (math.log(concurrency), math.log(prompt), math.log(gen))
    return gpu_type, _Cell(str(record["cell_id"]), str(worker), family, shape, math.log(latency) if ok else None)


def _predict(train: list[_Cell], test: list[_Cell]) -> list[float | None]:
    """Least-squares log latency of ``test`` cells from ``train``'s: an intercept per family + the log shape."""
    import numpy as np

    families = sorted({c.family for c in train}, key=str)
    index = {f: i for i, f in enumerate(families)}

    def row(c: _Cell) -> list[float]:
        onehot = [0.0] * len(families)
        onehot[index[c.family]] = 1.0
        return onehot + list(c.shape)

    x = np.array([row(c) for c in train])
    y = np.array([c.log_latency for c in train], dtype=float)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)  # minimum norm where a shape feature does not vary
    # Only inside what the peers ran: each shape feature within the range the family's peer cells span (a
    # feature the peers never varied has no slope to extrapolate with).
    spans = {
        f: [(min(v), max(v)) for v in zip(*(c.shape for c in train if c.family == f), strict=True)] for f in families
    }
    return [
        float(np.dot(row(c), coef)) if c.family in index and _inside(c.shape, spans[c.family]) else None for c in test
    ]


def _inside(shape: tuple[float, ...], span: list[tuple[float, float]]) -> bool:
    return all(lo - 1e-9 <= v <= hi + 1e-9 for v, (lo, hi) in zip(shape, span, strict=True))


def find_stragglers(
    records: Iterable[dict[str, Any]],
    *,
    judge: Iterable[str] | None = None,
    threshold: float = THRESHOLD,
    min_cells: int = MIN_CELLS,
) -> list[Straggler]:
    """The stragglers among ``records`` (cells.jsonl rows), slowest first. ``judge``: only these worker ids may
    be named (a run names its own workers; earlier runs' rows still serve as peers)."""
    by_type: dict[str, list[_Cell]] = defaultdict(list)
    hardware_of: dict[str, dict[str, Any]] = {}
    for record in records:
        found = _cell_of(record)
        if found is not None:
            by_type[found[0]].append(found[1])
            hardware_of.setdefault(found[1].worker, record.get("hardware") or {})
    allowed = set(judge) if judge is not None else None
    named: list[Straggler] = []
    for gpu_type, cells in by_type.items():
        workers = sorted({c.worker for c in cells})
        for worker in workers:
            if allowed is not None and worker not in allowed:
                continue
            own = [c for c in cells if c.worker == worker]
            peers = [c for c in cells if c.worker != worker and c.log_latency is not None]
            judged = [c for c in own if c.log_latency is not None]
            if not peers or len(judged) < min_cells:
                continue
            predicted = _predict(peers, judged)
            ratios = [
                math.exp(c.log_latency - p)
                for c, p in zip(judged, predicted, strict=True)
                if p is not None and c.log_latency is not None
            ]
            if len(ratios) < min_cells:
                continue
            slowdown = _median(ratios)
            slow_share = sum(r >= threshold for r in ratios) / len(ratios)
            if slowdown >= threshold and slow_share >= SLOW_SHARE:
                hw = hardware_of[worker]
                named.append(
                    Straggler(
                        worker_id=worker,
                        gpu_type=gpu_type,
                        node_id=hw.get("node_id"),
                        gpu_ids=[str(g) for g in hw.get("gpu_ids") or []],
                        slowdown=round(slowdown, 3),
                        cells_judged=len(ratios),
                        peers=len({c.worker for c in peers}),
                        cell_ids=sorted(c.cell_id for c in own),
                    )
                )
    return sorted(named, key=lambda s: -s.slowdown)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def run_stragglers(out_dir: Any, workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stragglers among a run's ``workers`` (the manifest's records of them), judged against every row of
    the folder ``out_dir``: what the collector puts in the run's record. Never raises: a verdict that cannot be
    reached is no reason to lose a run's record."""
    try:
        judge = {str(w["worker_id"]) for w in workers if w.get("worker_id")}
        return [s.to_dict() for s in find_stragglers(read_results(out_dir, traces=False), judge=judge)]
    except Exception:
        return []
