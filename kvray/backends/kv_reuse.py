"""A paged server's KV reuse and pressure figures for a cell's row, measured beside kvray's predictions.

Measured (vLLM): the prefix-cache counters' growth over each measured repeat (``vllm:prefix_cache_hits`` /
``_queries``, prompt tokens, scraped from /metrics before and after the repeat), each request's cached prompt
tokens (``usage.prompt_tokens_details.cached_tokens``, with ``--enable-prompt-tokens-details``), the preemption
counter's growth, and the moment the pool filled on the KV timeline. Predicted: kvray/sim/reuse.py for the hits,
kvmath for the concurrency at which the pool fills. Row columns (docs/kv_reuse.md):

  prefix_cache_hit_rate(_predicted)   hits / queries, pooled over the measured repeats
  kv_not_recomputed_bytes(_predicted) hit tokens × paged KV bytes per token *per GPU* (a TP rank's shard), per
                                      repeat (the row keeps the peak repeat, as for every kv_ column); measured
                                      from the counters. KV the engine did not compute again — not memory saved
                                      (kvray.analysis.reuse.kv_memory_saved: peak KV without the cache − with it)
  preemptions                         the counter's growth over the measured repeats (summed by the runner)
  kv_fill_concurrency_predicted       the fewest requests of this workload, at full length, that overfill the pool
                                      (None for closed loops, whose requests are never all in flight)
  pool_full_at_s                      the first /metrics sample of a repeat with at most one free block, or whose
                                      preemption counter had grown (when it was answered: seconds since the
                                      repeat's t0), else None
  pool_full_after_s                   when the sample before it was asked: the pool filled in (after, at]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from kvray.backends.base import BackendRun
from kvray.model.kvmath import cached_positions, kv_bytes_per_token
from kvray.model.parallel import shard_geometry
from kvray.model.resolve import resolve_geometry
from kvray.servers.prometheus import cache_dtype
from kvray.sim.reuse import predict_reuse
from kvray.spec import Cell, RequestSpec


def fill_concurrency(
    requests: Sequence[RequestSpec], num_blocks: int, block_size: int, hit_toks: Mapping[int, int] | None = None
) -> int | None:
    """The fewest of the workload's requests (smallest first, at full length) whose blocks overfill a pool of
    ``num_blocks`` (one of them the engine's null block); None when all of them fit. ``hit_toks`` (request id →
    prompt tokens a prefix cache serves, kvray/sim/reuse.py) are blocks shared with a request already resident."""
    hits = hit_toks or {}
    needs = sorted(
        math.ceil(cached_positions(r.prompt_toks, r.gen_toks) / block_size) - hits.get(r.id, 0) // block_size
        for r in requests
    )
    free = num_blocks - 1
    for n, need in enumerate(needs, start=1):
        free -= need
        if free < 0:
            return n
    return None


def pool_full_at(points: list[dict[str, Any]], num_blocks: int) -> tuple[float, float] | None:
    """When the pool filled, as a bracket (after_s, at_s): ``at_s`` is the answer (``t_s``) of the first sample
    with at most one free block, or with more preemptions than the first; ``after_s`` is when the sample before
    it was asked (``sent_s``: it read a pool not yet full, no earlier than that), 0 when there is none.

    A scrape answered late (vLLM's API process on busy cores can hold one for seconds) moves ``at_s`` late,
    even past the run's end, while ``after_s`` stays: the pool filled in (after_s, at_s]."""
    if not points:
        return None
    full_usage = (num_blocks - 2) / max(num_blocks - 1, 1)
    first_pre = points[0].get("preemptions")
    asked_before = 0.0
    for p in points:
        pre = p.get("preemptions")
        if (p.get("kv_usage") or 0.0) >= full_usage - 1e-9 or (
            pre is not None and first_pre is not None and pre > first_pre
        ):
            return asked_before, float(p["t_s"])
        asked_before = float(p.get("sent_s", p["t_s"]))
    return None


class ReuseAccount:
    """One cell's prefix-cache figures over its measured repeats (reset when the cell changes)."""

    def __init__(self) -> None:
        self.reset(None)

    def reset(self, cell_id: str | None) -> None:
        self.cell_id = cell_id
        self.hits = self.queries = self.hits_predicted = self.queries_predicted = 0
        self.per_request: list[dict[str, Any]] = []
        self.fills: list[dict[str, Any]] = []

    def add(
        self,
        cell: Cell,
        requests: Sequence[RequestSpec],
        run: BackendRun,
        cache: dict[str, Any],
        points: list[dict[str, Any]],
        repeat: int,
    ) -> None:
        """Put this repeat's figures (and the pooled ones so far) in ``run.memory`` / ``run.extra``."""
        block, blocks = cache.get("block_size"), cache.get("num_gpu_blocks")
        if repeat < 0 or not block:
            return
        if cell.cell_id != self.cell_id:
            self.reset(cell.cell_id)
        try:  # a rank's shard under TP: bytes per token (and so every byte figure here) per GPU
            g = shard_geometry(resolve_geometry(cell.model), cell.tensor_parallel)
        except Exception:
            g = None
        kv_dtype = cache_dtype(cache.get("cache_dtype"), cell.kv_dtype or cell.dtype)
        pred = predict_reuse(requests, int(block), g, kv_dtype)
        per_token = kv_bytes_per_token(g, kv_dtype, "paged") if g is not None else None
        hits, queries = run.counters.get("prefix_cache_hits"), run.counters.get("prefix_cache_queries")
        memory: dict[str, Any] = {"prefix_cache_hit_rate_predicted": None, "kv_not_recomputed_bytes_predicted": None}
        if hits is not None and queries is not None:
            self.hits, self.queries = self.hits + hits, self.queries + queries
            if self.queries:
                memory["prefix_cache_hit_rate"] = round(self.hits / self.queries, 6)
            if per_token is not None:
                memory["kv_not_recomputed_bytes"] = round(hits * per_token)
        self.hits_predicted += pred.hits
        self.queries_predicted += pred.queries
        if self.queries_predicted:
            memory["prefix_cache_hit_rate_predicted"] = round(self.hits_predicted / self.queries_predicted, 6)
        memory["kv_not_recomputed_bytes_predicted"] = pred.kv_not_recomputed_bytes
        for t in run.traces:
            self.per_request.append(
                {
                    "repeat": repeat,
                    "request_id": t.request_id,
                    "prompt_toks": t.prompt_toks,
                    "cached_toks": t.cached_prompt_toks,
                    "cached_toks_predicted": pred.hit_toks.get(t.request_id),
                }
            )
        if blocks:  # a closed loop (requests chained by ``after``) never has them all in flight: no such figure
            chained = any(r.after is not None for r in requests)
            memory["kv_fill_concurrency_predicted"] = (
                None if chained else fill_concurrency(requests, int(blocks), int(block), pred.hit_toks)
            )
            after_s, full_at = pool_full_at(points, int(blocks)) or (None, None)
            self.fills.append({"repeat": repeat, "pool_full_at_s": full_at, "pool_full_after_s": after_s})
            first_fill = next((f for f in self.fills if f["pool_full_at_s"]), {})
            memory["pool_full_at_s"] = first_fill.get("pool_full_at_s")
            memory["pool_full_after_s"] = first_fill.get("pool_full_after_s")
        run.memory.update(memory)
        run.extra["prefix_cache"] = {
            "block_size": int(block),
            "prediction": pred.to_dict(),
            "per_request": list(self.per_request),
            "pool_fills": list(self.fills),
            "measured_basis": "vllm /metrics prefix_cache_hits/queries deltas per repeat; per request: "
            "usage.prompt_tokens_details.cached_tokens",
        }
