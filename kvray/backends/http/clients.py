"""A cell's client side spread over K Ray actors (``clients: K``): each sends its share of the arrival schedule to
the same server through the same request code, and their traces merge into one run on the caller's clock.

One Python process tops out at a few hundred requests/s (docs/benchmarks.md, "Client capacity"), far below a large
deployment. With ``cell.clients = K > 1`` the openai backend (and vLLM through it) hands each run to ``run_spread``:

1. **Shares.** The requests are dealt to the K actors by whole chains (``split_chains``): an open loop round-robin
   over arrival order, a closed loop's users and a conversation's turns whole, so a chain's gate — its
   predecessor's end — is seen in the process that sends it.
2. **Prepared untimed.** The caller probes the server's flavor and builds every prompt (the very texts one client
   would send); each actor prepares its share before the clock starts: its own HTTP client, connections open.
   An actor reads streams with the caller's tokenizer core (``prompts.TokenCounter``, the ``tokenizers`` library)
   when that counts exactly as the tokenizer does, so it never imports transformers (~10 s on 2 cores); else it
   loads the tokenizer itself.
3. **Clocks.** Each actor's wall clock (``time.time``) is read ``CLOCK_PROBES`` times from the caller; the probe
   with the smallest round trip gives offset = actor − (send + receive) / 2, wrong by at most rtt / 2 whatever
   the two directions took (NTP's rule). Wall clocks, because ``perf_counter`` means nothing across machines.
4. **One start.** The caller picks one start instant on its own wall clock, a little ahead (``START_LEAD_S`` + two
   round trips); each actor gets that instant on its own clock (+ its offset) and takes the ``perf_counter``
   value that matches it as its t0 — also when the call arrived late, so a late actor shows as lag on its
   first requests, never as a schedule slid later.
5. **Merge.** An actor's traces are seconds since its t0, which is the caller's start instant put on the actor's
   clock with its offset: merged, every time is seconds since one instant on the caller's clock. Each trace
   records its ``client``. The caller scrapes ``/metrics`` over the whole window itself, as a single client does.

Each measured run adds a record to ``extra["client_clocks"]``: per actor its offset, rtt, how early its start
call arrived (``lead_s``; negative: late) and its request count; the row gets ``clients``, ``client_offset_s_max``,
``client_rtt_s_max`` and per-client lag p99 (kvray/measure/serving.py ``client_columns``).

Ray is whatever this process joined (a sweep worker; ``kvray bench --clients`` starts a local one): this module
never starts it and imports nothing of Ray until a pool is made. The actors reserve no CPU (``num_cpus=0``: they
mostly wait on sockets, and must fit beside the worker that owns them), sit on this node unless the cell's option
``client_placement=spread`` asks Ray to spread them, and live as long as the backend keeps the pool: across the
cell's warmup and repeats, and across cells against the same server with the same settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvray.backends.arrivals import split_chains
from kvray.backends.base import BackendRun
from kvray.backends.http.prompts import counter_json, workload_prompts
from kvray.backends.http.settings import HTTPSettings
from kvray.errors import KvrayInputError
from kvray.measure.trace import RunTrace
from kvray.spec import Cell, RequestSpec

CLOCK_PROBES = 7  # round trips per actor; the fastest one sets the offset
START_LEAD_S = 0.2  # the start instant is this far ahead of the clock probes (+ two round trips)
READY_TIMEOUT_S = 300.0  # an actor's start-up (imports, tokenizer); past it the cell fails saying so


@dataclass(frozen=True)
class ClientClock:
    """One actor's wall clock against the caller's."""

    offset_s: float  # actor − caller
    rtt_s: float  # round trip of the probe it came from: |error of offset_s| ≤ rtt_s / 2


@dataclass
class ShareResult:
    """What one actor sends back from a run."""

    traces: list[RunTrace]
    lead_s: float  # how long before the start instant the actor got its call (negative: it started late)


def joined_ray() -> Any:
    """Ray, as this process joined it; one clear error when it has not (nothing here starts a cluster)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        raise KvrayInputError(
            "clients > 1 sends the load from Ray actors, but this process has not joined Ray "
            "(kvray bench --clients starts a local one; from Python call ray.init() first)"
        )
    return ray


