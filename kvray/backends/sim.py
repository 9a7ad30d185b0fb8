"""The simulator as a backend: predicted traces and memory for any GPU in the table, no GPU and no sleeping.

Two engines, so the runner, metrics, store and figures treat its cells like measured ones, flagged ``simulated``:

- a burst on the ``hf`` layout (the default): the HF backend's static-batching queue (kvray/sim/simulate.py);
- ``layout: paged``, or any load other than a burst (closed, poisson, gamma, constant): a continuous-batching
  engine like vLLM's (kvray/sim/serving.py): admission by free KV blocks and ``max_num_seqs``, each step's time
  from the roofline of its prefill and decode tokens, preemption when the pool runs out. Its rows carry the KV
  pool in ``memory`` (kv_reserved_bytes; kv_predicted_bytes = the peak of blocks in use), the engine's state at
  its steps in ``extra["kv_timeline"]`` (as vLLM's and hf-paged's, at most ~500 points a repeat plus every
  preemption), and the preemptions (``counters`` → the row's ``preemptions``; ``extra["sim"]``).

A cell whose predicted memory exceeds the GPU (static batch), or whose weights leave no KV pool or whose request
cannot fit the pool alone (continuous), raises ``SimulatedOutOfMemory`` (a MemoryError), which the runner
records as status "oom": the OOM boundary is a result, not a crash.

Cell fields: ``hardware`` is a GPU name from kvray/hardware/gpus.py ("any" → H100-SXM); ``tensor_parallel`` splits the
model over that many of them (per-GPU memory, all-reduces over the GPU's link, docs/simulator.md); KV dtype is
``kv_dtype`` or ``dtype``. Cell options: ``layout`` ("hf" | "paged"), ``block_size`` (paged, 16), and ``eta_compute``,
``eta_memory``, ``layer_overhead_s`` and the CPU costs ``step_overhead_s``, ``request_step_s``, ``admit_s``,
``finish_s`` and fp8 KV's ``kv_dequant_s_per_gb`` to override the calibrated or default ones, each on its own
(kvray/sim/costs.py); for the continuous engine, vLLM's engine arguments ``max_num_seqs`` (256), ``max_num_batched_tokens`` (8192), ``chunked_prefill``
(true), ``gpu_memory_utilization`` (0.9), ``kv_pool_bytes`` or ``kv_cache_memory_bytes`` (overrides the utilisation)
``prefix_caching`` (true, as vLLM V1) and ``attention`` ("varlen", or "masked": one attention over the flattened
batch, as transformers' continuous batching runs it with sdpa — kvray/sim/passes.py). The continuous engine serves ``layout: paged``, every load but a burst and
every workload with shared prefixes; its prefix-cache hits go through the same account as vLLM's
(kvray/backends/kv_reuse.py), so a row's ``prefix_cache_hit_rate`` (simulated) sits beside its prediction.
Every row carries ``energy_j_tdp_estimate``, ``tdp_power_w`` and ``j_per_output_tok_tdp_estimate``: the GPU(s) at
TDP for the whole run (kvray/sim/simulate.py ``tdp_energy_estimate``) — a TDP × time estimate, neither a reading
nor a bound.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvray.backends.base import BackendBase, BackendRun
from kvray.backends.kv_reuse import ReuseAccount
from kvray.errors import KvrayInputError
from kvray.hardware.gpus import GpuSpec, get_gpu
from kvray.measure.trace import RunTrace
from kvray.model.geometry import ModelGeometry
from kvray.model.kvmath import DEFAULT_BLOCK_SIZE, LAYOUTS, normalize_dtype
from kvray.model.parallel import check_tensor_parallel
from kvray.model.resolve import resolve_geometry
from kvray.sim.costs import CPU_TERMS
from kvray.sim.serving import EngineConfig, PoolTooSmall, ServedRequest, ServingRun, serve
from kvray.sim.simulate import (
    DEFAULT_GPU,
    Costing,
    Efficiency,
    MemoryPrediction,
    RequestTiming,
    efficiency_for,
    simulate,
    tdp_energy_estimate,
)
from kvray.spec import Cell, RequestSpec
from kvray.units import GIB


class SimulatedOutOfMemory(MemoryError):
    """The predicted peak does not fit the simulated GPU (the runner maps MemoryError to status "oom")."""


def gpu_of(cell: Cell) -> GpuSpec:
    return get_gpu(DEFAULT_GPU if cell.hardware in ("any", "", "auto") else cell.hardware)


def _layout(opts: Mapping[str, Any]) -> tuple[str, int]:
    layout = str(opts.get("layout", "hf"))
    if layout not in LAYOUTS:
        raise KvrayInputError(f"sim backend: unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    block_size = int(opts.get("block_size", DEFAULT_BLOCK_SIZE))
    if block_size < 1:
        raise KvrayInputError(f"sim backend: block_size must be >= 1, got {block_size}")
    return layout, block_size


# Cell options that override the calibrated (or default) efficiencies and CPU costs (kvray/sim/costs.py)
EFFICIENCY_OPTIONS = ("eta_compute", "eta_memory", "layer_overhead_s", *CPU_TERMS, "kv_dequant_s_per_gb")
_ENGINE_INTS = ("max_num_seqs", "max_num_batched_tokens", "kv_pool_bytes")
_ENGINE_BOOLS = ("chunked_prefill", "prefix_caching")


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise KvrayInputError(f"sim backend: {name} must be true or false, got {value!r}")


def engine_config(opts: Mapping[str, Any]) -> EngineConfig:
    """The continuous-batching engine's knobs from cell options (vLLM's defaults for the rest, prefix caching on
    as in vLLM V1). ``kv_cache_memory_bytes`` — the pool option vllm and hf-paged take — sets the pool too, so
    one job's options size every paged engine alike."""
    _, block_size = _layout(opts)
    kwargs: dict[str, Any] = {"block_size": block_size, "prefix_caching": True}
    if opts.get("kv_pool_bytes") is None and opts.get("kv_cache_memory_bytes") is not None:
        opts = {**opts, "kv_pool_bytes": opts["kv_cache_memory_bytes"]}
    try:
        for key in _ENGINE_INTS:
            if opts.get(key) is not None:
                kwargs[key] = int(opts[key])
        if opts.get("gpu_memory_utilization") is not None:
            kwargs["gpu_memory_utilization"] = float(opts["gpu_memory_utilization"])
    except (TypeError, ValueError) as exc:
        raise KvrayInputError(f"sim backend: engine options must be numbers: {exc}") from None
    for key in _ENGINE_BOOLS:
        if opts.get(key) is not None:
            kwargs[key] = _flag(key, opts[key])
    if opts.get("attention") is not None:
        kwargs["attention"] = str(opts["attention"])
    try:
        return EngineConfig(**kwargs)
    except KvrayInputError as exc:
        raise KvrayInputError(f"sim backend: {exc}") from None


