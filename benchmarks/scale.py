"""Scale: many synthetic cells on a simulated multi-node cluster — does the driver keep up?

    uv run python benchmarks/scale.py [--nodes 8] [--gpus-per-node 8] [--types A100,H100] \
        [--cells 10000] [--cell-s 0] [--requests 64] [--gen-toks 32]

The cluster is ``ray.cluster_utils.Cluster`` on this machine: a head without GPUs and ``--nodes`` worker nodes
of ``--gpus-per-node`` logical GPUs each, the accelerator types alternating over the nodes (``hardware: each``
plans every cell on every type, so the cells split evenly). Cells use the synthetic backend: ``--cell-s 0``
makes them instant (the sweep's own cost is then all there is); ``--cell-s 1`` makes each take one second of
real sleeps, for wall / (Σ cell time / workers). Prints, all measured in this one run:

  cells/s           rows written per second once every worker was up (steady state), and over the whole wall
  wall / ideal      Σ over workers of (run end − its start-up) / Σ duration_s    goal ≤ 1.15 for 1-s cells
  append cost       per row: its batch's write + fsync time over the batch's rows, first and last 1,000 rows;
                    a part's Parquet flush time over its rows, first and last part; a worker's wait for
                    its acknowledgement (queueing behind other rows included)
  peak RSS          the driver process and the collector actor (ru_maxrss)
  load              `kvray plot`'s dataset load of the finished folder, seconds
  plot, report      with --plot-report: `kvray plot` and `kvray report` on the finished folder, each its own
                    process, wall and CPU, after the cluster is shut down (benchmarks/plot_report_speed.py)
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path


def build_job(
    cells: int, types: list[str], cell_s: float, requests: int, gen_toks: int, *, hardware: str = "each"
) -> object:
    """``cells`` synthetic cells split evenly over ``types`` (``hardware: each``); with ``hardware="any"`` and
    one type, all on whatever runs them (benchmarks/plot_report_speed.py builds its folder in-process so)."""
    from kvray.plan.job import job_from_dict

    per_type = max(cells // len(types), 1)
    prompts = max(d for d in range(1, min(per_type, 1000) + 1) if per_type % d == 0)  # exactly ``cells`` cells
    tpot_s = cell_s / (gen_toks + 1) if cell_s > 0 else 0.0
    return job_from_dict(
        {
            "name": "scale",
            "models": ["kvray/tiny-llama"],
            "backends": ["synthetic"],
            "dtypes": ["fp32"],
            "hardware": hardware,
            "warmup": 0,
            "repeats": 1,
            "options": {"ttft_s": tpot_s, "tpot_s": tpot_s},
            # prompt lengths 8, 9, … × a few generation lengths from --gen-toks (the model holds 4,096 positions)
            "grid": {
                "prompt_toks": [8 + i for i in range(prompts)],
                "gen_toks": [gen_toks + j for j in range(per_type // prompts)],
                "concurrency": [requests],
            },
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--types", default="A100,H100", help="accelerator types, alternating over the nodes")
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--cell-s", type=float, default=0.0, help="seconds each cell takes (0: instant)")
    parser.add_argument("--requests", type=int, default=64, help="requests per cell (one burst)")
    parser.add_argument("--gen-toks", type=int, default=32)
    parser.add_argument("--out", default=None, help="keep the results folder here (default: a temporary one)")
    parser.add_argument(
        "--plot-report", action="store_true", help="then time `kvray plot` and `kvray report` on the folder"
    )
    args = parser.parse_args()

    from kvray.sweep.ray_env import import_ray

    ray = import_ray()  # first: kvray's Ray settings (no `uv run` runtime env in the workers)
    from ray.cluster_utils import Cluster

    from kvray.data.reader import load_dataset, read_results
    from kvray.plan.planner import plan_cells
    from kvray.sweep import last_run, run_job

    types = args.types.split(",")
    job = build_job(args.cells, types, args.cell_s, args.requests, args.gen_toks)
    t_cluster = time.perf_counter()
    # no dashboard, as kvray's own local start (kvray/sweep/ray_env.py): a cluster kvray starts has none
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    for i in range(args.nodes):
        gpu_type = types[i % len(types)]
        cluster.add_node(num_cpus=2, num_gpus=args.gpus_per_node, resources={f"accelerator_type:{gpu_type}": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    print(
        f"cluster: {args.nodes} nodes × {args.gpus_per_node} GPUs ({', '.join(types)}), "
        f"up in {time.perf_counter() - t_cluster:.1f} s; load average {os.getloadavg()[0]:.1f}"
    )
    n_cells = len(plan_cells(job, types))  # type: ignore[arg-type]
    workers = args.nodes * args.gpus_per_node
    tmp = tempfile.TemporaryDirectory()
    out = Path(args.out) if args.out else Path(tmp.name) / "out"
    try:
        t0, cpu0, started_wall = time.perf_counter(), time.process_time(), time.time()
        run_job(job, out, progress=False)  # type: ignore[arg-type]
        wall_s = time.perf_counter() - t0
        run = last_run(out)
        rows = read_results(out, traces=False)
        t_load = time.perf_counter()
        cells, traces, _ = load_dataset(out)
        load_s = time.perf_counter() - t_load
        size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    finally:
        ray.shutdown()
        cluster.shutdown()

    ready_s = run.get("workers_ready_s") or 0.0
    sum_cell_s = sum(r["duration_s"] for r in rows)
    costs = run.get("collector", {})
    print(
        f"cells {n_cells} planned, {len(rows)} rows ({len(traces)} traces), {workers} workers, "
        f"cell_s {args.cell_s:g}, {args.requests} requests × {args.gen_toks} tokens"
    )
    print(f"wall                    {wall_s:8.1f} s   (workers up after {ready_s:.1f} s)")
    marks = [(n, t) for n, t in costs.get("rows_at", []) if t >= started_wall + ready_s]
    if len(marks) >= 2:  # rows written per second from the first mark after every worker was up to the last
        (n0, t0_mark), (n1, t1_mark) = marks[0], marks[-1]
        steady = (n1 - n0) / max(t1_mark - t0_mark, 1e-9)
        print(
            f"cells/s, all workers up {steady:8.1f}        goal ≥ 50 for instant cells "
            f"(rows {n0}→{n1} in {t1_mark - t0_mark:.1f} s, the collector's clock)"
        )
    print(f"cells/s over the wall   {len(rows) / wall_s:8.1f}")
    if sum_cell_s > 0 and args.cell_s > 0:
        # Each worker's time from its own start-up to the end of the run, over the cells' own time: the
        # wall / (Σ cell / workers) of a sweep whose workers came up at once. Workers here start one after
        # another on this machine's two cores (minutes for 64), which a real cluster does in parallel.
        available_s = sum(run["wall_s"] - w["ready_s"] for w in run["workers"] if w.get("ready_s") is not None)
        print(
            f"wall / ideal            {available_s / sum_cell_s:8.3f}        goal ≤ 1.15 "
            f"(Σ worker time after its start-up {available_s:.0f} s / Σ cell time {sum_cell_s:.0f} s)"
        )
    print(
        f"write ms/row            first 1000: {costs.get('write_ms_per_row_first_1000')}, last 1000: "
        f"{costs.get('write_ms_per_row_last_1000')}  ({costs.get('commit_batches')} batches of write + fsync)"
    )
    print(
        f"parts ms/row            first part: {costs.get('flush_ms_per_row_first')}, last part: "
        f"{costs.get('flush_ms_per_row_last')}  ({costs.get('parts_flushed')} parts flushed)"
    )
    print(
        f"ack wait ms/row         first 1000: {costs.get('append_ms_first_1000')}, "
        f"last 1000: {costs.get('append_ms_last_1000')}  (queueing for the group commit included)"
    )
    print(f"CPU s                   driver {time.process_time() - cpu0:.1f}, collector {costs.get('cpu_s')}")
    print(
        f"peak RSS MiB            driver {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}, "
        f"collector {costs.get('peak_rss_mib')}"
    )
    print(f"folder                  {size_mb:.1f} MB; dataset load {load_s:.2f} s")
    if args.plot_report:
        from plot_report_speed import time_outputs  # benchmarks/, beside this script

        del cells, traces  # the benchmark's own 2 GB of frames, not what the timed commands hold
        time_outputs(out, repeats=1)
    tmp.cleanup()


if __name__ == "__main__":
    main()
