"""A roofline predictor: latency, throughput and memory of a cell on any GPU in the table, without a GPU.

Each forward pass takes the longest of three roofs (see docs/simulator.md):

    compute  = FLOPs / (peak TFLOP/s × η_compute)
    memory   = bytes moved / (bandwidth × η_memory)
    overhead = num_layers × layer_overhead_s      (kernel launches and Python; 0 unless calibrated)

— except that the decode tokens' attention (their KV read) is a kernel of its own, timed after the rest of the
pass with the whole pass's roofline as a floor (``PassRoofs``), so a compute-bound prefill chunk in a mixed step
does not hide it. The FLOPs and bytes of each pass come from kvray.sim.passes: prefill FLOPs are 2 × matmul
parameters × tokens plus causal attention (P(P+1)/2 query-key pairs per layer, a W-wide band on sliding layers);
every pass reads the weights it touches — the shared ones and the LM head in full, the embedding rows its tokens look up, and
in MoE layers only the experts its tokens route to — plus the KV it writes (prefill) or the whole KV cache at
its current context (decode), so the context grows every step. Requests are served with the same
static-batching queue as the HF backend: when the engine is free, every request that has arrived forms the
next batch, padded to its longest prompt (``hf`` layout) or not padded with KV in blocks (``paged``).

Tensor parallelism (``tp`` > 1): the pass is costed on one rank's geometry (kvray.model.parallel: heads, MLP,
vocabulary split; norms replicated; KV heads split or replicated as vLLM does), so FLOPs, bytes, weights and KV
are per GPU, and each pass adds the communication TP needs — two all-reduces per layer (after attention's
o_proj and after the MLP's down projection, Megatron-style as vLLM runs it) of tokens × hidden × dtype bytes
each; a ring all-reduce sends and receives 2(N − 1)/N of the data per GPU over the GPU's link
(kvray/hardware/gpus.py INTERCONNECT, per direction). The all-reduce sits between the layers' matmuls and is
not overlapped with them, so its time adds to the roof (``allreduce_s``).

Defaults η_compute 0.7 and η_memory 0.9 are llm-analysis's; ``kvray calibrate`` fits them per GPU and layout
from measured cells and stores them in a JSON file this module reads (``KVRAY_CALIBRATION`` overrides it).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, Protocol

from kvray.errors import KvrayInputError
from kvray.hardware.gpus import GpuSpec, get_gpu
from kvray.model.geometry import ModelGeometry
from kvray.model.kvmath import DEFAULT_BLOCK_SIZE, LAYOUTS, dtype_bytes, kv_bytes_sequence, normalize_dtype
from kvray.model.oom import RUNTIME_OVERHEAD_BYTES, activation_bytes
from kvray.model.parallel import shard_geometry
from kvray.sim.passes import PassCost, batch_passes

DEFAULT_GPU = "H100-SXM"  # what hardware "any" simulates
DEFAULT_ETA_COMPUTE = 0.7  # llm-analysis's default flops efficiency
DEFAULT_ETA_MEMORY = 0.9  # llm-analysis's default memory efficiency
CALIBRATION_ENV = "KVRAY_CALIBRATION"
ALLREDUCES_PER_LAYER = 2  # Megatron-style TP: one after attention's row-parallel o_proj, one after the MLP's down
# The fixed cost of one small all-reduce, whatever its size: vLLM's custom all-reduce on H100 measured 8.5–11.8 µs
# for 512 B–32 KiB at TP 2/4/8 without CUDA graphs (sgl-project/sglang PR #2904's table); NCCL's NVLS tree
# ~6 µs at TP 2 with CUDA graphs (NVIDIA/nccl issue #1259). 8 µs sits between; decode's all-reduces are this size.
ALLREDUCE_LATENCY_S = 8e-6


class RequestLike(Protocol):
    """What the scheduler needs of a request (kvray.spec.RequestSpec fits)."""

    @property
    def prompt_toks(self) -> int: ...
    @property
    def gen_toks(self) -> int: ...
    @property
    def arrival_s(self) -> float: ...


@dataclass(frozen=True)
class Efficiency:
    """The fraction of peak a real engine reaches, plus a per-layer fixed cost per forward pass."""

    eta_compute: float = DEFAULT_ETA_COMPUTE
    eta_memory: float = DEFAULT_ETA_MEMORY
    layer_overhead_s: float = 0.0
    source: str = "defaults"

    def __post_init__(self) -> None:
        if not (self.eta_compute > 0 and self.eta_memory > 0 and self.layer_overhead_s >= 0):
            raise KvrayInputError(
                f"efficiencies must be positive and overhead >= 0, got η_compute {self.eta_compute}, "
                f"η_memory {self.eta_memory}, layer overhead {self.layer_overhead_s}"
            )

    def describe(self) -> str:
        text = f"η_compute {self.eta_compute:.3g}, η_memory {self.eta_memory:.3g}"
        if self.layer_overhead_s:
            text += f", layer overhead {self.layer_overhead_s * 1e6:.3g} µs"
        return f"{text} ({self.source})"


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
        return Efficiency(
            float(entry["eta_compute"]),
            float(entry["eta_memory"]),
            float(entry.get("layer_overhead_s", 0.0)),
            source=f"calibrated from {entry.get('rows', '?')} rows, {p}",
        )
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


# The linear pieces of a pass's time, as (compute, memory, overhead) coefficients of (1/η_compute, 1/η_memory,
# layer overhead): the time is the largest piece. The first three are the roofline of the whole pass; the last two
# the rest of the pass (less its decode attention) on one roof, then the decode attention on the other (the rest
# and the attention on the same roof add up to the whole pass's piece).
PIECES = ("compute", "memory", "overhead", "compute, then decode attention (memory)",
          "memory, then decode attention (compute)")  # fmt: skip


@dataclass(frozen=True)
class PassRoofs:
    """One pass's roofs at 100 % of peak (seconds) on one GPU, and its TP all-reduce time.

    The pass takes the largest of

        the roofline of the whole pass   max(compute/η_c, memory/η_m, layers × overhead)
        the rest, then decode attention  max(rest compute/η_c, rest memory/η_m)
                                         + max(attention compute/η_c, attention memory/η_m)

    plus ``allreduce_s`` (never overlapped). Decode attention is a kernel of its own between the layer's
    matmuls: a mixed step's KV read is not hidden under its prefill's compute, and the roofline of the whole
    pass stays a floor. A decode step bound by memory alone takes (weights + KV) / bandwidth either way.
    ``pieces`` writes that maximum as linear pieces in (1/η_c, 1/η_m, overhead), the form calibration fits.
    """

    compute_s: float
    memory_s: float
    layers: int
    decode_compute_s: float = 0.0
    decode_memory_s: float = 0.0
    allreduce_s: float = 0.0

    def pieces(self) -> list[tuple[float, float, float]]:
        """(compute, memory, overhead) coefficients of each piece of ``PIECES``, in that order."""
        c, m, n = self.compute_s, self.memory_s, float(self.layers)
        rc, rm, dc, dm = (
            c - self.decode_compute_s,
            m - self.decode_memory_s,
            self.decode_compute_s,
            self.decode_memory_s,
        )
        return [(c, 0.0, 0.0), (0.0, m, 0.0), (0.0, 0.0, n), (rc, dm, 0.0), (dc, rm, 0.0)]

    def _values(self, eff: Efficiency) -> list[float]:
        theta = (1 / eff.eta_compute, 1 / eff.eta_memory, eff.layer_overhead_s)
        return [sum(k * t for k, t in zip(piece, theta, strict=True)) for piece in self.pieces()]

    def time_s(self, eff: Efficiency) -> float:
        return max(self._values(eff)) + self.allreduce_s

    def bound(self, eff: Efficiency) -> str:
        """Which term limits the pass: "compute", "memory", "overhead" or (TP) "communication"; of a rest-then-
        attention piece, the roof of its larger part."""
        values = self._values(eff)
        if self.allreduce_s > max(values):
            return "communication"
        k = values.index(max(values))
        if k < 3:
            return PIECES[k]
        x, y = 1 / eff.eta_compute, 1 / eff.eta_memory
        rest_c, rest_m = (self.compute_s - self.decode_compute_s) * x, (self.memory_s - self.decode_memory_s) * y
        if k == 3:  # the rest on compute, the attention on memory
            return "compute" if rest_c >= self.decode_memory_s * y else "memory"
        return "memory" if rest_m >= self.decode_compute_s * x else "compute"


def pass_roofs(cost: PassCost, g: ModelGeometry, gpu: GpuSpec, dtype: str, tp: int = 1,
               communication: bool = True) -> PassRoofs:  # fmt: skip
    """The roofs of ``cost`` (one rank's pass under TP) on ``gpu`` at 100 % of peak; its all-reduces unless
    ``communication`` is False (a floor: the all-reduce latency is an estimate, not a bound)."""
    peak_flops = gpu.tflops(dtype) * 1e12
    bandwidth = gpu.bandwidth_gbps * 1e9
    return PassRoofs(cost.flops / peak_flops, cost.bytes / bandwidth, g.num_layers,
                     cost.decode_attention_flops / peak_flops, cost.decode_attention_bytes / bandwidth,
                     allreduce_s(g, gpu, cost.tokens, dtype, tp) if communication else 0.0)  # fmt: skip


def pass_time_s(cost: PassCost, g: ModelGeometry, gpu: GpuSpec, dtype: str, eff: Efficiency, tp: int = 1,
                communication: bool = True) -> float:  # fmt: skip
    """The pass's time (``PassRoofs.time_s``): its roofs with decode attention timed apart, plus the TP
    all-reduces (not overlapped with the matmuls they sit between)."""
    return pass_roofs(cost, g, gpu, dtype, tp, communication).time_s(eff)


def bound_of(cost: PassCost, g: ModelGeometry, gpu: GpuSpec, dtype: str, eff: Efficiency, tp: int = 1) -> str:
    """Which term limits the pass: "compute", "memory", "overhead" or (TP) "communication"."""
    return pass_roofs(cost, g, gpu, dtype, tp).bound(eff)


# --- memory ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPrediction:
    weights_bytes: int
    kv_bytes: int  # at the batch's largest point (every sequence at its final length)
    activation_bytes: int
    overhead_bytes: int  # CUDA context and allocator slack, outside torch's allocated counter
    capacity_bytes: int

    @property
    def peak_allocated_bytes(self) -> int:
        """What torch.cuda.max_memory_allocated would report: weights + KV + activations."""
        return self.weights_bytes + self.kv_bytes + self.activation_bytes

    @property
    def total_bytes(self) -> int:
        return self.peak_allocated_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes


def batch_memory(g: ModelGeometry, gpu: GpuSpec, batch: Sequence[RequestLike], dtype: str, kv_dtype: str,
                 layout: str, block_size: int = DEFAULT_BLOCK_SIZE) -> MemoryPrediction:  # fmt: skip
    """Weights + KV of the batch at its end + the prefill activation peak, against the GPU's memory.

    hf: every row is padded to the longest prompt and runs the longest generation, so each holds
    max(P) + max(G) − 1 positions. paged: each request holds its own P + G − 1 positions in whole blocks.
    """
    p_max, g_max = max(r.prompt_toks for r in batch), max(r.gen_toks for r in batch)
    if layout == "hf":
        kv = len(batch) * kv_bytes_sequence(g, p_max + g_max - 1, kv_dtype, "hf")
        act = activation_bytes(g, len(batch), p_max, dtype)
    else:
        kv = sum(kv_bytes_sequence(g, r.prompt_toks + r.gen_toks - 1, kv_dtype, "paged", block_size) for r in batch)
        act = activation_bytes(g, len(batch), math.ceil(sum(r.prompt_toks for r in batch) / len(batch)), dtype)
    weights = g.weights_bytes(dtype_bytes(dtype))
    return MemoryPrediction(weights, kv, act, RUNTIME_OVERHEAD_BYTES, gpu.memory_bytes)


# --- the static-batching schedule ---------------------------------------------------------------------


@dataclass
class RequestTiming:
    """Predicted life of one request, seconds from the start of the run (RunTrace's fields)."""

    index: int  # position in the request list
    arrival_s: float
    start_s: float
    token_times_s: list[float]
    end_s: float
    batch: int


@dataclass
class Schedule:
    timings: list[RequestTiming]
    batches: list[list[int]]  # request indices per batch, in serving order
    memory: list[MemoryPrediction]  # per batch
    prefill_bound: list[str]
    decode_bound: list[str]  # of each batch's last decode step ("" when it generates one token)

    @property
    def peak_memory(self) -> MemoryPrediction:
        return max(self.memory, key=lambda m: m.total_bytes)


def form_batches(
    requests: Sequence[RequestLike], batch_time_s: Callable[[list[int]], float]
) -> list[tuple[float, list[int]]]:
    """Static batching: when the engine is free, every arrived request joins the next batch.

    ``batch_time_s(indices)`` is how long a batch occupies the engine. Returns (start_s, indices) per batch.
    """
    order = sorted(range(len(requests)), key=lambda i: (requests[i].arrival_s, i))
    out: list[tuple[float, list[int]]] = []
    free_at, pos = 0.0, 0
    while pos < len(order):
        now = max(free_at, requests[order[pos]].arrival_s)
        batch = []
        while pos < len(order) and requests[order[pos]].arrival_s <= now:
            batch.append(order[pos])
            pos += 1
        out.append((now, batch))
        free_at = now + batch_time_s(batch)
    return out


def simulate(
    g: ModelGeometry,
    gpu: GpuSpec,
    requests: Sequence[RequestLike],
    *,
    dtype: str = "bf16",
    kv_dtype: str | None = None,
    layout: str = "hf",
    block_size: int = DEFAULT_BLOCK_SIZE,
    eff: Efficiency | None = None,
    tp: int = 1,
    communication: bool = True,
) -> Schedule:
    """Predicted per-request timestamps and per-batch memory of serving ``requests`` on ``gpu`` (per GPU of a
    TP=``tp`` group: ``g`` is the whole model, each pass is costed on one rank). ``communication`` False leaves
    the all-reduces out (a roofline floor: their latency is an estimate, not a bound)."""
    if not requests:
        raise KvrayInputError("nothing to simulate: no requests")
    if layout not in LAYOUTS:
        raise KvrayInputError(f"unknown KV layout {layout!r} (known: {', '.join(LAYOUTS)})")
    dtype = normalize_dtype(dtype)
    kv_dtype = normalize_dtype(kv_dtype or dtype)
    eff = eff or Efficiency()
    g = shard_geometry(g, tp)
    plans: dict[tuple[int, ...], tuple[list[float], str, str]] = {}

    def plan(batch: list[int]) -> tuple[list[float], str, str]:
        """Token times relative to batch start (the batch's longest generation), and the bounds."""
        key = tuple(batch)
        if key not in plans:
            prompts = [requests[i].prompt_toks for i in batch]
            gens = [requests[i].gen_toks for i in batch]
            passes = batch_passes(g, prompts, gens, dtype, kv_dtype, layout, block_size)
            times = list(accumulate(pass_time_s(c, g, gpu, dtype, eff, tp, communication) for c in passes))
            last = bound_of(passes[-1], g, gpu, dtype, eff, tp) if len(passes) > 1 else ""
            plans[key] = (times, bound_of(passes[0], g, gpu, dtype, eff, tp), last)
        return plans[key]

    batches = form_batches(requests, lambda b: plan(b)[0][-1])
    timings: list[RequestTiming | None] = [None] * len(requests)
    memory, prefill_bound, decode_bound = [], [], []
    for number, (start, batch) in enumerate(batches):
        times, pre_bound, dec_bound = plan(batch)
        for i in batch:
            own = [start + t for t in times[: requests[i].gen_toks]]
            timings[i] = RequestTiming(i, requests[i].arrival_s, start, own, own[-1], number)
        memory.append(batch_memory(g, gpu, [requests[i] for i in batch], dtype, kv_dtype, layout, block_size))
        prefill_bound.append(pre_bound)
        decode_bound.append(dec_bound)
    done = [t for t in timings if t is not None]
    return Schedule(done, [b for _, b in batches], memory, prefill_bound, decode_bound)


# --- one uniform cell -------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """The predicted figures of one uniform cell (all requests arrive together, one static batch).

    ttft_s, tpot_s and e2e_s follow kvray/measure/metrics.py's definitions applied to the predicted timestamps.
    """

    model: str
    gpu: str
    dtype: str
    kv_dtype: str
    layout: str
    concurrency: int
    prompt_toks: int
    gen_toks: int
    ttft_s: float
    tpot_s: float  # NaN for one generated token
    e2e_s: float
    output_tps: float
    weights_bytes: int
    kv_bytes: int
    activation_bytes: int
    peak_allocated_bytes: int
    total_bytes: int  # peak allocated + runtime overhead
    capacity_bytes: int
    fits: bool
    prefill_bound: str
    decode_bound: str
    eta_compute: float
    eta_memory: float
    layer_overhead_s: float
    efficiency_source: str
    extra: dict[str, Any] = field(default_factory=dict)
    # Tensor parallelism: the memory figures above are per GPU; throughput per GPU divides by the group's GPUs.
    tensor_parallel: int = 1
    output_tps_per_gpu: float = 0.0
    interconnect: str = ""
    allreduce_s_per_decode_step: float = 0.0  # the communication share of one decode step's time (0 at tp 1)
    # Never measured: the GPU(s) at their datasheet TDP (kvray/hardware/gpus.py TDP_W) × the predicted E2E — a
    # TDP × time estimate, not a bound (a GPU may sit below its power limit, and the prediction's time is itself an
    # estimate); None for a GPU without a tabled TDP. Kept off the axes of measured energy.
    tdp_power_w: float | None = None
    energy_j_tdp_estimate: float | None = None
    j_per_output_tok_tdp_estimate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Req:
    prompt_toks: int
    gen_toks: int
    arrival_s: float = 0.0


def predict_cell(
    g: ModelGeometry,
    gpu: str | GpuSpec,
    concurrency: int,
    prompt_toks: int,
    gen_toks: int,
    *,
    dtype: str = "bf16",
    kv_dtype: str | None = None,
    layout: str = "hf",
    block_size: int = DEFAULT_BLOCK_SIZE,
    eff: Efficiency | None = None,
    tp: int = 1,
    communication: bool = True,
) -> Prediction:
    """TTFT, TPOT, E2E, output tokens/s and peak memory of ``concurrency`` equal requests on ``gpu``.

    ``eff`` defaults to the calibrated values for this GPU and layout when present, else η defaults. ``tp``:
    the model split over that many GPUs of this type (memory per GPU, ``output_tps_per_gpu`` per GPU).
    ``communication`` False: without the TP all-reduces (kvray.analysis.findings' roofline floor).
    """
    if concurrency <= 0 or prompt_toks <= 0 or gen_toks <= 0:
        raise KvrayInputError(
            f"concurrency, prompt and generated tokens must be positive, got {concurrency}, {prompt_toks}, {gen_toks}"
        )
    spec = gpu if isinstance(gpu, GpuSpec) else get_gpu(DEFAULT_GPU if gpu == "any" else gpu)
    eff = eff or efficiency_for(spec, layout)
    dtype = normalize_dtype(dtype)
    kv_dtype = normalize_dtype(kv_dtype or dtype)
    schedule = simulate(
        g,
        spec,
        [_Req(prompt_toks, gen_toks)] * concurrency,
        dtype=dtype,
        kv_dtype=kv_dtype,
        layout=layout,
        block_size=block_size,
        eff=eff,
        tp=tp,
        communication=communication,
    )
    times = schedule.timings[0].token_times_s
    ttft, e2e = times[0], times[-1]
    tpot = (e2e - ttft) / (gen_toks - 1) if gen_toks > 1 else float("nan")
    mem = schedule.peak_memory
    return Prediction(
        model=g.name,
        gpu=spec.name,
        dtype=dtype,
        kv_dtype=kv_dtype,
        layout=layout,
        concurrency=concurrency,
        prompt_toks=prompt_toks,
        gen_toks=gen_toks,
        ttft_s=ttft,
        tpot_s=tpot,
        e2e_s=e2e,
        output_tps=concurrency * gen_toks / e2e,
        weights_bytes=mem.weights_bytes,
        kv_bytes=mem.kv_bytes,
        activation_bytes=mem.activation_bytes,
        peak_allocated_bytes=mem.peak_allocated_bytes,
        total_bytes=mem.total_bytes,
        capacity_bytes=mem.capacity_bytes,
        fits=mem.fits,
        prefill_bound=schedule.prefill_bound[0],
        decode_bound=schedule.decode_bound[0],
        eta_compute=eff.eta_compute,
        eta_memory=eff.eta_memory,
        layer_overhead_s=eff.layer_overhead_s,
        efficiency_source=eff.source,
        tensor_parallel=tp,
        output_tps_per_gpu=concurrency * gen_toks / e2e / tp,
        interconnect=spec.interconnect if tp > 1 else "",
        allreduce_s_per_decode_step=allreduce_s(g, spec, concurrency, dtype, tp) if communication else 0.0,
        **tdp_energy_estimate(spec, e2e, concurrency * gen_toks, tp),
    )


TDP_ESTIMATE_KEYS = ("tdp_power_w", "energy_j_tdp_estimate", "j_per_output_tok_tdp_estimate")


def tdp_energy_estimate(spec: GpuSpec, busy_s: float, output_toks: int, gpus: int = 1) -> dict[str, Any]:
    """{tdp_power_w, energy_j_tdp_estimate, j_per_output_tok_tdp_estimate}: TDP × ``gpus`` × ``busy_s`` (None
    without a TDP); a TP group draws on every GPU it holds. A TDP × time estimate, not a bound: a GPU may draw
    less than its TDP, and ``busy_s`` is the roofline's predicted time."""
    tdp = spec.tdp_w
    if tdp is None:
        return dict.fromkeys(TDP_ESTIMATE_KEYS)
    tdp *= gpus
    energy = tdp * busy_s
    return dict(zip(TDP_ESTIMATE_KEYS, (tdp, energy, energy / output_toks if output_toks else None), strict=True))
