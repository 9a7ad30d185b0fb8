"""One HTTP client per cell, on an event loop of its own, with its connections opened before the clock starts.

A new ``httpx.AsyncClient`` per repeat would open a fresh TCP connection (and for https a TLS handshake)
inside every request's TTFT. An async client is bound to the event loop it first ran on, so the session
keeps one loop running on a daemon thread for the backend's lifetime and one client per cell on it:
warmup and measured repeats of a cell share the client, and before each run ``warm`` opens as many
connections as the run will use, with requests that are not timed (the server may close idle ones
between runs — vLLM's uvicorn after 5 s — so warming is per run, and cheap when they are still open).
Shared by the openai and ollama backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

KEEPALIVE_S = 60.0  # the client keeps idle connections this long (the server may close them sooner)
WARM_TIMEOUT_S = 10.0


class ClientSession:
    """``session.run(coro)`` runs on the session's loop; ``await session.client(key, …)`` inside it gives the
    cell's client, a new one only when ``key`` (cell, server, headers) changes."""

    def __init__(self, name: str = "kvray-http") -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._key: tuple[Any, ...] | None = None
        self.clients_opened = 0  # how many clients this session created (one per cell)

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name=self.name, daemon=True)
            thread.start()
            self._loop, self._thread, self._client, self._key = loop, thread, None, None
        return self._loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the session's loop and wait for it (from any thread, an async Ray actor's included)."""
        return asyncio.run_coroutine_threadsafe(coro, self._ensure_loop()).result()

    async def client(
        self, key: tuple[Any, ...], connections: int, timeout_s: float, headers: Mapping[str, str] | None = None
    ) -> Any:
        """The client for ``key`` (call on the session's loop); the previous cell's client is closed."""
        import httpx

        if key == self._key and self._client is not None:
            return self._client
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
        limits = httpx.Limits(
            max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=KEEPALIVE_S
        )
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0))
        self._client = httpx.AsyncClient(limits=limits, timeout=timeout, headers=dict(headers or {}))
        self._key = key
        self.clients_opened += 1
        return self._client

    @staticmethod
    async def warm(client: Any, url: str, connections: int) -> None:
        """Open ``connections`` connections at once with untimed GETs of ``url`` (any answer will do; a server
        that cannot be reached is left for the timed requests to report)."""
        await asyncio.gather(
            *(client.get(url, timeout=WARM_TIMEOUT_S) for _ in range(connections)), return_exceptions=True
        )

    def close(self) -> None:
        """Close the client and stop the loop."""
        loop, thread, client = self._loop, self._thread, self._client
        self._loop, self._thread, self._client, self._key = None, None, None, None
        if loop is None:
            return
        if client is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        if not loop.is_running():
            loop.close()
