"""Where and how the openai backend sends requests: ``HTTPSettings``, built from a cell's options.

The options are checked in two steps. Their form (a URL that is http(s), a known endpoint and server
flavor, positive timeouts, ``extra_body`` a JSON object) is checked anywhere, the job loader included;
that the API key's environment variable is set is checked only where requests are sent from, since a job
planned on one machine runs on workers that may hold the key. The key itself is read from the
environment when headers are built and is never stored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvray.errors import KvrayInputError
from kvray.spec import Cell

ENDPOINTS = ("completions", "chat")
FLAVORS = ("auto", "vllm", "transformers", "openai")
CLIENT_PLACEMENTS = ("local", "spread")


def root_url(base_url: str) -> str:
    """``http://host:port`` from a base URL given with or without ``/v1``; a URL carrying credentials
    (``user:password@``) is refused without echoing it, since cell options reach datasets and manifests."""
    url = base_url.strip().rstrip("/")
    if "@" in url.split("://", 1)[-1].split("/", 1)[0]:
        raise KvrayInputError(
            "a server URL must not carry credentials (user:password@host): kvray would write them into the "
            "dataset; put the key in an environment variable and pass --api-key-env VAR"
        )
    if not url.startswith(("http://", "https://")):
        raise KvrayInputError(f"base URL must start with http:// or https://, got {base_url!r}")
    return url.removesuffix("/v1")


def check_reachable(base_url: str, timeout_s: float = 3.0) -> None:
    """A TCP connection to the server within ``timeout_s``, tried before anything loads (``kvray bench``):
    an unreachable server is one line at once, not a minute of client retries."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(root_url(base_url))
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise KvrayInputError(f"cannot reach the server at {root_url(base_url)} ({reason}): is it running?") from None


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
    # /metrics is answered on the server's own event loop (vLLM), so scraping costs the server a little: every
    # 0.5 s by default (benchmarks/scrape_overhead.py measures it), 0 turns the timeline off (one untimed scrape
    # before and after each run still reads the cache config and the prefix-cache counters)
    metrics_interval_s: float = 0.5
    allow_short_output: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)
    # where a cell with clients > 1 puts its client actors: "local" (this process's node) or "spread" (Ray's SPREAD
    # over the cluster's nodes: the server's URL, the tokenizer and the API key's variable must work on each)
    client_placement: str = "local"

    @classmethod
    def from_cell(cls, cell: Cell) -> HTTPSettings:
        """Settings from the cell's options, the API key's variable included (where requests are sent)."""
        return cls.from_options(cell.option_dict, cell.backend)

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any], backend: str = "openai", environment: bool = True
    ) -> HTTPSettings:
        """Settings from cell options; ``environment`` also checks that the API key's variable is set."""
        base_url = options.get("base_url")
        if not base_url:
            raise KvrayInputError(
                f"the {backend} backend needs --base-url: it needs a server URL (option base_url in a job file)"
            )
        known = set(cls.__dataclass_fields__) - {"extra_body"}
        settings = cls(**{k: v for k, v in options.items() if k in known})
        extra = options.get("extra_body")
        if extra is not None:  # a JSON object (text on the command line) merged into every request body
            try:
                body = json.loads(extra) if isinstance(extra, str) else extra
            except json.JSONDecodeError:
                body = None
            if not isinstance(body, dict):
                raise KvrayInputError(f"option extra_body must be a JSON object, got {extra!r}")
            settings.extra_body = body
        settings.check(environment)
        return settings

    def check(self, environment: bool = True) -> None:
        root_url(self.base_url)
        if self.endpoint not in ENDPOINTS:
            raise KvrayInputError(f"unknown endpoint {self.endpoint!r} (known: {', '.join(ENDPOINTS)})")
        if self.server_flavor not in FLAVORS:
            raise KvrayInputError(f"unknown server flavor {self.server_flavor!r} (known: {', '.join(FLAVORS)})")
        if self.client_placement not in CLIENT_PLACEMENTS:
            raise KvrayInputError(
                f"unknown client_placement {self.client_placement!r} (known: {', '.join(CLIENT_PLACEMENTS)})"
            )
        if float(self.timeout_s) <= 0 or float(self.metrics_interval_s) < 0:
            raise KvrayInputError("timeout_s must be positive and metrics_interval_s >= 0 (0: no timeline)")
        if environment and self.api_key_env and self.api_key_env not in os.environ:
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
