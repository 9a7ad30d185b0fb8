"""N vLLM replicas behind kvray's router (kvray/servers/router.py), one load sent through it per routing policy:
what the router forwarded to each replica, what each replica's prefix cache counted, what the client measured.

The replicas are vLLM servers started here, each bound to its own share of this process's CPUs (vLLM's CPU build:
``VLLM_CPU_OMP_THREADS_BIND``), all serving the same model directory, and kept up across the policies. Each policy
gets a router of its own in front of them and sends the load as its own repeat, so its prompts and cache salts are
its own (kvray/backends/http/): every policy starts from cold caches even though the replicas stay warm.

Every number says where it comes from: ``forwarded_per_replica`` is the router's count; ``prefix_cache`` is the
growth of each replica's ``vllm:prefix_cache_hits`` / ``_queries`` counters (tokens, from that replica's /metrics)
over the policy's run; ``ttft_ms`` is each request's TTFT on the client's clock (request sent → first streamed
token). kvray/capacity/replicas.py sets these against each policy's predicted hit rate.
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvray.backends.http import OpenAIBackend
from kvray.backends.vllm import VLLMBackend, cpu_ids, rank_cpu_ids
from kvray.errors import KvrayInputError
from kvray.measure.metrics import request_metrics
from kvray.servers.prometheus import parse, prefix_cache_counts
from kvray.servers.router import DEFAULT_PREFIX_CHARS, Router
from kvray.spec import Cell, RequestSpec, Workload, make_options


def replica_cpu_binds(replicas: int) -> list[str]:
    """This process's CPUs split into ``replicas`` equal groups, one per replica ("0", "1" on two cores); one line
    and exit 2 when there are fewer CPUs than replicas (replicas sharing a core measure each other)."""
    if replicas < 1:
        raise KvrayInputError(f"replicas must be at least 1, got {replicas}")
    if replicas == 1:
        return [cpu_ids()]
    try:
        return rank_cpu_ids(replicas).split("|")
    except KvrayInputError:
        have = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        raise KvrayInputError(
            f"{replicas} vLLM replicas need at least {replicas} CPUs (one each), this process has {have}; "
            "to share them, bind each replica yourself (--cpu-binds)"
        ) from None


@dataclass(frozen=True)
class ReplicaSettings:
    """How each vLLM replica is started: the model, its dtype and weights, vLLM's knobs, each replica's CPUs."""

    model: str
    replicas: int = 2
    dtype: str = "fp32"
    weights: str = "random"
    block_size: int = 32  # vLLM CPU's blocks; the prediction must use the same
    vllm_python: str | None = None  # None: $KVRAY_VLLM_PYTHON, then this interpreter's vLLM, then PATH
    extra_args: str | None = "-O0"  # eager: no torch.compile warm-up at each start (15–30 s on 2 cores)
    cpu_binds: tuple[str, ...] = ()  # () → replica_cpu_binds(replicas)
    startup_timeout_s: float = 600.0

    def binds(self) -> list[str]:
        binds = list(self.cpu_binds) or replica_cpu_binds(self.replicas)
        if len(binds) != self.replicas:
            raise KvrayInputError(f"{len(binds)} CPU bindings given for {self.replicas} replicas")
        return binds

    def cell(self, cpu_bind: str) -> Cell:
        options = make_options(
            vllm_python=self.vllm_python,
            extra_args=self.extra_args,
            cpu_threads_bind=cpu_bind,
            block_size=self.block_size,
            startup_timeout_s=self.startup_timeout_s,
        )
        return Cell(
            model=self.model,
            workload=Workload.uniform(1, 8, 2),
            backend="vllm",
            dtype=self.dtype,
            weights=self.weights,
            device="cpu",
            options=options,
        )

    def check(self) -> None:
        """Everything checkable before a server starts: replicas, CPUs, block size, a vLLM to run."""
        from kvray.model.kvmath import normalize_dtype

        if self.block_size < 1:
            raise KvrayInputError(f"block size must be positive, got {self.block_size}")
        normalize_dtype(self.dtype, allow_fp8=False)
        for bind in self.binds():
            VLLMBackend.check_cell(self.cell(bind))  # the knobs, and a vLLM python that exists


@dataclass
class PolicyRun:
    """One policy's run through the router (module docstring says where each number comes from)."""

    policy: str
    requests_sent: int
    requests_ok: int
    forwarded_per_replica: list[int]  # the router's count of POSTs sent to each replica
    prefix_cache: list[dict[str, float]]  # per replica: growth of its /metrics prefix_cache_hits and _queries
    ttft_ms: dict[int, float] = field(default_factory=dict)  # request id → TTFT, client clock; ok requests only
    wall_s: float = 0.0  # the run's wall time, client clock

    @property
    def hits(self) -> float:
        return sum(c["prefix_cache_hits"] for c in self.prefix_cache)

    @property
    def queries(self) -> float:
        return sum(c["prefix_cache_queries"] for c in self.prefix_cache)


