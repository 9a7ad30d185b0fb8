"""A node lost mid-sweep: its workers die with their cells; the cells run again on the nodes left, no row is
lost or written twice (issue #18, item 5).

The cluster is ``ray.cluster_utils.Cluster`` on this machine: a head without GPUs and two nodes of two logical
A100s each; the sweep's cells are synthetic, one second of real sleeps each. Once a few rows are on disk the
second node's raylet is killed (``remove_node(..., allow_graceful=False)``: the node vanishes as a crashed
machine's would). It runs in its own Python process, because it needs its own multi-node Ray while the rest
of the suite shares a single-node one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading, time
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray
    from ray.cluster_utils import Cluster
    from kvray.data.reader import read_results
    from kvray.plan.job import job_from_dict
    from kvray.sweep import run_job

    out = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=2, resources={"accelerator_type:A100": 1}) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    doomed = nodes[1].node_id
    job = job_from_dict({
        "name": "node-loss", "models": ["kvray/tiny-llama"], "backends": ["synthetic"], "dtypes": ["fp32"],
        "hardware": "A100", "warmup": 0, "repeats": 1, "options": {"ttft_s": 0.6, "tpot_s": 0.1},
        "grid": {"prompt_toks": [8 + i for i in range(16)], "gen_toks": [5], "concurrency": [1]},
    })
    killed = {}

    def kill_when_rows_land():
        while len(read_results(out, traces=False)) < 3:
            time.sleep(0.05)
        killed["rows_before"] = len(read_results(out, traces=False))
        cluster.remove_node(nodes[1], allow_graceful=False)
        killed["at"] = time.time()

    threading.Thread(target=kill_when_rows_land, daemon=True).start()
    run_job(job, out, progress=False)
    rows = read_results(out, traces=False)
    run = json.load(open(os.path.join(out, "manifest.json")))["runs"][-1]
    ray.shutdown()
    cluster.shutdown()
    print("RESULT " + json.dumps({"doomed": doomed, "killed": killed, "run": run,
                                 "lines": [json.loads(l)["cell_id"] for l in open(os.path.join(out, "cells.jsonl"))],
                                 "rows": [{"cell_id": r["cell_id"], "status": r["status"],
                                           "node": r["hardware"].get("node_id"), "started_at": r["started_at"]}
                                          for r in rows]}))
    """
)


@pytest.mark.cluster
def test_a_node_lost_mid_sweep_loses_no_row_and_its_cells_run_again_elsewhere(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "out")], capture_output=True, text=True, timeout=400
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    rows, run = result["rows"], result["run"]

    assert "at" in result["killed"], "the node was never killed: the sweep ended before three rows landed"
    assert len(rows) == 16 and Counter(r["status"] for r in rows) == {"ok": 16}, rows
    assert len(result["lines"]) == len(set(result["lines"])) == 16, "a row was written twice"
    assert run["outcome"] == "finished" and run["duplicates"] == 0
    # the lost node's workers died mid-cell: their cells ran again, on the node left
    assert run["cell_retries"] >= 1, run
    lost_workers = [w for w in run["workers"] if w.get("node_id") == result["doomed"]]
    assert lost_workers and all(w.get("ended") == "replaced" for w in lost_workers), (result["doomed"], run["workers"])
    on_doomed = [r for r in rows if r["node"] == result["doomed"]]
    assert len(on_doomed) <= result["killed"]["rows_before"] + 2  # at most what was in flight as it went
    assert len(rows) - len(on_doomed) >= 16 - result["killed"]["rows_before"] - 2
