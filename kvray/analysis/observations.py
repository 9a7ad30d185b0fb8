"""What a measured row tells the calibration: latencies as weighted sums of costed steps (kvray/sim/costs.py).

A row gives observations; each is a measured time and the steps it spans, every step written as its GPU pieces
(``StepRoofs.pieces``, linear in 1/η_compute, 1/η_memory and the per-layer launch floor; the time takes the
largest), its CPU coefficients (``StepRoofs.cpu_coefficients``: 1 per step, requests running, admitted,
finished) and its η-free all-reduce seconds, with a weight (1 for a TTFT's one prefill pass, 1 / steps for a
TPOT's mean over its decode steps). Two kinds of row identify different parameters:

- **bursts** (every request sent at once, started as one batch): the prefill pass (TTFT) and the mean decode step
  (TPOT) at a known concurrency — the GPU roofs and, over concurrencies up to what the engine will run, the cost
  per running request per step;
- **serving steady windows** (open-loop rates and closed loops): the mean TPOT is one steady step with R requests
  running — by Little's law R = achieved req/s × (mean E2E − mean TTFT) in decode, and achieved req/s × TPOT
  admitted and finished per step, whose prompts are prefilled in the same steps. These are the rows that show the
  CPU side at the batch sizes serving reaches, which bursts of a few requests cannot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvray.backends import backend_class
from kvray.errors import KvrayInputError
from kvray.hardware.gpus import GpuSpec, match_gpu
from kvray.hardware.host import is_cpu_hardware
from kvray.model.kvmath import DEFAULT_BLOCK_SIZE, normalize_dtype
from kvray.model.parallel import shard_geometry
from kvray.model.resolve import resolve_geometry
from kvray.sim.costs import StepRequests, StepRoofs, step_roofs
from kvray.sim.passes import PassCost, masked_attention, sequence_step_cost, step_cost
from kvray.sim.simulate import batch_passes, batch_requests

# The flat rows do not carry cell options, so sim rows (only with include_simulated) count as "hf".
BACKEND_LAYOUTS = {"hf": "hf", "hf-paged": "paged", "vllm": "paged", "openai": "paged", "sim": "hf"}
# The attention each backend's engine runs (kvray/sim/passes.py, ATTENTIONS): transformers' continuous batching
# runs sdpa or eager as one masked attention over the flattened batch; a flash implementation (GPU) is varlen
MASKED_ATTENTION_BACKENDS = ("hf-paged",)


def engine_attention(backend: str, record: dict[str, Any] | None = None) -> str:
    """ "masked" or "varlen" for a measured row of ``backend``: its recorded ``attn_implementation`` (hf-paged's
    ``extra.paged_cache``) when there is one, else the backend's default (sdpa for hf-paged: masked)."""
    if backend not in MASKED_ATTENTION_BACKENDS:
        return "varlen"
    record = record or {}
    implementation = str((record.get("paged_cache") or {}).get("attn_implementation") or "")
    implementation = implementation or str(record.get("attn_implementation") or "")
    return "varlen" if "flash" in implementation else "masked"


QUEUE_TOLERANCE = 0.05  # a burst whose requests queued more than this fraction of TTFT is not one batch
SERVING_LOADS = ("poisson", "gamma", "constant", "closed")


@dataclass
class Observation:
    """One measured latency and the steps it spans: per step its GPU pieces (steps, pieces, 3), CPU coefficients
    (steps, 4), all-reduce seconds and weight; the prediction is Σ weight · (max piece + CPU + all-reduce)."""

    row: int
    kind: str  # "ttft" | "tpot" (a burst's) | "steady" (a serving window's mean TPOT)
    measured_s: float
    pieces: np.ndarray
    cpu: np.ndarray
    fixed_s: np.ndarray
    weights: np.ndarray


