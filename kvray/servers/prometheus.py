"""Prometheus ``/metrics`` of an inference server: parse the text format, read vLLM's KV figures.

vLLM exports its own view of the KV cache — usage fraction, running / waiting requests, preemptions and,
in ``vllm:cache_config_info``, the cache geometry it allocated — which is the ground truth a paged
engine's memory cannot be measured from outside. ``MetricsPoller`` samples it while a cell runs and
keeps a timeline; servers without ``/metrics`` (404) simply yield no timeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from kvray.errors import KvrayInputError
from kvray.model.kvmath import normalize_dtype

# vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc; the first name present wins.
KV_USAGE_NAMES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
PREEMPTIONS = ("vllm:num_preemptions_total", "vllm:num_preemptions")
CACHE_CONFIG = "vllm:cache_config_info"
# Prefix-cache counters, in prompt tokens (prometheus_client exposes a counter "x" as "x_total").
PREFIX_HITS = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits")
PREFIX_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries")

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    """Samples of a Prometheus text exposition (comments and malformed lines skipped)."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = {k: bytes(v, "utf-8").decode("unicode_escape") for k, v in _LABEL.findall(m.group(3) or "")}
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        samples.append(Sample(m.group(1), labels, value))
    return samples


def _total(samples: list[Sample], names: tuple[str, ...] | str) -> float | None:
    """Sum over label sets (engines) of the first of ``names`` that is present."""
    for name in (names,) if isinstance(names, str) else names:
        values = [s.value for s in samples if s.name == name]
        if values:
            return float(sum(values))
    return None


def kv_snapshot(samples: list[Sample]) -> dict[str, float | None]:
    """{kv_usage (0–1), running, waiting, preemptions} — None for what the server does not export."""
    usages = []
    for name in KV_USAGE_NAMES:
        usages = [s.value for s in samples if s.name == name]
        if usages:
            break
    return {
        "kv_usage": max(usages) if usages else None,
        "running": _total(samples, RUNNING),
        "waiting": _total(samples, WAITING),
        "preemptions": _total(samples, PREEMPTIONS),
    }


def prefix_cache_counts(samples: list[Sample]) -> dict[str, float | None]:
    """{prefix_cache_hits, prefix_cache_queries}: vLLM's cumulative counters (tokens), None when not exported."""
    return {"prefix_cache_hits": _total(samples, PREFIX_HITS), "prefix_cache_queries": _total(samples, PREFIX_QUERIES)}


# vLLM's token counters (cumulative since the server started), kept on the cell's timeline.
TOKENS = {"prompt_tokens": ("vllm:prompt_tokens_total", "vllm:prompt_tokens"),
          "generation_tokens": ("vllm:generation_tokens_total", "vllm:generation_tokens")}  # fmt: skip


def engine_counters(samples: list[Sample]) -> dict[str, float | None]:
    """The cumulative counters a timeline point carries besides kv_snapshot: prefix-cache hits/queries, tokens."""
    return {**prefix_cache_counts(samples), **{k: _total(samples, names) for k, names in TOKENS.items()}}


def counter_values(samples: list[Sample]) -> dict[str, float | None]:
    """The cumulative counters a cell reports as deltas: prefix-cache hits and queries (tokens), preemptions."""
    return {**prefix_cache_counts(samples), "preemptions": _total(samples, PREEMPTIONS)}


def counter_deltas(before: list[Sample] | None, after: list[Sample] | None) -> dict[str, int]:
    """How much each counter (``counter_values``) grew between two scrapes ({} when either scrape or counter is
    missing)."""
    if before is None or after is None:
        return {}
    b, a = counter_values(before), counter_values(after)
    return {k: int(round(a[k] - b[k])) for k in a if a[k] is not None and b[k] is not None}  # type: ignore[operator]


def _number(text: str | None) -> int | float | None:
    if text is None or text in ("None", ""):
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else value


def cache_config(samples: list[Sample]) -> dict[str, Any]:
    """vLLM's allocated KV cache from ``vllm:cache_config_info`` labels (empty dict when absent).

    Keys: block_size, num_gpu_blocks, kv_cache_memory_bytes, kv_cache_size_tokens, gpu_memory_utilization,
    cache_dtype, enable_prefix_caching — numbers parsed, the rest as vLLM wrote them.
    """
    info = next((s.labels for s in samples if s.name == CACHE_CONFIG), None)
    if info is None:
        return {}
    out: dict[str, Any] = {}
    for key in ("block_size", "num_gpu_blocks", "kv_cache_memory_bytes", "kv_cache_size_tokens"):
        value = _number(info.get(key))
        out[key] = int(value) if value is not None else None
    out["gpu_memory_utilization"] = _number(info.get("gpu_memory_utilization"))
    out["cache_dtype"] = info.get("cache_dtype")
    out["enable_prefix_caching"] = info.get("enable_prefix_caching")
    if out["kv_cache_size_tokens"] is None and out["num_gpu_blocks"] and out["block_size"]:
        out["kv_cache_size_tokens"] = out["num_gpu_blocks"] * out["block_size"]
    return out


