"""A trace's KV footprint from the trace alone: prefix hits with an unbounded cache and under LRU pools, the working
set over time, the pool at which hits halve — plus the engine's own rule (vLLM's) for a replayed run's prediction.

A prompt is a list of *runs* — ``(label, offset, length)``: tokens ``offset … offset + length`` of a sequence named
``label`` — by the one prompt rule every backend sends (kvray/sim/reuse.py): a trace request's blocks (``("b", id)``,
equal ids equal tokens), a conversation's history (its previous turn's prompt, then that turn's synthetic answer
``("a", id)``), a group's filler ``("g", group, k)``, then the request's own tokens ``("own", id)``. A cache block is
keyed by its content *and everything before it* (a chained hash), as a prefix cache keys it, so equal keys mean a
block a cache can serve. No token is ever materialised: 10,000 requests of 12,000 tokens are a few hundred thousand
blocks.

**Trace rule** (``kvray trace``; the issue's definitions). Blocks of ``block_toks`` tokens, the last partial one
counted too (a trace's last hash id is one); requests in arrival order. ``prefix_hit_rate`` = hit blocks ÷ prompt
blocks with an unbounded cache: a request's hits are its leading blocks already cached (a prefix cache serves a
prefix), then all its blocks are cached. Under LRU with ``pool_blocks``: the same lookup, then the request's blocks
become the most recently used — its first block the most recent, its last the least (vLLM frees a request's blocks
tail first, so a shared head outlives the tails behind it) — and the least recently used beyond the pool are
evicted. Running requests are not pinned: the rule sees one request at a time.

**Engine rule** (``engine_hits``: what a replayed row's ``prefix_cache_hit_rate_predicted`` uses, through
kvray/sim/reuse.py): vLLM's automatic prefix caching — only full blocks; a hit stops at prompt − 1 tokens (the last
prompt token is computed for its logits); each request's prompt blocks and the blocks of its own generated tokens
are cached; nothing evicted; requests in id order; hit rate in tokens.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

Run = tuple[Any, int, int]  # (label, offset, length)


class TimedRequest(Protocol):
    """A request's lengths and arrival: what a scheduler needs of it (kvray.spec.RequestSpec fits; the simulator
    reads requests through this too, as ``kvray.sim.simulate.RequestLike``)."""

    @property
    def prompt_toks(self) -> int: ...
    @property
    def gen_toks(self) -> int: ...
    @property
    def arrival_s(self) -> float: ...


class PrefixRequest(TimedRequest, Protocol):
    """A request that may share a prompt prefix with others: its group and the group's prefix length (the
    simulator's reuse rule reads requests through this too, as ``kvray.sim.reuse.ReuseRequest``)."""

    @property
    def id(self) -> int: ...
    @property
    def prefix_group(self) -> int | None: ...
    @property
    def shared_prefix_toks(self) -> int: ...


class FootprintRequest(PrefixRequest, Protocol):
    """What the rule reads of a request (kvray.spec.RequestSpec is one): a trace request's blocks too."""

    @property
    def block_ids(self) -> tuple[int, ...]: ...
    @property
    def block_toks(self) -> int: ...


def _take(runs: Sequence[Run], n: int) -> list[Run]:
    """The first ``n`` tokens of ``runs``."""
    out: list[Run] = []
    for label, offset, length in runs:
        if n <= 0:
            break
        k = min(length, n)
        out.append((label, offset, k))
        n -= k
    return out


def _merge(runs: Iterable[Run]) -> list[Run]:
    """Adjacent pieces of one sequence joined, empty ones dropped: one content, one description."""
    out: list[Run] = []
    for label, offset, length in runs:
        if length <= 0:
            continue
        if out and out[-1][0] == label and out[-1][1] + out[-1][2] == offset:
            out[-1] = (label, out[-1][1], out[-1][2] + length)
        else:
            out.append((label, offset, length))
    return out


def prompt_runs(requests: Sequence[FootprintRequest]) -> dict[int, list[Run]]:
    """Each request's prompt as runs, by the rule of kvray/sim/reuse.py ``shared_token_ids`` (no engine overhead)."""
    history: dict[int, list[Run]] = {}
    out: dict[int, list[Run]] = {}
    for r in sorted(requests, key=lambda r: r.id):
        n = r.prompt_toks
        blocks = getattr(r, "block_ids", ())
        if blocks:
            runs = _take([(("b", b), 0, r.block_toks) for b in blocks], n)
            used = sum(length for _, _, length in runs)
            out[r.id] = _merge([*runs, (("own", r.id), 0, n - used)])
        elif r.prefix_group is None or r.shared_prefix_toks <= 0:
            out[r.id] = [(("own", r.id), 0, n)]
        else:
            shared = min(r.shared_prefix_toks, n)
            h = history.get(r.prefix_group, [])
            have = sum(length for _, _, length in h)
            if have < shared:
                h = [*h, (("g", r.prefix_group, have), 0, shared - have)]
            out[r.id] = _merge([*_take(h, shared), (("own", r.id), 0, n - shared)])
        if r.prefix_group is not None:
            history[r.prefix_group] = _merge([*out[r.id], (("a", r.id), 0, r.gen_toks)])
    return out