def observation(row: int, kind: str, measured_s: float, roofs: list[StepRoofs], weight: float) -> Observation:
    return Observation(
        row,
        kind,
        measured_s,
        np.array([r.pieces() for r in roofs]),
        np.array([r.cpu_coefficients() for r in roofs]),
        np.array([r.allreduce_s for r in roofs]),
        np.full(len(roofs), weight),
    )


def layout_of(row: dict[str, Any]) -> tuple[str | None, int]:
    """The row's KV layout and block size as the runner recorded them (``kv_layout``, ``kv_block_size``); for a
    dataset written before those columns, what its backend keeps by default."""
    layout = row.get("kv_layout")
    if layout not in ("hf", "paged"):
        layout = BACKEND_LAYOUTS.get(str(row.get("backend")))
    block = finite(row.get("kv_block_size"))
    return layout, int(block) if block else DEFAULT_BLOCK_SIZE


def ttft_basis_of(row: dict[str, Any]) -> str | None:
    """The row's ``ttft_basis``; for a dataset written before the column existed, what its backend declares."""
    basis = row.get("ttft_basis")
    if isinstance(basis, str) and basis:
        return basis
    try:
        return backend_class(str(row.get("backend"))).ttft_basis
    except KvrayInputError:
        return None


def prompts_of(row: dict[str, Any]) -> list[int]:
    text = str(row.get("prompt_toks_list") or "")
    prompts = [int(p) for p in text.split(",") if p.strip()]
    return prompts or [int(row["prompt_toks"])] * int(row["concurrency"])


def finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def steady_step(
    g: Any, gpu: GpuSpec, dtype: str, kv_dtype: str, tp: int, row: dict[str, Any], attention: str = "varlen"
) -> StepRoofs | None:
    """The mean step of a serving window (module docstring), or None when the row lacks what it takes."""
    rate, tpot = finite(row.get("achieved_rps")), finite(row.get("tpot_s_mean")) or finite(row.get("tpot_s_p50"))
    e2e, ttft = finite(row.get("e2e_s_mean")), finite(row.get("ttft_s_mean"))
    prompt, gen = finite(row.get("prompt_toks")), finite(row.get("gen_toks"))
    if None in (rate, tpot, e2e, ttft, prompt, gen) or gen is None or gen < 2:
        return None
    assert rate and tpot and e2e and ttft and prompt
    running = rate * max(e2e - ttft, 0.0)
    admitted = rate * tpot
    decodes = max(round(running), 1)
    context = int(prompt + gen / 2)
    decode = step_cost(g, [(context - 1, 1)] * decodes, dtype, kv_dtype)
    fill = sequence_step_cost(g, 0, int(prompt), kv_dtype)
    tokens = decodes + admitted * prompt
    cost = PassCost(
        decode.flops + admitted * fill.flops,
        decode.bytes + admitted * fill.prefill_attention_bytes,
        max(round(tokens), 1),
        decode.decode_attention_flops,
        decode.decode_attention_bytes,
        admitted * fill.prefill_attention_flops,
        admitted * fill.prefill_attention_bytes,
    )
    if attention == "masked":  # one attention over the step's decodes and admitted prompts (kvray/sim/passes.py)
        cost = masked_attention(cost, g, tokens, decodes * context + admitted * prompt, decodes)
    work = StepRequests(running + admitted, admitted, admitted)
    return step_roofs(cost, g, gpu, dtype, tp, requests=work)


