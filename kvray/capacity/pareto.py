"""The throughput–interactivity trade-off as points: tokens/s per GPU against tokens/s per user, and the Pareto
frontier across GPU types, TP degrees and load (InferenceX's plot, docs/capacity.md "Pareto frontier").

A point is one operating point of one deployment: a simulated probe of ``kvray plan`` (a rate one replica was
offered) or a measured or simulated cell of a results folder (a concurrency or a rate). Its axes:

    tokens/s per GPU    output tokens the deployment completed per second ÷ its GPUs (the TP degree)
    tokens/s per user   1 ÷ the TPOT a request saw (p50 of a cell; the mean of a probe's measured half)
    $/M output tokens   $/GPU-hour ÷ (tokens/s per GPU × 3600) × 10⁶   (where the GPU has a price)

A point is on the frontier when no other point is at least as good on both axes and better on one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kvray.capacity.prices import Price
from kvray.hardware.gpus import match_gpu


@dataclass(frozen=True)
class ParetoPoint:
    gpu: str
    tp: int
    source: str  # "predicted" (the simulator) or "measured (<backend>)"
    tokens_per_s_per_user: float
    tokens_per_s_per_gpu: float
    usd_per_gpu_hour: float | None = None
    model: str = ""
    kv_dtype: str = ""

    @property
    def usd_per_mtok_output(self) -> float | None:
        if self.usd_per_gpu_hour is None or self.tokens_per_s_per_gpu <= 0:
            return None
        return self.usd_per_gpu_hour / (self.tokens_per_s_per_gpu * 3600) * 1e6

    @property
    def measured(self) -> bool:
        return self.source != "predicted"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "usd_per_mtok_output": self.usd_per_mtok_output}


def frontier(points: Sequence[ParetoPoint]) -> list[ParetoPoint]:
    """The points no other point dominates (both axes at least as high, one higher), by tokens/s per user."""
    ordered = sorted(points, key=lambda p: (-p.tokens_per_s_per_user, -p.tokens_per_s_per_gpu))
    out: list[ParetoPoint] = []
    best_gpu = -math.inf
    for p in ordered:
        if p.tokens_per_s_per_gpu > best_gpu:
            out.append(p)
            best_gpu = p.tokens_per_s_per_gpu
    return sorted(out, key=lambda p: p.tokens_per_s_per_user)


def cost_frontier(points: Sequence[ParetoPoint]) -> list[ParetoPoint]:
    """Priced points no other is cheaper per M output tokens at least as interactive (lower-right frontier)."""
    priced = [p for p in points if p.usd_per_mtok_output is not None]
    ordered = sorted(priced, key=lambda p: (-p.tokens_per_s_per_user, p.usd_per_mtok_output or 0.0))
    out: list[ParetoPoint] = []
    cheapest = math.inf
    for p in ordered:
        assert p.usd_per_mtok_output is not None
        if p.usd_per_mtok_output < cheapest:
            out.append(p)
            cheapest = p.usd_per_mtok_output
    return sorted(out, key=lambda p: p.tokens_per_s_per_user)


def points_from_plan(plan: Mapping[str, Any]) -> list[ParetoPoint]:
    """Every sustainable probe of a plan's searched candidates (``Plan.to_dict(probes=True)``)."""
    out = []
    seen: set[tuple[Any, ...]] = set()
    for c in plan["candidates"]:
        for p in c["probes"] if isinstance(c.get("probes"), list) else []:
            key = (c["gpu"], c["tp"], c["kv_dtype"], p["rate_rps"])
            if key in seen or not p["sustainable"] or not p["tpot_ms_mean"] or not p["output_tps"]:
                continue
            seen.add(key)
            out.append(
                ParetoPoint(
                    c["gpu"],
                    int(c["tp"]),
                    "predicted",
                    1e3 / p["tpot_ms_mean"],
                    p["output_tps"] / c["tp"],
                    c.get("price_per_gpu_hour"),
                    plan.get("model", ""),
                    c["kv_dtype"],
                )
            )
    return out


def points_from_records(records: Iterable[Mapping[str, Any]], prices: Mapping[str, Price]) -> list[ParetoPoint]:
    """One point per ok cell with a TPOT and an output throughput (a results folder's rows)."""
    out = []
    for r in records:
        metrics = r.get("metrics") or {}
        tpot, tps = metrics.get("tpot_s_p50"), metrics.get("output_tps")
        if r.get("status") not in ("ok", "partial") or not tpot or not tps or not math.isfinite(tpot * tps):
            continue
        cell = r["cell"]
        tp = int(cell.get("tensor_parallel", 1) or 1)
        name = str((r.get("hardware") or {}).get("name") or cell.get("hardware") or "any")
        spec = match_gpu(name)
        gpu = spec.name if spec else name
        price = prices.get(gpu)
        source = "predicted" if r.get("simulated") else f"measured ({cell.get('backend', '?')})"
        out.append(
            ParetoPoint(
                gpu,
                tp,
                source,
                1 / tpot,
                tps / tp,
                price.usd_per_gpu_hour if price else None,
                str(cell.get("model", "")),
                str(cell.get("kv_dtype") or cell.get("dtype") or ""),
            )
        )
    return out
