"""Any OpenAI-compatible server over HTTP: streamed ``/v1/completions`` or ``/v1/chat/completions``.

Every request of the workload is sent at its arrival offset and stays in flight until its stream ends, so
the cell's concurrency is the number of requests in flight (asyncio + httpx, one connection each).

Token accounting follows the field notes: the number of output tokens is ``usage.completion_tokens``,
never the number of chunks. Each chunk is stamped when its line arrives; a chunk carries as many tokens
as its ``token_ids`` (vLLM with ``return_token_ids``) or, failing that, as its text re-tokenises to; the
chunk tokens are then reconciled with ``usage`` — extra ones dropped from the end, missing ones (text a
server held back, such as partial UTF-8) stamped at the end of the stream. Tokens of one chunk share its
timestamp and kvray/metrics.py splits the gap. A trace's ``start_s`` is when the request was sent: an
HTTP client cannot see when the server admitted it, so server-side queueing shows in TTFT, not queue_s.

Prompts are exactly ``prompt_toks`` tokens with the model's tokenizer (BOS and chat template included),
random words seeded per cell, repeat and request, so repeats never hit a prefix cache; the server's
``usage.prompt_tokens`` is recorded as the trace's prompt length.

Exact output lengths need a server-specific field; ``server_flavor`` (default "auto": probed once) picks
  vllm          ``ignore_eos`` + ``min_tokens`` (+ ``return_token_ids`` for exact chunk sizes)
  transformers  ``generation_config: {"eos_token_id": -1}`` (``transformers serve`` rejects the vLLM fields)
  openai        nothing: a request that stops early is an error unless ``allow_short_output`` is set

While a cell runs, Prometheus ``/metrics`` is scraped (when the server has it) into a KV-usage timeline,
``BackendRun.extra["kv_timeline"]``, and vLLM's ``cache_config_info`` into ``extra["server_cache"]``.

Cell options: base_url (required), api_key_env (name of the environment variable holding the key; the key
itself is never stored), endpoint ("completions" | "chat"), served_model, tokenizer, server_flavor,
timeout_s (per request, 300), metrics_url, metrics_interval_s (0.1), allow_short_output (False),
extra_body (a JSON object merged into every request, e.g. '{"top_k": 1}').
Failures — refused connection, timeout, HTTP error status, malformed stream — become per-request traces
with ``status="error"`` and the reason, never an exception.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvray.backends.base import BackendRun
from kvray.errors import KvrayInputError
from kvray.measure.trace import RunTrace
from kvray.spec import Cell, RequestSpec

ENDPOINTS = ("completions", "chat")
FLAVORS = ("auto", "vllm", "transformers", "openai")
_FLAVOR_FIELDS: dict[str, Callable[[int], dict[str, Any]]] = {
    "vllm": lambda gen: {"ignore_eos": True, "min_tokens": gen, "return_token_ids": True},
    "transformers": lambda gen: {"generation_config": json.dumps({"eos_token_id": -1})},
    "openai": lambda gen: {},
}
T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even when called inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="kvray-http")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return,unused-ignore]


def root_url(base_url: str) -> str:
    """``http://host:port`` from a base URL given with or without ``/v1``."""
    url = base_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise KvrayInputError(f"base URL must start with http:// or https://, got {base_url!r}")
    return url.removesuffix("/v1")


