"""The HTTP streaming layer every served engine goes through — vLLM's and transformers' servers, Ollama, any
OpenAI-compatible server — and the ``openai`` backend built on it: streamed ``/v1/completions`` or
``/v1/chat/completions``.

Every request of the workload is sent at its arrival offset and stays in flight until its stream ends, so
the cell's concurrency is the number of requests in flight (asyncio + httpx, one connection each, on one
client per cell whose connections are opened before the clock starts: ``session``).

Token accounting follows the field notes: the number of output tokens is ``usage.completion_tokens``,
never the number of chunks. Each chunk is stamped when its line arrives; a chunk carries as many tokens
as its ``token_ids`` (vLLM with ``return_token_ids``) or, failing that, as its text re-tokenises to; the
chunk tokens are then reconciled with ``usage`` — an over-count spread over the stream in proportion (first
token on the first chunk, last on the last), missing ones (text a server held back) stamped at the end of the
stream; a disagreement is kept per request (``RunTrace.chunk_toks``). ``end_s`` is when the stream ended.
Tokens of one chunk share its timestamp and kvray/measure/metrics.py splits the gap. A trace's ``start_s`` is when the request was sent:
an HTTP client cannot see when the server admitted it, so server-side queueing shows in TTFT, not queue_s.

Prompts are exactly ``prompt_toks`` tokens with the model's tokenizer (BOS and chat template included),
random words seeded per cell, repeat and request, and with the vllm flavor a per-request ``cache_salt`` so that
not even a shared BOS or chat-template prefix can be served from vLLM's prefix cache (the row's
``prefix_cache_hits`` shows it); the server's ``usage.prompt_tokens`` is recorded as the trace's prompt length.

Exact output lengths need a server-specific field; ``server_flavor`` (default "auto": probed once) picks
  vllm          ``ignore_eos`` + ``min_tokens`` (+ ``return_token_ids`` for exact chunk sizes)
  transformers  ``generation_config: {"eos_token_id": -1}`` (``transformers serve`` rejects the vLLM fields)
  openai        nothing: a request that stops early is an error unless ``allow_short_output`` is set

While a cell runs, Prometheus ``/metrics`` is scraped (when the server has it) into a KV-usage timeline,
``BackendRun.extra["kv_timeline"]``, and vLLM's ``cache_config_info`` into ``extra["server_cache"]``; untimed
scrapes before and after each run give the prefix-cache counters' increase (``BackendRun.counters``).

Cell options: base_url (required), api_key_env (name of the environment variable holding the key; the key
itself is never stored), endpoint ("completions" | "chat"), served_model, tokenizer, server_flavor,
timeout_s (per request, 300), metrics_url, metrics_interval_s (0.5; 0 = no timeline), allow_short_output (False),
extra_body (a JSON object merged into every request, e.g. '{"top_k": 1}'), client_placement ("local" | "spread": where
a cell with clients > 1 puts its client actors).
Failures — refused connection, timeout, HTTP error status, malformed stream — become per-request traces
with ``status="error"`` and the reason, never an exception.

Modules: ``settings`` (HTTPSettings from cell options), ``session`` (one client per cell on a loop of its
own, shared with ollama), ``prompts`` (exact-length prompts, shared with
ollama), ``stream`` (timed lines, SSE events, token times, failure reasons; shared with ollama),
``backend`` (OpenAIBackend), ``clients`` (a cell's load sent from K Ray actors, ``Cell.clients``, merged on the
caller's clock). The names below are the package's public API.
"""

from kvray.backends.http.backend import OpenAIBackend, predicted_paged_bytes
from kvray.backends.http.prompts import PromptBuilder, load_tokenizer, request_seed
from kvray.backends.http.settings import ENDPOINTS, FLAVORS, HTTPSettings, root_url
from kvray.backends.http.stream import Chunk, StreamError, chunk_content, parse_event, token_times

__all__ = [
    "ENDPOINTS",
    "FLAVORS",
    "Chunk",
    "HTTPSettings",
    "OpenAIBackend",
    "PromptBuilder",
    "StreamError",
    "chunk_content",
    "load_tokenizer",
    "parse_event",
    "predicted_paged_bytes",
    "request_seed",
    "root_url",
    "token_times",
]
