"""A discrete-event model of a continuous-batching engine (vLLM-like): requests served as they arrive, no GPU.

The static-batching queue of kvray/sim/simulate.py answers "how long does this batch take"; a serving engine
never forms batches. Every engine step (docs/simulator.md, "Serving load"):

1. **Running requests first**, in admission order: each is given the tokens it still needs before its next
   token (a decode: 1; a prefill: the rest of its prompt, at most the step's token budget with chunked prefill).
   A request whose next position starts a new KV block takes one from the pool; when none is free, the request
   admitted last is **preempted** (recompute, vLLM's default: its blocks are freed, it goes back to the head of
   the queue and later re-runs its prompt plus the tokens it had generated).
2. **Then waiting requests, FCFS**, while the running set is below ``max_num_seqs``, the token budget
   (``max_num_batched_tokens``) lasts and the pool keeps vLLM's admission watermark free after their prompt
   blocks (1 % of the pool; vLLM's ``watermark=0.01``). Without chunked prefill a prompt is never split.
3. The step's time is the step-time model of kvray/sim/costs.py over the whole mixed batch (kvray/sim/passes
   .step_cost): linear layers (every prefill chunk and decode token read the weights once together), prefill
   attention and decode attention each on its own roof, plus the engine's CPU work — per step, per running
   request, per request admitted (first time only) and per request finishing in the step.
   A request whose computed tokens reach its prompt (+ generated) length gets a token at the step's end.

A closed-loop request (``after`` = another request's id) arrives ``think_s`` after that request's last token,
so its arrival is only known during the run. ``duration_s``: a request whose arrival falls later is not sent,
nor is anything that waits on it.

Optional prefix caching (``prefix_caching``): requests of one ``prefix_group`` share the full blocks of their
first ``shared_prefix_toks`` tokens. A block is shared from the step that allocates it (vLLM V1 caches a block at
allocation), stays resident while any member runs, and after that stays cached but evictable — free for any
allocation, evicted least recently used first when one needs it — as vLLM's free-block queue does. A later
member skips the prefill of the cached blocks and does not allocate them again. A member's whole prompt is cached
for its group (a chat's next turn sends this turn's prompt as its history); a lookup takes at most the member's
own shared prefix.

KV blocks here are whole-model blocks (``block_size`` tokens × kvmath's paged bytes per token): a sliding-window
layer is charged every position, as vLLM's pool does without its hybrid allocator.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvray.errors import KvrayInputError
from kvray.hardware.gpus import GpuSpec
from kvray.model.geometry import ModelGeometry
from kvray.model.kvmath import DEFAULT_BLOCK_SIZE, dtype_bytes, kv_bytes_per_token, normalize_dtype, paged_blocks_in
from kvray.model.oom import RUNTIME_OVERHEAD_BYTES, activation_bytes
from kvray.model.parallel import shard_geometry
from kvray.sim.costs import Efficiency, StepRequests, StepTimer
from kvray.sim.passes import ATTENTIONS, StepCosts
from kvray.sim.simulate import RequestLike

# vLLM's defaults (V1 engine, OpenAI server on a GPU): engine arguments max_num_seqs, max_num_batched_tokens
# (chunked prefill on), gpu_memory_utilization, and the block manager's admission watermark.
VLLM_MAX_NUM_SEQS = 256
VLLM_MAX_NUM_BATCHED_TOKENS = 8192
VLLM_GPU_MEMORY_UTILIZATION = 0.9
VLLM_WATERMARK = 0.01


class PoolTooSmall(MemoryError):
    """The weights leave no KV pool, or a request cannot fit the pool even alone (vLLM refuses to start)."""


@dataclass(frozen=True)
class EngineConfig:
    """The engine's knobs, named as vLLM's engine arguments."""

    max_num_seqs: int = VLLM_MAX_NUM_SEQS
    max_num_batched_tokens: int = VLLM_MAX_NUM_BATCHED_TOKENS
    chunked_prefill: bool = True
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_pool_bytes: int | None = None  # None: gpu memory × gpu_memory_utilization − weights − activations − runtime
    gpu_memory_utilization: float = VLLM_GPU_MEMORY_UTILIZATION
    watermark: float = VLLM_WATERMARK
    prefix_caching: bool = False
    attention: str = "varlen"  # kvray.sim.passes.ATTENTIONS: "masked" for transformers' sdpa/eager batching

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise KvrayInputError(f"attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.block_size < 1:
            raise KvrayInputError(
                f"max_num_seqs, max_num_batched_tokens and block_size must be >= 1, got {self.max_num_seqs}, "
                f"{self.max_num_batched_tokens} and {self.block_size}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise KvrayInputError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_pool_bytes is not None and self.kv_pool_bytes <= 0:
            raise KvrayInputError(f"kv_pool_bytes must be positive, got {self.kv_pool_bytes}")
        if not 0 <= self.watermark < 1:
            raise KvrayInputError(f"watermark must be in [0, 1), got {self.watermark}")


@dataclass(frozen=True)
class KvPool:
    """The paged KV pool the engine allocates up front, and what the GPU holds beside it."""

    blocks: int
    block_size: int
    block_bytes: int
    weights_bytes: int
    activation_bytes: int  # the profiling pass's peak: max_num_batched_tokens tokens at once
    overhead_bytes: int
    capacity_bytes: int
    source: str  # "kv_pool_bytes" or "gpu_memory_utilization 0.9"

    @property
    def pool_bytes(self) -> int:
        return self.blocks * self.block_bytes

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.pool_bytes + self.activation_bytes + self.overhead_bytes


def kv_pool(g: ModelGeometry, gpu: GpuSpec, dtype: str, kv_dtype: str, cfg: EngineConfig) -> KvPool:
    """vLLM's sizing: memory × utilisation − weights − the profiled activation peak − runtime, in whole blocks."""
    weights = g.weights_bytes(dtype_bytes(dtype))
    act = activation_bytes(g, 1, cfg.max_num_batched_tokens, dtype)
    block_bytes = int(cfg.block_size * kv_bytes_per_token(g, kv_dtype, "paged"))
    pool: float
    if cfg.kv_pool_bytes is not None:
        pool, source = cfg.kv_pool_bytes, "kv_pool_bytes"
    else:
        pool = gpu.memory_bytes * cfg.gpu_memory_utilization - weights - act - RUNTIME_OVERHEAD_BYTES
        source = f"gpu_memory_utilization {cfg.gpu_memory_utilization:g}"
    blocks = paged_blocks_in(g, max(pool, 0), kv_dtype, cfg.block_size)
    if blocks <= 0:
        raise PoolTooSmall(
            f"no KV pool left on {gpu.name}: would need to allocate {weights + act + RUNTIME_OVERHEAD_BYTES} bytes "
            f"(weights {weights} + activations {act} + runtime {RUNTIME_OVERHEAD_BYTES}) of "
            f"{int(gpu.memory_bytes * cfg.gpu_memory_utilization)} ({source})"
        )
    return KvPool(blocks, cfg.block_size, block_bytes, weights, act, RUNTIME_OVERHEAD_BYTES, gpu.memory_bytes, source)


