"""``kvray validate``: every measured cell of a folder replayed through the simulator, prediction beside measurement.

Each measured cell (status ok, not simulated) becomes a ``sim`` cell with the same model, dtype, workload — its
requests, lengths, arrival schedule and seed as the measured cell recorded them — load, tensor parallelism and
engine settings (``engine_options``: what the measured backend ran, from the cell's options and the engine's own
report in the row), on the same device: a GPU of the table, or this machine measured as ``cpu-host`` for CPU rows
(the peaks stored with the calibration's cpu-host fit). A rate search is searched again on the simulator with the
measured search's own criterion (kvray/runner/saturation.py), so knee and saturation mean the same on both sides.
The simulated cell goes through the runner and kvray.measure.metrics like the measured one, so the two rows'
columns are computed by one piece of code.

Beside each error, the spread of the measurement itself over its repeats (``repeat_spread``). Metrics compared
(``METRICS``): TTFT p50 / p99, TPOT p50 / p99, E2E p50, achieved req/s, output tokens/s, KV peak
(measured used bytes vs the simulator's blocks in use), prefix-cache hit rate, and knee / saturation of a search.
The error is predicted / measured − 1. Calibrate on one folder, validate on another: that held-out error is the
one to believe.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvray.analysis.observations import engine_attention
from kvray.analysis.views import as_number
from kvray.backends.sim import SimBackend
from kvray.data.layout import CELLS_JSONL
from kvray.data.reader import read_results, result_from_record
from kvray.errors import KvrayInputError
from kvray.hardware.gpus import GpuSpec, match_gpu
from kvray.hardware.host import HOST_NAME, HostPeaks, is_cpu_hardware
from kvray.model.kvmath import kv_bytes_per_token, normalize_dtype
from kvray.model.parallel import shard_geometry
from kvray.model.resolve import resolve_geometry
from kvray.sim.costs import calibration_path, load_calibration

# metric → the row column it reads (measured and simulated rows share kvray.measure.metrics' names)
METRICS = (
    "ttft_s_p50",
    "ttft_s_p99",
    "tpot_s_p50",
    "tpot_s_p99",
    "e2e_s_p50",
    "achieved_rps",
    "output_tps",
    "kv_peak_bytes",
    "prefix_cache_hit_rate",
    "knee_rps",
    "saturation_rps",
)
# vLLM's engine defaults the simulator needs: (max_num_seqs, max_num_batched_tokens, block_size), CPU and GPU
# (vLLM 0.32.0 engine/arg_utils.py: the CPU platform's OpenAI server defaults; V1 on a GPU)
VLLM_CPU, VLLM_GPU = (128, 2048, 128), (256, 8192, 16)
HF_PAGED_BLOCK, HF_PAGED_CPU_BATCH_TOKENS = 256, 512  # kvray/backends/hf_paged.py's defaults
CPU_POOL_BYTES = 256 * 2**20  # the CPU pool the vllm and hf-paged backends ask for by default
PAGED_BACKENDS = ("vllm", "hf-paged", "openai")


@dataclass
class Validation:
    rows: list[dict[str, Any]]  # cell, metric, measured, predicted, rel_error
    cells: int
    skipped: dict[str, int] = field(default_factory=dict)
    calibration: str = ""
    labels: dict[str, str] = field(default_factory=dict)  # cell id → a readable label
    # cell id → metric → (max − min) / median of that metric over the measured repeats (``repeat_spread``), or
    # over the rounds when several folders were given
    spread: dict[str, dict[str, float]] = field(default_factory=dict)
    rounds: int = 1  # measured folders: rounds of one held-out job

    def median_abs_rel_error(self) -> dict[str, float]:
        return {m: statistics.median(errs) for m, errs in self._errors().items()}

    def worst_abs_rel_error(self) -> dict[str, float]:
        return {m: max(errs) for m, errs in self._errors().items()}

    def _errors(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for r in self.rows:
            if r["rel_error"] is not None and not r.get("excluded"):
                out.setdefault(r["metric"], []).append(abs(r["rel_error"]))
        return {m: out[m] for m in METRICS if m in out}

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_abs_rel_error": self.median_abs_rel_error(),
            "worst_abs_rel_error": self.worst_abs_rel_error(),
            "cells": self.cells,
            "skipped": self.skipped,
            "calibration": self.calibration,
            "rounds": self.rounds,
            "repeat_spread": self.spread,
            "labels": self.labels,
            "rows": self.rows,
        }


def host_device(calibration: str | Path | None) -> GpuSpec | None:
    """The cpu-host device a calibration file's CPU fit was made against (its stored peaks), if any."""
    entries = load_calibration(calibration)["entries"].get(HOST_NAME, {})
    for entry in entries.values():
        if isinstance(entry, dict) and entry.get("host_peaks"):
            return HostPeaks.from_dict(entry["host_peaks"]).spec()
    return None


