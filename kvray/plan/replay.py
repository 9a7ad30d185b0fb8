"""A trace as a load: the job grid's ``trace:`` key and ``kvray bench --trace``, turned into a replay workload.

    grid:
      - trace: {path: traces/mooncake_conversation_first300.jsonl, format: mooncake, speedup: 2, limit: 100}

Keys (kvray/traces/window.py says how each cuts the trace): ``path`` (required; relative to the working directory,
else to the job file's folder), ``format`` (mooncake | azure | burstgpt | kvray | conversations; default: detected from the
content), ``speedup``, ``limit``, ``start_s``, ``duration_s``, ``steady`` (default true), ``sample``, ``seed``,
``block_toks``, ``trace_block_toks`` (tokens per hash id the file was written at, default Mooncake's 512),
``cell`` (a kvray file's cell id), ``tokenizer`` / ``think_s`` / ``stagger_s`` (a conversations file,
kvray/traces/conversations.py), ``warmup_s`` / ``cooldown_s`` (the serving window, as for any
open loop), ``history`` (sessions: ``append`` — a turn's recorded prompt is its new message, sent after the whole
conversation so far — or ``recorded``: the recorded prompt already holds it).

A replay is an open loop at the recorded arrivals (kind ``replay``; its ``offered_rps`` is the cut trace's mean rate):
request ids run in arrival order, a trace's block ids go with each request (the prompt rule, kvray/sim/reuse.py).
Requests of a **session** are chained instead: a session's first turn leaves at its recorded time; turn k leaves
``think_s`` after turn k − 1's last token — the recorded gap from the previous turn's end (its submission plus the
recorded elapsed time, BurstGPT) to this turn's submission, or, where the trace records no elapsed time, the gap
between submissions (an upper bound of the think time, said in the notes) — never start to start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from kvray.errors import KvrayInputError
from kvray.plan.sessions import check_sessions_key, sessions_workloads
from kvray.sim.reuse import predict_hits
from kvray.spec import LoadSpec, RequestSpec, Workload
from kvray.traces.formats import FORMATS, Trace, read_trace
from kvray.traces.window import CutTrace, TraceOptions, cut

TRACE_KEYS = (
    "tokenizer",
    "think_s",
    "stagger_s",
    "trace_block_toks",
    "path",
    "format",
    "speedup",
    "limit",
    "start_s",
    "duration_s",
    "steady",
    "sample",
    "seed",
    "block_toks",
    "cell",
    "warmup_s",
    "cooldown_s",
    "history",
)
HISTORY_MODES = ("append", "recorded")


def check_trace_key(value: Any, key: str = "trace", base_dir: str | Path | None = None) -> dict[str, Any]:
    """A ``trace:`` mapping (or a bare path) → checked options, the path resolved; one line on bad input."""
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, Mapping) or "path" not in value:
        raise KvrayInputError(f"{key}: expected a mapping with path (and format, speedup, limit …)")
    stray = sorted(set(value) - set(TRACE_KEYS))
    if stray:
        raise KvrayInputError(f"{key}.{stray[0]}: unknown key (known: {', '.join(TRACE_KEYS)})")
    out: dict[str, Any] = {"path": _resolve(str(value["path"]), key, base_dir)}
    if value.get("format") is not None:
        if value["format"] not in FORMATS:
            raise KvrayInputError(
                f"{key}.format: unknown trace format {value['format']!r} (known: {', '.join(FORMATS)})"
            )
        out["format"] = str(value["format"])
    for name in ("speedup", "start_s", "duration_s", "sample", "warmup_s", "cooldown_s", "think_s", "stagger_s"):
        if value.get(name) is not None:
            v = value[name]
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise KvrayInputError(f"{key}.{name}: expected a number >= 0, got {v!r}")
            out[name] = float(v)
    for name in ("limit", "seed", "block_toks", "trace_block_toks"):
        if value.get(name) is not None:
            v = value[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "seed" else 1):
                raise KvrayInputError(f"{key}.{name}: expected a positive integer, got {v!r}")
            out[name] = v
    if "steady" in value:
        if not isinstance(value["steady"], bool):
            raise KvrayInputError(f"{key}.steady: expected true or false, got {value['steady']!r}")
        out["steady"] = value["steady"]
    for name in ("cell", "tokenizer"):
        if value.get(name) is not None:
            out[name] = str(value[name])
    if value.get("history") is not None:
        if value["history"] not in HISTORY_MODES:
            raise KvrayInputError(f"{key}.history: expected append or recorded, got {value['history']!r}")
        out["history"] = value["history"]
    try:
        _options(out)
    except KvrayInputError as exc:
        raise KvrayInputError(f"{key}: {exc}") from None
    return out


def _resolve(path: str, key: str, base_dir: str | Path | None) -> str:
    p = Path(path).expanduser()
    if not p.is_file() and base_dir is not None and (Path(base_dir) / p).is_file():
        p = Path(base_dir) / p
    if not p.is_file():
        raise KvrayInputError(f"{key}.path: trace file {path} does not exist")
    return str(p)


def _options(opts: Mapping[str, Any]) -> TraceOptions:
    names = ("speedup", "limit", "start_s", "duration_s", "steady", "sample", "seed", "block_toks")
    return TraceOptions(**{k: opts[k] for k in names if k in opts})


@lru_cache(maxsize=8)
def _read(
    path: str,
    mtime_ns: int,
    fmt: str | None,
    cell: str | None,
    block: int | None,
    conversations: tuple[tuple[str, Any], ...],
) -> Trace:
    return read_trace(path, fmt, cell=cell, block_toks=block, conversations=dict(conversations))


def cut_trace(opts: Mapping[str, Any]) -> CutTrace:
    """The trace ``opts`` name, read (cached while the file is unchanged) and cut."""
    path = str(opts["path"])
    try:
        mtime = Path(path).stat().st_mtime_ns
    except OSError:
        raise KvrayInputError(f"trace file {path} does not exist") from None
    conv = tuple((k, opts[k]) for k in ("tokenizer", "think_s", "stagger_s") if k in opts)
    trace = _read(path, mtime, opts.get("format"), opts.get("cell"), opts.get("trace_block_toks"), conv)
    return cut(trace, _options(opts))


def trace_label(opts: Mapping[str, Any], trace: CutTrace) -> str:
    """What a replay row's ``load`` says about its trace: format, file, and each cut in words."""
    return f"{trace.format}:{Path(trace.path).name} — " + "; ".join(trace.notes or ["whole trace"])


