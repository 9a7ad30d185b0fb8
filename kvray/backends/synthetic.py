"""A backend that emits tokens on a known schedule, with real sleeps: the instrument that proves the metrics.

Each request waits until it is due (its arrival, or in a closed loop its predecessor's end), then for a free slot (``max_batch`` slots, first come first served;
0 = unlimited), then emits its first token ``ttft_s`` after starting and the rest ``tpot_s`` apart, in
chunks of ``chunk_toks`` tokens (a chunk is stamped when its last token is due, like a streamed HTTP
event). So a request's TTFT is queue + ``ttft_s``, its TPOT and every ITL gap are ``tpot_s``, and its
queue time follows from the slots and the schedule — exactly what the tests recover from the traces.

Cell options (``Cell.options``): ttft_s (0.05), tpot_s (0.01), chunk_toks (1), max_batch (0),
fail ("oom" | "error": the run raises, to exercise the runner), oom_above_tokens (raise an OOM when
concurrency × longest sequence exceeds it — an emulated memory boundary for sweep tests), fail_every (0; k:
every request whose id is k − 1 modulo k fails after half its tokens, as a request that times out mid-stream
does — the cell is then ``partial``), timeout_s (None; the client's per-request timeout, as the HTTP backends'
``timeout_s``: a request not finished this long after it was sent fails with the tokens it got, and leaves its
queue place or slot to the next, as a server aborts a request whose client hung up).

A process whose environment sets ``KVRAY_SYNTHETIC_SLOWDOWN`` (a factor, default 1) serves every schedule that
many times slower: a throttled or shared GPU, for the straggler tests (kvray/sweep/stragglers.py) — set in one
worker's process only, it makes that worker the straggler of an otherwise uniform sweep.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from kvray.backends.arrivals import ArrivalSchedule, serve_on_schedule
from kvray.backends.base import BackendBase, BackendRun, run_async
from kvray.errors import KvrayInputError
from kvray.measure.trace import RunTrace
from kvray.spec import Cell, RequestSpec

SLOWDOWN_ENV = "KVRAY_SYNTHETIC_SLOWDOWN"  # this process's schedules take this factor longer (a throttled GPU)
DEFAULTS: dict[str, Any] = {
    "ttft_s": 0.05,
    "tpot_s": 0.01,
    "chunk_toks": 1,
    "max_batch": 0,
    "fail": None,
    "oom_above_tokens": None,
    "fail_every": 0,
    "timeout_s": None,
}


def schedule_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The cell's options over the defaults, checked."""
    opts = {**DEFAULTS, **options}
    if opts["ttft_s"] < 0 or opts["tpot_s"] < 0:
        raise KvrayInputError("synthetic backend: ttft_s and tpot_s must be >= 0")
    if int(opts["chunk_toks"]) < 1 or int(opts["max_batch"]) < 0 or int(opts["fail_every"]) < 0:
        raise KvrayInputError("synthetic backend: chunk_toks must be >= 1, max_batch and fail_every >= 0")
    if opts["timeout_s"] is not None and not float(opts["timeout_s"]) > 0:
        raise KvrayInputError(f"synthetic backend: timeout_s must be positive seconds, got {opts['timeout_s']}")
    return opts


class SyntheticBackend(BackendBase):
    name = "synthetic"
    simulated = False  # the clock is real; only the "model" is a schedule
    oom_precheck = False  # holds no model, so there is nothing to check
    device = "cpu"

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> None:
        schedule_options(options)

    def load(self, cell: Cell) -> None:
        schedule_options(cell.option_dict)

    def run(self, cell: Cell, requests: Sequence[RequestSpec], repeat: int) -> BackendRun:
        opts = schedule_options(cell.option_dict)
        wl = cell.workload
        if opts["fail"] == "oom" or (
            opts["oom_above_tokens"] is not None and wl.concurrency * wl.max_seq_len > opts["oom_above_tokens"]
        ):
            attempted = wl.concurrency * wl.max_seq_len
            raise MemoryError(f"synthetic: can't allocate memory: you tried to allocate {attempted} bytes")
        if opts["fail"] == "error":
            raise RuntimeError("synthetic: injected failure")
        schedule = ArrivalSchedule.for_cell(cell, requests)
        return BackendRun(traces=run_async(_serve(list(requests), repeat, opts, schedule)))

    def device_info(self) -> dict[str, Any]:
        import psutil

        return {"name": "cpu", "memory_bytes": int(psutil.virtual_memory().total), "cpu_count": psutil.cpu_count()}

    def close(self) -> None:
        pass


async def _serve(
    requests: list[RequestSpec], repeat: int, opts: dict[str, Any], schedule: ArrivalSchedule
) -> list[RunTrace]:
    slowdown = float(os.environ.get(SLOWDOWN_ENV) or 1.0)
    ttft_s, tpot_s, chunk = slowdown * float(opts["ttft_s"]), slowdown * float(opts["tpot_s"]), int(opts["chunk_toks"])
    fail_every = int(opts["fail_every"])
    timeout_s = None if opts["timeout_s"] is None else float(opts["timeout_s"])
    slots = asyncio.Semaphore(int(opts["max_batch"]) or len(requests) or 1)  # FIFO-fair since Python 3.11
    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    async def sleep_until(t: float) -> float:
        delay = t - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        return clock()

    async def work(r: RequestSpec, got: dict[str, Any]) -> None:
        async with slots:
            got["start"] = start = clock()
            first = await sleep_until(start + ttft_s)
            times = got["times"] = [first]
            stop = max(r.gen_toks // 2, 1) if got["fails"] else r.gen_toks
            while len(times) < stop:
                k = min(chunk, stop - len(times))
                stamp = await sleep_until(first + (len(times) + k - 1) * tpot_s)
                times.extend([stamp] * k)

    async def serve(r: RequestSpec, sent_s: float) -> RunTrace:
        fails = fail_every > 0 and r.id % fail_every == fail_every - 1
        got: dict[str, Any] = {"start": None, "times": [], "fails": fails}
        timed_out = False
        try:
            await (work(r, got) if timeout_s is None else asyncio.wait_for(work(r, got), sent_s + timeout_s - clock()))
        except TimeoutError:  # the client gave up: the slot (or the queue place) goes to the next request
            timed_out = True
        times: list[float] = got["times"]
        end = clock() if timed_out else times[-1]
        error = None
        if timed_out:
            error = f"synthetic: timeout after {timeout_s:g} s, {len(times)} of {r.gen_toks} tokens"
        elif fails:
            error = f"synthetic: injected failure after {len(times)} of {r.gen_toks} tokens"
        return RunTrace(
            request_id=r.id,
            repeat=repeat,
            arrival_s=r.arrival_s,  # the schedule's due time replaces it (serve_on_schedule)
            start_s=got["start"] if got["start"] is not None else end,  # never started: it waited to the end
            token_times_s=times,
            end_s=end,
            prompt_toks=r.prompt_toks,
            output_toks=len(times),
            status="error" if error else "ok",
            error=error,
        )

    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.id))
    traces = await serve_on_schedule(schedule, ordered, t0, serve)
    return sorted(traces, key=lambda t: t.request_id)


def throttle_first_worker(claim: str, factor: float) -> None:
    """A sweep's ``worker_setup`` (kvray.sweep.driver.run_job) that throttles one worker: the first worker process
    to create the file ``claim`` serves every schedule ``factor`` times slower (``SLOWDOWN_ENV``), the others
    run as usual — one sick GPU among healthy ones of its type."""
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.environ[SLOWDOWN_ENV] = str(factor)
