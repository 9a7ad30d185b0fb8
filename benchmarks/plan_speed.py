"""How long `kvray plan` takes over 3 GPUs × 4 TP × 2 KV dtypes × 2 prefix-caching settings (48 candidates): the
branch-and-bound search against searching every candidate (--exhaustive), in one run, and whether both pick the
same deployment. Run: uv run python benchmarks/plan_speed.py"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("KVRAY_CALIBRATION", os.path.join(tempfile.gettempdir(), "kvray-no-calibration.json"))

from kvray.capacity.planner import plan_capacity  # noqa: E402
from kvray.capacity.prices import PRICES  # noqa: E402
from kvray.capacity.traffic import traffic_from_flags  # noqa: E402
from kvray.model.resolve import resolve_geometry  # noqa: E402


def main() -> None:
    g = resolve_geometry("meta-llama/Meta-Llama-3-8B")
    traffic = traffic_from_flags(
        {"kind": "lognormal", "median": 512, "sigma": 0.6, "max": 2048},
        {"kind": "lognormal", "median": 128, "sigma": 0.6, "max": 512},
    )
    kw = {
        "gpus": ["H100-SXM", "A100-80GB-SXM", "L4"],
        "tps": [1, 2, 4, 8],
        "kv_dtypes": ["bf16", "fp8"],
        "prefix_caching": [True, False],
        "prices": PRICES,
    }
    for rate in (20.0, 100.0):
        got = {}
        for exhaustive in (False, True):
            wall, cpu = time.perf_counter(), time.process_time()
            plan = plan_capacity(g, traffic, rate, {"ttft_ms": 500, "tpot_ms": 50}, exhaustive=exhaustive, **kw)
            got[exhaustive] = (time.perf_counter() - wall, time.process_time() - cpu, plan)
            best = plan.best
            print(
                f"rate {rate:g}: {'exhaustive' if exhaustive else 'pruned    '} {len(plan.candidates)} candidates, "
                f"{plan.searched} searched, wall {got[exhaustive][0]:.1f} s, CPU {got[exhaustive][1]:.1f} s; best "
                f"{best.replicas if best else '-'} x {best.gpu if best else '-'} TP{best.tp if best else '-'} "
                f"${best.cost_per_hour if best else 0:.2f}/h"
            )
        same = (got[False][2].best.cost_per_hour if got[False][2].best else None) == (
            got[True][2].best.cost_per_hour if got[True][2].best else None
        )
        print(
            f"rate {rate:g}: CPU ratio exhaustive / pruned {got[True][1] / got[False][1]:.1f}x; same best cost: {same}"
        )


if __name__ == "__main__":
    main()