def serves_continuously(cell: Cell) -> bool:
    """``layout: paged``, any load but a burst, or a workload with shared prefixes (what a prefix cache serves):
    the continuous-batching engine, else the static batch."""
    wl = cell.workload
    shared = any(r.prefix_group is not None for r in wl.requests)
    return cell.option_dict.get("layout") == "paged" or wl.load_kind != "burst" or shared


class SimBackend(BackendBase):
    name = "sim"
    simulated = True  # the runner skips its host OOM pre-check: the prediction itself decides
    device = "cpu"  # nothing runs on a device; the runner's tracker only watches this process

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> None:
        engine_config(options)

    @classmethod
    def validate_hardware(cls, hardware: str) -> None:
        """The simulator's hardware is a GPU from the table, not a Ray accelerator type."""
        get_gpu(hardware)

    @classmethod
    def layout_for(cls, options: Mapping[str, Any]) -> str:
        """The layout option chooses what the simulator predicts ("hf" unless ``layout: paged``)."""
        return "paged" if options.get("layout") == "paged" else "hf"

    def __init__(self, calibration: str | Path | None = None, *, device: GpuSpec | None = None):
        self.calibration = calibration  # a calibration file; None → $KVRAY_CALIBRATION or the default path
        # a device outside the GPU table (this machine measured as ``cpu-host``, kvray/hardware/host.py) that
        # every cell runs on, whatever its ``hardware``: kvray validate replays CPU rows on it
        self.sim_device = device
        self.geometry: ModelGeometry | None = None
        self.gpu: GpuSpec = get_gpu(DEFAULT_GPU)
        self._reuse = ReuseAccount()  # simulated prefix-cache hits beside their prediction, pooled over repeats

    def _gpu_of(self, cell: Cell) -> GpuSpec:
        return self.sim_device if self.sim_device is not None else gpu_of(cell)

    def load(self, cell: Cell) -> None:
        self.gpu = self._gpu_of(cell)
        _layout(cell.option_dict)
        normalize_dtype(cell.dtype)
        if self.geometry is None or self.geometry.name != cell.model:
            self.geometry = resolve_geometry(cell.model)
        check_tensor_parallel(self.geometry, cell.tensor_parallel)

    def efficiency(self, cell: Cell, layout: str) -> Efficiency:
        """Cell options over the calibration file over the defaults (each of ``EFFICIENCY_OPTIONS`` on its own)."""
        base = efficiency_for(self.gpu, layout, self.calibration)
        opts = cell.option_dict
        if not any(k in opts for k in EFFICIENCY_OPTIONS):
            return base
        try:
            values = {k: float(opts[k]) for k in EFFICIENCY_OPTIONS if k in opts}
        except (TypeError, ValueError) as exc:
            raise KvrayInputError(f"sim backend: efficiency options must be numbers: {exc}") from None
        return replace(base, **values, source="cell options")

    def run(self, cell: Cell, requests: Sequence[RequestSpec], repeat: int) -> BackendRun:
        if self.geometry is None or self.geometry.name != cell.model or self.gpu is not self._gpu_of(cell):
            self.load(cell)
        assert self.geometry is not None
        layout, block_size = _layout(cell.option_dict)
        dtype = normalize_dtype(cell.dtype)
        kv_dtype = normalize_dtype(cell.kv_dtype or cell.dtype)
        eff = self.efficiency(cell, layout)
        if serves_continuously(cell):
            return self._serve(cell, requests, repeat, dtype, kv_dtype, eff)
        tp = cell.tensor_parallel
        costing = Costing(dtype, kv_dtype, layout, block_size, eff, tp)
        schedule = simulate(self.geometry, self.gpu, requests, costing=costing)
        peak = schedule.peak_memory
        if not peak.fits:
            raise SimulatedOutOfMemory(_oom_message(self.gpu, peak))
        traces = _traces(requests, schedule.timings, repeat)
        memory: dict[str, int | float | None] = {
            "baseline_bytes": peak.weights_bytes,
            "peak_allocated_bytes": peak.peak_allocated_bytes,
            "peak_reserved_bytes": None,
            "nvml_baseline_used_bytes": None,
            "nvml_peak_used_bytes": None,
            "rss_peak_bytes": None,
            "weights_bytes": peak.weights_bytes,
            "kv_predicted_bytes": max(m.kv_bytes for m in schedule.memory),
            "activation_peak_bytes": max(m.activation_bytes for m in schedule.memory),
            "predicted_total_bytes": peak.total_bytes,  # + runtime overhead; the GPU's size is hardware_memory_bytes
            "fits": True,
        }
        extra = {
            "sim": {
                "gpu": self.gpu.name,
                "layout": layout,
                "block_size": block_size,
                "eta_compute": eff.eta_compute,
                "eta_memory": eff.eta_memory,
                "layer_overhead_s": eff.layer_overhead_s,
                **dict(zip(CPU_TERMS, eff.cpu, strict=True)),
                "kv_dequant_s_per_gb": eff.kv_dequant_s_per_gb,
                "efficiency_source": eff.source,
                "batches": len(schedule.batches),
                "prefill_bound": schedule.prefill_bound,
                "decode_bound": schedule.decode_bound,
                **_tp_facts(self.gpu, tp),
            },
            **_parallelism(tp),
        }
        memory.update(_energy(self.gpu, traces, tp))
        ordered = sorted(traces, key=lambda t: t.request_id)
        return BackendRun(traces=ordered, kv_measured_bytes=None, memory=memory, simulated=True, extra=extra)

    def _serve(
        self, cell: Cell, requests: Sequence[RequestSpec], repeat: int, dtype: str, kv_dtype: str, eff: Efficiency
    ) -> BackendRun:
        """The continuous-batching engine: traces as the engine served them, the KV pool and its timeline."""
        assert self.geometry is not None
        cfg = engine_config(cell.option_dict)
        load = cell.workload.load
        try:
            run = serve(
                self.geometry,
                self.gpu,
                requests,
                dtype,
                kv_dtype,
                cfg,
                eff,
                load.duration_s if load is not None else None,
                cell.tensor_parallel,
            )
        except PoolTooSmall as exc:
            raise SimulatedOutOfMemory(f"sim: predicted out of memory on {self.gpu.name}: {exc}") from None
        traces = _traces(requests, run.timings, repeat)
        pool = run.pool
        kv_peak = run.kv_blocks_peak * pool.block_bytes
        allocated = pool.weights_bytes + pool.pool_bytes + pool.activation_bytes
        memory: dict[str, int | float | None] = {
            "baseline_bytes": pool.weights_bytes,
            "peak_allocated_bytes": allocated,  # the pool is allocated up front, whatever the load
            "peak_reserved_bytes": None,
            "nvml_baseline_used_bytes": None,
            "nvml_peak_used_bytes": None,
            "rss_peak_bytes": None,
            "weights_bytes": pool.weights_bytes,
            "kv_reserved_bytes": pool.pool_bytes,
            "kv_predicted_bytes": kv_peak,  # blocks in use at the busiest step, whole blocks
            "kv_usage_peak": kv_peak / pool.pool_bytes,
            "activation_peak_bytes": pool.activation_bytes,
            "predicted_total_bytes": pool.total_bytes,
            "fits": True,
        }
        sim = {
            "gpu": self.gpu.name,
            "engine": "continuous-batching",
            "layout": "paged",
            "block_size": cfg.block_size,
            "max_num_seqs": cfg.max_num_seqs,
            "max_num_batched_tokens": cfg.max_num_batched_tokens,
            "chunked_prefill": cfg.chunked_prefill,
            "prefix_caching": cfg.prefix_caching,
            "kv_pool_blocks": pool.blocks,
            "kv_pool_source": pool.source,
            "kv_cache_size_tokens": pool.tokens,
            "eta_compute": eff.eta_compute,
            "eta_memory": eff.eta_memory,
            "layer_overhead_s": eff.layer_overhead_s,
            **dict(zip(CPU_TERMS, eff.cpu, strict=True)),
            "kv_dequant_s_per_gb": eff.kv_dequant_s_per_gb,
            "efficiency_source": eff.source,
            "steps": sum(1 for s in run.steps if s.dt_s > 0),
            "step_bounds": run.bounds,
            "running_peak": run.running_peak,
            "preemptions": run.preemptions,
            "unsent": len(run.unsent),
            **_tp_facts(self.gpu, cell.tensor_parallel),
        }
        counters = {"preemptions": run.preemptions}
        if cfg.prefix_caching:
            counters["prefix_cache_hits"] = run.prefix_hit_tokens
            counters["prefix_cache_queries"] = sum(r.prompt_toks for r in requests)
        memory.update(_energy(self.gpu, traces, cell.tensor_parallel))
        extra: dict[str, Any] = {"sim": sim, **_parallelism(cell.tensor_parallel)}
        points = kv_timeline(run, repeat)
        if repeat >= 0:
            extra["kv_timeline"] = points  # this repeat's; the runner joins a cell's repeats
        ordered = sorted(traces, key=lambda t: t.request_id)
        out = BackendRun(
            traces=ordered, kv_measured_bytes=None, memory=memory, simulated=True, extra=extra, counters=counters
        )
        if cfg.prefix_caching and any(r.prefix_group is not None for r in requests):
            cache = {"block_size": cfg.block_size, "num_gpu_blocks": pool.blocks}
            self._reuse.add(cell, requests, out, cache, points, repeat)
        return out

    @classmethod
    def cell_hardware(cls, cell: Cell) -> dict[str, Any]:
        """The simulated GPU: a row of this cell names it whichever worker ran (or skipped) the cell."""
        return _gpu_identity(gpu_of(cell))

    def memory_scope(self) -> str:
        """Nothing is measured: the memory columns are the roofline's predictions for the simulated GPU."""
        return "predicted (simulator)"

    def device_info(self) -> dict[str, Any]:
        return _gpu_identity(self.gpu)

    def close(self) -> None:
        self.geometry = None