def block_keys(runs: Sequence[Run], block_toks: int, *, partial: bool = False) -> list[int]:
    """Chained keys of the blocks of ``runs`` (block k's key hashes its content and block k − 1's key); the last
    partial block is keyed too when ``partial``."""
    keys: list[int] = []
    piece: list[Run] = []
    fill, key = 0, 0
    for label, offset, length in runs:
        while length > 0:
            if fill == 0 and length >= block_toks:  # a whole block of one sequence: its key without assembling
                key = hash((key, ((label, offset, block_toks),)))
                keys.append(key)
                offset, length = offset + block_toks, length - block_toks
                continue
            k = min(length, block_toks - fill)
            piece.append((label, offset, k))
            fill, offset, length = fill + k, offset + k, length - k
            if fill == block_toks:
                key = hash((key, tuple(_merge(piece))))
                keys.append(key)
                piece, fill = [], 0
    if partial and piece:  # a partial block: keyed by content (the trace rule), or unique (the engine never hits it)
        keys.append(hash((key, tuple(_merge(piece)), "partial")))
    return keys


def trace_blocks(requests: Sequence[FootprintRequest], block_toks: int) -> list[list[int]]:
    """Each request's prompt blocks (trace rule: the last partial block counted), in arrival order."""
    runs = prompt_runs(requests)
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.id))
    return [block_keys(runs[r.id], block_toks, partial=True) for r in ordered]


def _leading_hits(keys: Sequence[int], cached: Any) -> int:
    k = 0
    while k < len(keys) and keys[k] in cached:
        k += 1
    return k


def prefix_hit_rate(blocks: Sequence[Sequence[int]]) -> float:
    """Hit blocks ÷ prompt blocks with an unbounded cache (trace rule)."""
    cached: set[int] = set()
    hits = total = 0
    for keys in blocks:
        hits += _leading_hits(keys, cached)
        total += len(keys)
        cached.update(keys)
    return hits / total if total else 0.0


def lru_hit_rate(blocks: Sequence[Sequence[int]], pool_blocks: int) -> float:
    """Hit blocks ÷ prompt blocks under LRU with room for ``pool_blocks`` blocks (trace rule)."""
    lru: OrderedDict[int, None] = OrderedDict()
    hits = total = 0
    for keys in blocks:
        hits += _leading_hits(keys, lru)
        total += len(keys)
        for key in reversed(keys):  # the first block ends the most recent: tails are evicted first
            lru[key] = None
            lru.move_to_end(key)
        while len(lru) > pool_blocks:
            lru.popitem(last=False)
    return hits / total if total else 0.0


def half_hit_pool(blocks: Sequence[Sequence[int]]) -> int | None:
    """The smallest pool (blocks) whose LRU hit rate reaches half the unbounded one; None when nothing hits."""
    full = prefix_hit_rate(blocks)
    if full <= 0:
        return None
    lo, hi = 1, max(len({k for keys in blocks for k in keys}), 1)
    while lo < hi:  # LRU hits grow with the pool (bisection over sizes)
        mid = (lo + hi) // 2
        if lru_hit_rate(blocks, mid) >= full / 2:
            hi = mid
        else:
            lo = mid + 1
    return lo


def working_set(
    requests: Sequence[FootprintRequest], blocks: Sequence[Sequence[int]], bins: int = 20
) -> list[dict[str, Any]]:
    """Per time bin of the trace: requests arriving, distinct blocks they touch, distinct blocks so far."""
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.id))
    if not ordered:
        return []
    t0, t1 = ordered[0].arrival_s, ordered[-1].arrival_s
    width = (t1 - t0) / bins if t1 > t0 else 1.0
    seen: set[int] = set()
    out: list[dict[str, Any]] = []
    i = 0
    for b in range(bins if t1 > t0 else 1):
        end = t0 + (b + 1) * width
        window: set[int] = set()
        n = 0
        while i < len(ordered) and (ordered[i].arrival_s < end or b == bins - 1 or t1 == t0):
            window.update(blocks[i])
            n += 1
            i += 1
        seen |= window
        out.append(
            {"t_s": round(t0 + b * width, 6), "requests": n, "blocks": len(window), "blocks_cumulative": len(seen)}
        )
    return out


