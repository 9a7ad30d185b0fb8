"""Sessions from parameters, and the search for the most concurrent sessions whose p95 TTFT stays under an SLO.

``sessions_workload``: ``sessions`` multi-turn conversations (kvray/plan/reuse.py ``multi_turn_workload``: turn k is
sent ``think_s`` after turn k − 1's last token, its prompt the whole conversation so far), their first turns
*staggered* — session c starts at c × ``stagger_s`` (default think_s ÷ sessions: the starts spread over one think
time), so the run does not open with every session's first prompt at once and then move in lockstep.

``most_sessions_under_slo``: the policy, no engine — doubling from 1 until a count misses the SLO, then bisection
between the last count that met it and the first that did not; every probe's p95 is kept (measured by whatever
``p95_ttft_s`` runs: a backend, or the sim for the prediction — kvray/runner/sessions.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvray.errors import KvrayInputError
from kvray.plan.reuse import multi_turn_workload
from kvray.spec import Workload


def sessions_workload(
    sessions: int, turns: int, user_toks: int, gen_toks: int, think_s: float = 0.0, stagger_s: float | None = None
) -> Workload:
    """``sessions`` × ``turns`` turns (module docstring); request ids turn-major, as multi_turn's."""
    base = multi_turn_workload(sessions, turns, user_toks, gen_toks, think_s)
    gap = think_s / sessions if stagger_s is None else stagger_s
    if gap < 0:
        raise KvrayInputError(f"stagger_s must be >= 0, got {gap}")
    requests = tuple(
        dataclasses.replace(r, arrival_s=round(r.id * gap, 6)) if r.after is None else r for r in base.requests
    )
    return dataclasses.replace(base, requests=requests)


@dataclass
class SessionsSearch:
    """The outcome: the most sessions meeting the SLO (0: not even one), and each probe's p95 TTFT (s)."""

    slo_ttft_s: float
    best: int = 0
    probes: dict[int, float] = field(default_factory=dict)
    capped: bool = False  # the largest count allowed still met the SLO: the true limit may be higher


def most_sessions_under_slo(
    p95_ttft_s: Callable[[int], float], slo_ttft_s: float, max_sessions: int = 1024
) -> SessionsSearch:
    """Doubling, then bisection (module docstring); ``p95_ttft_s(n)`` runs n sessions and returns their p95 TTFT."""
    if slo_ttft_s <= 0 or max_sessions < 1:
        raise KvrayInputError("the sessions search needs a positive SLO and max_sessions >= 1")
    out = SessionsSearch(slo_ttft_s)

    def meets(n: int) -> bool:
        if n not in out.probes:
            out.probes[n] = float(p95_ttft_s(n))
        return out.probes[n] <= slo_ttft_s  # NaN (no sample) fails

    good, bad, n = 0, None, 1
    while n <= max_sessions:
        if not meets(n):
            bad = n
            break
        good, n = n, n * 2
    if bad is None:
        if good < max_sessions and meets(max_sessions):
            good = max_sessions
        elif good < max_sessions:
            bad = max_sessions
        out.capped = bad is None
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if meets(mid) else (good, mid)
    out.best = good
    return out


SESSIONS_KEYS = ("sessions", "turns", "user_toks", "gen_toks", "think_s", "stagger_s")


def check_sessions_key(value: Any, key: str = "sessions") -> dict[str, Any]:
    """A grid's ``sessions: {sessions: [1, 4, 16], turns: 4, user_toks: 256, gen_toks: 128, think_s: 2}`` →
    checked options (``sessions`` a count or a list of counts; ``stagger_s`` default think_s ÷ sessions)."""
    if not isinstance(value, Mapping):
        raise KvrayInputError(f"{key}: expected a mapping with sessions, turns, user_toks, gen_toks (and think_s)")
    stray = sorted(set(value) - set(SESSIONS_KEYS))
    if stray:
        raise KvrayInputError(f"{key}.{stray[0]}: unknown key (known: {', '.join(SESSIONS_KEYS)})")
    out: dict[str, Any] = {}
    for name in ("sessions", "turns", "user_toks", "gen_toks"):
        if name not in value:
            raise KvrayInputError(f"{key}.{name}: required")
        values = value[name] if isinstance(value[name], list) and name == "sessions" else [value[name]]
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise KvrayInputError(f"{key}.{name}: expected positive integers, got {value[name]!r}")
        out[name] = tuple(sorted(set(values))) if name == "sessions" else values[0]
    for name in ("think_s", "stagger_s"):
        if value.get(name) is not None:
            v = value[name]
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise KvrayInputError(f"{key}.{name}: expected seconds >= 0, got {v!r}")
            out[name] = float(v)
    return out


def sessions_workloads(opts: Mapping[str, Any], slo: tuple[tuple[str, float], ...] = ()) -> list[Workload]:
    """One workload per session count of a checked ``sessions:`` key."""
    return [
        dataclasses.replace(
            sessions_workload(
                n, opts["turns"], opts["user_toks"], opts["gen_toks"], opts.get("think_s", 0.0), opts.get("stagger_s")
            ),
            slo=slo,
        )
        for n in opts["sessions"]
    ]
