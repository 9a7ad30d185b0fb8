"""The openai backend: any OpenAI-compatible server over HTTP, streamed ``/v1/completions`` or ``/v1/chat/completions``.

Every request of the workload is sent at its arrival offset and stays in flight until its stream ends, so
the cell's concurrency is the number of requests in flight (asyncio + httpx, one connection each).
The package docstring (kvray/backends/http/__init__.py) gives token accounting, flavors and options.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvray.backends.arrivals import ArrivalSchedule, serve_on_schedule
from kvray.backends.base import BackendBase, BackendRun
from kvray.backends.http.prompts import PromptBuilder, load_tokenizer, request_salt, request_seed, workload_prompts
from kvray.backends.http.session import ClientSession
from kvray.backends.http.settings import HTTPSettings, check_reachable
from kvray.backends.http.stream import (
    Chunk,
    chunk_content,
    error_trace,
    parse_event,
    stream_failure,
    timed_lines,
    token_times,
)
from kvray.measure.trace import RunTrace
from kvray.model.kvmath import cached_positions, kv_bytes_batch, kv_bytes_per_token
from kvray.model.parallel import shard_geometry
from kvray.model.resolve import resolve_geometry
from kvray.servers.prometheus import MetricsPoller, cache_config, cache_dtype, counter_deltas, peak, used_kv_bytes
from kvray.spec import Cell, RequestSpec

_FLAVOR_FIELDS: dict[str, Callable[[int], dict[str, Any]]] = {
    "vllm": lambda gen: {"ignore_eos": True, "min_tokens": gen, "return_token_ids": True},
    "transformers": lambda gen: {"generation_config": json.dumps({"eos_token_id": -1})},
    "openai": lambda gen: {},
}


OPEN_LOOP_WARM = 32  # connections an open loop opens before t0 (more open on demand)


class CountsTokens(Protocol):
    """What reads a stream needs of a tokenizer: how many tokens a piece of streamed text stands for."""

    def count_text_tokens(self, text: str) -> int: ...


@dataclass
class Prepared:
    """One run's requests, ready before its clock starts: prompts built, connections open, flavor known."""

    cell: Cell
    requests: list[RequestSpec]
    repeat: int
    client: Any  # the cell's httpx.AsyncClient, on the backend's session loop
    prompts: dict[int, str]


