"""``kvray trace``'s description of a trace, run nothing: counts, rates, lengths and the KV footprint (kvray/traces/).

``describe_trace`` returns one JSON-ready mapping — the keys ``requests``, ``duration_s``, ``mean_rps``,
``prefix_hit_rate`` (hit blocks ÷ prompt blocks, an unbounded cache, arrival order) and ``pool_hit_rates``
(``[{pool_blocks, hit_rate}]`` under LRU; rules in kvray/traces/footprint.py) are the interface other tools read
(capacity planning calls this function), with ``pool_tokens`` / ``pool_bytes`` beside each pool when a model is
named, the working set over time and ``half_hit_pool_blocks``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvray.errors import KvrayInputError
from kvray.model.kvmath import kv_bytes_per_token, normalize_dtype
from kvray.model.resolve import resolve_geometry
from kvray.plan.replay import cut_trace, replay_requests
from kvray.traces import footprint as fp

DEFAULT_BLOCK_TOKS = 16  # a trace without blocks of its own: vLLM's default block


def describe_trace(
    opts: Mapping[str, Any],
    *,
    block_toks: int | None = None,
    pool_blocks: Sequence[int] = (),
    model: str | None = None,
    kv_dtype: str = "bf16",
    bins: int = 20,
) -> dict[str, Any]:
    """The description (module docstring) of the trace ``opts`` name (kvray/plan/replay.py's keys), cut as a replay
    would cut it; blocks of ``block_toks`` tokens (default: the trace's own block, else 16)."""
    trace = cut_trace(opts)
    requests, notes = replay_requests(trace, history=str(opts.get("history", "append")))
    block = block_toks or trace.block_toks or DEFAULT_BLOCK_TOKS
    if block < 1:
        raise KvrayInputError(f"--block-tokens must be a positive number of tokens, got {block}")
    if any(p < 1 for p in pool_blocks):
        raise KvrayInputError(f"--pool-blocks must be positive block counts, got {list(pool_blocks)}")
    per_token = _bytes_per_token(model, kv_dtype) if model else None
    blocks = fp.trace_blocks(requests, block)
    arrivals = [r.arrival_s for r in trace.requests]
    duration = max(arrivals) - min(arrivals)
    unique = len({k for keys in blocks for k in keys})
    pools = []
    for p in pool_blocks:
        entry: dict[str, Any] = {"pool_blocks": int(p), "hit_rate": round(fp.lru_hit_rate(blocks, p), 6)}
        if per_token is not None:
            entry.update(pool_tokens=p * block, pool_bytes=round(p * block * per_token))
        pools.append(entry)
    half = fp.half_hit_pool(blocks)
    out: dict[str, Any] = {
        "path": trace.path,
        "format": trace.format,
        "requests": len(requests),
        "sessions": len({r.session for r in trace.requests if r.session is not None}),
        "duration_s": round(duration, 6),
        "mean_rps": round((len(requests) - 1) / duration, 6) if duration > 0 else None,
        "peak_rps": fp.peak_rps(arrivals),
        "peak_rps_window_s": 1.0,
        "prompt_toks": fp.percentiles([r.prompt_toks for r in requests]),
        "output_toks": fp.percentiles([r.gen_toks for r in requests]),
        "block_toks": block,
        "trace_block_toks": trace.block_toks or None,
        "prompt_blocks": sum(len(k) for k in blocks),
        "unique_blocks": unique,
        "prefix_hit_rate": round(fp.prefix_hit_rate(blocks), 6),
        "pool_hit_rates": pools,
        "half_hit_pool_blocks": half,
        "working_set": fp.working_set(requests, blocks, bins),
        "notes": [*trace.notes, *notes],
        "rules": "blocks keyed by content and prefix, last partial block counted; hits = leading cached blocks; "
        "LRU: a request's blocks become most recent, its first the most recent (tails evicted first)",
    }
    if per_token is not None:
        out.update(
            model=model, kv_dtype=kv_dtype, kv_bytes_per_token=per_token, unique_bytes=round(unique * block * per_token)
        )
        if half is not None:
            out["half_hit_pool_bytes"] = round(half * block * per_token)
        for w in out["working_set"]:
            w["bytes"] = round(w["blocks"] * block * per_token)
    return out


def _bytes_per_token(model: str, kv_dtype: str) -> float:
    return kv_bytes_per_token(resolve_geometry(model), normalize_dtype(kv_dtype), "paged")