@dataclass
class HTTPSettings:
    """Where and how to send requests; built from a cell's options (or by a server-starting backend)."""

    base_url: str
    endpoint: str = "completions"
    served_model: str | None = None
    tokenizer: str | None = None
    server_flavor: str = "auto"
    api_key_env: str | None = None
    timeout_s: float = 300.0
    metrics_url: str | None = None
    metrics_interval_s: float = 0.1
    allow_short_output: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_cell(cls, cell: Cell) -> HTTPSettings:
        opts = cell.option_dict
        base_url = opts.get("base_url")
        if not base_url:
            raise KvrayInputError(f"the {cell.backend} backend needs a server URL (--base-url / option base_url)")
        known = set(cls.__dataclass_fields__) - {"extra_body"}
        settings = cls(**{k: v for k, v in opts.items() if k in known})
        extra = opts.get("extra_body")
        if extra is not None:  # a JSON object (text on the command line) merged into every request body
            try:
                body = json.loads(extra) if isinstance(extra, str) else extra
            except json.JSONDecodeError:
                body = None
            if not isinstance(body, dict):
                raise KvrayInputError(f"option extra_body must be a JSON object, got {extra!r}")
            settings.extra_body = body
        settings.check()
        return settings

    def check(self) -> None:
        root_url(self.base_url)
        if self.endpoint not in ENDPOINTS:
            raise KvrayInputError(f"unknown endpoint {self.endpoint!r} (known: {', '.join(ENDPOINTS)})")
        if self.server_flavor not in FLAVORS:
            raise KvrayInputError(f"unknown server flavor {self.server_flavor!r} (known: {', '.join(FLAVORS)})")
        if float(self.timeout_s) <= 0 or float(self.metrics_interval_s) <= 0:
            raise KvrayInputError("timeout_s and metrics_interval_s must be positive")
        if self.api_key_env and self.api_key_env not in os.environ:
            raise KvrayInputError(f"environment variable {self.api_key_env} (the API key) is not set")

    @property
    def root(self) -> str:
        return root_url(self.base_url)

    @property
    def url(self) -> str:
        return f"{self.root}/v1/{'chat/completions' if self.endpoint == 'chat' else 'completions'}"

    def headers(self) -> dict[str, str]:
        """Request headers; the API key is read from the environment here and nowhere else."""
        if self.api_key_env:
            return {"Authorization": f"Bearer {os.environ[self.api_key_env]}"}
        return {}


# --- prompts ------------------------------------------------------------------------------------------


class PromptBuilder:
    """Random-word prompts of an exact token count under a tokenizer (completion or chat form)."""

    def __init__(self, tokenizer: Any, chat: bool = False):
        self.tokenizer = tokenizer
        self.chat = chat
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self.allowed = [i for i in range(len(tokenizer)) if i not in special and i not in added]
        if not self.allowed:
            raise KvrayInputError("the tokenizer has no ordinary tokens to build prompts from")

    def count(self, text: str) -> int:
        if self.chat:
            enc = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True
            )
            ids = enc["input_ids"] if hasattr(enc, "keys") else enc
            return len(ids)
        return len(self.tokenizer(text)["input_ids"])

    def count_text_tokens(self, text: str) -> int:
        """Tokens a streamed piece of text stands for (no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def make(self, n_tokens: int, seed: int) -> str:
        """A prompt of ``n_tokens`` tokens; the closest reachable length if the tokenizer does not round-trip."""
        rng = random.Random(seed)
        overhead = self.count("")
        ids = [rng.choice(self.allowed) for _ in range(max(n_tokens - overhead, 0))]
        text = ""
        for _ in range(12):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            diff = self.count(text) - n_tokens
            if diff == 0:
                break
            if diff > 0:
                ids = ids[: max(len(ids) - diff, 0)]
            else:
                ids += [rng.choice(self.allowed) for _ in range(-diff)]
        return text


def load_tokenizer(name: str) -> Any:
    """``AutoTokenizer`` for a local directory or hub id; failures become one clear input error."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise KvrayInputError(
            f"cannot load a tokenizer for {name!r} ({first}); pass option tokenizer=DIR_OR_ID for exact prompt lengths"
        ) from None