def observations_from_rows(
    rows: list[dict[str, Any]], include_simulated: bool = False, host: GpuSpec | None = None
) -> tuple[dict[tuple[str, str], list[Observation]], dict[str, int]]:
    """Group usable rows' observations by (GPU name, layout); count the skipped rows by reason.

    ``host``: CPU rows are fitted against it (its name, e.g. "cpu-host"); on the client's clock, TPOT only."""
    from kvray.analysis.views import sharded_tensor_parallel

    groups: dict[tuple[str, str], list[Observation]] = {}
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    geometries: dict[str, Any] = {}
    for index, row in enumerate(rows):
        if row.get("status") != "ok":
            skip("status not ok")
            continue
        if bool(row.get("simulated")) and not include_simulated:
            skip("simulated")
            continue
        gpu = match_gpu(str(row.get("hardware") or ""))
        on_host = gpu is None and host is not None and is_cpu_hardware(str(row.get("hardware") or ""))
        gpu = host if on_host else gpu
        if gpu is None:
            skip("hardware not in the GPU table")
            continue
        tpot_only = ttft_basis_of(row) != "engine"  # a server's TTFT holds HTTP, tokenisation and queueing
        if tpot_only and not on_host:
            skip("TTFT not on the engine's clock (ttft_basis)")
            continue
        layout, block_size = layout_of(row)
        if layout is None:
            skip("backend without a known KV layout")
            continue
        ttft = finite(row.get("ttft_s_p50"))
        if ttft is None:
            skip("no TTFT")
            continue
        load = str(row.get("load") or "burst")
        serving = load in SERVING_LOADS
        if not serving and load not in ("burst", "nan"):
            skip(f"load {load}")
            continue
        queue = finite(row.get("queue_s_max")) or 0.0
        # TTFT must be the prefill alone; TPOT alone only needs the batch to decode together: a request started
        # within a twentieth of the decode span shares nearly every step with the others. A burst whose requests
        # queued past a twentieth of its TTFT but not of its decode span still gives its TPOT.
        decode_span = (finite(row.get("tpot_s_p50")) or 0.0) * (int(row["gen_toks"]) - 1)
        one_prefill = not tpot_only and queue <= QUEUE_TOLERANCE * ttft
        if not serving and not one_prefill and queue > QUEUE_TOLERANCE * decode_span:
            skip("requests queued (more than one batch)")
            continue
        model = str(row.get("model"))
        if model not in geometries:
            try:
                geometries[model] = resolve_geometry(model)
            except Exception:
                geometries[model] = None
        g = geometries[model]
        if g is None:
            skip("model geometry unknown")
            continue
        try:
            dtype = normalize_dtype(str(row.get("dtype") or "bf16"))
            kv_dtype = normalize_dtype(str(row.get("kv_dtype") or dtype))
            tp = sharded_tensor_parallel(row)
            shard = shard_geometry(g, tp)
        except KvrayInputError:
            skip("unknown dtype or tensor_parallel not valid for the model")
            continue
        attention = engine_attention(str(row.get("backend")), row)
        if serving:
            step = steady_step(shard, gpu, dtype, kv_dtype, tp, row, attention)
            if step is None:
                skip("serving row without achieved rate, TPOT, E2E or TTFT")
                continue
            tpot = finite(row.get("tpot_s_mean")) or finite(row.get("tpot_s_p50"))
            assert tpot is not None
            groups.setdefault((gpu.name, layout), []).append(observation(index, "steady", tpot, [step], 1.0))
            continue
        prompts = prompts_of(row)
        gen = int(row["gen_toks"])
        gens = [gen] * len(prompts)
        roofs = [
            step_roofs(p, shard, gpu, dtype, tp, requests=work)
            for p, work in zip(
                batch_passes(shard, prompts, gens, dtype, kv_dtype, layout, block_size, attention),
                batch_requests(prompts, gens, layout),
                strict=True,
            )
        ]
        tpot = finite(row.get("tpot_s_p50"))
        if tpot_only and (tpot is None or gen < 2):
            skip("TTFT not on the engine's clock (ttft_basis) and no TPOT")
            continue
        obs = groups.setdefault((gpu.name, layout), [])
        if one_prefill:
            obs.append(observation(index, "ttft", ttft, roofs[:1], 1.0))
        if tpot is not None and gen > 1:
            obs.append(observation(index, "tpot", tpot, roofs[1:], 1 / (len(roofs) - 1)))
    return groups, skipped
