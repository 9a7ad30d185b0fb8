"""Tensor-parallel workers on a simulated heterogeneous cluster: placement groups, packing, refusal.

One ``ray.cluster_utils.Cluster`` for the whole module, in its own Python process (it needs its own multi-node
Ray while the rest of the suite shares a single-node one): a head without GPUs, an 8-GPU H100 node and a 4-GPU
A100 node (logical GPUs). The scenarios run one after another on it, with the synthetic backend's short cells.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray
    from ray.cluster_utils import Cluster
    from kvray.errors import KvrayInputError
    from kvray.plan.job import job_from_dict
    from kvray.sweep import run_job
    from kvray.data.reader import read_results
    from kvray.measure.trace import CellResult

    jobs, out = json.loads(sys.argv[1]), sys.argv[2]
    for attempt in range(3):  # a loaded machine's raylet may time out at startup (ray-project/ray#65983)
        try:
            cluster = Cluster(initialize_head=True,
                              head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
            break
        except Exception:
            if attempt == 2:
                raise
            time.sleep(2)
    nodes = {}
    for gpu_type, n in (("H100", 8), ("A100", 4)):
        node = cluster.add_node(num_cpus=1, num_gpus=n, resources={f"accelerator_type:{gpu_type}": 1},
                                labels={"ray.io/accelerator-type": gpu_type})
        nodes[node.node_id] = gpu_type
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    results = {}
    for name, job in jobs.items():
        started = time.monotonic()
        folder = os.path.join(out, name)
        try:
            run_job(job_from_dict(job, source=name + ".yaml"), folder, progress=False, check_oom=False)
            outcome = {"ok": True}
        except KvrayInputError as exc:
            outcome = {"ok": False, "error": str(exc)}
        outcome["wall_s"] = time.monotonic() - started
        outcome["rows"] = [CellResult.from_dict(r).to_row() for r in read_results(folder)]
        manifest = os.path.join(folder, "manifest.json")
        runs = json.load(open(manifest)).get("runs", []) if os.path.exists(manifest) else []
        outcome["workers"] = [w for run in runs for w in run.get("workers", [])]
        outcome["pgs_left"] = [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"]
        results[name] = outcome
    ray.shutdown()
    cluster.shutdown()
    print("RESULT " + json.dumps({"nodes": nodes, "results": results}, default=str))
    """
)


def _job(tp: list[int], hardware: list[str], concurrency: list[int]) -> dict:
    return {
        "models": ["meta-llama/Llama-3.1-70B"],  # 64 heads, 8 KV heads: TP 1–16 are all degrees vLLM accepts
        "backends": ["synthetic"],
        "dtypes": ["bf16"],
        "hardware": hardware,
        "tensor_parallel": tp,
        "warmup": 0,
        "repeats": 1,
        "workers": 2,
        "options": {"ttft_s": 0.01, "tpot_s": 0.001},
        "grid": {"prompt_toks": [16], "gen_toks": [2], "concurrency": concurrency},
    }


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    jobs = {
        "tp4": _job([4], ["A100", "H100"], [1, 2]),
        "mixed": _job([1, 8], ["H100"], [1, 2, 3]),
        "tp16": _job([16], ["H100"], [1]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(jobs), str(out)], capture_output=True, text=True, timeout=500
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.cluster
def test_tp4_worker_holds_four_gpus_of_one_node_of_the_right_type(cluster_run):
    nodes, tp4 = cluster_run["nodes"], cluster_run["results"]["tp4"]
    assert tp4["ok"], tp4
    rows = tp4["rows"]
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    for row in rows:
        assert row["tensor_parallel"] == 4
        assert nodes[row["node_id"]] == row["hardware_requested"]  # the A100 cells on the A100 node, and so on
    workers = {w["worker_id"]: w for w in tp4["workers"]}
    assert workers and all(len(w["gpu_ids"]) == 4 for w in workers.values())
    assert {nodes[w["node_id"]] for w in workers.values()} == {"A100", "H100"}
    assert tp4["pgs_left"] == []  # every placement group went back with its worker


@pytest.mark.cluster
def test_mixed_tp1_and_tp8_sweep_finishes(cluster_run):
    nodes, mixed = cluster_run["nodes"], cluster_run["results"]["mixed"]
    assert mixed["ok"], mixed
    rows = mixed["rows"]
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    assert sorted(r["tensor_parallel"] for r in rows) == [1, 1, 1, 8, 8, 8]
    assert {nodes[r["node_id"]] for r in rows} == {"H100"}
    sizes = sorted(len(w["gpu_ids"]) for w in mixed["workers"])
    assert sizes[-1] == 8 and sizes[0] == 1  # one whole-node TP 8 worker beside one-GPU workers
    assert mixed["wall_s"] < 300  # not the 600 s start timeout: the TP 8 group got the node when it was freed


@pytest.mark.cluster
def test_tp16_is_refused_before_the_run_naming_the_largest_node(cluster_run):
    tp16 = cluster_run["results"]["tp16"]
    assert not tp16["ok"] and tp16["rows"] == []
    assert "tensor_parallel 16" in tp16["error"] and "needs 16 H100 GPUs on one node" in tp16["error"]
    assert "the largest node" in tp16["error"] and "has 8" in tp16["error"]
