"""A 10,000-request Mooncake-format trace: ``kvray trace``'s footprint (prefix hits, LRU pools, the half-hit pool) and
its replay on the sim backend (one H100), timed in this process.

Target (issue #28): the sim replays 10,000 requests "in seconds". The trace is generated here, seeded: conversations
whose turns re-send the conversation's blocks so far (chained hash ids, as Mooncake's), 4 000-token prompts on
average, Poisson arrivals at 20 req/s. Prints wall and CPU seconds of each step and the load average (the machine
may be shared); then, ``--repeats`` times, the sim replay interleaved with benchmarks/sim_speed.py's plain Poisson
run of as many requests (Llama-3-8B, 40 req/s) and the ratio of their CPU seconds (one process, one run: the
machine's load cancels out of it). Target: ≤ 5 CPU s for the 10,000-request replay.
Run: uv run python benchmarks/trace_replay.py [REQUESTS] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def write_trace(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    t, next_id, lines = 0.0, 1, []
    chats: list[list[int]] = []
    for _ in range(n):
        t += rng.exponential(1 / 20)
        if not chats or rng.random() < 0.3:  # a new conversation: the shared system block 0, then its own
            chats.append([0])
        chat = chats[int(rng.integers(len(chats)))]
        grow = int(rng.integers(1, 8))
        chat.extend(range(next_id, next_id + grow))
        next_id += grow
        blocks = chat[-64:] if len(chat) > 64 else list(chat)
        prompt = (len(blocks) - 1) * 512 + int(rng.integers(1, 513))
        lines.append(
            json.dumps(
                {
                    "timestamp": round(t * 1000),
                    "input_length": prompt,
                    "output_length": int(rng.integers(16, 400)),
                    "hash_ids": blocks,
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")


def timed(label: str, fn):  # type: ignore[no-untyped-def]
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    print(f"{label}: {time.perf_counter() - w:.2f} s wall, {time.process_time() - c:.2f} s CPU")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("requests", type=int, nargs="?", default=10_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    n = args.requests
    from sim_speed import run_once

    from kvray.backends import get_backend
    from kvray.plan.replay import check_trace_key, replay_workload
    from kvray.plan.trace_summary import describe_trace
    from kvray.runner.run import run_cell
    from kvray.spec import Cell

    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.jsonl"
        write_trace(path, n)
        opts = check_trace_key({"path": str(path)})
        s = timed(
            f"kvray trace ({n} requests, pools 1k/10k/100k blocks)",
            lambda: describe_trace(opts, pool_blocks=[1000, 10_000, 100_000]),
        )
        print(
            f"  prefix hit rate {s['prefix_hit_rate']:.3f}, pools {[p['hit_rate'] for p in s['pool_hit_rates']]}, "
            f"half-hit pool {s['half_hit_pool_blocks']} blocks"
        )
        wl = timed("replay workload (read, cut, requests)", lambda: replay_workload(opts))
        cell = Cell("Qwen/Qwen2.5-7B", wl, backend="sim", hardware="H100-SXM", warmup=0, repeats=1)
        r = timed(f"sim replay of {n} requests on H100-SXM", lambda: run_cell(get_backend("sim"), cell))
        m = r.metrics
        print(
            f"  status {r.status}; offered {m['offered_rps']:.1f} req/s, achieved {m['achieved_rps']:.1f}; "
            f"TTFT p50 {m['ttft_s_p50']:.3f} s; predicted hit rate {r.memory['prefix_cache_hit_rate_predicted']}"
        )
        for k in range(args.repeats):  # interleaved: the replay, then the plain Poisson run, in this process
            c = time.process_time()
            run_cell(get_backend("sim"), cell)
            replay_s = time.process_time() - c
            poisson_s, steps, served = run_once(n, 40.0)
            print(
                f"repeat {k + 1}: sim replay {replay_s:.2f} CPU s; plain Poisson {served} requests ({steps} steps, "
                f"serve alone) {poisson_s:.2f} CPU s; ratio {replay_s / poisson_s:.1f}; "
                f"load average {os.getloadavg()[0]:.2f}"
            )
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
