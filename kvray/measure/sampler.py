"""Periodic samplers: something read every few milliseconds on a daemon thread while a run goes on.

A backend's run keeps the main thread busy (a generate loop, an event loop), so what it cannot see from
there — a paged cache's blocks in use, a server's resident memory, a GPU's used memory — is read on a
thread of its own. Every sampler reads once on entry, then every ``interval_s``, then once more on exit,
so a run shorter than one interval still has its first and last state. Times are seconds on the
``time.perf_counter`` clock since ``t0``, the clock every trace uses, so samples line up with tokens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self


class PeriodicSampler:
    """``with SomeSampler(...) as s: run()``; subclasses implement ``sample`` (called on the sampler thread)."""

    def __init__(self, interval_s: float, name: str, t0: float | None = None):
        self.interval_s = interval_s
        self.t0 = time.perf_counter() if t0 is None else t0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def elapsed_s(self) -> float:
        """Seconds since ``t0`` on the perf_counter clock."""
        return time.perf_counter() - self.t0

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> Self:
        self.sample()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class PeakSampler(PeriodicSampler):
    """The largest value ``read`` returned while running; a read that fails or returns None is skipped."""

    def __init__(self, read: Callable[[], int | None], interval_s: float, name: str, initial: int = 0):
        super().__init__(interval_s, name)
        self.read = read
        self.peak = initial

    def sample(self) -> None:
        try:
            value = self.read()
        except Exception:  # a device or process that went away mid-run: keep the peak seen so far
            return
        if value is not None and value > self.peak:
            self.peak = value