def scrape_prefix_cache(base_url: str) -> dict[str, float]:
    """A replica's cumulative prefix-cache counters (tokens) from its own /metrics; 0 where not exported yet."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as resp:
        got = prefix_cache_counts(parse(resp.read().decode()))
    return {k: float(v or 0) for k, v in got.items()}


class VLLMReplicas:
    """``with VLLMReplicas(settings) as r: r.run(policy, requests, repeat)``: the replicas up, then stopped."""

    def __init__(self, settings: ReplicaSettings, log: Callable[[str], None] | None = None):
        self.settings = settings
        self.log = log or (lambda _line: None)
        self.backends: list[VLLMBackend] = []
        self.startup_s: list[float] = []

    @property
    def urls(self) -> list[str]:
        return [b.server.base_url for b in self.backends]

    @property
    def model_dir(self) -> str:
        """What the replicas serve: the servable directory of a random-weight model, else the model id."""
        path = self.backends[0].model_path
        assert path is not None
        return path

    def __enter__(self) -> VLLMReplicas:
        try:
            for i, bind in enumerate(self.settings.binds()):
                backend = VLLMBackend()
                self.backends.append(backend)
                started = time.perf_counter()
                backend.load(self.settings.cell(bind))
                self.startup_s.append(time.perf_counter() - started)
                self.log(f"replica {i} on CPUs {bind}: {backend.server.base_url} up in {self.startup_s[-1]:.0f} s")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for backend in self.backends:
            backend.close()

    def run(
        self, policy: str, requests: Sequence[RequestSpec], repeat: int, prefix_chars: int = DEFAULT_PREFIX_CHARS
    ) -> PolicyRun:
        """``requests`` through a router of ``policy`` in front of the replicas, as repeat ``repeat``."""
        s = self.settings
        with Router(self.urls, policy, prefix_chars=prefix_chars) as router:
            options = make_options(
                base_url=router.url,
                tokenizer=self.model_dir if s.weights == "random" else s.model,
                served_model=s.model,
                server_flavor="vllm",
                metrics_interval_s=0,  # the router has no /metrics: each replica is scraped around the run
            )
            cell = Cell(
                model=s.model,
                workload=Workload("shared_prefix", tuple(requests)),
                backend="openai",
                dtype=s.dtype,
                weights=s.weights,
                device="cpu",
                options=options,
            )
            client = OpenAIBackend()
            client.load(cell)
            before = [scrape_prefix_cache(u) for u in self.urls]
            started = time.perf_counter()
            try:
                run = client.run(cell, requests, repeat)
            finally:
                client.close()
            wall_s = time.perf_counter() - started
            after = [scrape_prefix_cache(u) for u in self.urls]
            forwarded = list(router.counts)
        ok = [t for t in run.traces if t.status == "ok"]
        return PolicyRun(
            policy,
            len(requests),
            len(ok),
            forwarded,
            [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)],
            {t.request_id: request_metrics(t)["ttft_s"] * 1e3 for t in ok},
            wall_s,
        )