def peak_rps(arrivals: Sequence[float], window_s: float = 1.0) -> float:
    """The most arrivals in any ``window_s`` window (sliding), per second."""
    times = sorted(arrivals)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window_s:
            j += 1
        best = max(best, i - j + 1)
    return best / window_s


def percentiles(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:  # nearest rank
        return float(ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)])

    return {
        "mean": round(sum(ordered) / len(ordered), 3),
        "p50": pick(50),
        "p90": pick(90),
        "p99": pick(99),
        "max": float(ordered[-1]),
    }


def block_segments(runs: Sequence[Run], block_toks: int) -> list[tuple[int, int]]:
    """The full blocks of ``runs`` as segments ``(key, blocks)``: block j (1 … blocks) of a segment is ``(key, j)``.

    The same blocks as ``block_keys`` (a block's identity is everything up to its end), named per run instead of per
    block: the whole blocks of one run that starts on a block boundary are one segment (its key hashes the boundary
    and the run's label and offset, so block j holds that run's tokens up to j blocks in), and a block straddling two
    runs is a segment of one. A 512-token trace block is one segment of 32 blocks of 16, not 32 hashes."""
    segments: list[tuple[int, int]] = []
    boundary: Any = 0  # identity of everything before the current block boundary
    piece: list[Run] = []
    fill = 0
    for label, offset, length in _merge(runs):
        if fill:  # finish the block the previous run left partial
            k = min(length, block_toks - fill)
            piece.append((label, offset, k))
            fill, offset, length = fill + k, offset + k, length - k
            if fill < block_toks:
                continue
            key = hash((boundary, tuple(piece)))
            segments.append((key, 1))
            boundary, piece, fill = (key, 1), [], 0
        whole = length // block_toks
        if whole:
            key = hash((boundary, label, offset))
            segments.append((key, whole))
            boundary = (key, whole)
        if length % block_toks:
            piece, fill = [(label, offset + whole * block_toks, length % block_toks)], length % block_toks
    return segments


def engine_hits(requests: Sequence[FootprintRequest], block_size: int) -> dict[int, int]:
    """Prompt tokens each request should find in vLLM's prefix cache (engine rule, module docstring).

    Nothing is evicted and every request caches all the blocks before a point, so the cache holds, for each segment
    (``block_segments``), a prefix of its blocks: it is kept as segment → blocks cached, and a lookup walks segments,
    not blocks (``engine_lru_hits`` with an unbounded pool is the same rule, block by block)."""
    runs = prompt_runs(requests)
    cached: dict[int, int] = {}
    hits: dict[int, int] = {}
    for r in sorted(requests, key=lambda r: r.id):
        prompt = runs[r.id]
        left = (r.prompt_toks - 1) // block_size  # a hit stops at prompt − 1 tokens
        hit = 0
        for key, blocks in block_segments(prompt, block_size):
            want = min(blocks, left)
            have = min(cached.get(key, 0), want)
            hit, left = hit + have, left - have
            if have < want or left <= 0:
                break
        hits[r.id] = hit * block_size
        for key, blocks in block_segments([*prompt, (("out", r.id), 0, max(r.gen_toks - 1, 0))], block_size):
            if cached.get(key, 0) < blocks:
                cached[key] = blocks
    return hits


def engine_lru_hits(requests: Sequence[FootprintRequest], block_size: int, pool_blocks: int) -> dict[int, int]:
    """``engine_hits`` with a pool of ``pool_blocks`` blocks that evicts (vLLM's free-block queue): requests one at a
    time in id order; a request's leading cached full prompt blocks are hits (at most prompt − 1 tokens); then the
    full blocks of its computed tokens (prompt + output − 1) are freed to the queue's tail, its last block first, and
    the least recently used beyond the pool are evicted. A partial block has no hash: vLLM frees it to be reused
    first (``BlockPool.free_blocks``, "evict first"), so it never displaces a cached block."""
    runs = prompt_runs(requests)
    lru: OrderedDict[int, None] = OrderedDict()
    hits: dict[int, int] = {}
    for r in sorted(requests, key=lambda r: r.id):
        prompt = runs[r.id]
        full = (r.prompt_toks - 1) // block_size
        hits[r.id] = _leading_hits(block_keys(prompt, block_size)[:full], lru) * block_size
        keys = block_keys([*prompt, (("out", r.id), 0, max(r.gen_toks - 1, 0))], block_size)
        for key in reversed(keys):
            lru[key] = None
            lru.move_to_end(key)
        while len(lru) > pool_blocks:
            lru.popitem(last=False)
    return hits