def _energy(gpu: GpuSpec, traces: Sequence[RunTrace], tp: int) -> dict[str, Any]:
    """The run's TDP × time estimate: ``tp`` GPUs at TDP from the first arrival to the last token."""
    busy = max(t.end_s for t in traces) - min(t.arrival_s for t in traces) if traces else 0.0
    return tdp_energy_estimate(gpu, busy, sum(t.output_toks for t in traces), tp)


def _traces(
    requests: Sequence[RequestSpec], timings: Sequence[RequestTiming | ServedRequest], repeat: int
) -> list[RunTrace]:
    """RunTraces of the predicted timings; sent = arrival, since a simulated client never lags."""
    return [
        RunTrace(
            request_id=requests[t.index].id,
            repeat=repeat,
            arrival_s=t.arrival_s,
            start_s=t.start_s,
            token_times_s=t.token_times_s,
            end_s=t.end_s,
            prompt_toks=requests[t.index].prompt_toks,
            output_toks=len(t.token_times_s),
            sent_s=t.arrival_s,
        )
        for t in timings
    ]


def kv_timeline(run: ServingRun, repeat: int, max_points: int = 500) -> list[dict[str, Any]]:
    """The engine's state at its steps, shaped like vLLM's and hf-paged's timeline points (``t_s`` = the step's
    start, seconds since the repeat's t0). A step becomes a point when it is at least 1 / ``max_points`` of the run
    after the last point (so a long run stays a few hundred points, as a server's sampled /metrics would), when
    the preemption count moved, and for the first and last step."""
    points: list[dict[str, Any]] = []
    pool, steps = run.pool, run.steps
    if not steps:
        return points
    spacing = (steps[-1].t_s - steps[0].t_s) / max_points
    for n, step in enumerate(steps):
        last = points[-1] if points else None
        if (
            last is not None
            and n != len(steps) - 1
            and step.preemptions == last["preemptions"]
            and step.t_s - last["t_s"] < spacing
        ):
            continue
        points.append(
            {
                "repeat": repeat,
                "t_s": round(step.t_s, 6),
                "kv_used_bytes": step.kv_blocks_used * pool.block_bytes,
                "kv_usage": step.kv_blocks_used / pool.blocks,
                "running": step.running,
                "waiting": step.waiting,
                "preemptions": step.preemptions,
            }
        )
    return points


