"""A trace cut for a run: window, steady part, session sample, first N, time compression, block size — in that order.

start_s / duration_s  the requests that arrived in [start_s, start_s + duration_s) of the trace (trace seconds)
steady                skip a ramp at either end (``steady_window``): on by default for traces of >= 200 requests,
                      and reported in the trace's notes (BurstGPT opens with a ramp ~92× slower than the rest)
sample                keep this fraction of the sessions, whole (seeded); a trace without sessions keeps that
                      fraction of its requests
limit                 the first N requests that remain
speedup               arrivals (and think times) divided by this: 2 replays the trace in half its time
block_toks            tokens one trace block becomes (a trace with block ids): every prompt and output length is
                      scaled by block_toks ÷ the trace's block size, so a trace block stays a whole number of the
                      engine's blocks (Mooncake's 512-token blocks as 32 tokens: 2 vLLM blocks of 16)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from kvray.errors import KvrayInputError
from kvray.traces.formats import Trace, TraceRequest

STEADY_MIN_REQUESTS = 200  # fewer: bins too sparse to tell a ramp from noise; the window is left whole
STEADY_SPAN = 10  # requests per stretch the pace is measured over
STEADY_FRACTION = 0.2  # a stretch slower than 5× the typical one is ramp


@dataclass(frozen=True)
class TraceOptions:
    """How to cut a trace (module docstring); the defaults keep it whole, at its own speed and block size."""

    speedup: float = 1.0
    limit: int | None = None
    start_s: float | None = None
    duration_s: float | None = None
    steady: bool = True
    sample: float | None = None
    seed: int = 0
    block_toks: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.speedup) and self.speedup > 0):
            raise KvrayInputError(f"trace speedup must be a positive number, got {self.speedup}")
        if self.limit is not None and self.limit < 1:
            raise KvrayInputError(f"trace limit must be a positive number of requests, got {self.limit}")
        if self.start_s is not None and self.start_s < 0:
            raise KvrayInputError(f"trace start_s must be >= 0, got {self.start_s}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise KvrayInputError(f"trace duration_s must be positive, got {self.duration_s}")
        if self.sample is not None and not 0 < self.sample <= 1:
            raise KvrayInputError(f"trace sample must be a fraction in (0, 1], got {self.sample}")
        if self.block_toks is not None and self.block_toks < 1:
            raise KvrayInputError(f"trace block_toks must be a positive number of tokens, got {self.block_toks}")


@dataclass
class CutTrace:
    """A trace after ``cut``: its requests (arrivals from 0, compressed), block size, and what was done to it."""

    requests: list[TraceRequest]
    format: str
    path: str
    block_toks: int
    speedup: float
    notes: list[str] = field(default_factory=list)
    steady_window_s: tuple[float, float] | None = None  # the part kept by ``steady`` (trace seconds), None: all

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0


def steady_window(arrivals: list[float]) -> tuple[float, float] | None:
    """(start, end) trace seconds of the steady part of an arrival list, or None when nothing is ramp.

    The trace's typical pace is the median time ``STEADY_SPAN`` consecutive requests take (robust to a ramp that
    lasts longer than the rest, as BurstGPT's does); the steady part runs from the first request whose next
    ``STEADY_SPAN`` arrive within 1 / ``STEADY_FRACTION`` of that time to the last such stretch's end — a slow opening
    (or tail) is cut, lulls in the middle stay (they are the trace)."""
    n = len(arrivals)
    if n < STEADY_MIN_REQUESTS:
        return None
    spans = [arrivals[i + STEADY_SPAN] - arrivals[i] for i in range(n - STEADY_SPAN)]
    typical = float(np.median(spans))
    if typical <= 0:
        return None
    busy = [i for i, span in enumerate(spans) if span <= typical / STEADY_FRACTION]
    first, last = busy[0], busy[-1] + STEADY_SPAN
    if first == 0 and last == n - 1:
        return None
    return arrivals[first], arrivals[last]


def cut(trace: Trace, opts: TraceOptions) -> CutTrace:
    """``trace`` cut by ``opts`` (module docstring); one line when nothing is left."""
    reqs = list(trace.requests)
    notes = list(trace.notes)
    if opts.start_s is not None or opts.duration_s is not None:
        lo = opts.start_s or 0.0
        hi = lo + opts.duration_s if opts.duration_s is not None else math.inf
        reqs = [r for r in reqs if lo <= r.arrival_s < hi]
        notes.append(f"window [{lo:g}, {hi:g}) s of the trace: {len(reqs)} requests")
    window = steady_window([r.arrival_s for r in reqs]) if opts.steady else None
    if window is not None:
        kept = [r for r in reqs if window[0] <= r.arrival_s <= window[1]]
        skipped = len(reqs) - len(kept)
        notes.append(f"steady window [{window[0]:.1f}, {window[1]:.1f}] s: {skipped} requests of a ramp skipped")
        reqs = kept
    if opts.sample is not None and opts.sample < 1:
        reqs = _sample(reqs, opts.sample, opts.seed)
        notes.append(f"sample {opts.sample:g} of the sessions (whole, seed {opts.seed}): {len(reqs)} requests")
    if opts.limit is not None and len(reqs) > opts.limit:
        reqs = reqs[: opts.limit]
        notes.append(f"first {opts.limit} requests")
    if not reqs:
        raise KvrayInputError(f"{trace.path}: no requests left after cutting the trace ({'; '.join(notes[-2:])})")
    t0 = reqs[0].arrival_s
    block = trace.block_toks
    scale = 1.0
    if opts.block_toks is not None and block:
        scale, block = opts.block_toks / block, opts.block_toks
        notes.append(f"one trace block of {trace.block_toks} tokens → {block} tokens (lengths × {scale:g})")
    elif opts.block_toks is not None:
        raise KvrayInputError(f"{trace.path}: block_toks maps a trace's blocks, and this {trace.format} trace has none")
    out = [_scaled(r, (r.arrival_s - t0) / opts.speedup, scale, block, opts.speedup) for r in reqs]
    if opts.speedup != 1:
        notes.append(f"arrivals ÷ {opts.speedup:g} (speedup)")
    return CutTrace(out, trace.format, trace.path, block, opts.speedup, notes, window)


def _scaled(r: TraceRequest, arrival_s: float, scale: float, block: int, speedup: float) -> TraceRequest:
    prompt, gen = r.prompt_toks, r.gen_toks
    if scale != 1.0:
        prompt, gen = max(round(prompt * scale), 1), max(round(gen * scale), 1)
        if r.block_ids:  # still len(blocks) blocks: all but the last whole
            prompt = min(max(prompt, (len(r.block_ids) - 1) * block + 1), len(r.block_ids) * block)
    elapsed = r.elapsed_s / speedup if r.elapsed_s is not None else None
    return TraceRequest(round(arrival_s, 6), prompt, gen, r.block_ids, r.session, elapsed)


def _sample(reqs: list[TraceRequest], fraction: float, seed: int) -> list[TraceRequest]:
    """Whole sessions (a request without one is a session of its own), each kept with probability ``fraction``."""
    keys = sorted({r.session if r.session is not None else f"#{i}" for i, r in enumerate(reqs)})
    rng = np.random.default_rng(seed)
    keep = {k for k, u in zip(keys, rng.random(len(keys)), strict=True) if u < fraction}
    return [r for i, r in enumerate(reqs) if (r.session if r.session is not None else f"#{i}") in keep]
