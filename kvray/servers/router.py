"""A small HTTP router in front of N server replicas (data-parallel serving): ``round_robin``, ``least_loaded``,
``prefix_affinity`` — where a KV cache is won or lost by routing.

With round-robin each replica sees every prefix, so each replica computes each shared prefix once; with prefix
affinity (a hash of the prompt's first ``prefix_chars`` characters) a prefix lives on one replica and is computed
once in all. ``least_loaded`` sends to the replica with the fewest requests in flight (ties rotate, so a
one-at-a-time load alternates as round-robin does). kvray/capacity/routing.py predicts each policy's hit rate
from the workload; ``kvray route`` (kvray/capacity/replicas.py) checks it on N vLLM replicas.

The router is a threaded ``http.server`` in this process on a free port: a POST's body is read, its prompt (or its
chat messages' text) picked for the policy, and the request forwarded unchanged to the chosen replica; the
answer streams back as it arrives (SSE chunks are flushed one by one, so a client's TTFT still sees the first
token), the connection closed at its end (HTTP/1.0 framing). GETs go to replica 0 (``/health``, ``/v1/models``),
except ``/metrics``: 404, since one replica's counters are not the deployment's — scrape each replica.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import itertools
import json
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from kvray.errors import KvrayInputError

POLICIES = ("round_robin", "least_loaded", "prefix_affinity")
DEFAULT_PREFIX_CHARS = 200  # keep it under the shared prefix's length in characters, or affinity sees suffixes
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade"}


class Policy:
    """Chooses a replica for a request: ``pick(key)`` (``key``: the prompt's leading text), ``done(i)`` after."""

    def __init__(self, name: str, replicas: int, prefix_chars: int = DEFAULT_PREFIX_CHARS):
        if name not in POLICIES:
            raise KvrayInputError(f"unknown routing policy {name!r} (known: {', '.join(POLICIES)})")
        if replicas < 1:
            raise KvrayInputError(f"a router needs at least one replica, got {replicas}")
        self.name, self.replicas, self.prefix_chars = name, replicas, prefix_chars
        self.in_flight = [0] * replicas
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def pick(self, key: str) -> int:
        with self._lock:
            if self.name == "prefix_affinity":
                digest = hashlib.sha256(key[: self.prefix_chars].encode()).digest()
                i = int.from_bytes(digest[:8], "big") % self.replicas
            elif self.name == "round_robin":
                i = next(self._turn) % self.replicas
            else:  # least_loaded: fewest in flight, ties taken in turn
                start = next(self._turn) % self.replicas
                order = [(start + k) % self.replicas for k in range(self.replicas)]
                i = min(order, key=lambda j: self.in_flight[j])
            self.in_flight[i] += 1
            return i

    def done(self, i: int) -> None:
        with self._lock:
            self.in_flight[i] -= 1


def prompt_text(body: bytes) -> str:
    """The text a request's prefix lives in: ``prompt`` (completions) or its messages' contents (chat)."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    prompt = data.get("prompt")
    if isinstance(prompt, list):
        prompt = " ".join(map(str, prompt))
    if isinstance(prompt, str):
        return prompt
    messages = data.get("messages") or []
    return "".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))


class Router:
    """``Router(["http://127.0.0.1:8001", …], "prefix_affinity").start()``; ``url``; ``counts`` per replica."""

    def __init__(
        self, upstreams: Sequence[str], policy: str, prefix_chars: int = DEFAULT_PREFIX_CHARS, timeout_s: float = 600.0
    ):
        self.upstreams = [urlsplit(u.rstrip("/")) for u in upstreams]
        self.policy = Policy(policy, len(self.upstreams), prefix_chars)
        self.timeout_s = timeout_s
        self.counts = [0] * len(self.upstreams)  # requests forwarded to each replica
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the router first"
        host, port = self._server.server_address[:2]
        return f"http://{host.decode() if isinstance(host, bytes) else host}:{port}"

    def start(self) -> Router:
        router = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet: the replicas log
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    self.send_error(404, "the router has no metrics of its own: scrape each replica")
                    return
                router._forward(self, 0, b"")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                i = router.policy.pick(prompt_text(body))
                try:
                    router._forward(self, i, body)
                finally:
                    router.policy.done(i)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="kvray-router", daemon=True)
        self._thread.start()
        return self

    def _forward(self, handler: BaseHTTPRequestHandler, i: int, body: bytes) -> None:
        up = self.upstreams[i]
        self.counts[i] += 1 if handler.command == "POST" else 0
        conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port or 80, timeout=self.timeout_s)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP | {"host"}}
            if body:
                headers["Content-Length"] = str(len(body))
            conn.request(handler.command, handler.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            handler.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP_BY_HOP:
                    handler.send_header(k, v)
            handler.send_header("Connection", "close")
            handler.end_headers()
            while chunk := resp.read1(65536):
                handler.wfile.write(chunk)
                handler.wfile.flush()
        except OSError as exc:
            with contextlib.suppress(OSError):
                handler.send_error(502, f"replica {i} ({up.geturl()}): {exc}")
        finally:
            conn.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Router:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