@dataclass
class ServedRequest:
    """One request's predicted life, seconds from the run's start (RunTrace's fields, as simulate's timings)."""

    index: int  # position in the request list
    arrival_s: float  # when it was sent (closed loop: its predecessor's end + think time)
    start_s: float  # first admission into the running set
    token_times_s: list[float]
    end_s: float
    preemptions: int  # times it was preempted and recomputed


@dataclass(frozen=True)
class StepRecord:
    """One engine step (or the moment the engine fell idle: dt_s 0, nothing running)."""

    t_s: float  # when the step started
    dt_s: float
    running: int  # requests scheduled in this step
    waiting: int  # arrived, not running
    kv_blocks_used: int
    preemptions: int  # so far in the run
    prefill_tokens: int
    decode_tokens: int


@dataclass
class ServingRun:
    timings: list[ServedRequest]  # sent requests, by index
    unsent: list[int]  # indices not sent: arrival after duration_s (or after a request that was not sent)
    steps: list[StepRecord]
    pool: KvPool
    preemptions: int
    prefix_hit_tokens: int = 0
    bounds: dict[str, int] = field(default_factory=dict)  # steps per limiting roof

    @property
    def kv_blocks_peak(self) -> int:
        return max((s.kv_blocks_used for s in self.steps), default=0)

    @property
    def running_peak(self) -> int:
        return max((s.running for s in self.steps), default=0)


