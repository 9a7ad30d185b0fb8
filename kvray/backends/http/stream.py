"""Reading a streamed HTTP response into timed chunks: the part every server backend shares.

A request is sent when its schedule says (kvray/backends/arrivals.py), its response read line by line with each
line stamped on arrival (``timed_lines``), and the whole stream bounded by a timeout (``stream_failure``);
whatever goes wrong — refused connection, timeout, HTTP error status, malformed stream — becomes the
request's trace with ``status="error"`` and a one-line reason (``error_trace``), never an exception.
OpenAI's server-sent events are parsed here (``parse_event``, ``chunk_content``); Ollama's NDJSON lines in
kvray/backends/ollama.py. Chunk timestamps become one timestamp per output token in ``token_times``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from kvray.measure.trace import RunTrace
from kvray.spec import RequestSpec


class StreamError(Exception):
    """A stream that cannot be read as the server's protocol says it should be."""


@dataclass
class Chunk:
    t_s: float
    text: str
    token_ids: int | None  # len(token_ids) when the server sent them


def one_line(text: str) -> str:
    """An HTTP error body as one line."""
    return text.strip().replace("\n", " ")


async def timed_lines(
    client: Any, url: str, body: dict[str, Any], t0: float, error_detail: Callable[[str], str] = one_line
) -> AsyncGenerator[tuple[float, str], None]:
    """POST ``body`` and yield (seconds since ``t0``, stripped line) as each line of the response arrives.

    A status other than 200 raises StreamError with the body's ``error_detail``. Use it under
    ``contextlib.aclosing`` so that stopping early closes the response at once.
    """
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            detail = error_detail((await response.aread()).decode(errors="replace"))
            raise StreamError(f"HTTP {response.status_code}: {detail[:200]}")
        async for line in response.aiter_lines():
            yield time.perf_counter() - t0, line.strip()


async def stream_failure(stream: Coroutine[Any, Any, None], timeout_s: float) -> str | None:
    """Read a whole stream within ``timeout_s``: None when it ended, else the one-line reason it failed."""
    try:
        await asyncio.wait_for(stream, timeout_s)
    except Exception as exc:
        return http_reason(exc, timeout_s)
    return None


def error_trace(
    r: RequestSpec,
    repeat: int,
    start_s: float,
    chunks: Sequence[Chunk],
    t0: float,
    reason: str,
    counts: Sequence[int] | None = None,
) -> RunTrace:
    """The trace of a request that failed: the tokens it got, ending now, with the reason.

    ``counts`` are the tokens each chunk carried (one each when not given, as Ollama streams them): a failed
    request's ``output_toks`` is tokens, not chunks, and each token carries its chunk's arrival time.
    """
    end = time.perf_counter() - t0
    counts = list(counts) if counts is not None else [1] * len(chunks)
    times = [c.t_s for c, k in zip(chunks, counts, strict=True) for _ in range(k)]
    return RunTrace(
        r.id, repeat, r.arrival_s, start_s, times, end, r.prompt_toks, len(times), status="error", error=reason
    )


def json_object(text: str, unit: str) -> dict[str, Any]:
    """One JSON object of a stream (``unit``: "event", "line"), or a StreamError saying what is wrong with it."""
    try:
        event = json.loads(text)
    except json.JSONDecodeError:
        raise StreamError(f"malformed stream: invalid JSON in {unit} {text[:80]!r}") from None
    if not isinstance(event, dict):
        raise StreamError(f"malformed stream: {unit} is not an object: {text[:80]!r}")
    return event


def parse_event(line: str) -> dict[str, Any] | None:
    """One SSE line → its JSON event; None for blank/comment/other fields and for ``[DONE]``."""
    if not line or line.startswith(":"):
        return None
    if not line.startswith("data:"):
        if line.split(":", 1)[0] in ("event", "id", "retry"):
            return None
        raise StreamError(f"malformed stream: unexpected line {line[:80]!r}")
    payload = line[5:].strip()
    if payload == "[DONE]":
        return {"_done": True}
    event = json_object(payload, "event")
    if "error" in event and not event.get("choices"):
        err = event["error"]
        message = err.get("message", err) if isinstance(err, dict) else err
        raise StreamError(f"server error in stream: {str(message)[:200]}")
    return event


def chunk_content(event: dict[str, Any], chat: bool) -> tuple[str, int | None, str | None]:
    """(text, number of token ids or None, finish_reason) of an event's first choice."""
    choices = event.get("choices") or []
    if not isinstance(choices, list):
        raise StreamError("malformed stream: 'choices' is not a list")
    if not choices:
        return "", None, None
    choice = choices[0]
    if not isinstance(choice, dict):
        raise StreamError("malformed stream: a choice is not an object")
    if chat:
        delta = choice.get("delta") or {}
        text = (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
    else:
        text = choice.get("text") or ""
    ids = choice.get("token_ids")
    return str(text), (len(ids) if isinstance(ids, list) else None), choice.get("finish_reason")


def token_times(chunks: Sequence[Chunk], counts: Sequence[int], n_tokens: int, end_s: float) -> list[float]:
    """One timestamp per output token: each chunk's time repeated by its token count, reconciled to usage.

    When the chunks count more tokens than the server's usage (text re-tokenised piece by piece splits what
    the model generated as one token), usage's tokens are spread over the chunks in proportion: token j of n
    takes the time of chunk-token round(j·(C − 1)/(n − 1)) of C, so the first token stays on the first chunk
    and the last on the last — trimming the surplus from the end instead would cut the stream short and
    shrink E2E and TPOT by the over-count. Tokens the chunks do not account for (text a server held back,
    tokens that print as nothing) are stamped at the stream's end ``end_s``.
    """
    times = [c.t_s for c, k in zip(chunks, counts, strict=True) for _ in range(k)]
    if len(times) > n_tokens:
        if n_tokens <= 1:
            return times[:n_tokens]
        step = (len(times) - 1) / (n_tokens - 1)
        return [times[int(j * step + 0.5)] for j in range(n_tokens)]
    return times + [end_s] * (n_tokens - len(times))


def http_reason(exc: BaseException, timeout_s: float) -> str:
    """Why a request failed, in one line: timeout, connection refused, malformed stream, HTTP status…"""
    import httpx

    if isinstance(exc, asyncio.TimeoutError | httpx.TimeoutException):
        return f"timeout after {timeout_s:g} s ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        text = str(exc) or "connection failed"
        cause: BaseException | None = exc
        while cause is not None:  # httpx's async transport wraps the OS error ("All connection attempts failed")
            if isinstance(cause, ConnectionRefusedError) or "refused" in str(cause).lower():
                return f"connection refused: {text[:160]}"
            cause = cause.__cause__ or cause.__context__
        return f"connect error: {text[:160]}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"malformed stream: {str(exc)[:160] or 'server closed the connection mid-response'}"
    if isinstance(exc, StreamError):
        return str(exc)
    return f"{type(exc).__name__}: {str(exc)[:160]}"
