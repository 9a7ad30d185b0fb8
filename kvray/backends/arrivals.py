"""When each request is sent: open-loop offsets, closed-loop chains and a stop time — one schedule, every backend.

A request is *due* at its ``arrival_s`` (burst and open loops), or — in a closed loop, where ``after`` names
the request before it — ``think_s`` after that request ended, which only the run itself can tell. A load
with a ``duration_s`` sends nothing due after it: such a request gets no trace, and neither does any request
chained after it. Each backend asks the same schedule, so a closed loop means the same thing on hf, hf-paged,
vLLM, a server or the synthetic engine:

- event-loop backends (``openai``, ``vllm``, ``ollama``, ``synthetic``) ``await schedule.send(r)`` in each
  request's task and call ``schedule.ended(r.id, end_s)`` when it finishes;
- engine loops (``hf``, ``hf-paged``) poll ``schedule.pop_due(now_s)`` and ``schedule.next_due_s()``.

A trace's ``arrival_s`` is the moment the request was due (the schedule's), its ``sent_s`` the moment the
client actually sent it; ``sent_s − arrival_s`` is the client's lag (kvray/measure/serving.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from kvray.measure.trace import RunTrace
from kvray.spec import Cell, RequestSpec

T = TypeVar("T")
SPIN_S = 0.002  # the last 2 ms before a send are waited by yielding to the loop, not by a timer (send error ≤ 5 ms)


class ArrivalSchedule:
    """The send times of one repeat's requests, resolved as the run goes (times in seconds since its t0)."""

    def __init__(self, requests: Sequence[RequestSpec], stop_s: float | None = None):
        self.requests = {r.id: r for r in requests}
        self.stop_s = stop_s
        self._ended: dict[int, float] = {}  # id → end time (seconds since t0)
        self._dropped: set[int] = set()  # never sent: due after stop_s, or chained after one that was not
        self._pending = sorted(requests, key=lambda r: (r.after is not None, r.arrival_s, r.id))
        self._events: dict[int, asyncio.Event] = {}

    @classmethod
    def for_cell(cls, cell: Cell, requests: Sequence[RequestSpec]) -> ArrivalSchedule:
        """The schedule of one repeat of ``cell``: its load's duration (if any) is the stop time."""
        load = cell.workload.load
        return cls(requests, load.duration_s if load is not None else None)

    # ---- shared ------------------------------------------------------------------------------------------------

    def due_s(self, r: RequestSpec) -> float | None:
        """When ``r`` is due: its arrival offset, or its predecessor's end + think time (None: still running)."""
        if r.after is None:
            return r.arrival_s
        end = self._ended.get(r.after)
        return None if end is None else end + r.think_s

    def _blocked(self, r: RequestSpec) -> bool:
        """True when ``r`` will never be sent: chained after a dropped request, or due after the stop time."""
        if r.after is not None and r.after in self._dropped:
            return True
        due = self.due_s(r)
        return due is not None and self.stop_s is not None and due > self.stop_s

    def ended(self, request_id: int, end_s: float) -> None:
        """Request ``request_id`` finished (ok or not) at ``end_s``: its follower in a closed loop is now due."""
        self._ended[request_id] = end_s
        event = self._events.get(request_id)
        if event is not None:
            event.set()

    def _drop(self, r: RequestSpec) -> None:
        self._dropped.add(r.id)
        event = self._events.get(r.id)
        if event is not None:
            event.set()

    @property
    def dropped(self) -> set[int]:
        """Ids of requests the schedule did not send (the load's duration ran out first)."""
        return set(self._dropped)

    # ---- engine loops (hf, hf-paged) ----------------------------------------------------------------------------

    def pop_due(self, now_s: float) -> list[tuple[float, RequestSpec]]:
        """(due_s, request) of the requests due by ``now_s``, in due order, removed from the pending set; the
        unsendable are dropped."""
        due: list[tuple[float, int, RequestSpec]] = []
        keep: list[RequestSpec] = []
        changed = True
        while changed:  # a dropped request unblocks (drops) its followers in the same call
            changed = False
            keep = []
            for r in self._pending:
                if self._blocked(r):
                    self._drop(r)
                    changed = True
                    continue
                t = self.due_s(r)
                if t is not None and t <= now_s:
                    due.append((t, r.id, r))
                else:
                    keep.append(r)
            self._pending = keep
        return [(t, r) for t, _, r in sorted(due, key=lambda x: (x[0], x[1]))]

    def next_due_s(self) -> float | None:
        """The earliest known due time among pending requests (None: none known — all wait on running ones)."""
        known = [t for r in self._pending if (t := self.due_s(r)) is not None and not self._blocked(r)]
        return min(known) if known else None

    @property
    def pending(self) -> int:
        """Requests neither sent nor dropped yet — kept by ``pop_due`` (the engine loops' API); ``send`` leaves it
        alone, so an event loop pays nothing per request for it."""
        return len(self._pending)

    # ---- event loops (openai, vllm, ollama, synthetic) -------------------------------------------------------------

    async def send(self, r: RequestSpec, t0: float) -> tuple[float, float] | None:
        """Wait until ``r`` is due; returns (due_s, sent_s) since ``t0``, or None when it is never to be sent.

        Every request's task calls this before sending; call ``ended`` when it finishes (also on failure)."""
        if r.after is not None and r.after not in self._ended and r.after not in self._dropped:
            event = self._events.setdefault(r.after, asyncio.Event())
            self._events.setdefault(r.id, asyncio.Event())
            await event.wait()
        else:
            self._events.setdefault(r.id, asyncio.Event())
        if self._blocked(r):
            self._drop(r)
            return None
        due = self.due_s(r)
        assert due is not None
        delay = t0 + due - time.perf_counter()
        if delay > SPIN_S:  # the event loop's timer wakes late on a busy machine: sleep to just before, then yield
            await asyncio.sleep(delay - SPIN_S)
        while time.perf_counter() < t0 + due:
            await asyncio.sleep(0)
        return due, time.perf_counter() - t0