def serve(
    g: ModelGeometry,
    gpu: GpuSpec,
    requests: Sequence[RequestLike],
    dtype: str = "bf16",
    kv_dtype: str | None = None,
    cfg: EngineConfig | None = None,
    eff: Efficiency | None = None,
    duration_s: float | None = None,
    tp: int = 1,
) -> ServingRun:
    """Predicted per-request timings and per-step engine state of serving ``requests`` on ``gpu``.

    ``tp`` > 1: one rank of a tensor-parallel group (kvray.model.parallel) — its weights, its KV heads in the
    pool (every rank holds the same blocks, each of its heads only), each step plus its all-reduces.

    Requests are read through ``RequestLike`` plus, when present, ``id``, ``after``, ``think_s``,
    ``prefix_group`` and ``shared_prefix_toks`` (kvray.spec.RequestSpec has them all).
    """
    if not requests:
        raise KvrayInputError("nothing to simulate: no requests")
    cfg = cfg or EngineConfig()
    eff = eff or Efficiency()
    dtype = normalize_dtype(dtype)
    kv_dtype = normalize_dtype(kv_dtype or dtype)
    g = shard_geometry(g, tp)
    pool = kv_pool(g, gpu, dtype, kv_dtype, cfg)
    pending, followers = _arrivals(requests, pool, cfg.block_size)
    import numpy as np  # imported when a run starts, not with the CLI

    from kvray.sim.engine import Engine

    engine = Engine(requests, pool.blocks, cfg)
    costs = StepCosts(g, dtype, kv_dtype, "paged", cfg.block_size, cfg.attention)
    timer = StepTimer(g, gpu, dtype, eff, tp, kv_dtype)
    computed, target, tokens, gen = engine.computed, engine.target, engine.tokens, engine.gen
    arrivals: dict[int, float] = {}
    ended: dict[int, float] = {}  # request → when its last token came
    token_events: list[tuple[Any, float]] = []  # (requests that got a token, when): gathered per request at the end
    steps: list[StepRecord] = []
    bounds: dict[str, int] = {}
    now = 0.0
    while pending or engine.waiting or engine.running:
        while pending and pending[0][0] <= now:
            arrival, i = heapq.heappop(pending)
            if duration_s is not None and arrival > duration_s:
                continue  # not sent, and nothing that follows it is either
            arrivals[i] = arrival
            engine.waiting.append(i)
        if not engine.waiting and not engine.running:
            if not pending:
                break  # the rest was never sent
            now = pending[0][0]
            continue
        idx, new = engine.schedule(now)
        if not len(idx):
            raise PoolTooSmall(f"the engine cannot admit request {engine.waiting[0]}: KV pool too small")
        past = computed[idx]
        cost = costs.step(past, new)
        due = past + new == target[idx]  # these get a token at the step's end
        finishing = int(np.count_nonzero(due & (tokens[idx] + 1 == gen[idx])))
        dt, bound = timer.time_s(cost, StepRequests(len(idx), engine.admitted, finishing))
        bounds[bound] = bounds.get(bound, 0) + 1
        scheduled_toks = int(new.sum())
        steps.append(
            StepRecord(
                now,
                dt,
                len(idx),
                len(engine.waiting),
                pool.blocks - engine.free,
                engine.preemptions,
                scheduled_toks - engine.decodes,
                engine.decodes,
            )
        )
        now += dt
        computed[idx] = past + new
        if engine.grouped:
            for i in idx.tolist():
                engine.share_prefix(i)
        got = idx[due]
        target[got] += 1
        tokens[got] += 1
        token_events.append((got, now))
        if finishing:
            for i in got[tokens[got] == gen[got]].tolist():
                engine.release(i)
                ended[i] = now
                for j in followers.get(i, []):
                    heapq.heappush(pending, (now + getattr(requests[j], "think_s", 0.0), j))
            engine.running = [i for i in engine.running if i not in ended]
        if not engine.running and not engine.waiting:
            steps.append(StepRecord(now, 0.0, 0, 0, pool.blocks - engine.free, engine.preemptions, 0, 0))
    times = _token_times(token_events, len(requests))
    timings = []
    for i in sorted(ended):
        start = engine.start_s[i]
        assert start is not None
        timings.append(ServedRequest(i, arrivals[i], start, times[i], ended[i], engine.preempted[i]))
    unsent = [i for i in range(len(requests)) if i not in ended]
    return ServingRun(timings, unsent, steps, pool, engine.preemptions, engine.prefix_hits, bounds)


def _token_times(events: list[tuple[Any, float]], n: int) -> list[list[float]]:
    """Each request's token times from the steps' (requests that got a token, when), in step order."""
    import numpy as np

    if not events:
        return [[] for _ in range(n)]
    who = np.concatenate([e[0] for e in events])
    when = np.repeat([e[1] for e in events], [len(e[0]) for e in events])
    order = np.argsort(who, kind="stable")  # stable: each request's tokens stay in time order
    ends = np.cumsum(np.bincount(who, minlength=n))
    flat = when[order].tolist()
    return [flat[(ends[i - 1] if i else 0) : ends[i]] for i in range(n)]


def _arrivals(
    requests: Sequence[RequestLike], pool: KvPool, block_size: int
) -> tuple[list[tuple[float, int]], dict[int, list[int]]]:
    """(heap of (arrival, index) of the requests due at a fixed time, index → the closed-loop requests after it).

    Refuses, before anything runs, a request that cannot fit the pool alone and an ``after`` naming no request.
    """
    ids = {getattr(req, "id", i): i for i, req in enumerate(requests)}
    followers: dict[int, list[int]] = {}
    pending: list[tuple[float, int]] = []
    for i, req in enumerate(requests):
        need = math.ceil((req.prompt_toks + req.gen_toks - 1) / block_size)
        if need > pool.blocks:
            raise PoolTooSmall(
                f"request {getattr(req, 'id', i)} needs {need} KV blocks ({req.prompt_toks} + {req.gen_toks} tokens) "
                f"and would need to allocate {need * pool.block_bytes} bytes; the pool holds {pool.blocks} blocks "
                f"({pool.pool_bytes} bytes, {pool.source})"
            )
        after = getattr(req, "after", None)
        if after is None:
            pending.append((req.arrival_s, i))
        elif after not in ids or ids[after] == i:
            raise KvrayInputError(f"request {getattr(req, 'id', i)} follows unknown request {after}")
        else:
            followers.setdefault(ids[after], []).append(i)
    heapq.heapify(pending)
    return pending, followers
