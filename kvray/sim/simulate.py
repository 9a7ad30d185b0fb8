"""A roofline predictor: latency, throughput and memory of a cell on any GPU in the table, without a GPU.

Each forward pass is timed by the step-time model of kvray.sim.costs (docs/simulator.md): the linear layers,
the prefill attention and the decode attention each on its own roof (compute at peak × η_compute, memory at
bandwidth × η_memory), added, with the whole pass's roofline (and a per-layer launch floor) as the floor, plus the
TP all-reduces and the engine's CPU work (per step, per running request, per admission, per finish: 0 unless
calibrated). The FLOPs and bytes of each pass come from kvray.sim.passes: prefill FLOPs are 2 × matmul
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

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import accumulate
from typing import Any

from kvray.errors import KvrayInputError
from kvray.hardware.gpus import GpuSpec, get_gpu
from kvray.model.geometry import ModelGeometry
from kvray.model.kvmath import DEFAULT_BLOCK_SIZE, LAYOUTS, dtype_bytes, kv_bytes_sequence, normalize_dtype
from kvray.model.oom import RUNTIME_OVERHEAD_BYTES, activation_bytes
from kvray.model.parallel import shard_geometry
from kvray.sim.costs import (  # the step-time model; names re-exported (__all__)
    ALLREDUCE_LATENCY_S,
    ALLREDUCES_PER_LAYER,
    CALIBRATION_ENV,
    DEFAULT_ETA_COMPUTE,
    DEFAULT_ETA_MEMORY,
    Efficiency,
    StepRequests,
    allreduce_s,
    calibration_path,
    efficiency_for,
    load_calibration,
    pass_time_s,
    roofs_s,
    step_roofs,
)
from kvray.sim.passes import batch_passes
from kvray.traces.footprint import TimedRequest

DEFAULT_GPU = "H100-SXM"  # what hardware "any" simulates
__all__ = [  # the step-time model lives in kvray.sim.costs; these names stay importable from here
    "ALLREDUCE_LATENCY_S",
    "ALLREDUCES_PER_LAYER",
    "CALIBRATION_ENV",
    "DEFAULT_ETA_COMPUTE",
    "DEFAULT_ETA_MEMORY",
    "Efficiency",
    "StepRequests",
    "allreduce_s",
    "calibration_path",
    "efficiency_for",
    "load_calibration",
    "pass_time_s",
    "roofs_s",
    "step_roofs",
    "Costing",
    "MemoryPrediction",
    "Prediction",
    "RequestLike",
    "RequestTiming",
    "Schedule",
    "batch_memory",
    "batch_requests",
    "form_batches",
    "predict_cell",
    "simulate",
    "tdp_energy_estimate",
]


RequestLike = TimedRequest  # what the scheduler needs of a request (kvray.spec.RequestSpec fits)


@dataclass(frozen=True)
class Costing:
    """How a static batch is costed: the keyword options ``simulate`` and ``predict_cell`` share.

    ``kv_dtype`` None: the weights' dtype. ``eff`` None: ``simulate`` uses the defaults, ``predict_cell`` the
    calibration file's entry for the GPU and layout. ``tp``: the model split over that many GPUs (each pass costed
    on one rank). ``communication`` False leaves the all-reduces out (a roofline floor: their latency is an
    estimate, not a bound).
    """

    dtype: str = "bf16"
    kv_dtype: str | None = None
    layout: str = "hf"
    block_size: int = DEFAULT_BLOCK_SIZE
    eff: Efficiency | None = None
    tp: int = 1
    communication: bool = True

    @classmethod
    def of(cls, costing: Costing | None, options: dict[str, Any]) -> Costing:
        """``costing`` (or the defaults) with ``options`` replacing its fields; dtypes normalised, layout checked."""
        try:
            c = replace(costing or cls(), **options)
        except TypeError as exc:
            raise KvrayInputError(f"unknown costing option: {exc}") from None
        if c.layout not in LAYOUTS:
            raise KvrayInputError(f"unknown KV layout {c.layout!r} (known: {', '.join(LAYOUTS)})")
        dtype = normalize_dtype(c.dtype)
        return replace(c, dtype=dtype, kv_dtype=normalize_dtype(c.kv_dtype or dtype))


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


def batch_memory(
    g: ModelGeometry,
    gpu: GpuSpec,
    batch: Sequence[RequestLike],
    dtype: str,
    kv_dtype: str,
    layout: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> MemoryPrediction:
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


def batch_requests(prompts: Sequence[int], gens: Sequence[int], layout: str) -> list[StepRequests]:
    """The engine's CPU work in each pass of ``kvray.sim.passes.batch_passes``: the prefill admits every row;
    decode step k runs the rows still generating (hf: every row, padded to the longest generation) and finishes
    those whose k + 1-th token is their last."""
    rows = len(prompts)
    out = [StepRequests(rows, rows, sum(1 for n in gens if n == 1))]
    for k in range(1, max(gens)):
        running = rows if layout == "hf" else sum(1 for n in gens if k < n)
        out.append(StepRequests(running, 0, sum(1 for n in gens if n == k + 1)))
    return out


def simulate(
    g: ModelGeometry, gpu: GpuSpec, requests: Sequence[RequestLike], *, costing: Costing | None = None, **options: Any
) -> Schedule:
    """Predicted per-request timestamps and per-batch memory of serving ``requests`` on ``gpu`` as the HF
    backend's static batches. ``costing`` (or its fields as keywords: dtype, kv_dtype, layout, block_size, eff,
    tp, communication — ``Costing``) says how; under TP ``g`` is the whole model and each pass is costed on one
    rank."""
    if not requests:
        raise KvrayInputError("nothing to simulate: no requests")
    c = Costing.of(costing, options)
    dtype, kv_dtype, layout, block_size, tp = c.dtype, c.kv_dtype or c.dtype, c.layout, c.block_size, c.tp
    eff = c.eff or Efficiency()
    g = shard_geometry(g, tp)
    plans: dict[tuple[int, ...], tuple[list[float], str, str]] = {}

    def plan(batch: list[int]) -> tuple[list[float], str, str]:
        """Token times relative to batch start (the batch's longest generation), and the bounds."""
        key = tuple(batch)
        if key not in plans:
            prompts = [requests[i].prompt_toks for i in batch]
            gens = [requests[i].gen_toks for i in batch]
            passes = batch_passes(g, prompts, gens, dtype, kv_dtype, layout, block_size)
            roofs = [
                step_roofs(p, g, gpu, dtype, tp, c.communication, work, kv_dtype)
                for p, work in zip(passes, batch_requests(prompts, gens, layout), strict=True)
            ]
            times = list(accumulate(r.time_s(eff) for r in roofs))
            plans[key] = (times, roofs[0].bound(eff), roofs[-1].bound(eff) if len(roofs) > 1 else "")
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
    costing: Costing | None = None,
    **options: Any,
) -> Prediction:
    """TTFT, TPOT, E2E, output tokens/s and peak memory of ``concurrency`` equal requests on ``gpu``.

    ``costing`` or its fields as keywords (``Costing``); ``eff`` defaults to the calibrated values for this GPU and
    layout when present, else the defaults. ``tp``: memory per GPU, ``output_tps_per_gpu`` per GPU.
    ``communication`` False: without the TP all-reduces (kvray.analysis.findings' roofline floor).
    """
    if concurrency <= 0 or prompt_toks <= 0 or gen_toks <= 0:
        raise KvrayInputError(
            f"concurrency, prompt and generated tokens must be positive, got {concurrency}, {prompt_toks}, {gen_toks}"
        )
    spec = gpu if isinstance(gpu, GpuSpec) else get_gpu(DEFAULT_GPU if gpu == "any" else gpu)
    c = Costing.of(costing, options)
    eff = c.eff or efficiency_for(spec, c.layout)
    c = replace(c, eff=eff)
    dtype, kv_dtype, layout, tp, communication = c.dtype, c.kv_dtype or c.dtype, c.layout, c.tp, c.communication
    schedule = simulate(g, spec, [_Req(prompt_toks, gen_toks)] * concurrency, costing=c)
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