def replay_workload(opts: Mapping[str, Any], slo: tuple[tuple[str, float], ...] | Mapping[str, float] = ()) -> Workload:
    """The cut trace as a ``replay`` workload (module docstring): open-loop arrivals, sessions chained."""
    trace = cut_trace(opts)
    requests, notes = replay_requests(trace, history=str(opts.get("history", "append")))
    arrivals = [r.arrival_s for r in requests if r.after is None]
    span = max(arrivals) - min(arrivals)
    rate = (len(requests) - 1) / span if span > 0 and len(requests) > 1 else None
    load = LoadSpec(
        kind="replay",
        rate_rps=rate,
        requests=len(requests),
        seed=int(opts.get("seed", 0)),
        warmup_s=opts.get("warmup_s"),
        cooldown_s=opts.get("cooldown_s"),
        trace="; ".join([trace_label(opts, trace), *notes]),
    )
    slo_pairs = tuple(sorted(slo.items())) if isinstance(slo, Mapping) else tuple(slo)
    kind = "sessions" if any(r.after is not None for r in requests) else "replay"
    return Workload(kind, tuple(requests), load=load, slo=slo_pairs)


def replay_requests(trace: CutTrace, history: str = "append") -> tuple[list[RequestSpec], list[str]]:
    """RequestSpecs of a cut trace, ids in arrival order; sessions chained (module docstring). Also the notes."""
    notes: list[str] = []
    sessions: dict[str, int] = {}
    last: dict[str, tuple[int, float, float | None]] = {}  # session → (previous turn's id, its arrival, its elapsed)
    lengths: dict[int, tuple[int, int]] = {}
    out: list[RequestSpec] = []
    guessed = 0
    for i, r in enumerate(trace.requests):
        fields: dict[str, Any] = {}
        prompt = r.prompt_toks
        if r.block_ids:
            fields.update(block_ids=r.block_ids, block_toks=trace.block_toks)
        if r.session is not None:
            group = sessions.setdefault(r.session, len(sessions))
            prev = last.get(r.session)
            if prev is not None:
                before, at, elapsed = prev
                gap = r.arrival_s - at - (elapsed or 0.0)
                guessed += elapsed is None
                fields.update(after=before, think_s=round(max(gap, 0.0), 6))
                if not r.block_ids:  # the conversation so far is the prompt's head
                    shared = sum(lengths[before])
                    prompt = prompt + shared if history == "append" else max(prompt, 1)
                    fields.update(prefix_group=group, shared_prefix_toks=min(shared, prompt - 1))
            elif not r.block_ids:
                fields.update(prefix_group=group)
            last[r.session] = (i, r.arrival_s, r.elapsed_s)
        lengths[i] = (prompt, r.gen_toks)
        out.append(RequestSpec(i, prompt, r.gen_toks, r.arrival_s, **fields))
    if sessions:
        notes.append(f"{len(sessions)} sessions: each turn {think_rule(guessed)}; prompts {history} the history")
    return out, notes