def engine_options(
    backend: str, on_cpu: bool, options: dict[str, Any], extra: dict[str, Any], kv_bytes_per_token: float
) -> dict[str, Any]:
    """The sim backend's options that reproduce the measured engine: its layout, and for a paged engine its
    batch limits, block size, pool and prefix caching — the cell's options first, then what the engine reported
    in the row (``extra``: vLLM's ``server_cache``, hf-paged's ``paged_cache``), then the backend's defaults."""
    if backend not in PAGED_BACKENDS:
        return {"layout": "hf"}
    if backend == "hf-paged":
        cache = extra.get("paged_cache") or {}
        block = int(options.get("block_size") or cache.get("block_size") or HF_PAGED_BLOCK)
        batch = options.get("max_batch_tokens") or cache.get("max_batch_tokens") or HF_PAGED_CPU_BATCH_TOKENS
        seqs = options.get("max_num_seqs") or VLLM_GPU[0]
        blocks = cache.get("num_blocks")
        prefix = bool(options.get("prefix_sharing", False))
        attention = engine_attention(backend, extra)
    else:
        cache = extra.get("server_cache") or {}
        seqs_d, batch_d, block_d = VLLM_CPU if on_cpu else VLLM_GPU
        block = int(options.get("block_size") or cache.get("block_size") or block_d)
        batch, seqs = options.get("max_num_batched_tokens") or batch_d, options.get("max_num_seqs") or seqs_d
        blocks = cache.get("num_gpu_blocks")
        prefix = bool(options.get("enable_prefix_caching", True))
        attention = "varlen"
    out: dict[str, Any] = {
        "layout": "paged",
        "block_size": block,
        "max_num_batched_tokens": int(batch),
        "max_num_seqs": int(seqs),
        "prefix_caching": prefix,
        "attention": attention,
    }
    if blocks:
        out["kv_pool_bytes"] = int(int(blocks) * block * kv_bytes_per_token)
    elif options.get("kv_cache_memory_bytes") or on_cpu:
        out["kv_pool_bytes"] = int(options.get("kv_cache_memory_bytes") or CPU_POOL_BYTES)
    if options.get("gpu_memory_utilization"):
        out["gpu_memory_utilization"] = float(options["gpu_memory_utilization"])
    return out


def measured_value(metric: str, row: dict[str, Any], extra: dict[str, Any]) -> float | None:
    """The value of ``metric`` in a (measured or simulated) row, None where the row has none."""
    if metric == "achieved_rps":
        value = row.get("achieved_rps")
        value = value if as_number(value) is not None else row.get("rps")
    elif metric == "kv_peak_bytes":
        value = row.get("kv_measured_bytes") if not row.get("simulated") else row.get("kv_predicted_bytes")
    elif metric == "prefix_cache_hit_rate":
        hits, queries = as_number(row.get("prefix_cache_hits")), as_number(row.get("prefix_cache_queries"))
        value = hits / queries if hits is not None and queries else None
    else:
        value = row.get(metric)
    return as_number(value)


def not_the_engines(metric: str, row: dict[str, Any]) -> str | None:
    """Why a measured value is not the engine's to predict (kept in the rows, left out of the summary), or None.

    A rate measured while the client fell behind its schedule is the client's (the simulator sends on time), and
    a search whose knee was bounded by such a probe measured a lower bound, not the engine's knee."""
    if metric in ("knee_rps", "saturation_rps") and row.get("knee_client_bound"):
        return "search bounded by the client: it fell behind its schedule above the knee (a lower bound)"
    if metric in ("achieved_rps", "output_tps") and row.get("client_behind"):
        return "the client fell behind its schedule: the rate offered was the client's, not the schedule's"
    return None


def repeat_spread(traces: list[Any]) -> dict[str, float]:
    """(max − min) / median over the measured repeats of each latency percentile ``METRICS`` names, each repeat's
    percentile over its own requests (all of them: a load's ramp-up and drain included); {} with one repeat. A
    prediction cannot be judged more finely than this."""
    import numpy as np

    from kvray.measure.metrics import request_metrics, tokens_bunched

    by_repeat: dict[int, list[dict[str, float]]] = {}
    for t in traces:
        m = request_metrics(t)
        if tokens_bunched(t):  # stamped by a stalled reader: no TPOT, as the row's own metrics count it
            m["tpot_s"] = float("nan")
        by_repeat.setdefault(t.repeat, []).append(m)
    if len(by_repeat) < 2:
        return {}
    out: dict[str, float] = {}
    for metric in METRICS[:5]:  # the latency percentiles
        key, q = metric.rsplit("_p", 1)
        values = []
        for requests in by_repeat.values():
            own = [r[key] for r in requests if r[key] == r[key]]
            if own:
                values.append(float(np.percentile(own, int(q))))
        if len(values) > 1 and statistics.median(values) > 0:
            out[metric] = (max(values) - min(values)) / statistics.median(values)
    return out