class OpenAIBackend(BackendBase):
    """Benchmarks a running OpenAI-compatible server; holds no model, so there is nothing to OOM-check here."""

    name = "openai"
    oom_precheck = False
    needs_model_geometry = False  # the server may serve a model kvray cannot resolve
    device = "cpu"  # the client's process; the server's memory comes from its own metrics
    ttft_basis = "client-http"  # first chunk's arrival at the client: HTTP, tokenisation and queueing included
    multi_client = True  # a cell's requests can be sent from K Ray actors (clients.py)

    def __init__(self) -> None:
        self.settings: HTTPSettings | None = None
        self.prompts: PromptBuilder | None = None
        self.counter: CountsTokens | None = None  # counts a chunk's text tokens: ``prompts``, or a client actor's
        self.flavor: str | None = None
        self.model_name: str | None = None
        self._tokenizer_name: str | None = None
        self.server_cache: dict[str, Any] = {}
        self.session = ClientSession("kvray-openai")
        self.client_pool: Any = None  # clients.ClientPool: the actors of the last cell with clients > 1
        self.clocks_cell: str | None = None
        self.clocks: list[dict[str, Any]] = []  # that cell's client clock records, one per measured run

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> None:
        HTTPSettings.from_options(options, cls.name, environment=False)

    @classmethod
    def check_cell(cls, cell: Cell) -> Cell:
        """The options, the API key's variable set in this process's environment, and the server reachable."""
        check_reachable(HTTPSettings.from_cell(cell).root)
        return cell

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
        self.counter = self.prompts

    def configure_sender(self, settings: HTTPSettings, counter: CountsTokens) -> None:
        """Point a backend that only sends prompts built elsewhere (a client actor, clients.py) at a server: the
        model name and a concrete flavor come in ``settings``, ``counter`` counts streamed text's tokens, and no
        tokenizer is loaded here."""
        settings.check()
        if not settings.served_model or settings.server_flavor == "auto":
            raise ValueError("a sender needs the served model's name and a known server flavor")
        self.settings, self.model_name, self.flavor = settings, settings.served_model, settings.server_flavor
        self.prompts, self.counter = None, counter

    @property
    def tokenizer_name(self) -> str | None:
        """The tokenizer the prompts are built with (a directory or hub id), once configured."""
        return self._tokenizer_name

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
        if cell.clients > 1:  # the client side spread over Ray actors (clients.py)
            from kvray.backends.http.clients import run_spread

            return run_spread(self, cell, requests, repeat)
        return self.session.run(self.run_async(cell, requests, repeat))

    async def run_async(self, cell: Cell, requests: Sequence[RequestSpec], repeat: int) -> BackendRun:
        assert self.settings is not None
        ready = await self.prepare_async(cell, requests, repeat)
        poller, before = await self.metrics_before(ready.client, repeat)
        poller.t0 = t0 = time.perf_counter()
        if self.settings.metrics_interval_s > 0 and before is not None:
            poller.start()
        traces = await self.send_async(ready, t0)
        return await self.finish_async(cell, traces, poller, before, repeat, t0)

    async def prepare_async(
        self, cell: Cell, requests: Sequence[RequestSpec], repeat: int, prompts: Mapping[int, str] | None = None
    ) -> Prepared:
        """Everything before t0, untimed: the prompts (built here unless given), the cell's client with its
        connections open, the server's flavor probed."""
        assert self.settings is not None
        settings = self.settings
        if prompts is None:
            assert self.prompts is not None
            prompts = workload_prompts(self.prompts, cell, requests, repeat)  # shared prefixes token-exact
        headers = settings.headers()
        connections = len(requests) + 1  # the pool's ceiling: every request in flight, one for /metrics
        # opened before t0: what can be in flight at once — a burst's size, a closed loop's users (of these
        # requests: a client actor's share holds some of them); an open loop opens up to OPEN_LOOP_WARM and grows
        # on demand (httpcore scans every open connection per request: warming one per request made a
        # 400-request loop spend 70 s of CPU in the pool at 100 req/s)
        kind = cell.workload.load_kind
        warm = sum(r.after is None for r in requests) if kind == "closed" else OPEN_LOOP_WARM
        warm = len(requests) if kind == "burst" else warm
        key = (cell.cell_id, settings.root, tuple(sorted(headers.items())))
        client = await self.session.client(key, connections + 3, settings.timeout_s, headers)
        await self.session.warm(client, f"{settings.root}/v1/models", min(warm, len(requests)) + 1)  # untimed
        await self.probe_flavor(cell, client)
        return Prepared(cell, list(requests), repeat, client, dict(prompts))

    async def probe_flavor(self, cell: Cell, client: Any) -> None:
        """Learn the server's flavor once (it stays None while the server cannot be reached)."""
        if self.flavor is None:
            assert self.prompts is not None
            self.flavor = await self._probe_flavor(client, self.prompts.make(2, request_seed(cell, -(10**6), 0)))

    async def metrics_before(self, client: Any, repeat: int) -> tuple[MetricsPoller, Any]:
        """The run's /metrics poller and the counters before it (None: no /metrics here, or none now)."""
        assert self.settings is not None
        settings = self.settings
        poller = MetricsPoller(
            client, settings.metrics_url or f"{settings.root}/metrics", 0.0, settings.metrics_interval_s or 1.0, repeat
        )
        before = await poller.scrape()  # counters before the run (prefix-cache hits), outside the timed window
        if before is None:  # no /metrics here (or none now): no timeline for this run
            poller.available = False
        return poller, before

    async def send_async(self, ready: Prepared, t0: float) -> list[RunTrace]:
        """Send the prepared requests on their schedule, ``t0`` (a ``time.perf_counter`` value) being its zero."""
        cell, repeat, client = ready.cell, ready.repeat, ready.client
        schedule = ArrivalSchedule.for_cell(cell, ready.requests)
        traces = await serve_on_schedule(
            schedule,
            ready.requests,
            t0,
            lambda r, sent_s: self._request(client, cell, r, ready.prompts[r.id], t0, repeat, sent_s),
        )
        return list(traces)

    async def finish_async(
        self, cell: Cell, traces: list[RunTrace], poller: MetricsPoller, before: Any, repeat: int, t0: float
    ) -> BackendRun:
        """Stop the poller, read the server's cache config once, and wrap the traces as the run's result."""
        await poller.stop()
        if before is not None and not self.server_cache:
            self.server_cache = cache_config(poller.last_samples or before) or {
                "source": "metrics without vllm:cache_config_info"
            }
        run = self._backend_run(cell, traces, poller, counter_deltas(before, poller.last_samples), repeat)
        run.t0_s = t0  # the traces' and the /metrics points' origin, for the cell's telemetry
        return run

    def _backend_run(
        self, cell: Cell, traces: list[RunTrace], poller: MetricsPoller, counters: dict[str, int], repeat: int
    ) -> BackendRun:
        extra: dict[str, Any] = {"server_flavor": self.flavor, "served_model": self.model_name}
        memory: dict[str, int | float | None] = {}
        if repeat >= 0 and poller.points:  # warmups are not part of the cell's timeline
            extra["kv_timeline"] = list(poller.points)  # this repeat's; the runner joins a cell's repeats
        if self.server_cache.get("num_gpu_blocks"):
            extra["server_cache"] = dict(self.server_cache)
            reserved, source = reserved_kv_bytes(cell, self.server_cache)
            # Only samples that caught requests in the engine say how much KV the workload used.
            busy = [p for p in poller.points if (p.get("running") or 0) > 0]
            usage = peak(busy, "kv_usage")
            memory["kv_reserved_bytes"] = reserved
            memory["kv_usage_peak"] = usage
            extra["kv_reserved_source"] = source
            used = used_kv_bytes(self.server_cache.get("num_gpu_blocks"), reserved, usage)
            if used is not None:
                memory["kv_used_peak_bytes"] = used
            predicted = predicted_paged_bytes(cell, self.server_cache)
            if predicted is not None:
                memory["kv_predicted_bytes"] = predicted
        mismatched = [t for t in traces if t.chunk_toks is not None]
        counters = {**counters, "stream_token_mismatches": len(mismatched)}
        kv_measured = memory.get("kv_used_peak_bytes")
        return BackendRun(
            traces=traces,
            kv_measured_bytes=int(kv_measured) if kv_measured is not None else None,
            memory=memory,
            extra=extra,
            counters=counters,
        )

    def _body(self, prompt: str, r: RequestSpec, flavor: str, stream: bool = True, salt: str = "") -> dict[str, Any]:
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
        if flavor == "vllm" and salt:  # vLLM salts the first block's prefix-cache hash with it: no prompt, chat
            body["cache_salt"] = salt  # template included, can be served from another request's cached blocks
        body.update(self.settings.extra_body)
        return body

    async def _probe_flavor(self, client: Any, prompt: str) -> str | None:
        """The first flavor whose length-forcing fields the server accepts (None if it cannot be reached)."""
        assert self.settings is not None
        probe = RequestSpec(id=0, prompt_toks=2, gen_toks=1)  # its own 2-token prompt: nothing a request reuses
        for flavor in ("vllm", "transformers", "openai"):
            body = self._body(prompt, probe, flavor, stream=False, salt="kvray-flavor-probe")
            try:
                response = await client.post(self.settings.url, json=body)
            except Exception:
                return None  # unreachable now: every request will record why; probe again next run
            if response.status_code == 200:
                return flavor
            if response.status_code not in (400, 422):
                return "openai"
        return "openai"

    async def _request(
        self, client: Any, cell: Cell, r: RequestSpec, prompt: str, t0: float, repeat: int, start_s: float
    ) -> RunTrace:
        """One request, sent now (``start_s``, seconds since ``t0``): its stream read into a RunTrace."""
        assert self.settings is not None and self.counter is not None
        chunks: list[Chunk] = []
        state: dict[str, Any] = {"usage": None, "finish": None, "end_s": start_s}
        salt = request_salt(cell, repeat, r)  # shared within a prefix group, so its requests can hit
        failure = await stream_failure(
            self._stream(client, r, prompt, t0, chunks, state, salt), float(self.settings.timeout_s)
        )
        counts = [c.token_ids if c.token_ids is not None else self.counter.count_text_tokens(c.text) for c in chunks]
        counts = [max(k, 1) if c.text or c.token_ids else k for c, k in zip(chunks, counts, strict=True)]
        if failure is not None:
            return error_trace(r, repeat, start_s, chunks, t0, failure, counts)
        usage = state["usage"]
        if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
            return error_trace(
                r, repeat, start_s, chunks, t0, "malformed stream: it ended without usage.completion_tokens", counts
            )
        n_out = int(usage["completion_tokens"])
        times = token_times(chunks, counts, n_out, state["end_s"])
        prompt_toks = int(usage.get("prompt_tokens") or r.prompt_toks)
        # end_s is when the stream ended (its last line), whatever the token accounting did with the chunks
        trace = RunTrace(r.id, repeat, r.arrival_s, start_s, times, state["end_s"], prompt_toks, n_out)
        if sum(counts) != n_out:  # kept per request: the chunks' own count, beside usage's in output_toks
            trace.chunk_toks = sum(counts)
        details = usage.get("prompt_tokens_details")  # vLLM with --enable-prompt-tokens-details: prefix-cache hits
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            trace.cached_prompt_toks = int(details["cached_tokens"])
        if n_out != r.gen_toks and not (self.settings.allow_short_output and 0 < n_out < r.gen_toks):
            trace.status = "error"
            trace.error = (
                f"server returned {n_out} of {r.gen_toks} tokens (finish_reason {state['finish']!r}; flavor "
                f"{self.flavor!r} cannot force output lengths; set allow_short_output to accept)"
            )
        return trace

    async def _stream(
        self, client: Any, r: RequestSpec, prompt: str, t0: float, chunks: list[Chunk], state: dict[str, Any], salt: str
    ) -> None:
        assert self.settings is not None
        chat = self.settings.endpoint == "chat"
        body = self._body(prompt, r, self.flavor or "openai", salt=salt)
        async with contextlib.aclosing(timed_lines(client, self.settings.url, body, t0)) as lines:
            async for t, line in lines:
                event = parse_event(line)
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

    def memory_tracker(self) -> Any:
        """Nothing: the server's memory is in another process, maybe on another machine; kvray's own would
        only look like it (its KV figures come from the server's /metrics when published)."""
        return None

    def memory_scope(self) -> str:
        return "remote server — not measured (KV from its /metrics when published)"

    def device_info(self) -> dict[str, Any]:
        """The server's hardware is not visible over HTTP: name the server instead."""
        return {"name": "remote", "server": self.settings.root if self.settings else None}

    def close(self) -> None:
        self.settings = None
        pool, self.client_pool = self.client_pool, None
        if pool is not None:
            pool.close()
        self.session.close()