def request_seed(cell: Cell, repeat: int, request_id: int) -> int:
    digest = hashlib.sha256(f"{cell.cell_id}:{repeat}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


# --- streams -------------------------------------------------------------------------------------------


class StreamError(Exception):
    """A stream that cannot be read as OpenAI server-sent events."""


@dataclass
class Chunk:
    t_s: float
    text: str
    token_ids: int | None  # len(token_ids) when the server sent them


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
    try:
        event = json.loads(payload)
    except json.JSONDecodeError:
        raise StreamError(f"malformed stream: invalid JSON in event {payload[:80]!r}") from None
    if not isinstance(event, dict):
        raise StreamError(f"malformed stream: event is not an object: {payload[:80]!r}")
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
    """One timestamp per output token: each chunk's time repeated by its token count, reconciled to usage."""
    times = [c.t_s for c, k in zip(chunks, counts, strict=True) for _ in range(k)]
    if len(times) > n_tokens:
        return times[:n_tokens]
    return times + [end_s] * (n_tokens - len(times))


def _http_reason(exc: BaseException, timeout_s: float) -> str:
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


# --- the backend ----------------------------------------------------------------------------------------


class OpenAIBackend:
    """Benchmarks a running OpenAI-compatible server; holds no model, so there is nothing to OOM-check here."""

    name = "openai"
    simulated = False
    oom_precheck = False
    device = "cpu"  # the client's process; the server's memory comes from its own metrics

    def __init__(self) -> None:
        self.settings: HTTPSettings | None = None
        self.prompts: PromptBuilder | None = None
        self.flavor: str | None = None
        self.model_name: str | None = None
        self._tokenizer_name: str | None = None
        self._timeline_cell: str | None = None
        self._timeline: list[dict[str, Any]] = []
        self.server_cache: dict[str, Any] = {}

    # --- loading ------------------------------------------------------------------------------------

    def load(self, cell: Cell) -> None:
        self.configure(HTTPSettings.from_cell(cell), cell.model)

    def configure(self, settings: HTTPSettings, model: str) -> None:
        """Point the client at a server; the tokenizer and the model name are resolved once per server."""
        settings.check()
        same_server = self.settings is not None and self.settings.root == settings.root
        if not same_server or settings.server_flavor != "auto":
            self.flavor = None if settings.server_flavor == "auto" else settings.server_flavor
        if not same_server:
            self.model_name = None
        self.settings = settings
        if self.model_name is None:
            self.model_name = settings.served_model or self._discover_model() or model
        tokenizer_name = settings.tokenizer or _local_or(model, self.model_name)
        if tokenizer_name != self._tokenizer_name or self.prompts is None:
            self.prompts = PromptBuilder(load_tokenizer(tokenizer_name), chat=settings.endpoint == "chat")
            self._tokenizer_name = tokenizer_name
        elif self.prompts.chat != (settings.endpoint == "chat"):
            self.prompts = PromptBuilder(self.prompts.tokenizer, chat=settings.endpoint == "chat")

    def _discover_model(self) -> str | None:
        """The first model id of ``GET /v1/models`` (None when the server is unreachable or has none)."""
        import httpx

        assert self.settings is not None
        try:
            response = httpx.get(f"{self.settings.root}/v1/models", headers=self.settings.headers(), timeout=10.0)
            data = response.json().get("data") or []
            return str(data[0]["id"]) if response.status_code == 200 and data else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            return None

    # --- running ------------------------------------------------------------------------------------

    def run(self, cell: Cell, requests: Sequence[RequestSpec], repeat: int) -> BackendRun:
        if self.settings is None:
            self.load(cell)
        return run_async(self.run_async(cell, requests, repeat))

    async def run_async(self, cell: Cell, requests: Sequence[RequestSpec], repeat: int) -> BackendRun:
        import httpx

        from kvray.servers.prometheus import MetricsPoller, cache_config, peak

        assert self.settings is not None and self.prompts is not None
        settings = self.settings
        prompts = {r.id: self.prompts.make(r.prompt_toks, request_seed(cell, repeat, r.id)) for r in requests}
        limits = httpx.Limits(max_connections=len(requests) + 4, max_keepalive_connections=len(requests) + 4)
        timeout = httpx.Timeout(settings.timeout_s, connect=min(settings.timeout_s, 30.0))
        async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=settings.headers()) as client:
            if self.flavor is None:
                self.flavor = await self._probe_flavor(client, prompts[requests[0].id] if requests else "")
            metrics_url = settings.metrics_url or f"{settings.root}/metrics"
            t0 = time.perf_counter()
            poller = MetricsPoller(client, metrics_url, t0, settings.metrics_interval_s, repeat)
            poller.start()
            traces = await asyncio.gather(*(self._request(client, r, prompts[r.id], t0, repeat) for r in requests))
            await poller.stop()
            if poller.available and not self.server_cache:
                samples = await poller.scrape()
                self.server_cache = cache_config(samples) if samples else {}
                if samples is not None and not self.server_cache:
                    self.server_cache = {"source": "metrics without vllm:cache_config_info"}
        extra: dict[str, Any] = {"server_flavor": self.flavor, "served_model": self.model_name}
        memory: dict[str, int | float | None] = {}
        if repeat >= 0 and poller.points:  # warmups are not part of the cell's timeline
            if self._timeline_cell != cell.cell_id:
                self._timeline_cell, self._timeline = cell.cell_id, []
            self._timeline.extend(poller.points)
            extra["kv_timeline"] = list(self._timeline)
        if self.server_cache and "kv_cache_memory_bytes" in self.server_cache:
            extra["server_cache"] = dict(self.server_cache)
            reserved = self.server_cache.get("kv_cache_memory_bytes")
            # Only samples that caught requests in the engine say how much KV the workload used.
            busy = [p for p in poller.points if (p.get("running") or 0) > 0]
            usage = peak(busy, "kv_usage")
            memory["kv_reserved_bytes"] = reserved
            memory["kv_usage_peak"] = usage
            used = used_kv_bytes(self.server_cache, usage)
            if used is not None:
                memory["kv_used_peak_bytes"] = used
            predicted = predicted_paged_bytes(cell, self.server_cache)
            if predicted is not None:
                memory["kv_predicted_bytes"] = predicted
        kv_measured = memory.get("kv_used_peak_bytes")
        return BackendRun(
            traces=list(traces),
            kv_measured_bytes=int(kv_measured) if kv_measured is not None else None,
            memory=memory,
            extra=extra,
        )

    def _body(self, prompt: str, r: RequestSpec, flavor: str, stream: bool = True) -> dict[str, Any]:
        assert self.settings is not None
        body: dict[str, Any] = {"model": self.model_name, "max_tokens": r.gen_toks, "temperature": r.temperature}
        if self.settings.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        body.update(_FLAVOR_FIELDS[flavor](r.gen_toks))
        body.update(self.settings.extra_body)
        return body

    async def _probe_flavor(self, client: Any, prompt: str) -> str | None:
        """The first flavor whose length-forcing fields the server accepts (None if it cannot be reached)."""
        assert self.settings is not None
        probe = RequestSpec(id=0, prompt_toks=1, gen_toks=1)
        for flavor in ("vllm", "transformers", "openai"):
            try:
                response = await client.post(self.settings.url, json=self._body(prompt, probe, flavor, stream=False))
            except Exception:
                return None  # unreachable now: every request will record why; probe again next run
            if response.status_code == 200:
                return flavor
            if response.status_code not in (400, 422):
                return "openai"
        return "openai"

    async def _request(self, client: Any, r: RequestSpec, prompt: str, t0: float, repeat: int) -> RunTrace:
        assert self.settings is not None and self.prompts is not None
        delay = t0 + r.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        start_s = time.perf_counter() - t0
        chunks: list[Chunk] = []
        state: dict[str, Any] = {"usage": None, "finish": None, "end_s": start_s}
        timeout_s = float(self.settings.timeout_s)

        def failed(reason: str) -> RunTrace:
            end = time.perf_counter() - t0
            return RunTrace(r.id, repeat, r.arrival_s, start_s, [c.t_s for c in chunks], end, r.prompt_toks,
                            len(chunks), status="error", error=reason)  # fmt: skip

        try:
            await asyncio.wait_for(self._stream(client, r, prompt, t0, chunks, state), timeout_s)
        except Exception as exc:
            return failed(_http_reason(exc, timeout_s))
        usage = state["usage"]
        if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
            return failed("malformed stream: it ended without usage.completion_tokens")
        n_out = int(usage["completion_tokens"])
        counts = [c.token_ids if c.token_ids is not None else self.prompts.count_text_tokens(c.text) for c in chunks]
        counts = [max(k, 1) if c.text or c.token_ids else k for c, k in zip(chunks, counts, strict=True)]
        times = token_times(chunks, counts, n_out, state["end_s"])
        prompt_toks = int(usage.get("prompt_tokens") or r.prompt_toks)
        trace = RunTrace(r.id, repeat, r.arrival_s, start_s, times, times[-1] if times else state["end_s"],
                         prompt_toks, n_out)  # fmt: skip
        if n_out != r.gen_toks and not (self.settings.allow_short_output and 0 < n_out < r.gen_toks):
            trace.status = "error"
            trace.error = (
                f"server returned {n_out} of {r.gen_toks} tokens (finish_reason {state['finish']!r}; flavor "
                f"{self.flavor!r} cannot force output lengths; set allow_short_output to accept)"
            )
        return trace

    async def _stream(
        self, client: Any, r: RequestSpec, prompt: str, t0: float, chunks: list[Chunk], state: dict[str, Any]
    ) -> None:
        assert self.settings is not None
        chat = self.settings.endpoint == "chat"
        body = self._body(prompt, r, self.flavor or "openai")
        async with client.stream("POST", self.settings.url, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace").strip().replace("\n", " ")
                raise StreamError(f"HTTP {response.status_code}: {detail[:200]}")
            async for line in response.aiter_lines():
                t = time.perf_counter() - t0
                event = parse_event(line.strip())
                if event is None:
                    continue
                state["end_s"] = t
                if event.get("_done"):
                    break
                text, n_ids, finish = chunk_content(event, chat)
                if text or n_ids:
                    chunks.append(Chunk(t, text, n_ids))
                if finish:
                    state["finish"] = finish
                if isinstance(event.get("usage"), dict):
                    state["usage"] = event["usage"]

    def device_info(self) -> dict[str, Any]:
        """The server's hardware is not visible over HTTP: name the server instead."""
        return {"name": "remote", "server": self.settings.root if self.settings else None}

    def close(self) -> None:
        self.settings = None


def used_kv_bytes(cache: dict[str, Any], usage: float | None) -> int | None:
    """KV bytes in use from vLLM's usage fraction: vLLM reserves one null block, so usage = used / (blocks − 1)."""
    blocks, reserved = cache.get("num_gpu_blocks"), cache.get("kv_cache_memory_bytes")
    if usage is None or not blocks or not reserved:
        return None
    used_blocks = round(usage * max(blocks - 1, 1))
    return int(used_blocks * (reserved // blocks))


def predicted_paged_bytes(cell: Cell, cache: dict[str, Any]) -> int | None:
    """kvray's paged-layout prediction for the cell's workload with the server's block size and KV dtype."""
    from kvray.model.kvmath import cached_positions, kv_bytes_batch
    from kvray.model.resolve import resolve_geometry

    block_size = cache.get("block_size")
    if not block_size:
        return None
    dtype = cache_dtype(cache.get("cache_dtype"), cell.kv_dtype or cell.dtype)
    try:
        g = resolve_geometry(cell.model)
    except Exception:
        return None
    positions = [cached_positions(r.prompt_toks, r.gen_toks) for r in cell.workload.requests]
    return kv_bytes_batch(g, positions, dtype, "paged", int(block_size))


def cache_dtype(server_dtype: str | None, model_dtype: str) -> str:
    """The KV dtype a server reports ("auto" means the model's dtype)."""
    from kvray.model.kvmath import normalize_dtype

    if not server_dtype or server_dtype == "auto":
        return normalize_dtype(model_dtype)
    try:
        return normalize_dtype(server_dtype)
    except KvrayInputError:
        return normalize_dtype(model_dtype)


def _local_or(model: str, served: str | None) -> str:
    """The tokenizer source when none is given: the cell's model, else the name the server reports."""
    from pathlib import Path

    if Path(model).expanduser().is_dir() or not served:
        return model
    if Path(served).expanduser().is_dir():
        return served
    return model