def validate(measured_dir: str | Path | Sequence[str | Path], calibration: str | Path | None = None) -> Validation:
    """Replay every measured cell of ``measured_dir`` on the simulator (module docstring).

    Several folders are **rounds** of one held-out job (the same cells run again later: repeats interleaved across
    the whole job, so a drift of the machine touches every cell alike): each cell is predicted once, its measured
    value is the median over the rounds that judged it, and its spread is the range over rounds."""
    from kvray.runner.run import run_cell
    from kvray.runner.saturation import is_search, run_search

    folders = [Path(measured_dir)] if isinstance(measured_dir, str | Path) else [Path(d) for d in measured_dir]
    for folder in folders:
        if not (folder / CELLS_JSONL).is_file():
            raise KvrayInputError(f"{folder} is not a results folder (no {CELLS_JSONL})")
    cal = Path(calibration).expanduser() if calibration is not None else calibration_path()
    if calibration is not None and not cal.is_file():
        raise KvrayInputError(f"no calibration file {calibration}")
    host = host_device(cal)
    backends = {"gpu": SimBackend(cal), "host": SimBackend(cal, device=host) if host else None}
    out = Validation([], 0, calibration=str(cal), rounds=len(folders))

    def skip(reason: str) -> None:
        out.skipped[reason] = out.skipped.get(reason, 0) + 1

    by_cell: dict[str, list[Any]] = {}  # cell id → its measured results, one per round, in round order
    for folder in folders:
        for record in read_results(folder):
            result = result_from_record(record)
            by_cell.setdefault(result.cell.cell_id, []).append(result)
    for results in by_cell.values():
        rounds = [r for r in results if r.status == "ok" and not r.simulated and r.cell.backend != "sim"]
        if not rounds:
            skip("not ok" if all(r.status != "ok" for r in results) else "simulated")
            continue
        measured = rounds[0]
        cell = measured.cell
        hardware = str((measured.hardware or {}).get("name") or cell.hardware or "")
        gpu = match_gpu(hardware)
        on_cpu = gpu is None and (is_cpu_hardware(hardware) or cell.device == "cpu")
        backend = backends["host"] if on_cpu else backends["gpu"]
        if (gpu is None and not on_cpu) or backend is None:
            skip("CPU row without a cpu-host calibration" if on_cpu else "hardware not in the GPU table")
            continue
        try:
            g = shard_geometry(resolve_geometry(cell.model), cell.tensor_parallel)
            kv_dtype = normalize_dtype(cell.kv_dtype or cell.dtype)
        except Exception:  # a model kvray cannot resolve offline: nothing to simulate
            skip("model geometry unknown")
            continue
        opts = engine_options(
            cell.backend, on_cpu, cell.option_dict, measured.extra or {}, kv_bytes_per_token(g, kv_dtype, "paged")
        )
        sim_cell = dataclasses.replace(
            cell,
            backend="sim",
            hardware=gpu.name if gpu else "any",
            warmup=0,
            repeats=1,
            device="cpu",
            options=tuple(sorted(opts.items())),
        )
        predicted = (
            run_search(backend, sim_cell, lambda _: None, check_oom=False)
            if is_search(cell)
            else run_cell(backend, sim_cell, check_oom=False)
        )
        if predicted.status != "ok":
            skip(f"simulator: {predicted.status}")
            continue
        out.cells += 1
        load = cell.workload.load
        rate = "" if load is None else f" {load.kind}" + (f" {load.rate_rps:g}/s" if load.rate_rps else "")
        out.labels[cell.cell_id] = cell.label() + rate + (" search" if is_search(cell) else "")
        p_row = predicted.to_row()
        m_rows = [(r.to_row(), r.extra or {}) for r in rounds]
        out.spread[cell.cell_id] = {} if len(rounds) > 1 else repeat_spread(measured.traces)
        for metric in METRICS:
            p = measured_value(metric, p_row, predicted.extra or {})
            judged = [(measured_value(metric, row, extra), not_the_engines(metric, row)) for row, extra in m_rows]
            kept = [v for v, why in judged if v is not None and not why]
            seen = [v for v, _ in judged if v is not None]
            if p is None or not seen:
                continue
            m = statistics.median(kept or seen)
            rel = p / m - 1 if m else None
            row = {"cell": cell.cell_id, "metric": metric, "measured": m, "predicted": p, "rel_error": rel}
            if len(rounds) > 1:
                row["measured_rounds"] = [v for v, _ in judged]
                if len(kept) > 1 and m:
                    out.spread[cell.cell_id][metric] = (max(kept) - min(kept)) / abs(m)
            if not kept:
                row["excluded"] = next(why for _, why in judged if why)
            out.rows.append(row)
    return out
