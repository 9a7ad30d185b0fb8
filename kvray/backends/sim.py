"""The simulator as a backend: predicted traces and memory for any GPU in the table, no GPU and no sleeping.

It serves a cell's requests with the HF backend's static-batching queue (see kvray/sim/simulate.py), so the
runner, metrics, store and figures treat its cells like measured ones, flagged ``simulated``. A cell whose
predicted memory exceeds the GPU raises ``SimulatedOutOfMemory`` (a MemoryError), which the runner records
as status "oom": the OOM boundary is a result, not a crash.

Cell fields: ``hardware`` is a GPU name from kvray/hardware/gpus.py ("any" → H100-SXM); KV dtype is
``kv_dtype`` or ``dtype``. Cell options: ``layout`` ("hf" | "paged"), ``block_size`` (paged, 16), and ``eta_compute``,
``eta_memory``, ``layer_overhead_s`` to override the calibrated or default efficiencies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvray.backends.base import BackendBase, BackendRun
from kvray.errors import KvrayInputError
from kvray.hardware.gpus import GpuSpec, get_gpu
from kvray.measure.trace import RunTrace
from kvray.model.geometry import ModelGeometry
from kvray.model.kvmath import DEFAULT_BLOCK_SIZE, LAYOUTS, normalize_dtype
from kvray.sim.simulate import DEFAULT_GPU, Efficiency, MemoryPrediction, efficiency_for, simulate
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


class SimBackend(BackendBase):
    name = "sim"
    simulated = True  # the runner skips its host OOM pre-check: the prediction itself decides
    device = "cpu"  # nothing runs on a device; the runner's tracker only watches this process

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> None:
        _layout(options)

    @classmethod
    def validate_hardware(cls, hardware: str) -> None:
        """The simulator's hardware is a GPU from the table, not a Ray accelerator type."""
        get_gpu(hardware)

    @classmethod
    def layout_for(cls, options: Mapping[str, Any]) -> str:
        """The layout option chooses what the simulator predicts ("hf" unless ``layout: paged``)."""
        return "paged" if options.get("layout") == "paged" else "hf"

    def __init__(self, calibration: str | Path | None = None):
        self.calibration = calibration  # a calibration file; None → $KVRAY_CALIBRATION or the default path
        self.geometry: ModelGeometry | None = None
        self.gpu: GpuSpec = get_gpu(DEFAULT_GPU)

    def load(self, cell: Cell) -> None:
        from kvray.model.resolve import resolve_geometry

        self.gpu = gpu_of(cell)
        _layout(cell.option_dict)
        normalize_dtype(cell.dtype)
        if self.geometry is None or self.geometry.name != cell.model:
            self.geometry = resolve_geometry(cell.model)

    def efficiency(self, cell: Cell, layout: str) -> Efficiency:
        """Cell options over the calibration file over the defaults."""
        base = efficiency_for(self.gpu, layout, self.calibration)
        opts = cell.option_dict
        keys = ("eta_compute", "eta_memory", "layer_overhead_s")
        if not any(k in opts for k in keys):
            return base
        compute, memory, overhead = (float(opts.get(k, getattr(base, k))) for k in keys)
        return Efficiency(compute, memory, overhead, source="cell options")

    def run(self, cell: Cell, requests: Sequence[RequestSpec], repeat: int) -> BackendRun:
        if self.geometry is None or self.geometry.name != cell.model or self.gpu is not gpu_of(cell):
            self.load(cell)
        assert self.geometry is not None
        layout, block_size = _layout(cell.option_dict)
        dtype = normalize_dtype(cell.dtype)
        kv_dtype = normalize_dtype(cell.kv_dtype or cell.dtype)
        eff = self.efficiency(cell, layout)
        schedule = simulate(self.geometry, self.gpu, requests, dtype, kv_dtype, layout, block_size, eff)
        peak = schedule.peak_memory
        if not peak.fits:
            raise SimulatedOutOfMemory(_oom_message(self.gpu, peak))
        traces = [
            RunTrace(
                request_id=requests[t.index].id,
                repeat=repeat,
                arrival_s=t.arrival_s,
                start_s=t.start_s,
                token_times_s=t.token_times_s,
                end_s=t.end_s,
                prompt_toks=requests[t.index].prompt_toks,
                output_toks=len(t.token_times_s),
            )
            for t in schedule.timings
        ]
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
                "efficiency_source": eff.source,
                "batches": len(schedule.batches),
                "prefill_bound": schedule.prefill_bound,
                "decode_bound": schedule.decode_bound,
            }
        }
        ordered = sorted(traces, key=lambda t: t.request_id)
        return BackendRun(traces=ordered, kv_measured_bytes=None, memory=memory, simulated=True, extra=extra)

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