def predicted_paged_bytes(cell: Cell, cache: dict[str, Any]) -> int | None:
    """kvray's paged-layout prediction for the cell's workload with the server's block size and KV dtype."""
    block_size = cache.get("block_size")
    if not block_size:
        return None
    dtype = cache_dtype(cache.get("cache_dtype"), cell.kv_dtype or cell.dtype)
    try:
        g = shard_geometry(resolve_geometry(cell.model), cell.tensor_parallel)  # one rank's KV under TP
    except Exception:
        return None
    positions = [cached_positions(r.prompt_toks, r.gen_toks) for r in cell.workload.requests]
    return kv_bytes_batch(g, positions, dtype, "paged", int(block_size))


def reserved_kv_bytes(cell: Cell, cache: dict[str, Any]) -> tuple[int | None, str | None]:
    """(bytes of the server's KV pool, where the figure comes from).

    vLLM publishes ``kv_cache_memory_bytes`` only when it was given one (``--kv-cache-memory-bytes``; kvray's
    CPU path passes it). Otherwise — the usual GPU case, sized by ``gpu_memory_utilization`` — the pool is
    derived from what vLLM does publish: num_gpu_blocks × block_size × kvmath's bytes per token for the model
    and the reported KV dtype (paged layout). On the CPU build both routes exist and agree exactly.
    """
    if cache.get("kv_cache_memory_bytes"):
        return int(cache["kv_cache_memory_bytes"]), "vllm:cache_config_info kv_cache_memory_bytes"
    blocks, block = cache.get("num_gpu_blocks"), cache.get("block_size")
    if not blocks or not block:
        return None, None
    try:
        g = shard_geometry(resolve_geometry(cell.model), cell.tensor_parallel)  # a rank's pool under TP
    except Exception:
        return None, None
    per_token = kv_bytes_per_token(g, cache_dtype(cache.get("cache_dtype"), cell.kv_dtype or cell.dtype), "paged")
    return round(int(blocks) * int(block) * per_token), "num_gpu_blocks × block_size × kvmath bytes per token"


def _local_or(model: str, served: str | None) -> str:
    """The tokenizer source when none is given: the cell's model, else the name the server reports."""
    from pathlib import Path

    if Path(model).expanduser().is_dir() or not served:
        return model
    if Path(served).expanduser().is_dir():
        return served
    return model