def used_kv_bytes(blocks: int | None, reserved: int | None, usage: float | None) -> int | None:
    """KV bytes in use from vLLM's usage fraction of a pool of ``blocks`` blocks and ``reserved`` bytes: vLLM
    reserves one null block, so usage = used / (blocks − 1)."""
    if usage is None or not blocks or not reserved:
        return None
    used_blocks = round(usage * max(blocks - 1, 1))
    return int(used_blocks * (reserved // blocks))


def cache_dtype(server_dtype: str | None, model_dtype: str) -> str:
    """The KV dtype a server reports in ``cache_config_info`` ("auto" means the model's dtype)."""
    if not server_dtype or server_dtype == "auto":
        return normalize_dtype(model_dtype)
    try:
        return normalize_dtype(server_dtype)
    except KvrayInputError:
        return normalize_dtype(model_dtype)


SCRAPE_TIMEOUT_S = 10.0


class MetricsPoller:
    """Scrapes ``url`` every ``interval_s`` on the running event loop; ``points`` is the KV timeline.

    Each point: {t_s, sent_s, rtt_s, kv_usage, running, waiting, preemptions}, times on the caller's clock
    relative to ``t0``. ``t_s`` is when the answer arrived: the server reads its gauges while answering, and on a
    busy server the request waits on its event loop first, so the answer is the closer stamp; ``sent_s`` and
    ``rtt_s`` (answer − send) bound the moment the values describe.
    A server that answers the first scrape with an error status or refuses the connection has no metrics:
    polling stops. A scrape that merely times out (a busy server streaming tokens on a loaded machine) is
    skipped and polling goes on — giving up there would lose the whole cell's timeline.
    """

    def __init__(self, client: Any, url: str, t0: float, interval_s: float = 0.25, repeat: int = 0):
        self.client = client
        self.url = url
        self.t0 = t0
        self.interval_s = interval_s
        self.repeat = repeat
        self.points: list[dict[str, Any]] = []
        self.last_samples: list[Sample] | None = None  # the final scrape's, after the run (stop)
        self.available: bool | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def scrape(self) -> list[Sample] | None:
        samples, _ = await self._scrape()
        return samples

    async def _scrape(self) -> tuple[list[Sample] | None, bool]:
        """(samples or None, whether the failure says the server has no metrics at all)."""
        import httpx

        try:  # generous: on a loaded machine a late answer is still a sample of the run
            response = await self.client.get(self.url, timeout=max(self.interval_s * 4, SCRAPE_TIMEOUT_S))
        except httpx.TimeoutException:
            return None, False
        except Exception:
            return None, True
        if response.status_code != 200:
            return None, True
        return parse(response.text), False

    def _point(self, samples: list[Sample], sent_s: float) -> None:
        answered_s = time.perf_counter() - self.t0
        snap = kv_snapshot(samples)
        if any(v is not None for v in snap.values()):
            self.points.append(
                {
                    "repeat": self.repeat,
                    "t_s": round(answered_s, 6),
                    "sent_s": round(sent_s, 6),
                    "rtt_s": round(answered_s - sent_s, 6),
                    **snap,
                    **engine_counters(samples),
                }
            )

    async def _loop(self) -> None:
        while not self._stopping:
            sent_s = time.perf_counter() - self.t0
            samples, absent = await self._scrape()
            if samples is None:
                if self.available is None and absent:
                    self.available = False
                    return
            else:
                self.available = True
                self._point(samples, sent_s)
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Let a scrape in flight land (it was asked for during the run), one last scrape (the state right
        after the run), then stop."""
        self._stopping = True
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=SCRAPE_TIMEOUT_S)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.available is not False:
            sent_s = time.perf_counter() - self.t0
            samples = await self.scrape()
            if samples is not None:
                self.available = True
                self.last_samples = samples
                self._point(samples, sent_s)


def peak(points: list[dict[str, Any]], key: str) -> float | None:
    values = [p[key] for p in points if p.get(key) is not None and not math.isnan(p[key])]
    return max(values) if values else None
