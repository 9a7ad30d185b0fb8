"""Sweep efficiency: N cells on M worker actors vs the same cells one after another.

    uv run python benchmarks/sweep_efficiency.py [--cells 96] [--workers 4] [--cell-s 1.0]

Cells use the synthetic backend, whose time is a schedule of real sleeps, so M workers truly overlap even
on a 2-core machine and Σ cell time is known; the cluster is a local Ray with M logical GPUs. Prints

  sequential   the same cells run one after another in this process (= Σ cell time)
  ratio        sweep wall / (Σ cell time / M)            target ≤ 1.15 (1.00 = no overhead at all)
  scheduling   worker time available after each worker was up / Σ cell time  (the hand-out's cost)
  loads        model loads per worker actor, per model    must be 1

Everything is measured in one run; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def build_job(cells: int, cell_s: float, models: list[str]) -> object:
    from kvray.plan.job import job_from_dict

    per_model = max(cells // len(models), 1)
    gen_toks = 9
    tpot_s = 0.05
    ttft_s = max(cell_s - (gen_toks - 1) * tpot_s, 0.0)
    return job_from_dict(
        {
            "name": "sweep-efficiency",
            "models": models,
            "backends": ["synthetic"],
            "dtypes": ["fp32"],
            "warmup": 0,
            "repeats": 1,
            "options": {"ttft_s": ttft_s, "tpot_s": tpot_s},
            "grid": {"prompt_toks": [8 * (i + 1) for i in range(per_model)], "gen_toks": [gen_toks]},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=96)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--cell-s", type=float, default=1.0, help="seconds each synthetic cell takes")
    parser.add_argument("--models", nargs="+", default=["kvray/tiny-llama", "gpt2"])
    args = parser.parse_args()

    from kvray.backends import get_backend
    from kvray.data.reader import read_results
    from kvray.plan.planner import plan_cells
    from kvray.runner.run import run_cells
    from kvray.sweep import last_run, run_job, start_local_ray

    job = build_job(args.cells, args.cell_s, args.models)
    cells = plan_cells(job)  # type: ignore[arg-type]

    t0 = time.perf_counter()
    run_cells(get_backend("synthetic"), cells)
    sequential_s = time.perf_counter() - t0

    start_local_ray(num_cpus=2, num_gpus=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = run_job(job, Path(tmp) / "out", progress=False).output_dir  # type: ignore[arg-type]
        wall_s = time.perf_counter() - t0
        run = last_run(out)
        rows = read_results(out)
    sum_cell_s = sum(r["duration_s"] for r in rows)
    ideal_s = sequential_s / args.workers
    ready_s = run.get("workers_ready_s") or 0.0
    available_s = sum(run["wall_s"] - w["ready_s"] for w in run["workers"])
    loads = [n for w in run["workers"] for n in w.get("model_loads", {}).values()]
    per_worker = {w["worker_id"].rsplit("-", 2)[-2]: w.get("model_loads", {}) for w in run["workers"]}

    print(f"cells {len(cells)} ({len(rows)} rows), models {len(args.models)}, workers {args.workers}")
    print(
        f"sequential (Σ cell time)     {sequential_s:7.2f} s   (Σ duration_s in the sweep's rows: {sum_cell_s:.2f} s)"
    )
    print(f"ideal on {args.workers} workers (Σ / M)   {ideal_s:7.2f} s")
    print(f"sweep wall                   {wall_s:7.2f} s   (workers up after {ready_s:.2f} s)")
    print(f"ratio wall / (Σ / M)         {wall_s / ideal_s:7.3f}     target ≤ 1.15")
    print(f"scheduling (after start-up)  {available_s / sum_cell_s:7.3f}     worker-seconds up / Σ cell time")
    print(f"model loads per worker       max {max(loads)}, min {min(loads)}  (must be 1 per model)")
    for worker, model_loads in sorted(per_worker.items()):
        described = ", ".join(f"{k.split('|')[0]}×{v}" for k, v in model_loads.items())
        print(f"  worker {worker}: {described}")


if __name__ == "__main__":
    main()
