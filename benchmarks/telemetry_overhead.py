"""What the telemetry sampler costs: the same cell through ``run_cell`` with telemetry on and off, alternating in one
process on one loaded model, compared on the cell's own TPOT.

    uv run python benchmarks/telemetry_overhead.py [--model kvray/tiny-llama] [--device cpu] [--dtype fp32]
        [--concurrency 4] [--prompt-toks 128] [--gen-toks 32] [--rounds 15] [--interval-s 0.1]

The two cells differ only in the option ``telemetry_interval_s`` (0 = off); each round runs both, the order
alternating. The in-process HF backend is the worst case: its generate loop shares the GIL with the sampler
thread (a server backend's engine runs in another process). Prints the median TPOT p50 of each and the median of
per-round ratios (on / off), robust to a machine whose load drifts. Goal: ≤ 1.02. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics

from kvray.backends.hf import HFBackend
from kvray.runner.run import run_cell
from kvray.spec import Cell, Workload, make_options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="kvray/tiny-llama")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--prompt-toks", type=int, default=128)
    ap.add_argument("--gen-toks", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--interval-s", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least sensitive to other load)")
    args = ap.parse_args()

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    workload = Workload.uniform(args.concurrency, args.prompt_toks, args.gen_toks)

    def cell(interval_s: float) -> Cell:
        return Cell(
            model=args.model,
            workload=workload,
            dtype=args.dtype,
            device=args.device,
            warmup=0,
            repeats=1,
            options=make_options(telemetry_interval_s=interval_s),
        )

    cells = {"off": cell(0.0), "on": cell(args.interval_s)}
    backend = HFBackend()
    backend.load(cells["off"])
    tpot: dict[str, list[float]] = {"off": [], "on": []}
    samples: list[int] = []
    for name in ("off", "on"):  # warm both paths
        run_cell(backend, cells[name], check_oom=False)
    for i in range(args.rounds):
        for name in ("off", "on") if i % 2 == 0 else ("on", "off"):
            result = run_cell(backend, cells[name], check_oom=False)
            assert result.status == "ok", result.reason
            tpot[name].append(result.metrics["tpot_s_p50"])
            if name == "on":
                samples.append(int(result.extra["energy"]["telemetry_samples"]))
    backend.close()
    off, on = tpot["off"], tpot["on"]
    paired = statistics.median(a / b for a, b in zip(on, off, strict=True))
    print(
        f"model {args.model} on {args.device} ({args.dtype}, {torch.get_num_threads()} CPU threads), "
        f"{args.concurrency} × {args.prompt_toks} → {args.gen_toks}, {args.rounds} rounds, "
        f"telemetry every {args.interval_s} s ({statistics.median(samples)} samples per cell, median)"
    )
    print(
        f"TPOT p50: off median {statistics.median(off) * 1e3:.2f} ms (min {min(off) * 1e3:.2f}), "
        f"on median {statistics.median(on) * 1e3:.2f} ms (min {min(on) * 1e3:.2f}); "
        f"on/off: paired median {paired:.3f}, min/min {min(on) / min(off):.3f}"
    )
    print("goal: on / off ≤ 1.02")


if __name__ == "__main__":
    main()
