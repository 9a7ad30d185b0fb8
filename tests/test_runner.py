"""run_cell never raises for a cell's own failure: refused, error and a real out-of-memory become statuses."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tiny_models import tiny_config, write_model_dir

from kvray.backends import get_backend
from kvray.backends.hf import HFBackend
from kvray.bench.runner import MEMORY_KEYS, run_cell, run_cells
from kvray.spec import Cell, Workload, make_options


def test_high_risk_cell_is_refused_before_any_model_loads():
    backend = HFBackend()
    cell = Cell(model="meta-llama/Llama-3.1-70B", workload=Workload.uniform(64, 4096, 64), device="cpu")
    r = run_cell(backend, cell)
    assert r.status == "refused" and backend.model is None
    assert "OOM risk high" in r.reason and "GiB" in r.reason and "--no-check-oom" in r.reason
    assert r.traces == [] and r.versions["transformers"]


def test_bad_model_is_an_error_result_not_an_exception():
    r = run_cell(HFBackend(), Cell(model="nobody/nothing", workload=Workload.uniform(1, 4, 2), device="cpu"))
    assert r.status == "error" and "nobody/nothing" in r.reason


def test_result_carries_identity_versions_and_every_memory_column():
    results = []
    cells = [
        Cell(
            model="kvray/tiny-llama",
            backend="synthetic",
            workload=Workload.uniform(c, 16, 3),
            warmup=0,
            options=make_options(ttft_s=0.0, tpot_s=0.001),
        )
        for c in (1, 2)
    ]
    out = run_cells(get_backend("synthetic"), cells, on_result=results.append)
    assert [r.status for r in out] == ["ok", "ok"] and results == out
    r = out[1]
    assert set(MEMORY_KEYS) <= set(r.memory) and r.memory["kv_predicted_bytes"] > 0
    assert r.hardware["name"] == "cpu" and r.started_at.endswith("+00:00") and r.duration_s > 0
    assert r.simulated is False and r.versions["kvray"] and r.versions["torch"]
    row = r.to_row()
    assert row["ttft_s_p99"] >= row["ttft_s_p50"] and "kv_rel_error" in row


CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import psutil
    from kvray.backends.hf import HFBackend
    from kvray.bench.runner import run_cell
    from kvray.spec import Cell, Workload

    model = sys.argv[1]
    backend = HFBackend()
    small = Cell(model=model, workload=Workload.uniform(2, 8, 3), dtype="fp32", device="cpu", warmup=1)
    big = Cell(model=model, workload=Workload.uniform(8, 4096, 2), dtype="fp32", device="cpu", warmup=0)
    statuses = [run_cell(backend, small).status]
    # Cap the address space 1 GiB above what the loaded process already maps: the big cell's eager
    # attention scores (8 x 4 heads x 4096^2 fp32 = 2 GiB) cannot be allocated.
    vms = psutil.Process().memory_info().vms
    resource.setrlimit(resource.RLIMIT_AS, (vms + 2**30, resource.RLIM_INFINITY))
    oom = run_cell(backend, big, check_oom=False)
    after = run_cell(backend, small)
    print(json.dumps({"first": statuses[0], "oom": oom.status, "reason": oom.reason, "memory": oom.memory,
                      "after": after.status, "after_traces": len(after.traces)}))
    """
)


def test_real_allocation_failure_is_oom_and_the_next_cell_runs(tmp_path: Path):
    cfg = tiny_config("opt", max_position_embeddings=8192, attn_implementation="eager")
    model = write_model_dir(tmp_path / "opt-eager", cfg)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(model)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["first"] == "ok"
    assert out["oom"] == "oom", out["reason"]
    assert "can't allocate memory" in out["reason"] and "8 requests × 4098 tokens" in out["reason"]
    assert out["memory"]["oom_attempted_bytes"] >= 2**30  # the attempted size is recorded
    assert out["after"] == "ok" and out["after_traces"] == 2


def test_memory_tracker_catches_a_short_cpu_spike_and_ignores_earlier_ones(monkeypatch):
    import time

    import numpy as np

    from kvray.measure import memory

    before = np.ones(96 * 2**20 // 8)  # a spike before the cell must not count
    del before
    with memory.MemoryTracker("cpu") as tracked:
        spike = np.ones(48 * 2**20 // 8)  # 48 MiB touched and freed at once
        del spike
    figures = tracked.figures()
    assert 40 * 2**20 <= figures["rss_peak_bytes"] - figures["baseline_bytes"] < 90 * 2**20
    assert figures["peak_allocated_bytes"] is None and figures["nvml_peak_used_bytes"] is None

    monkeypatch.setattr(memory, "reset_rss_peak", lambda: False)  # no kernel peak counter: sampling thread
    with memory.MemoryTracker("cpu") as sampled:
        held = np.ones(48 * 2**20 // 8)
        time.sleep(0.1)
        del held
    figures = sampled.figures()
    assert figures["rss_peak_bytes"] - figures["baseline_bytes"] >= 40 * 2**20


def test_oom_errors_are_recognised_with_their_sizes():
    from kvray.measure.memory import attempted_bytes, is_oom_error

    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2147483648 bytes.")
    assert is_oom_error(cpu) and attempted_bytes(cpu) == 2**31
    cuda = type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 1.50 GiB.")
    assert is_oom_error(cuda) and attempted_bytes(cuda) == int(1.5 * 2**30)
    assert is_oom_error(MemoryError()) and not is_oom_error(ValueError("allocate"))
