"""The continuous-batching scheduler's state between steps, for kvray/sim/serving.py (whose docstring states the
rules): every request's counters in NumPy arrays indexed by its position in the request list.

Why arrays: a replayed trace keeps a hundred or more requests running for tens of thousands of steps, so the scheduler's pass
over the running requests is millions of (request, step) pairs. That pass is one set of array operations per step
when nothing in it can change the pool's order of events — no request shares a cached prefix (``grouped``) and the
blocks it adds fit the free pool in admission order (so nothing is preempted); otherwise the step runs request by
request, the rules as written. Both give the same schedule (tests/test_sim_serving.py), and the same as the
request-by-request engine this replaced, bit for bit (docs/benchmarks.md, "The sim replays 10,000 trace requests").
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvray.sim.simulate import RequestLike


class Engine:
    """Requests by index: ``computed`` (KV positions), ``target`` (positions before the next token: the prompt plus
    every token generated so far), ``blocks`` owned, ``shared_blocks`` of a group's prefix used but not owned,
    ``tokens`` generated; ``waiting`` and ``running`` (admission order) hold indices."""

    def __init__(self, requests: Sequence[RequestLike], blocks: int, cfg: Any):
        self.cfg = cfg
        n = len(requests)
        self.prompt = np.fromiter((r.prompt_toks for r in requests), np.int64, n)
        self.gen = np.fromiter((r.gen_toks for r in requests), np.int64, n)
        self.computed = np.zeros(n, np.int64)
        self.target = self.prompt.copy()
        self.blocks = np.zeros(n, np.int64)
        self.shared_blocks = np.zeros(n, np.int64)
        self.tokens = np.zeros(n, np.int64)
        self.group: list[int | None] = [getattr(r, "prefix_group", None) for r in requests]
        self.shared: list[int] = [getattr(r, "shared_prefix_toks", 0) for r in requests]
        self.start_s: list[float | None] = [None] * n
        self.preempted = [0] * n
        # a prefix group in play: the pool's order of events depends on each request's turn (run request by request)
        self.grouped = bool(cfg.prefix_caching) and any(g is not None for g in self.group)
        self.free = blocks
        self.watermark = int(cfg.watermark * blocks)
        self.waiting: deque[int] = deque()
        self.running: list[int] = []
        self.preemptions = 0
        self.prefix_hits = 0
        self.decodes = 0  # decode tokens in the step just scheduled
        self.admitted = 0  # requests admitted for the first time in the step just scheduled
        self.groups: dict[int, list[int]] = {}  # group → [prefix blocks resident, members running]
        # groups no member runs, whose prefix blocks stay cached (counted in ``free``) until an allocation needs
        # them — least recently used first, as vLLM's free-block queue evicts
        self.evictable: dict[int, int] = {}

    def release(self, i: int) -> None:
        """Free ``i``'s own blocks (and its group's, when it was the last member running); the caller unlists it."""
        self.free += int(self.blocks[i])
        self.blocks[i] = 0
        group = self.group[i]
        if group is not None and self.cfg.prefix_caching:
            state = self.groups[group]
            state[1] -= 1
            if state[1] == 0 and state[0]:  # the last member left: its blocks are free, and still cached
                self.free += state[0]
                self.evictable[group] = state[0]

    def take(self, need: int) -> None:
        """Allocate ``need`` blocks, evicting cached prefixes (least recently used first) that they overwrite."""
        while self.evictable and self.free - need < sum(self.evictable.values()):
            group = next(iter(self.evictable))
            self.evictable.pop(group)
            self.groups[group][0] = 0
        self.free -= need

    def preempt(self) -> int:
        """Recompute preemption of the request admitted last: its KV is freed, it waits at the queue's head."""
        victim = self.running.pop()
        self.release(victim)
        self.computed[victim], self.shared_blocks[victim] = 0, 0
        self.preempted[victim] += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def schedule(self, now: float) -> tuple[np.ndarray, np.ndarray]:
        """This step's requests and their new tokens, running requests first, then admissions."""
        self.decodes = self.admitted = 0
        scheduled = None if self.grouped else self._running_at_once()
        if scheduled is None:
            idx, new, budget, preempted = self._running_one_by_one()
        else:
            (idx, new), budget, preempted = scheduled, self.cfg.max_num_batched_tokens - int(scheduled[1].sum()), False
        admitted_idx, admitted_new = ([], []) if preempted else self._admit(now, budget, len(idx) > 0)
        if admitted_idx:
            idx = np.concatenate([idx, np.asarray(admitted_idx, np.int64)])
            new = np.concatenate([new, np.asarray(admitted_new, np.int64)])
        return idx, new

    def _running_at_once(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The running requests' chunks as array operations; None when their blocks would not fit in order (a
        preemption: the step is redone request by request)."""
        run = np.asarray(self.running, np.int64)
        computed, target = self.computed[run], self.target[run]
        new = target - computed  # ≥ 1: a running request always has a position to compute
        before = np.cumsum(new) - new  # budget used before each request
        m = int(np.count_nonzero(before < self.cfg.max_num_batched_tokens))  # a prefix: ``before`` increases
        run, computed, target, new = run[:m], computed[:m], target[:m], new[:m]
        new = np.minimum(new, self.cfg.max_num_batched_tokens - before[:m])
        size = self.cfg.block_size
        need = -(-(computed + new) // size) - self.shared_blocks[run] - self.blocks[run]
        total = np.cumsum(need)
        if m and int(total.max()) > self.free:
            return None
        if m:
            self.take(int(total[-1]))
            self.blocks[run] += need
        self.decodes = int(np.count_nonzero((new == 1) & (self.tokens[run] > 0) & (target - computed == 1)))
        return run, new

    def _running_one_by_one(self) -> tuple[np.ndarray, np.ndarray, int, bool]:
        """The running requests' chunks request by request (preemption and shared prefixes as written)."""
        budget, size = self.cfg.max_num_batched_tokens, self.cfg.block_size
        idx: list[int] = []
        news: list[int] = []
        preempted = False
        i = 0
        running = self.running
        while i < len(running) and budget > 0:
            r = running[i]
            computed, target = int(self.computed[r]), int(self.target[r])
            new = min(target - computed, budget)
            need = -(-(computed + new) // size) - int(self.shared_blocks[r]) - int(self.blocks[r])  # ceil division
            while need > self.free:
                preempted = True
                if self.preempt() == r:
                    break
            if i == len(running):
                break  # r was the last running request and preempted itself
            if new == 1 and self.tokens[r] and target - computed == 1:
                self.decodes += 1
            self.take(need)
            self.blocks[r] += need
            idx.append(r)
            news.append(new)
            budget -= new
            i += 1
        return np.asarray(idx, np.int64), np.asarray(news, np.int64), budget, preempted

    def _admit(self, now: float, budget: int, running_scheduled: bool) -> tuple[list[int], list[int]]:
        """Waiting requests, FCFS, while the running set, the token budget and the pool (its watermark) allow."""
        idx: list[int] = []
        news: list[int] = []
        size = self.cfg.block_size
        while self.waiting and len(self.running) < self.cfg.max_num_seqs and budget > 0:
            r = self.waiting[0]
            cached = self._cached(r)
            new = int(self.target[r]) - cached
            if self.cfg.chunked_prefill:
                new = min(new, budget)
            elif new > budget and (idx or running_scheduled):
                break  # a whole prompt waits for a step with room (an empty step takes it whatever its size)
            shared = cached // size
            need = max(math.ceil((cached + new) / size) - shared, 0)
            back = self.reclaim(r) if cached else 0
            if self.free - back - need < (self.watermark if self.running else 0):
                break
            self.waiting.popleft()
            group = self.group[r]
            if back:  # the cached prefix is in use again: no longer free, no longer evictable
                assert group is not None
                self.evictable.pop(group)
                self.free -= back
            self.computed[r], self.shared_blocks[r], self.blocks[r] = cached, shared, need
            self.take(need)
            self.prefix_hits += cached
            if self.start_s[r] is None:
                self.start_s[r] = now
                self.admitted += 1
            if group is not None and self.cfg.prefix_caching:
                self.groups.setdefault(group, [0, 0])[1] += 1
            self.running.append(r)
            # vLLM V1 caches a block when it allocates it (KVCacheManager.allocate_slots → cache_blocks), so a
            # later admission in this same step already hits the prefix this one is about to compute
            self.share_prefix(r, cached + new)
            idx.append(r)
            news.append(new)
            budget -= new
        return idx, news

    def reclaim(self, r: int) -> int:
        """Blocks a cached (evictable) prefix of ``r``'s group takes back from the free pool when ``r`` joins."""
        group = self.group[r]
        return self.evictable.get(group, 0) if group is not None and self.cfg.prefix_caching else 0

    def _cached(self, r: int) -> int:
        """Prompt positions already resident for ``r``'s prefix group (full blocks; at least one token to run)."""
        group = self.group[r]
        if not self.cfg.prefix_caching or group is None:
            return 0
        resident = self.groups.get(group, [0, 0])[0]
        size = self.cfg.block_size
        full = min(self.shared[r] // size, resident, (int(self.target[r]) - 1) // size)
        return full * size

    def share_prefix(self, r: int, scheduled: int | None = None) -> None:
        """The full prefix blocks ``r`` has computed (or, ``scheduled``, will have computed by the end of this
        step) become its group's (owned once, by the group)."""
        group = self.group[r]
        if not self.cfg.prefix_caching or group is None:
            return
        state = self.groups[group]
        # its whole prompt, not only the prefix it shares: a later member may share more of it (a chat's next
        # turn sends this turn's prompt as its history); a lookup never takes more than its own shared prefix
        done = int(self.computed[r]) if scheduled is None else scheduled
        full = min(int(self.prompt[r]), done) // self.cfg.block_size
        if full > state[0]:
            moved = full - max(state[0], int(self.shared_blocks[r]))
            state[0] = full
            self.blocks[r] -= moved
            self.shared_blocks[r] = full