def _tp_facts(gpu: GpuSpec, tp: int) -> dict[str, Any]:
    """What the sim row says about TP: the degree and the link its all-reduces were costed over."""
    return {"tensor_parallel": tp, "interconnect": gpu.interconnect if tp > 1 else None}


def _parallelism(tp: int) -> dict[str, Any]:
    """The row's ``parallelism``: memory columns are one GPU's (one rank's) under TP."""
    return {"parallelism": f"tensor parallel {tp} (simulated; memory per GPU)"} if tp > 1 else {}


def _gpu_identity(gpu: GpuSpec) -> dict[str, Any]:
    return {
        "name": gpu.name,
        "memory_bytes": gpu.memory_bytes,
        "simulated": True,
        "accelerator_type": gpu.ray_accelerator_type,
    }


def _oom_message(gpu: GpuSpec, m: MemoryPrediction) -> str:
    """Sizes in the message: the runner reads "allocate N bytes" as the attempted size."""
    return (
        f"sim: predicted out of memory on {gpu.name}: would need to allocate {m.total_bytes} bytes "
        f"({m.total_bytes / GIB:.2f} GiB = weights {m.weights_bytes / GIB:.2f} + KV {m.kv_bytes / GIB:.2f} + "
        f"activations {m.activation_bytes / GIB:.2f} + runtime {m.overhead_bytes / GIB:.2f}) of "
        f"{m.capacity_bytes / GIB:.2f} GiB"
    )