class LoadClient:
    """One client actor: a backend of the caller's class (an OpenAIBackend, passed in rather than imported, since
    backend.py imports this module) against the caller's server. Plain Python; ``ClientPool`` makes it a Ray actor."""

    def __init__(self, backend_class: type, settings: HTTPSettings, model: str, counter: str | None) -> None:
        self.backend = backend_class()
        if counter is not None:  # the caller's fast tokenizer core: enough to read streams, no transformers here
            from kvray.backends.http.prompts import TokenCounter

            self.backend.configure_sender(settings, TokenCounter(counter))
        else:  # a tokenizer without one: loaded here, as the caller did
            self.backend.configure(settings, model)
        self._ready: Any = None  # the backend's Prepared share, between prepare and serve

    def clock(self) -> float:
        return time.time()

    def prepare(self, cell: Cell, requests: list[RequestSpec], prompts: dict[int, str], repeat: int) -> int:
        """Open this share's connections, untimed; returns how many requests it holds."""
        self._ready = self.backend.session.run(self.backend.prepare_async(cell, requests, repeat, prompts))
        return len(requests)

    def serve(self, start_wall_s: float) -> ShareResult:
        """Send the prepared share with t0 at ``start_wall_s`` on this actor's wall clock."""
        ready, self._ready = self._ready, None
        if ready is None:
            raise RuntimeError("serve called before prepare")
        return self.backend.session.run(_serve_share(self.backend, ready, start_wall_s))

    def close(self) -> None:
        self.backend.close()


async def _serve_share(backend: Any, ready: Any, start_wall_s: float) -> ShareResult:
    lead = start_wall_s - time.time()
    t0 = time.perf_counter() + lead  # the start instant on this process's perf_counter, past or future
    if lead > 0:
        await asyncio.sleep(lead)
    traces = await backend.send_async(ready, t0)
    return ShareResult(traces, lead)


def _actor_error(exc: BaseException) -> Exception:
    """A Ray error as the one line of its cause (an actor's KvrayInputError, a refused tokenizer …)."""
    cause = getattr(exc, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else exc).strip().splitlines()
    return RuntimeError(f"client actor: {text[-1] if text else type(exc).__name__}")


class ClientPool:
    """K ``LoadClient`` actors against one server; ``key`` says which settings they were made for."""

    def __init__(
        self, backend_class: type, k: int, settings: HTTPSettings, model: str, counter: str | None, key: tuple[Any, ...]
    ) -> None:
        ray = joined_ray()
        self.ray = ray
        self.key = key
        if settings.client_placement == "spread":
            strategy: Any = "SPREAD"
        else:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            strategy = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        remote = ray.remote(LoadClient).options(num_cpus=0, scheduling_strategy=strategy)
        self.actors = [remote.remote(backend_class, settings, model, counter) for _ in range(k)]
        try:
            ray.get([a.clock.remote() for a in self.actors], timeout=READY_TIMEOUT_S)
        except Exception as exc:
            self.close()
            raise _actor_error(exc) from None

    def call(self, refs: list[Any]) -> list[Any]:
        try:
            return list(self.ray.get(refs))
        except Exception as exc:
            raise _actor_error(exc) from None

    def clocks(self) -> list[ClientClock]:
        """Each actor's offset from the fastest of ``CLOCK_PROBES`` round trips, measured one actor at a time."""
        out = []
        for actor in self.actors:
            best: ClientClock | None = None
            for _ in range(CLOCK_PROBES):
                sent = time.time()
                seen = float(self.ray.get(actor.clock.remote()))
                back = time.time()
                if best is None or back - sent < best.rtt_s:
                    best = ClientClock(seen - (sent + back) / 2, back - sent)
            assert best is not None
            out.append(best)
        return out

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor)
        self.actors = []


def pool_for(backend: Any, cell: Cell) -> ClientPool:
    """The backend's pool for this cell's server and client count, made (and the old one closed) when they change."""
    settings = backend.settings
    assert settings is not None and backend.model_name is not None and backend.prompts is not None
    tokenizer = backend.tokenizer_name or backend.model_name
    # a server that could not be reached has no flavor yet: its requests will fail, each saying why
    flavor = backend.flavor or "openai"
    key = (cell.clients, repr(settings), backend.model_name, tokenizer, flavor)
    pool = backend.client_pool
    if pool is not None and pool.key == key:
        return pool
    backend.client_pool = None
    if pool is not None:
        pool.close()
    actor_settings = dataclasses.replace(
        settings, served_model=backend.model_name, tokenizer=tokenizer, server_flavor=flavor
    )
    counter = counter_json(backend.prompts)
    backend.client_pool = ClientPool(type(backend), cell.clients, actor_settings, backend.model_name, counter, key)
    return backend.client_pool


