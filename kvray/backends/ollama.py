"""Ollama over its native API: streamed ``/api/generate`` with Ollama's own timings beside the client's.

Each request is sent at its arrival offset (``raw`` mode, so no chat template changes the prompt) and its
NDJSON stream read line by line: a line with ``response`` text is one chunk, stamped when it arrives; the
final ``done`` line carries Ollama's counts and durations (nanoseconds), kept per request in
``extra["ollama_requests"]``:
  prompt_eval_count / prompt_eval_duration   prompt tokens evaluated and how long that took
  eval_count / eval_duration                 output tokens and how long decoding took
  load_duration, total_duration              model load (if it was not loaded) and the whole request
Output tokens are ``eval_count`` (never the number of chunks); chunks are reconciled to it as in the
openai backend. The trace's ``start_s`` is when Ollama began evaluating the prompt — the stream's end minus
``prompt_eval_duration + eval_duration`` — so a model load or a wait for one of Ollama's
``OLLAMA_NUM_PARALLEL`` slots (both inside ``total_duration``) shows as queue_s; ``prompt_toks`` is
``prompt_eval_count`` (a prompt prefix Ollama still had cached is not re-evaluated and not counted).

Ollama cannot be told to ignore EOS, so a request may stop early: such traces stay "ok" with their real
token count (option ``allow_short_output``, default True here). ``num_ctx`` — the context, hence the KV
cache, Ollama allocates per sequence — is sent as an option when given and reported as
``extra["kv_context_tokens"]``; ``/api/ps`` after the run gives the loaded model's size and VRAM share.

Prompts are exactly ``prompt_toks`` tokens when option ``tokenizer`` names the model's Hugging Face
tokenizer; otherwise they are ``prompt_toks`` random words and the count Ollama reports is recorded.

Cell options: host (required, e.g. http://127.0.0.1:11434), served_model (default: the cell's model),
num_ctx, tokenizer, timeout_s (300), allow_short_output (True), keep_alive.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvray.backends.arrivals import ArrivalSchedule, serve_on_schedule
from kvray.backends.base import BackendBase, BackendRun
from kvray.backends.http.prompts import PromptBuilder, load_tokenizer, request_seed
from kvray.backends.http.session import ClientSession
from kvray.backends.http.settings import check_reachable, root_url
from kvray.backends.http.stream import (
    Chunk,
    StreamError,
    error_trace,
    json_object,
    stream_failure,
    timed_lines,
    token_times,
)
from kvray.errors import KvrayInputError
from kvray.measure.trace import RunTrace
from kvray.spec import Cell, RequestSpec

_NS = 1e-9
_WORDS = ("time", "river", "stone", "light", "garden", "window", "number", "city", "paper", "music", "forest",
          "engine", "silver", "market", "winter", "bridge", "letter", "planet", "signal", "orange")  # fmt: skip


@dataclass
class OllamaSettings:
    host: str
    served_model: str | None = None
    num_ctx: int | None = None
    tokenizer: str | None = None
    timeout_s: float = 300.0
    allow_short_output: bool = True
    keep_alive: str | None = None

    @classmethod
    def from_cell(cls, cell: Cell) -> OllamaSettings:
        return cls.from_options(cell.option_dict)

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> OllamaSettings:
        """Settings from cell options, checked (their form only: nothing is contacted)."""
        if not opts.get("host"):
            raise KvrayInputError(
                "the ollama backend needs --host: it needs a server address (option host in a job file)"
            )
        settings = cls(**{k: v for k, v in opts.items() if k in cls.__dataclass_fields__})
        root_url(settings.host)
        if settings.num_ctx is not None and int(settings.num_ctx) < 1:
            raise KvrayInputError(f"ollama: num_ctx must be >= 1, got {settings.num_ctx}")
        if float(settings.timeout_s) <= 0:
            raise KvrayInputError("ollama: timeout_s must be positive")
        return settings

    @property
    def root(self) -> str:
        return root_url(self.host)


class OllamaBackend(BackendBase):
    """Benchmarks a running Ollama server through ``/api/generate``."""

    name = "ollama"
    oom_precheck = False  # holds no model here
    needs_model_geometry = False  # Ollama serves its own model names ("llama3.2:1b")
    device = "cpu"
    # TTFT, TPOT and E2E are all on the client's clock (send → chunk arrivals); only the split of TTFT into
    # queue_s is placed with Ollama's own durations (start_s), so no latency mixes the two clocks.
    ttft_basis = "client-http"

    def __init__(self) -> None:
        self.settings: OllamaSettings | None = None
        self.prompts: PromptBuilder | None = None
        self._tokenizer_name: str | None = None
        self.session = ClientSession("kvray-ollama")

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> None:
        OllamaSettings.from_options(options)

    @classmethod
    def check_cell(cls, cell: Cell) -> Cell:
        """The options, and the server reachable (an unreachable one is one line, not an error row)."""
        check_reachable(OllamaSettings.from_cell(cell).root)
        return cell

    def load(self, cell: Cell) -> None:
        self.settings = OllamaSettings.from_cell(cell)
        if self.settings.tokenizer and self.settings.tokenizer != self._tokenizer_name:
            self.prompts = PromptBuilder(load_tokenizer(self.settings.tokenizer))
            self._tokenizer_name = self.settings.tokenizer
        elif not self.settings.tokenizer:
            self.prompts, self._tokenizer_name = None, None

    def _prompt(self, n_tokens: int, seed: int) -> str:
        if self.prompts is not None:
            return self.prompts.make(n_tokens, seed)
        rng = random.Random(seed)
        return " ".join(rng.choice(_WORDS) + str(rng.randrange(100)) for _ in range(n_tokens))

    def run(self, cell: Cell, requests: Sequence[RequestSpec], repeat: int) -> BackendRun:
        self.load(cell)
        return self.session.run(self._run(cell, requests, repeat))

    async def _run(self, cell: Cell, requests: Sequence[RequestSpec], repeat: int) -> BackendRun:
        assert self.settings is not None
        prompts = {r.id: self._prompt(r.prompt_toks, request_seed(cell, repeat, r.id)) for r in requests}
        model = self.settings.served_model or cell.model
        client = await self.session.client(
            (cell.cell_id, self.settings.root), len(requests) + 2, self.settings.timeout_s
        )
        await self.session.warm(client, f"{self.settings.root}/api/version", len(requests))  # untimed
        t0 = time.perf_counter()
        results = await serve_on_schedule(
            ArrivalSchedule.for_cell(cell, requests),
            requests,
            t0,
            lambda r, sent_s: self._request(
                client, model, r, prompts[r.id], t0, repeat, request_seed(cell, repeat, r.id) % 2**31, sent_s
            ),
            trace_of=lambda result: result[0],
        )
        ps = await self._ps(client, model)
        extra: dict[str, Any] = {
            "served_model": model,
            "ollama_requests": [timing for _, timing in results if timing],
        }
        if self.settings.num_ctx is not None:
            extra["kv_context_tokens"] = int(self.settings.num_ctx)
        elif ps.get("context_length"):
            extra["kv_context_tokens"] = int(ps["context_length"])
        memory: dict[str, int | float | None] = {}
        if ps:
            extra["ollama_ps"] = ps
            memory["server_model_bytes"] = ps.get("size")
            memory["server_vram_bytes"] = ps.get("size_vram")
        return BackendRun(traces=[trace for trace, _ in results], memory=memory, extra=extra, t0_s=t0)

    async def _ps(self, client: Any, model: str) -> dict[str, Any]:
        """The running-model entry of ``/api/ps`` for ``model`` ({} when absent or unreachable)."""
        assert self.settings is not None
        try:
            response = await client.get(f"{self.settings.root}/api/ps", timeout=10.0)
            for entry in response.json().get("models", []):
                if entry.get("name") == model or entry.get("model") == model:
                    keys = ("name", "size", "size_vram", "context_length", "expires_at", "details")
                    return {k: entry[k] for k in keys if k in entry}
        except Exception:
            pass
        return {}

    async def _request(
        self, client: Any, model: str, r: RequestSpec, prompt: str, t0: float, repeat: int, seed: int, sent_s: float
    ) -> tuple[RunTrace, dict[str, Any] | None]:
        assert self.settings is not None
        settings = self.settings
        chunks: list[Chunk] = []
        final: dict[str, Any] = {}
        options: dict[str, Any] = {"num_predict": r.gen_toks, "temperature": r.temperature, "seed": seed}
        if settings.num_ctx is not None:
            options["num_ctx"] = int(settings.num_ctx)
        body: dict[str, Any] = {"model": model, "prompt": prompt, "stream": True, "raw": True, "options": options}
        if settings.keep_alive is not None:
            body["keep_alive"] = settings.keep_alive

        async def stream() -> None:
            url = f"{settings.root}/api/generate"
            async with contextlib.aclosing(timed_lines(client, url, body, t0, _error_detail)) as lines:
                async for t, line in lines:
                    if not line:
                        continue
                    event = json_object(line, "line")
                    if event.get("error"):
                        raise StreamError(f"server error in stream: {str(event['error'])[:200]}")
                    text = event.get("response") or ""
                    if text:
                        chunks.append(Chunk(t, str(text), None))
                    if event.get("done"):
                        final.update(event)
                        final["_t"] = t
                        return

        def failed(reason: str) -> tuple[RunTrace, None]:
            return error_trace(r, repeat, sent_s, chunks, t0, reason), None

        failure = await stream_failure(stream(), settings.timeout_s)
        if failure is not None:
            return failed(failure)
        if not final:
            return failed("malformed stream: it ended without a done line")
        n_out = final.get("eval_count")
        if not isinstance(n_out, int):
            return failed("malformed stream: the done line has no eval_count")
        end_s = float(final["_t"])
        counts = [1] * len(chunks)  # Ollama streams one token per line; eval_count reconciles the rest
        times = token_times(chunks, counts, n_out, end_s)
        # Ollama began evaluating the prompt prompt_eval + eval before the end; before that it was loading the
        # model or waiting for a parallel slot (both inside total_duration).
        busy_s = sum(float(final.get(k) or 0) for k in ("prompt_eval_duration", "eval_duration")) * _NS
        start_s = min(max(sent_s, end_s - busy_s), times[0] if times else end_s)
        prompt_toks = final.get("prompt_eval_count")
        trace = RunTrace(
            r.id,
            repeat,
            r.arrival_s,
            start_s,
            times,
            times[-1] if times else end_s,
            int(prompt_toks) if isinstance(prompt_toks, int) else r.prompt_toks,
            n_out,
        )
        if n_out != r.gen_toks and not (settings.allow_short_output and 0 < n_out < r.gen_toks):
            trace.status = "error"
            trace.error = f"ollama returned {n_out} of {r.gen_toks} tokens (done_reason {final.get('done_reason')!r})"
        timing = {
            "request_id": r.id,
            "repeat": repeat,
            "done_reason": final.get("done_reason"),
            "prompt_eval_count": final.get("prompt_eval_count"),
            "eval_count": n_out,
            **{
                f"{k}_s": float(final[k]) * _NS
                for k in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
                if isinstance(final.get(k), int | float)
            },
            "client_ttft_s": (times[0] - r.arrival_s) if times else None,
            "client_e2e_s": end_s - r.arrival_s,
        }
        return trace, timing

    def device_info(self) -> dict[str, Any]:
        return {"name": "remote", "server": self.settings.root if self.settings else None}

    def memory_tracker(self) -> Any:
        """Nothing: Ollama's memory is its own process's; what it publishes (/api/ps) is in the row."""
        return None

    def memory_scope(self) -> str:
        return "remote server — not measured (model size and VRAM share from its /api/ps)"

    def close(self) -> None:
        self.settings = None
        self.session.close()


def _error_detail(text: str) -> str:
    """Ollama's error bodies are JSON ``{"error": "..."}``; anything else is kept as sent."""
    text = text.strip()
    with contextlib.suppress(json.JSONDecodeError, AttributeError):
        text = str(json.loads(text).get("error", text))
    return text