async def serve_on_schedule(
    schedule: ArrivalSchedule,
    requests: Sequence[RequestSpec],
    t0: float,
    serve: Callable[[RequestSpec, float], Awaitable[T]],
    trace_of: Callable[[T], RunTrace] = lambda result: result,  # type: ignore[assignment,return-value]
) -> list[T]:
    """Serve each request when it is due, concurrently; ``serve(r, sent_s)`` does the request itself.

    Each result's trace gets the schedule's arrival (due time) and the actual send time, and its end
    releases the request's closed-loop follower. Requests the schedule never sent have no result."""

    async def one(r: RequestSpec) -> T | None:
        sent = await schedule.send(r, t0)
        if sent is None:
            return None
        due_s, sent_s = sent
        end_s: float | None = None
        try:
            result = await serve(r, sent_s)
            trace = trace_of(result)
            trace.arrival_s, trace.sent_s, end_s = due_s, sent_s, trace.end_s
            return result
        finally:
            schedule.ended(r.id, end_s if end_s is not None else time.perf_counter() - t0)

    results = await asyncio.gather(*(one(r) for r in requests))
    return [r for r in results if r is not None]


def split_chains(requests: Sequence[RequestSpec], k: int) -> list[list[RequestSpec]]:
    """``requests`` dealt to ``k`` senders: whole chains, round-robin in the order their first requests are due.

    A request without ``after`` starts a chain; each follower (a closed loop's next request, a conversation's next
    turn) goes with its chain, so its gate — its predecessor's end — is seen in the process that sends it. An open
    loop is all single-request chains, so it is dealt round-robin over arrival order and each sender offers
    1/k of the rate. Each share keeps the requests' own order; a sender may get none (fewer chains than k)."""
    by_id = {r.id: r for r in requests}
    roots: dict[int, int] = {}

    def root(r: RequestSpec) -> int:
        path: list[int] = []
        while r.id not in roots and r.after is not None and r.after in by_id and r.id not in path:
            path.append(r.id)
            r = by_id[r.after]
        found = roots.setdefault(r.id, r.id)
        roots.update(dict.fromkeys(path, found))
        return found

    heads = sorted((r for r in requests if root(r) == r.id), key=lambda r: (r.arrival_s, r.id))
    sender = {r.id: i % k for i, r in enumerate(heads)}
    shares: list[list[RequestSpec]] = [[] for _ in range(k)]
    for r in requests:
        shares[sender[root(r)]].append(r)
    return shares
