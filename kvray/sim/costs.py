"""The step-time model: what one forward pass (one engine step) costs, each part on its own roof.

A step of a continuous-batching engine — or one pass of a static batch — is costed as its parts
(docs/simulator.md, "The step-time model"):

    linear        max(2 · N_body · tokens + 2 · N_head · logits  FLOPs / (peak × η_c),
                      weights the tokens touch, read once         bytes / (bandwidth × η_m))
    prefill attn  max(causal QKᵀ + AV FLOPs of the prefill chunks / (peak × η_c),
                      their KV (past read, new written)           / (bandwidth × η_m))
    decode attn   max(the decode tokens' attention FLOPs          / (peak × η_c),
                      the KV of every decoding sequence           / (bandwidth × η_m))
    GPU           max(roofline of the whole pass, linear + prefill attn + decode attn) + dequant
    dequant       kv_dequant_s_per_gb × GB of fp8 KV the attention parts read and write (0 for bf16 KV)
    step          GPU + all-reduces (TP) + CPU

    roofline      max(Σ FLOPs / (peak × η_c), Σ bytes / (bandwidth × η_m), layers × layer_overhead_s)
    CPU           step_overhead_s + request_step_s × running + admit_s × admitted + finish_s × finished

The three GPU parts are separate kernels one after the other, so their times add; the roofline of the whole
pass is the floor they cannot go below (a sum of maxima is never below the maximum of the sums, so only the
launch-overhead roof can raise it). The all-reduces sit between the matmuls that need them, and the engine's
CPU side (scheduling, sampling, detokenisation, streaming) runs between steps in the engines kvray measures
(vLLM V1 without async scheduling, transformers' continuous batching), so both add.

Every rate here is calibratable (kvray/analysis/calibrate.py); ``Efficiency`` carries them, defaults in
docs/simulator.md with their sources.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from itertools import product
from pathlib import Path
from typing import Any, NamedTuple

from kvray.errors import KvrayInputError
from kvray.hardware.gpus import GpuSpec
from kvray.model.geometry import ModelGeometry
from kvray.model.kvmath import dtype_bytes, normalize_dtype
from kvray.sim.passes import PassCost

DEFAULT_ETA_COMPUTE = 0.7  # llm-analysis's default flops efficiency
DEFAULT_ETA_MEMORY = 0.9  # llm-analysis's default memory efficiency
CALIBRATION_ENV = "KVRAY_CALIBRATION"
ALLREDUCES_PER_LAYER = 2  # Megatron-style TP: one after attention's row-parallel o_proj, one after the MLP's down
# The fixed cost of one small all-reduce, whatever its size: vLLM's custom all-reduce on H100 measured 8.5–11.8 µs
# for 512 B–32 KiB at TP 2/4/8 without CUDA graphs (sgl-project/sglang PR #2904's table); NCCL's NVLS tree
# ~6 µs at TP 2 with CUDA graphs (NVIDIA/nccl issue #1259). 8 µs sits between; decode's all-reduces are this size.
ALLREDUCE_LATENCY_S = 8e-6
# The CPU-side parameters: seconds per step, per running request per step, per request admitted, per request
# finished. 0 by default (a pure roofline) — no published per-step figure transfers between engines, versions and
# host CPUs; ``kvray calibrate`` fits them from a short run (docs/simulator.md).
CPU_TERMS = ("step_overhead_s", "request_step_s", "admit_s", "finish_s")
# fp8 KV's (de)quantisation: the attention kernels convert every fp8 KV element they load to bf16 (and quantise
# what they write), work the byte roofs do not see. Seconds per GB of fp8 KV the attention parts touch; 0 by
# default — no published per-byte figure (vLLM's docs and issues report fp8 KV decode from slightly faster to
# slower than bf16 depending on the attention backend, never a rate): set it in a calibration entry.
QUANTISED_KV_DTYPES = ("fp8",)


@dataclass(frozen=True)
class Efficiency:
    """The fraction of peak a real engine reaches, a per-layer launch floor, and the engine's CPU costs."""

    eta_compute: float = DEFAULT_ETA_COMPUTE
    eta_memory: float = DEFAULT_ETA_MEMORY
    layer_overhead_s: float = 0.0
    source: str = "defaults"
    step_overhead_s: float = 0.0  # per engine step (scheduler, input preparation)
    request_step_s: float = 0.0  # per running request per step (sampling, output processing, streaming a token)
    admit_s: float = 0.0  # per request admitted (tokenisation, request setup)
    finish_s: float = 0.0  # per request finished (detokenisation of the end, freeing, the final response)
    kv_dequant_s_per_gb: float = 0.0  # per GB of fp8 KV the attention reads or writes (QUANTISED_KV_DTYPES)

    def __post_init__(self) -> None:
        cpu = [getattr(self, k) for k in CPU_TERMS]
        overheads = (self.layer_overhead_s, self.kv_dequant_s_per_gb, *cpu)
        if not (self.eta_compute > 0 and self.eta_memory > 0 and min(overheads) >= 0):
            raise KvrayInputError(
                f"efficiencies must be positive and overheads >= 0, got η_compute {self.eta_compute}, "
                f"η_memory {self.eta_memory}, layer overhead {self.layer_overhead_s}, CPU {cpu}, "
                f"KV dequantisation {self.kv_dequant_s_per_gb} s/GB"
            )

    @property
    def cpu(self) -> tuple[float, float, float, float]:
        return self.step_overhead_s, self.request_step_s, self.admit_s, self.finish_s

    def describe(self) -> str:
        text = f"η_compute {self.eta_compute:.3g}, η_memory {self.eta_memory:.3g}"
        if self.layer_overhead_s:
            text += f", layer overhead {self.layer_overhead_s * 1e6:.3g} µs"
        names = ("per step", "per running request per step", "per admission", "per finish")
        for name, value in zip(names, self.cpu, strict=True):
            if value:
                text += f", CPU {value * 1e3:.3g} ms {name}"
        if self.kv_dequant_s_per_gb:
            text += f", fp8 KV dequantisation {self.kv_dequant_s_per_gb * 1e3:.3g} ms/GB"
        return f"{text} ({self.source})"

    @classmethod
    def from_entry(cls, entry: dict[str, Any], source: str) -> Efficiency:
        """From a calibration entry (older entries have no CPU terms: they stay 0)."""
        known = {f.name for f in fields(cls)} - {"source"}
        return cls(**{k: float(v) for k, v in entry.items() if k in known and v is not None}, source=source)