def think_rule(guessed: int) -> str:
    """How the think times were found, in words (the notes)."""
    if guessed:
        return (
            f"leaves its think time after the previous turn's end ({guessed} think times are submission gaps: "
            "no elapsed time recorded, an upper bound)"
        )
    return "leaves the recorded think time after the previous turn's end"


def grid_workloads(grid: Any) -> list[Workload]:
    """The workloads of a ``trace:`` or ``sessions:`` grid block (kvray/plan/planner.py's hook)."""
    reuse = dict(grid.reuse)
    slo = tuple(sorted(grid.slo))
    if reuse["workload"] == "trace":
        return [replay_workload(dict(reuse["trace"]), slo)]
    return sessions_workloads(dict(reuse["sessions"]), slo)


def trace_grid(
    g: Mapping[str, Any], key: str, fail: Callable[[str, str], KvrayInputError], base_dir: str | Path | None
) -> dict[str, Any]:
    """A job grid block with ``trace:`` → its Grid's fields (kvray/plan/job.py's hook): only ``slo`` and
    ``experiment`` may go beside it — the trace sets the requests, their lengths and their arrivals."""
    from kvray.plan.loads import parse_slo

    kind = "trace" if "trace" in g else "sessions"
    stray = sorted(set(g) - {kind, "slo", "experiment"})
    if stray:
        raise fail(f"{key}.{stray[0]}", f"does not go with {kind}: (it sets the requests and their arrivals)")
    try:
        if kind == "trace":
            opts = check_trace_key(g["trace"], f"{key}.trace", base_dir)
        else:
            opts = check_sessions_key(g["sessions"], f"{key}.sessions")
        slo = tuple(sorted(parse_slo(g["slo"], f"{key}.slo").items())) if "slo" in g else ()
    except KvrayInputError as exc:
        raise fail("", str(exc)) from None
    experiment = g.get("experiment")
    return dict(
        gen_toks=(),
        reuse=(("workload", kind), (kind, tuple(sorted(opts.items())))),
        slo=slo,
        experiment=None if experiment is None else str(experiment),
    )


def trace_grid_dict(grid: Any) -> dict[str, Any]:
    """A trace or sessions Grid back as its job-file block (round-trips through ``trace_grid``)."""
    kind = dict(grid.reuse)["workload"]
    d: dict[str, Any] = {kind: {k: list(v) if isinstance(v, tuple) else v for k, v in dict(grid.reuse)[kind]}}
    if grid.slo:
        d["slo"] = dict(grid.slo)
    if grid.experiment is not None:
        d["experiment"] = grid.experiment
    return d


def predicted_hit_rate(cell: Any) -> float | None:
    """A replayed cell's ``prefix_cache_hit_rate_predicted`` where its backend gave none: hit tokens ÷ prompt tokens
    of one repeat in an unbounded prefix cache of the cell's ``block_size`` (default 16, vLLM's), by vLLM's rule
    (kvray/sim/reuse.py ``predict_hits``)."""
    requests = cell.workload.requests
    block = int(cell.option_dict.get("block_size") or 16)
    queries = sum(r.prompt_toks for r in requests)
    return round(sum(predict_hits(requests, block).values()) / queries, 6) if queries else None