def run_spread(backend: Any, cell: Cell, requests: Sequence[RequestSpec], repeat: int) -> BackendRun:
    """One run of ``cell`` sent from ``cell.clients`` actors (module docstring) for ``backend``, the caller's
    OpenAIBackend; a failure closes the pool, so the next run starts from fresh actors."""
    assert backend.prompts is not None and backend.settings is not None
    if backend.flavor is None:  # probed here, once, so the actors need no prompt builder of their own
        backend.session.run(_probe_flavor(backend, cell))
    pool = pool_for(backend, cell)
    try:
        shares = split_chains(requests, cell.clients)
        prompts = workload_prompts(backend.prompts, cell, requests, repeat)  # the texts one client would send
        refs = [
            a.prepare.remote(cell, share, {r.id: prompts[r.id] for r in share}, repeat)
            for a, share in zip(pool.actors, shares, strict=True)
        ]
        pool.call(refs)
        clocks = pool.clocks()  # just before the start: the actors are idle, the probes quick
        order = {r.id: i for i, r in enumerate(requests)}
        run = backend.session.run(_run_async(backend, pool, cell, clocks, repeat, order))
    except BaseException:
        backend.client_pool = None
        pool.close()
        raise
    if repeat >= 0:  # warmups are not part of the cell's record
        if backend.clocks_cell != cell.cell_id:
            backend.clocks_cell, backend.clocks = cell.cell_id, []
        backend.clocks.append(
            {
                "repeat": repeat,
                "offsets_s": [c.offset_s for c in clocks],
                "rtts_s": [c.rtt_s for c in clocks],
                "lead_s": run.extra.pop("_client_leads_s"),
                "requests": [len(share) for share in shares],
            }
        )
        run.extra["client_clocks"] = list(backend.clocks)
    run.extra.pop("_client_leads_s", None)
    return run


async def _metrics_client(backend: Any, cell: Cell) -> Any:
    """The caller's own small HTTP client for the run: the flavor probe and /metrics."""
    settings = backend.settings
    assert settings is not None
    headers = settings.headers()
    key = (cell.cell_id, settings.root, tuple(sorted(headers.items())), "caller")
    return await backend.session.client(key, 4, settings.timeout_s, headers)


async def _probe_flavor(backend: Any, cell: Cell) -> None:
    await backend.probe_flavor(cell, await _metrics_client(backend, cell))


async def _run_async(
    backend: Any, pool: ClientPool, cell: Cell, clocks: list[ClientClock], repeat: int, order: Mapping[int, int]
) -> BackendRun:
    """On the backend's session loop: the caller's /metrics poller around the actors' common start."""
    settings = backend.settings
    assert settings is not None
    poller, before = await backend.metrics_before(await _metrics_client(backend, cell), repeat)
    lead = START_LEAD_S + 2 * max(c.rtt_s for c in clocks)
    start_wall = time.time() + lead
    t0 = time.perf_counter() + lead  # the same instant on this process's perf_counter: the run's origin
    refs = [a.serve.remote(start_wall + c.offset_s) for a, c in zip(pool.actors, clocks, strict=True)]
    poller.t0 = t0
    try:
        await asyncio.sleep(max(t0 - time.perf_counter(), 0.0))
        if settings.metrics_interval_s > 0 and before is not None:
            poller.start()
        try:
            results: list[ShareResult] = await asyncio.gather(*(asyncio.wrap_future(ref.future()) for ref in refs))
        except Exception as exc:
            raise _actor_error(exc) from None
    except BaseException:
        await poller.stop()
        raise
    traces: list[RunTrace] = []
    for i, share in enumerate(results):
        for t in share.traces:
            t.client = i
            traces.append(t)
    traces.sort(key=lambda t: order.get(t.request_id, len(order)))  # the workload's order, as one client returns it
    run = await backend.finish_async(cell, traces, poller, before, repeat, t0)
    run.extra["_client_leads_s"] = [share.lead_s for share in results]
    return run