# --- calibration file (written by kvray.analysis.calibrate, read here) -----------------------------------------


def calibration_path() -> Path:
    env = os.environ.get(CALIBRATION_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvray" / "calibration.json"


def load_calibration(path: str | Path | None = None) -> dict[str, Any]:
    """The calibration file's content ({"entries": {gpu: {layout: {...}}}}), empty when absent or unreadable."""
    p = Path(path) if path is not None else calibration_path()
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return {"version": 1, "entries": {}}
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        return {"version": 1, "entries": {}}
    return data


def efficiency_for(gpu: GpuSpec, layout: str = "hf", path: str | Path | None = None) -> Efficiency:
    """Calibrated efficiencies for this GPU and KV layout when the calibration file has them, else defaults."""
    p = Path(path) if path is not None else calibration_path()
    entry = load_calibration(p)["entries"].get(gpu.name, {}).get(layout)
    if not entry:
        return Efficiency()
    try:
        return Efficiency.from_entry(entry, f"calibrated from {entry.get('rows', '?')} rows, {p}")
    except (KeyError, TypeError, ValueError, KvrayInputError):
        return Efficiency()


# --- the roofs ------------------------------------------------------------------------------------------


def roofs_s(cost: PassCost, g: ModelGeometry, gpu: GpuSpec, dtype: str, eff: Efficiency) -> tuple[float, float, float]:
    """(compute, memory, overhead) seconds of one pass as a whole; the roofline is the largest."""
    compute = cost.flops / (gpu.tflops(dtype) * 1e12 * eff.eta_compute)
    memory = cost.bytes / (gpu.bandwidth_gbps * 1e9 * eff.eta_memory)
    return compute, memory, g.num_layers * eff.layer_overhead_s


def allreduce_s(g: ModelGeometry, gpu: GpuSpec, tokens: int, dtype: str, tp: int) -> float:
    """Seconds one pass over ``tokens`` tokens spends in TP all-reduces (0 at tp 1).

    Per layer ``ALLREDUCES_PER_LAYER`` all-reduces of tokens × hidden activations in ``dtype``; each costs
    ``ALLREDUCE_LATENCY_S`` plus its data time: a ring all-reduce over N GPUs sends (and receives) 2(N − 1)/N of
    the payload per GPU, at the link's per-direction bandwidth (kvray/hardware/gpus.py INTERCONNECT).
    """
    if tp <= 1 or tokens <= 0:
        return 0.0
    payload = tokens * g.hidden_size * dtype_bytes(dtype)
    per_gpu = 2 * (tp - 1) / tp * payload
    one = ALLREDUCE_LATENCY_S + per_gpu / (gpu.link_gbps_per_direction * 1e9)
    return ALLREDUCES_PER_LAYER * g.num_layers * one


class StepRequests(NamedTuple):
    """What the engine's CPU side does in a step: requests running (scheduled), admitted, finished."""

    running: float = 0  # floats: a serving window's mean step (kvray/analysis/observations.py) has fractions
    admitted: float = 0
    finished: float = 0


NO_REQUESTS = StepRequests()
# The GPU part of a step as linear pieces in θ = (1/η_compute, 1/η_memory, layer overhead): the time is the largest
# piece. Three for the roofline of the whole pass, then one per choice of roof for each of the three parts (linear,
# prefill attention, decode attention) — their sum, each part on the roof it picks.
PART_ROOFS = tuple(product((0, 1), repeat=3))
PIECES = ("compute", "memory", "overhead") + tuple(
    "parts: " + ", ".join(("compute", "memory")[k] for k in roofs) for roofs in PART_ROOFS
)


@dataclass(frozen=True)
class StepRoofs:
    """One step's parts at 100 % of peak (seconds) on one GPU, its all-reduce time and its CPU work.

    ``parts`` holds (compute, memory) seconds of the linear layers, the prefill attention and the decode
    attention (module docstring); ``time_s`` is max(roofline, Σ parts on their roofs) + all-reduces + CPU.
    """

    parts: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    layers: int
    allreduce_s: float = 0.0
    requests: StepRequests = NO_REQUESTS
    quantised_kv_bytes: float = 0.0  # fp8 KV the attention parts read and write: ``kv_dequant_s_per_gb`` applies

    @property
    def compute_s(self) -> float:
        return sum(c for c, _ in self.parts)

    @property
    def memory_s(self) -> float:
        return sum(m for _, m in self.parts)

    def pieces(self) -> list[tuple[float, float, float]]:
        """(compute, memory, overhead) coefficients of each piece of ``PIECES``, in that order."""
        out = [(self.compute_s, 0.0, 0.0), (0.0, self.memory_s, 0.0), (0.0, 0.0, float(self.layers))]
        for roofs in PART_ROOFS:
            c = sum(part[0] for part, k in zip(self.parts, roofs, strict=True) if k == 0)
            m = sum(part[1] for part, k in zip(self.parts, roofs, strict=True) if k == 1)
            out.append((c, m, 0.0))
        return out

    def cpu_coefficients(self) -> tuple[float, float, float, float]:
        """Coefficients of (step_overhead_s, request_step_s, admit_s, finish_s) in the step's CPU time."""
        return 1.0, float(self.requests.running), float(self.requests.admitted), float(self.requests.finished)

    def gpu_s(self, eff: Efficiency) -> float:
        x, y = 1 / eff.eta_compute, 1 / eff.eta_memory
        parts = sum(max(c * x, m * y) for c, m in self.parts)
        roofs = max(self.compute_s * x, self.memory_s * y, self.layers * eff.layer_overhead_s, parts)
        return roofs + self.quantised_kv_bytes / 1e9 * eff.kv_dequant_s_per_gb

    def cpu_s(self, eff: Efficiency) -> float:
        return sum(k * v for k, v in zip(self.cpu_coefficients(), eff.cpu, strict=True))

    def time_s(self, eff: Efficiency) -> float:
        return self.gpu_s(eff) + self.allreduce_s + self.cpu_s(eff)

    def bound(self, eff: Efficiency) -> str:
        """What limits the step: "compute", "memory" or "overhead" (GPU), "communication" (TP) or "cpu"."""
        gpu, cpu = self.gpu_s(eff), self.cpu_s(eff)
        if cpu > max(gpu, self.allreduce_s):
            return "cpu"
        if self.allreduce_s > gpu:
            return "communication"
        x, y = 1 / eff.eta_compute, 1 / eff.eta_memory
        if self.layers * eff.layer_overhead_s >= gpu:
            return "overhead"
        compute = sum(c * x for c, m in self.parts if c * x >= m * y)
        memory = sum(m * y for c, m in self.parts if c * x < m * y)
        return "compute" if compute >= memory else "memory"


def step_roofs(
    cost: PassCost,
    g: ModelGeometry,
    gpu: GpuSpec,
    dtype: str,
    tp: int = 1,
    communication: bool = True,
    requests: StepRequests = NO_REQUESTS,
    kv_dtype: str | None = None,
) -> StepRoofs:
    """The parts of ``cost`` (one rank's pass under TP) on ``gpu`` at 100 % of peak; its all-reduces unless
    ``communication`` is False (a floor: the all-reduce latency is an estimate, not a bound); with an fp8
    ``kv_dtype`` the attention's KV bytes for the dequantisation term."""
    peak, bandwidth = gpu.tflops(dtype) * 1e12, gpu.bandwidth_gbps * 1e9
    pre_c, pre_m = cost.prefill_attention_flops, cost.prefill_attention_bytes
    dec_c, dec_m = cost.decode_attention_flops, cost.decode_attention_bytes
    linear = ((cost.flops - pre_c - dec_c) / peak, (cost.bytes - pre_m - dec_m) / bandwidth)
    parts = (linear, (pre_c / peak, pre_m / bandwidth), (dec_c / peak, dec_m / bandwidth))
    comm = allreduce_s(g, gpu, cost.tokens, dtype, tp) if communication else 0.0
    return StepRoofs(parts, g.num_layers, comm, requests, quantised_kv_bytes(cost, kv_dtype))


def quantised_kv_bytes(cost: PassCost, kv_dtype: str | None) -> float:
    """The KV bytes of ``cost``'s attention parts when the KV is fp8 (what dequantisation costs scale with)."""
    return cost.prefill_attention_bytes + cost.decode_attention_bytes if is_quantised_kv(kv_dtype) else 0.0


def is_quantised_kv(kv_dtype: str | None) -> bool:
    return kv_dtype is not None and normalize_dtype(kv_dtype) in QUANTISED_KV_DTYPES


def pass_time_s(cost: PassCost, g: ModelGeometry, gpu: GpuSpec, dtype: str, eff: Efficiency) -> float:
    """The pass's time on one GPU (``StepRoofs.time_s``): its parts on their roofs (the whole pass's roofline a
    floor); ``step_roofs(…).time_s(eff)`` for TP's all-reduces and the engine's CPU work for its requests."""
    return step_roofs(cost, g, gpu, dtype).time_s(eff)


class StepTimer:
    """``StepRoofs.time_s`` and ``bound`` for one (model, GPU, dtype, efficiency, TP), with the rates divided
    once: the serving model times every one of tens of thousands of steps through it."""

    def __init__(
        self, g: ModelGeometry, gpu: GpuSpec, dtype: str, eff: Efficiency, tp: int = 1, kv_dtype: str | None = None
    ):
        self.g, self.gpu, self.dtype, self.eff, self.tp, self.kv_dtype = g, gpu, dtype, eff, tp, kv_dtype
        self.per_flop = 1 / (gpu.tflops(dtype) * 1e12 * eff.eta_compute)
        self.per_byte = 1 / (gpu.bandwidth_gbps * 1e9 * eff.eta_memory)
        self.launch = g.num_layers * eff.layer_overhead_s
        self.dequant_per_byte = eff.kv_dequant_s_per_gb / 1e9 if is_quantised_kv(kv_dtype) else 0.0

    def time_s(self, cost: PassCost, requests: StepRequests) -> tuple[float, str]:
        """(seconds, bound) of a step: the same arithmetic as ``StepRoofs`` (tests compare them)."""
        x, y = self.per_flop, self.per_byte
        pc, pm = cost.prefill_attention_flops * x, cost.prefill_attention_bytes * y
        dc, dm = cost.decode_attention_flops * x, cost.decode_attention_bytes * y
        lc, lm = cost.flops * x - pc - dc, cost.bytes * y - pm - dm
        parts = max(lc, lm) + max(pc, pm) + max(dc, dm)
        gpu = max(cost.flops * x, cost.bytes * y, self.launch, parts)
        if self.dequant_per_byte:
            gpu += (cost.prefill_attention_bytes + cost.decode_attention_bytes) * self.dequant_per_byte
        e = self.eff
        cpu = e.step_overhead_s + e.request_step_s * requests.running + e.admit_s * requests.admitted
        cpu += e.finish_s * requests.finished
        comm = allreduce_s(self.g, self.gpu, cost.tokens, self.dtype, self.tp) if self.tp > 1 else 0.0
        if cpu > max(gpu, comm):
            bound = "cpu"
        elif comm > gpu:
            bound = "communication"
        elif self.launch >= gpu:
            bound = "overhead"
        else:
            compute = sum(c for c, m in ((lc, lm), (pc, pm), (dc, dm)) if c >= m)
            bound = "compute" if compute >= parts - compute else "memory"
        return gpu + comm + cpu, bound
