"""The traffic a plan serves: its request lengths (drawn from distributions, or a trace's), its shared prefixes,
and how a probe of it at any rate is built.

A plan's probe sends the same requests at every rate, only closer together: lengths are drawn once (seeded) and
cycled, arrivals are Poisson at the probe's rate (seeded); a trace keeps its own arrival pattern, compressed or
stretched to the probe's mean rate. With ``--prefix-toks S --groups K`` each request belongs to one of K prefix
groups drawn uniformly (seeded) and its prompt is S shared tokens followed by its drawn prompt length (the unique
suffix).

``--trace FILE``: a minimal reader of its own (``read_trace``) until the trace readers of issue #28 land —
Mooncake JSONL (``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids`` of 512-token blocks) and
CSV with Azure's columns (``TIMESTAMP``, ``ContextTokens``, ``GeneratedTokens``). Swap ``read_trace`` for
#28's reader when it is on main; nothing else here changes.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from kvray.errors import KvrayInputError

MOONCAKE_BLOCK_TOKS = 512  # Mooncake's hash_ids name blocks of 512 tokens (FAST'25 trace README)
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


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_toks: int
    gen_toks: int
    prefix_group: int | None = None
    shared_prefix_toks: int = 0


@dataclass(frozen=True)
class Traffic:
    """Request lengths (and prefixes) of a workload, independent of its rate."""

    lengths: tuple[tuple[int, int], ...]  # (prompt, gen) per request, cycled; the prompt includes any prefix
    groups: int = 0  # shared-prefix groups (0: none)
    prefix_toks: int = 0
    trace: tuple[TraceRequest, ...] = ()  # a trace's requests, by arrival
    source: str = ""

    @property
    def mean_prompt_toks(self) -> float:
        return sum(p for p, _ in self.lengths) / len(self.lengths)

    @property
    def mean_gen_toks(self) -> float:
        return sum(g for _, g in self.lengths) / len(self.lengths)

    @property
    def has_prefixes(self) -> bool:
        return self.groups > 0 or any(r.prefix_group is not None for r in self.trace)

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
        t0 = self.trace[0].arrival_s
        span = (self.trace[-1].arrival_s - t0) * scale + 1 / rate_rps
        groups = 1 + max((r.prefix_group for r in self.trace if r.prefix_group is not None), default=-1)
        out = []
        for i in range(n):
            lap, r = divmod(i, len(self.trace))
            req = self.trace[r]
            group = None if req.prefix_group is None else req.prefix_group + lap * groups  # a new lap: new content
            out.append(
                PlanRequest(
                    i,
                    req.prompt_toks,
                    req.gen_toks,
                    lap * span + (req.arrival_s - t0) * scale,
                    group,
                    req.shared_prefix_toks,
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


def traffic_from_trace(path: str | Path, limit: int | None = None) -> Traffic:
    """A trace file's requests as a Traffic (lengths and prefixes as recorded, arrivals kept for scaling)."""
    reqs = read_trace(path, limit)
    return Traffic(
        tuple((r.prompt_toks, r.gen_toks) for r in reqs),
        trace=tuple(reqs),
        source=f"trace {Path(path).name} ({len(reqs)} requests)",
    )


def read_trace(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Mooncake JSONL or Azure-column CSV, by content; one line naming the file on anything else."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise KvrayInputError(f"--trace {p}: cannot read it ({exc.strerror or exc})") from None
    head = text.lstrip()[:1]
    reqs = _mooncake(text, p) if head == "{" else _azure_csv(text, p)
    if limit is not None:
        reqs = reqs[:limit]
    if len(reqs) < 2:
        raise KvrayInputError(f"--trace {p}: needs at least 2 requests, found {len(reqs)}")
    return reqs


def _mooncake(text: str, p: Path) -> list[TraceRequest]:
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append(
                {
                    "t": float(row["timestamp"]) / 1000,
                    "p": int(row["input_length"]),
                    "g": int(row["output_length"]),
                    "h": [int(h) for h in row.get("hash_ids", [])],
                }
            )
        except (ValueError, KeyError, TypeError):
            raise KvrayInputError(
                f"--trace {p}: line {n} is not a Mooncake record (timestamp, input_length, output_length)"
            ) from None
    rows.sort(key=lambda r: r["t"])
    # a request shares the leading blocks it has in common with the first request that began with its first block
    firsts: dict[int, tuple[int, list[int]]] = {}
    out = []
    for r in rows:
        group, shared = None, 0
        if r["h"]:
            gid, hashes = firsts.setdefault(r["h"][0], (len(firsts), r["h"]))
            common = next(
                (k for k, (a, b) in enumerate(zip(hashes, r["h"], strict=False)) if a != b),
                min(len(hashes), len(r["h"])),
            )
            group, shared = gid, min(common * MOONCAKE_BLOCK_TOKS, r["p"])
        out.append(TraceRequest(r["t"], max(r["p"], 1), max(r["g"], 1), group, shared))
    return out


def _azure_csv(text: str, p: Path) -> list[TraceRequest]:
    reader = csv.DictReader(text.splitlines())
    names = set(reader.fieldnames or [])
    if not {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= names:
        raise KvrayInputError(
            f"--trace {p}: not a Mooncake JSONL or Azure CSV trace (needs TIMESTAMP, ContextTokens, GeneratedTokens "
            f"columns; found {', '.join(sorted(names)) or 'none'})"
        )
    out = []
    for n, row in enumerate(reader, 2):
        try:
            out.append(
                TraceRequest(
                    _seconds(row["TIMESTAMP"]), max(int(row["ContextTokens"]), 1), max(int(row["GeneratedTokens"]), 1)
                )
            )
        except ValueError:
            raise KvrayInputError(f"--trace {p}: line {n} has a bad TIMESTAMP or token count") from None
    out.sort(key=lambda r: r.arrival_s)
    return out


def _seconds(stamp: str) -> float:
    """Azure's TIMESTAMP ("2023-11-16 18:15:46.6805900") or a number of seconds."""
    try:
        return float(stamp)
    except ValueError:
        pass
    text = stamp.strip()
    if "." in text:  # Python parses at most 6 fraction digits
        head, frac = text.split(".", 1)
        text = f"{head}.{frac[:6]}"
    return datetime.fromisoformat(text).timestamp()
