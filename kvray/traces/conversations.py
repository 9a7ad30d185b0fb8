"""Conversations files as sessions: OpenAI messages JSONL (``{"messages": [{"role", "content"}, …]}`` a line) or
ShareGPT (``{"conversations": [{"from": "human" | "gpt", "value"}, …]}``, a line each or one JSON array).

Each conversation is a session; each user message a turn, whose output is the assistant message after it (a
missing one: 1 token). Lengths are tokens of ``tokenizer`` (a local tokenizer.json or a directory holding one, read
with the ``tokenizers`` library) or, without one, whitespace-separated words — a proxy, said in the notes. The file
records no times: session c starts at c × ``stagger_s`` and turn k is submitted ``think_s`` after turn k − 1 (its
recorded elapsed time is 0), so a replay sends it think_s after the previous answer (kvray/plan/replay.py). A turn's
length is its own message: a replay's ``history: append`` (the default) prepends the conversation so far.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvray.errors import KvrayInputError
from kvray.traces.records import Trace, TraceRequest

USER_ROLES = ("user", "human")
ASSISTANT_ROLES = ("assistant", "gpt", "chatgpt", "bard", "model")


def looks_like_conversations(first: str) -> bool:
    """A first line that opens a ShareGPT array, or a JSON object with messages / conversations."""
    if first.startswith("["):
        return True
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and ("messages" in obj or "conversations" in obj)


def _counter(tokenizer: str | None) -> Callable[[str], int]:
    if tokenizer is None:
        return lambda text: len(text.split())
    p = Path(tokenizer)
    p = p / "tokenizer.json" if p.is_dir() else p
    if not p.is_file():
        raise KvrayInputError(f"tokenizer {tokenizer}: no tokenizer.json there")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(p))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def _conversations(path: Path) -> list[list[dict[str, Any]]]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        items = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except json.JSONDecodeError as exc:
        raise KvrayInputError(f"{path}: not JSON lines or a JSON array of conversations ({exc.msg})") from None
    out = []
    for i, item in enumerate(items):
        turns = item.get("messages", item.get("conversations")) if isinstance(item, dict) else None
        if not isinstance(turns, list):
            raise KvrayInputError(f"{path}: conversation {i} has no messages / conversations list")
        out.append(
            [
                {
                    "role": str(m.get("role", m.get("from", ""))).lower(),
                    "text": str(m.get("content", m.get("value", ""))),
                }
                for m in turns
                if isinstance(m, dict)
            ]
        )
    return out


def read_conversations(
    path: Path, *, tokenizer: str | None = None, think_s: float = 0.0, stagger_s: float = 1.0
) -> Trace:
    """The conversations file at ``path`` as a trace of sessions (module docstring)."""
    count = _counter(tokenizer)
    requests: list[TraceRequest] = []
    for c, conv in enumerate(_conversations(path)):
        k = 0
        for j, m in enumerate(conv):
            if m["role"] not in USER_ROLES:
                continue
            answer = next((n["text"] for n in conv[j + 1 :] if n["role"] in ASSISTANT_ROLES), "")
            prompt, gen = max(count(m["text"]), 1), max(count(answer), 1)
            requests.append(
                TraceRequest(round(c * stagger_s + k * think_s, 6), prompt, gen, session=f"c{c}", elapsed_s=0.0)
            )
            k += 1
    trace = Trace(requests, "conversations", str(path))
    unit = f"tokens of {tokenizer}" if tokenizer else "whitespace words (no tokenizer given: a proxy for tokens)"
    trace.notes.append(f"conversations: lengths in {unit}; sessions start {stagger_s:g} s apart, think {think_s:g} s")
    requests.sort(key=lambda r: r.arrival_s)
    return trace
