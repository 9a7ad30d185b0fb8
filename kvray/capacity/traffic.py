"""The traffic a plan serves: its request lengths (drawn from distributions, or a trace's), its shared prefixes,
and how a probe of it at any rate is built.

A plan's probe sends the same requests at every rate, only closer together: lengths are drawn once (seeded) and
cycled, arrivals are Poisson at the probe's rate (seeded); a trace keeps its own arrival pattern, compressed or
stretched to the probe's mean rate. With ``--prefix-toks S --groups K`` each request belongs to one of K prefix
groups drawn uniformly (seeded) and its prompt is S shared tokens followed by its drawn prompt length (the unique
suffix).

``--trace FILE`` (``traffic_from_trace``): any format kvray/traces/ reads (Mooncake, Azure 2023/2024, BurstGPT,
kvray's traces.jsonl, conversations), cut as ``kvray trace`` and ``kvray bench --trace`` cut it (kvray/plan/
replay.py: steady window, ``--limit``, ``--speedup``) and turned into requests as a replay sends them (block ids
kept, a session's turn prepending the conversation so far) — but open loop: each turn at its recorded arrival,
since a probe rescales arrivals to its rate. Prefix reuse comes from the trace's blocks and sessions by the engine
rule (kvray/traces/footprint.py ``engine_hits``, the engine's block size): a request's hit tokens become its
``shared_prefix_toks`` in the group of its first block (or its session) — the group the serving simulator shares
blocks in and the router's prefix affinity keys on (a prompt's head) — and its block ids go with it, so
kvray/capacity/routing.py predicts each replica's share by the same rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kvray.errors import KvrayInputError
from kvray.model.kvmath import DEFAULT_BLOCK_SIZE
from kvray.traces.footprint import engine_hits
from kvray.traces.formats import FORMATS

DEFAULT_SAMPLES = 256  # length pairs drawn once per plan


@dataclass(frozen=True)
class PlanRequest:
    """One request of a probe: what kvray.sim.serving.serve reads (kvray.spec.RequestSpec's fields)."""

    id: int
    prompt_toks: int
    gen_toks: int
    arrival_s: float
    prefix_group: int | None = None
    shared_prefix_toks: int = 0
    block_ids: tuple[int, ...] = ()  # a trace's blocks (kvray/traces/): what the reuse rule keys on
    block_toks: int = 0


@dataclass(frozen=True)
class Traffic:
    """Request lengths (and prefixes) of a workload, independent of its rate."""

    lengths: tuple[tuple[int, int], ...]  # (prompt, gen) per request, cycled; the prompt includes any prefix
    groups: int = 0  # shared-prefix groups (0: none)
    prefix_toks: int = 0
    trace: tuple[PlanRequest, ...] = ()  # a trace's requests (one lap), by arrival, ids from 0
    source: str = ""
    notes: tuple[str, ...] = ()  # what reading and cutting the trace did, and its predicted reuse

    @property
    def mean_prompt_toks(self) -> float:
        return sum(p for p, _ in self.lengths) / len(self.lengths)

    @property
    def mean_gen_toks(self) -> float:
        return sum(g for _, g in self.lengths) / len(self.lengths)

    @property
    def has_prefixes(self) -> bool:
        return self.groups > 0 or any(r.shared_prefix_toks > 0 for r in self.trace)

    @property
    def trace_rate_rps(self) -> float | None:
        """A trace's own mean rate (requests over its span), None without one."""
        if len(self.trace) < 2:
            return None
        span = self.trace[-1].arrival_s - self.trace[0].arrival_s
        return (len(self.trace) - 1) / span if span > 0 else None

    def percentile_pair(self, q: float) -> tuple[int, int]:
        """(prompt, gen) at the ``q``-th percentile of each (nearest rank): the request an SLO percentile is about."""
        prompts = sorted(p for p, _ in self.lengths)
        gens = sorted(g for _, g in self.lengths)
        k = min(len(prompts) - 1, max(0, math.ceil(q / 100 * len(prompts)) - 1))
        return prompts[k], gens[k]

    def requests(self, rate_rps: float, n: int, seed: int = 0) -> list[PlanRequest]:
        """``n`` requests at ``rate_rps``: Poisson arrivals (seeded), or the trace's arrivals scaled to that mean
        rate (the trace repeated, back to back, when ``n`` exceeds it)."""
        if rate_rps <= 0 or n <= 0:
            raise KvrayInputError(f"a probe needs a positive rate and request count, got {rate_rps} and {n}")
        if self.trace:
            return self._trace_requests(rate_rps, n)
        import random

        rng, pick = random.Random(seed), random.Random(f"groups {seed}")  # arrivals apart from group draws
        out, t = [], 0.0
        for i in range(n):
            prompt, gen = self.lengths[i % len(self.lengths)]
            group = pick.randrange(self.groups) if self.groups else None
            out.append(PlanRequest(i, prompt, gen, t, group, self.prefix_toks if self.groups else 0))
            t += rng.expovariate(rate_rps)
        return out

    def _trace_requests(self, rate_rps: float, n: int) -> list[PlanRequest]:
        natural = self.trace_rate_rps or rate_rps
        scale = natural / rate_rps
        span = self.trace[-1].arrival_s * scale + 1 / rate_rps
        groups = 1 + max((r.prefix_group for r in self.trace if r.prefix_group is not None), default=-1)
        blocks = 1 + max((b for r in self.trace for b in r.block_ids), default=-1)
        out = []
        for i in range(n):
            lap, k = divmod(i, len(self.trace))
            r = self.trace[k]
            out.append(
                replace(
                    r,
                    id=i,
                    arrival_s=lap * span + r.arrival_s * scale,
                    # a new lap is new content: its groups and blocks hit nothing of the laps before
                    prefix_group=None if r.prefix_group is None else r.prefix_group + lap * groups,
                    block_ids=tuple(b + lap * blocks for b in r.block_ids),
                )
            )
        return out


def traffic_from_flags(
    prompt: Mapping[str, Any] | int,
    gen: Mapping[str, Any] | int,
    *,
    groups: int = 0,
    prefix_toks: int = 0,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
) -> Traffic:
    """Lengths drawn from ``--prompt-dist``/``--gen-dist`` (kvray.plan.loads' forms) or fixed token counts."""
    import numpy as np

    from kvray.plan.loads import length_params, sample_lengths

    if groups < 0 or prefix_toks < 0 or (groups > 0) != (prefix_toks > 0):
        raise KvrayInputError(
            f"--groups and --prefix-toks go together and must be positive, got {groups}, {prefix_toks}"
        )
    prompt_params = length_params(prompt, "--prompt-dist", "prompt")
    gen_params = length_params(gen, "--gen-dist", "gen")
    rng = np.random.default_rng([seed, 1])
    prompts = sample_lengths(prompt_params, samples, rng)
    gens = sample_lengths(gen_params, samples, rng)
    lengths = tuple((prefix_toks + p, g) for p, g in zip(prompts, gens, strict=True))
    described = f"prompt {_describe(prompt_params)}, output {_describe(gen_params)}"
    if groups:
        described += f", {groups} shared prefixes of {prefix_toks} tokens"
    return Traffic(lengths, groups, prefix_toks, source=described)


def _describe(params: Mapping[str, Any]) -> str:
    if params["kind"] == "fixed":
        return f"{params['value']} tokens"
    return (
        params["kind"]
        + "("
        + ", ".join(
            f"{k}={v:g}" for k, v in params.items() if k not in ("kind", "source") and isinstance(v, int | float)
        )
        + ")"
    )


def traffic_from_trace(
    path: str | Path,
    fmt: str | None = None,
    *,
    limit: int | None = None,
    speedup: float | None = None,
    block_size: int | None = None,
) -> Traffic:
    """A trace file's requests as a Traffic (module docstring): ``fmt`` None detects the format; ``limit`` keeps the
    first N requests, ``speedup`` divides the arrivals (its mean rate is the rate planned for without --rate);
    ``block_size``: the engine's, which the reuse rule counts hits in. One line on anything bad."""
    from kvray.plan.replay import check_trace_key, cut_trace, replay_requests

    if not Path(path).is_file():
        raise KvrayInputError(f"--trace {path}: no such file")
    if fmt is not None and fmt not in FORMATS:
        raise KvrayInputError(f"--trace-format: unknown trace format {fmt!r} (known: {', '.join(FORMATS)})")
    if limit is not None and limit < 2:
        raise KvrayInputError(f"--limit must keep at least 2 requests of the trace (a rate needs 2), got {limit}")
    if speedup is not None and not (math.isfinite(speedup) and speedup > 0):
        raise KvrayInputError(f"--speedup must be a positive number, got {speedup}")
    block = block_size or DEFAULT_BLOCK_SIZE
    raw = {"path": str(path), "format": fmt, "limit": limit, "speedup": speedup}
    cut = cut_trace(check_trace_key({k: v for k, v in raw.items() if v is not None}, "--trace"))
    specs, _ = replay_requests(cut)  # its notes say how a replay chains sessions; a probe sends them open loop
    hits = engine_hits(specs, block)
    keys: dict[tuple[str, int], int] = {}  # a first block or a session → its prefix group
    reqs = []
    for s in specs:
        key = ("b", s.block_ids[0]) if s.block_ids else None if s.prefix_group is None else ("s", s.prefix_group)
        group = None if key is None else keys.setdefault(key, len(keys))
        reqs.append(
            PlanRequest(s.id, s.prompt_toks, s.gen_toks, s.arrival_s, group, hits[s.id], s.block_ids, s.block_toks)
        )
    prompt = sum(r.prompt_toks for r in reqs)
    hit_rate = sum(hits.values()) / prompt if prompt else 0.0
    sessions = len({r.prefix_group for r in specs if r.prefix_group is not None})
    notes = [*cut.notes]
    if sessions:
        notes.append(
            f"{sessions} sessions: each turn at its recorded arrival (open loop), after the conversation so far"
        )
    notes.append(
        f"prefix reuse from the trace's blocks and sessions: {hit_rate:.1%} of prompt tokens hit an unbounded cache "
        f"of {block}-token blocks (vLLM's rule, kvray/traces/footprint.py engine_hits)"
    )
    speed = f", arrivals ÷ {speedup:g}" if speedup and speedup != 1 else ""
    return Traffic(
        tuple((r.prompt_toks, r.gen_toks) for r in reqs),
        trace=tuple(reqs),
        source=f"{cut.format} trace {Path(path).name} ({len(reqs)} requests{speed})",
        notes=tuple(notes),
    )
