"""Trace files → ``TraceRequest`` lists: Mooncake JSONL, Azure CSV (2023 / 2024), BurstGPT CSV, kvray's traces.jsonl.

Each reader keeps what the file records and says what it dropped; nothing is downloaded. Times become seconds since
the trace's first request; lengths are tokens as recorded.

  mooncake  JSONL, one request a line: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids`` (the
            prompt's blocks, 512 tokens each, equal ids = equal content — the FAST'25 release, kvcache-ai/Mooncake);
            an optional ``session_id`` / ``chat_id`` groups turns
  azure     CSV ``TIMESTAMP,ContextTokens,GeneratedTokens`` (Azure LLM inference traces 2023 and 2024; the
            timestamp a date-time, 7 fractional digits in 2023, a UTC offset in 2024)
  burstgpt  CSV ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type`` and, in later releases,
            ``Session ID`` and ``Elapsed time`` (s); a row with 0 response tokens is a failed request: dropped and
            counted (``failed``), as a replay cannot ask an engine to fail
  kvray     a results folder's traces.jsonl (``{"cell_id", "traces": [...]}`` a line): one cell's repeat replayed at
            its requests' due times — a past run sent again exactly
"""

from __future__ import annotations

import csv
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from kvray.errors import KvrayInputError
from kvray.traces.conversations import looks_like_conversations
from kvray.traces.records import Trace, TraceRequest

FORMATS = ("mooncake", "azure", "burstgpt", "kvray", "conversations")  # conversations: kvray/traces/conversations.py
MOONCAKE_BLOCK_TOKS = 512  # FAST'25 release README: each hash id stands for a block of 512 tokens


def detect_format(path: Path) -> str:
    """The format of ``path`` from its first line (module docstring), or one line saying it is none of them."""
    first = _first_line(path)
    if looks_like_conversations(first):
        return "conversations"
    if first.startswith("{"):
        try:
            obj = json.loads(first)
        except json.JSONDecodeError:
            raise KvrayInputError(f"{path}: the first line is not JSON, and not a CSV header kvray knows") from None
        if isinstance(obj, dict) and "traces" in obj and "cell_id" in obj:
            return "kvray"
        if isinstance(obj, dict) and "input_length" in obj:
            return "mooncake"
        raise KvrayInputError(f"{path}: a JSONL trace needs input_length (Mooncake) or cell_id/traces (kvray)")
    header = {h.strip().lower() for h in first.split(",")}
    if {"contexttokens", "generatedtokens"} <= header:
        return "azure"
    if {"request tokens", "response tokens"} <= header:
        return "burstgpt"
    raise KvrayInputError(
        f"{path}: not a trace kvray knows ({', '.join(FORMATS)}); name it with --format / format: if it is one"
    )


def read_trace(
    path: str | Path,
    fmt: str | None = None,
    *,
    cell: str | None = None,
    block_toks: int | None = None,
    conversations: dict[str, Any] | None = None,
) -> Trace:
    """The trace at ``path`` in ``fmt`` (None: detected from the content); ``cell``: a kvray file's cell id;
    ``block_toks``: tokens per hash id where a Mooncake-format file was written at another block size than 512;
    ``conversations``: a conversations file's ``tokenizer``, ``think_s``, ``stagger_s``."""
    p = Path(path)
    if not p.is_file():
        raise KvrayInputError(f"trace file {p} does not exist")
    if fmt is None:
        fmt = detect_format(p)
    if fmt not in FORMATS:
        raise KvrayInputError(f"unknown trace format {fmt!r} (known: {', '.join(FORMATS)})")
    if fmt == "conversations":
        from kvray.traces.conversations import read_conversations

        trace = read_conversations(p, **(conversations or {}))
    elif fmt == "mooncake":
        trace = _mooncake(p, block_toks or MOONCAKE_BLOCK_TOKS)
    else:
        trace = _kvray(p, cell) if fmt == "kvray" else {"azure": _azure, "burstgpt": _burstgpt}[fmt](p)
    if not trace.requests:
        raise KvrayInputError(f"{p}: no requests in this {fmt} trace")
    return trace


