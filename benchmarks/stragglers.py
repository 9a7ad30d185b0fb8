"""How long the straggler verdict takes at the end of a run: ``find_stragglers`` (kvray/sweep/stragglers.py) on
synthetic cells.jsonl rows, and whether it names the one worker slowed by a known factor.

    uv run python benchmarks/stragglers.py [--repeats 5] [--sizes 1280x8,10240x64]

Each size is ROWSxWORKERS: the workers split over two GPU types (A100, H100), each type's cells dealt round-robin
over its workers in a fixed shuffled order, as a sweep's free workers take the next cell. Every healthy cell's
E2E p50 follows 0.02 s × concurrency^0.5 × (prompt/8)^0.3 × gen/4 × (1 ± 5 % noise, fixed seed); the first
A100 worker's cells take ``--slowdown`` (3.0) times that. Prints per size: wall and CPU seconds of the verdict
(median, min and max over ``--repeats`` calls in this one process after a first call, which numpy's import and
warm-up make slower and is printed apart; rows already in memory), the rows per worker, the slowdown it
reported, and the same through ``run_stragglers`` — what the collector calls — which reads the folder's
cells.jsonl first (these rows are small, a few hundred bytes; a real row is larger, so its read takes longer).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def synthetic_rows(n_rows: int, n_workers: int, slowdown: float, seed: int = 7) -> list[dict[str, Any]]:
    """``n_rows`` cells.jsonl-like records over ``n_workers`` workers of two GPU types; worker a0 is slow."""
    rng = random.Random(seed)
    types = ("A100", "H100")
    shapes = list(itertools.product([1, 2, 4, 8, 16, 32, 64, 128], [8, 16, 32, 64, 128, 256, 512, 1024], [4, 16, 64]))
    per_type = n_rows // len(types)
    records = []
    for t_index, gpu in enumerate(types):
        workers = [f"{gpu[0].lower()}{i}" for i in range(t_index, n_workers, len(types))]
        order = [shapes[i % len(shapes)] for i in rng.sample(range(per_type), per_type)]
        for i, (conc, prompt, gen) in enumerate(order):
            worker = workers[i % len(workers)]
            factor = slowdown if worker == "a0" else 1.0
            e2e = 0.02 * conc**0.5 * (prompt / 8) ** 0.3 * gen / 4 * factor * (1 + rng.uniform(-0.05, 0.05))
            records.append(
                {
                    "cell_id": f"{gpu}-{i}",
                    "status": "ok",
                    "simulated": False,
                    "cell": {
                        "model": "m",
                        "backend": "hf",
                        "dtype": "bf16",
                        "weights": "random",
                        "workload": {"kind": "burst", "requests": [{"prompt_toks": prompt, "gen_toks": gen}] * conc},
                    },
                    "hardware": {"worker_id": worker, "accelerator_type": gpu, "node_id": f"node-{worker}"},
                    "metrics": {"e2e_s_p50": e2e},
                }
            )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1280x8,10240x64", help="ROWSxWORKERS, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slowdown", type=float, default=3.0)
    args = parser.parse_args()

    from kvray.sweep.stragglers import find_stragglers, run_stragglers

    print(f"load average {os.getloadavg()[0]:.1f} at the start; {args.repeats} calls per size, one process")
    for size in args.sizes.split(","):
        n_rows, n_workers = (int(x) for x in size.split("x"))
        records = synthetic_rows(n_rows, n_workers, args.slowdown)
        first_s, walls, cpus, found = timed(lambda records=records: find_stragglers(records), args.repeats)
        named = ", ".join(f"{s.worker_id} {s.slowdown:.2f}× over {s.cells_judged} cells" for s in found) or "none"
        print(
            f"{len(records):6d} rows, {n_workers:3d} workers ({len(records) // n_workers} rows each): "
            f"find_stragglers wall {summary(walls)}, CPU {statistics.median(cpus):.3f} s (first call {first_s:.3f} s); "
            f"named: {named} (injected: a0 {args.slowdown:g}×)"
        )
        with tempfile.TemporaryDirectory() as tmp:
            lines = [json.dumps(r) for r in records]
            (Path(tmp) / "cells.jsonl").write_text("\n".join(lines) + "\n")
            workers = [{"worker_id": w} for w in sorted({r["hardware"]["worker_id"] for r in records})]
            _, walls, cpus, verdict = timed(lambda tmp=tmp, workers=workers: run_stragglers(tmp, workers), args.repeats)
        assert [s["worker_id"] for s in verdict] == [s.worker_id for s in found]
        print(
            f"{'':6s}       {'':3s}          with the folder read ({sum(map(len, lines)) // len(lines)} bytes a row): "
            f"run_stragglers wall {summary(walls)}, CPU {statistics.median(cpus):.3f} s"
        )


def timed(call: Callable[[], Any], repeats: int) -> tuple[float, list[float], list[float], Any]:
    """(first call's wall s, ``repeats`` more calls' wall s and CPU s, the last result)."""
    wall = time.perf_counter()
    result = call()
    first_s = time.perf_counter() - wall
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = call()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return first_s, walls, cpus, result


def summary(walls: list[float]) -> str:
    return f"{statistics.median(walls):.3f} s (min {min(walls):.3f}, max {max(walls):.3f})"


if __name__ == "__main__":
    main()
