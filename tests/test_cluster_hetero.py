"""Heterogeneous clusters on one machine: ray.cluster_utils.Cluster with fake A100 and H100 nodes.

Each scenario runs in its own Python process, because it needs its own multi-node Ray while the rest of
the suite shares a single-node one.
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
    from kvray.plan.job import load_job
    from kvray.sweep import run_job

    job_path, out = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    for gpu_type in ("A100", "H100"):
        cluster.add_node(num_cpus=1, num_gpus=1, resources={f"accelerator_type:{gpu_type}": 1},
                         labels={"ray.io/accelerator-type": gpu_type})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    started = time.monotonic()
    try:
        run_job(load_job(job_path), out, progress=False)
        outcome = {"ok": True}
    except KvrayInputError as exc:
        outcome = {"ok": False, "error": str(exc)}
    outcome["wall_s"] = time.monotonic() - started
    outcome["nodes"] = [n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")]
    ray.shutdown()
    cluster.shutdown()
    print("RESULT " + json.dumps(outcome))
    """
)

JOB = """
name: hetero
models: [kvray/tiny-llama]
backends: [hf]
dtypes: [fp32]
weights: random
hardware: {hardware}
warmup: 0
repeats: 1
grid:
  prompt_toks: [16, 32]
  gen_toks: [4]
  concurrency: [1, 2]
"""


def _run(tmp_path, hardware: str) -> dict:
    job = tmp_path / "hetero.yaml"
    job.write_text(JOB.format(hardware=hardware))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(job), str(tmp_path / "out")], capture_output=True, text=True, timeout=400
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.cluster
def test_each_runs_every_cell_on_every_gpu_type_and_rows_line_up(tmp_path):
    outcome = _run(tmp_path, "each")
    assert outcome["ok"], outcome
    from kvray.data.reader import load_dataset

    cells, _, manifest = load_dataset(tmp_path / "out")
    assert len(cells) == 8 and cells["cell_id"].is_unique and set(cells["status"]) == {"ok"}
    assert set(cells["accelerator_type"]) == {"A100", "H100"}
    assert set(cells["hardware_requested"]) == {"A100", "H100"}
    # Workers ran on both GPU nodes, and each row's accelerator type is the one it asked for.
    assert set(cells["node_id"]) == set(outcome["nodes"])
    assert (cells["accelerator_type"] == cells["hardware_requested"]).all()
    # The same shapes on each type: a cross-hardware comparison lines up cell by cell.
    shapes = cells.groupby("accelerator_type")[["prompt_toks", "concurrency"]].apply(
        lambda g: sorted(map(tuple, g.to_numpy().tolist()))
    )
    assert shapes["A100"] == shapes["H100"] == [(16, 1), (16, 2), (32, 1), (32, 2)]


@pytest.mark.cluster
def test_unknown_gpu_type_fails_fast_listing_the_types_present(tmp_path):
    outcome = _run(tmp_path, "[B200]")
    assert not outcome["ok"]
    assert "B200" in outcome["error"] and "A100" in outcome["error"] and "H100" in outcome["error"]
    assert outcome["wall_s"] < 60  # it never waits for an actor Ray cannot place
    assert not (tmp_path / "out" / "cells.jsonl").exists() or not (tmp_path / "out" / "cells.jsonl").read_text()