def _first_line(path: Path) -> str:
    try:
        with path.open(encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    return line.strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise KvrayInputError(f"cannot read trace {path}: {exc}") from None
    raise KvrayInputError(f"{path}: empty trace file")


def _positive_int(value: Any, where: str) -> int:
    try:
        n = int(float(value))
    except (TypeError, ValueError):
        raise KvrayInputError(f"{where}: expected a token count, got {value!r}") from None
    if n < 0:
        raise KvrayInputError(f"{where}: token counts cannot be negative, got {n}")
    return n


def _rebased(trace: Trace) -> Trace:
    """Requests sorted by arrival (stable: the file's order breaks ties), times from the first at 0."""
    trace.requests.sort(key=lambda r: r.arrival_s)
    if trace.requests:
        t0 = trace.requests[0].arrival_s
        trace.requests = [_at(r, r.arrival_s - t0) for r in trace.requests]
    return trace


def _at(r: TraceRequest, arrival_s: float) -> TraceRequest:
    return TraceRequest(round(arrival_s, 6), r.prompt_toks, r.gen_toks, r.block_ids, r.session, r.elapsed_s)


def _jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    out = []
    with path.open(encoding="utf-8-sig") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KvrayInputError(f"{path}:{i}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise KvrayInputError(f"{path}:{i}: expected a JSON object a line")
            out.append((i, obj))
    return out


def _mooncake(path: Path, block: int) -> Trace:
    requests, zero = [], 0
    for i, obj in _jsonl(path):
        where = f"{path}:{i}"
        missing = [k for k in ("timestamp", "input_length", "output_length") if k not in obj]
        if missing:
            raise KvrayInputError(f"{where}: a Mooncake request needs {', '.join(missing)}")
        ids = obj.get("hash_ids") or []
        if not isinstance(ids, list) or not all(isinstance(b, int) for b in ids):
            raise KvrayInputError(f"{where}: hash_ids must be a list of integers")
        prompt, gen = _positive_int(obj["input_length"], where), _positive_int(obj["output_length"], where)
        if prompt == 0 or gen == 0:
            zero += 1
            continue
        if ids and not (len(ids) - 1) * block < prompt <= len(ids) * block:
            raise KvrayInputError(f"{where}: {len(ids)} hash_ids of {block} tokens do not make input_length {prompt}")
        session = obj.get("session_id", obj.get("chat_id"))
        ts = float(obj["timestamp"]) / 1000.0
        requests.append(TraceRequest(ts, prompt, gen, tuple(ids), None if session is None else str(session)))
    trace = Trace(requests, "mooncake", str(path), block if any(r.block_ids for r in requests) else 0)
    if zero:
        trace.notes.append(f"{zero} requests with 0 input or output tokens dropped")
        trace.failed = zero
    return _rebased(trace)


def _csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        names = [n.strip() for n in reader.fieldnames or []]
        rows = [(i, {k.strip(): (v or "").strip() for k, v in row.items() if k}) for i, row in enumerate(reader, 2)]
    return names, rows


def parse_datetime_s(text: str, where: str) -> float:
    """Seconds since the epoch of an Azure timestamp: ``2023-11-16 18:17:03.9799600`` (7 fractional digits, which
    ``datetime`` does not take) or ``2024-05-10 00:00:00.009930+00:00``; the fraction is added exactly."""
    stamp, offset = text.strip(), ""
    for sign in ("+", "-"):
        cut = stamp.rfind(sign)
        if cut > 10:  # past the date's own dashes: a UTC offset
            stamp, offset = stamp[:cut], stamp[cut:]
            break
    whole, _, fraction = stamp.partition(".")
    try:
        base = datetime.fromisoformat(whole + offset) if offset else datetime.fromisoformat(whole)
        frac = float("0." + fraction) if fraction else 0.0
    except ValueError:
        raise KvrayInputError(f"{where}: cannot read timestamp {text!r}") from None
    return base.timestamp() + frac


def _azure(path: Path) -> Trace:
    names, rows = _csv_rows(path)
    lower = {n.lower(): n for n in names}
    if not {"timestamp", "contexttokens", "generatedtokens"} <= set(lower):
        raise KvrayInputError(f"{path}: an Azure trace needs columns TIMESTAMP, ContextTokens, GeneratedTokens")
    t, p, g = lower["timestamp"], lower["contexttokens"], lower["generatedtokens"]
    requests, zero = [], 0
    for i, row in rows:
        where = f"{path}:{i}"
        prompt, gen = _positive_int(row[p], where), _positive_int(row[g], where)
        if prompt == 0 or gen == 0:
            zero += 1
            continue
        requests.append(TraceRequest(parse_datetime_s(row[t], where), prompt, gen))
    trace = Trace(requests, "azure", str(path))
    if zero:
        trace.failed = zero
        trace.notes.append(f"{zero} requests with 0 context or generated tokens dropped")
    return _rebased(trace)


def _burstgpt(path: Path) -> Trace:
    names, rows = _csv_rows(path)
    lower = {n.lower(): n for n in names}
    need = ("timestamp", "request tokens", "response tokens")
    if not set(need) <= set(lower):
        raise KvrayInputError(f"{path}: a BurstGPT trace needs columns Timestamp, Request tokens, Response tokens")
    session_col, elapsed_col = lower.get("session id"), lower.get("elapsed time")
    requests, failed = [], 0
    for i, row in rows:
        where = f"{path}:{i}"
        try:
            ts = float(row[lower["timestamp"]])
        except ValueError:
            raise KvrayInputError(f"{where}: Timestamp must be seconds, got {row[lower['timestamp']]!r}") from None
        prompt = _positive_int(row[lower["request tokens"]], where)
        gen = _positive_int(row[lower["response tokens"]], where)
        if gen == 0 or prompt == 0:  # BurstGPT's failures: a response of 0 tokens
            failed += 1
            continue
        session = row.get(session_col or "", "") or None
        elapsed = row.get(elapsed_col or "", "")
        requests.append(TraceRequest(ts, prompt, gen, session=session, elapsed_s=float(elapsed) if elapsed else None))
    trace = Trace(requests, "burstgpt", str(path), failed=failed)
    if failed:
        trace.notes.append(f"{failed} failed requests (0 response tokens) dropped")
    return _rebased(trace)


def _kvray(path: Path, cell: str | None) -> Trace:
    chosen: dict[str, Any] | None = None
    cells = []
    for _, obj in _jsonl(path):
        cells.append(str(obj.get("cell_id")))
        if cell is None or str(obj.get("cell_id")) == cell:
            chosen = obj  # the last line of a cell wins (a rerun replaced it)
            if cell is None:
                break
    if chosen is None:
        more = " …" if len(cells) > 5 else ""
        raise KvrayInputError(f"{path}: no cell {cell!r} (cells: {', '.join(cells[:5])}{more})")
    traces = [t for t in chosen.get("traces") or [] if isinstance(t, dict)]
    measured = sorted({int(t.get("repeat", 0)) for t in traces if int(t.get("repeat", 0)) >= 0})
    if not measured:
        raise KvrayInputError(f"{path}: cell {chosen.get('cell_id')} has no measured requests to replay")
    first = [t for t in traces if int(t.get("repeat", 0)) == measured[0]]
    requests = [
        TraceRequest(float(t["arrival_s"]), int(t["prompt_toks"]), max(int(t.get("output_toks") or 1), 1))
        for t in sorted(first, key=lambda t: (t["arrival_s"], t["request_id"]))
    ]
    trace = Trace(requests, "kvray", str(path))
    trace.notes.append(f"cell {chosen.get('cell_id')}, repeat {measured[0]}: requests at their recorded due times")
    return _rebased(trace)
