"""run_cell never raises for a cell's own failure: refused, error and a real out-of-memory become statuses."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_models import tiny_config, write_model_dir

from kvray.backends import backend_class, backend_names, check_cell, get_backend, validate_backend
from kvray.backends.base import BackendBase
from kvray.backends.hf import HFBackend
from kvray.backends.synthetic import SyntheticBackend
from kvray.errors import KvrayInputError
from kvray.runner.run import MEMORY_KEYS, oom_refusal, run_cell, run_cells
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
    from kvray.runner.run import run_cell
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


@pytest.mark.integration  # a `kvray` child process
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


SPIKE = """
import json, sys, time
import numpy as np
from kvray.measure import memory
if sys.argv[1] == "sampled":  # no kernel peak counter: the sampling thread must see a spike held 0.1 s
    memory.reset_rss_peak = lambda: False
before = np.ones(96 * 2**20 // 8)  # a spike before the cell must not count
del before
with memory.MemoryTracker("cpu") as tracked:
    spike = np.ones(48 * 2**20 // 8)  # 48 MiB touched, then freed
    if sys.argv[1] == "sampled":
        time.sleep(0.1)
    del spike
print(json.dumps(tracked.figures()))
"""


@pytest.mark.parametrize("path", ["kernel", "sampled"])
def test_memory_tracker_catches_a_short_cpu_spike_and_ignores_earlier_ones(path):
    """Run in a fresh process: deep in the full suite, the pytest process (1.3 GB, many libraries loaded) served a
    48 MiB allocation from memory it already held, so RSS did not move and there was no spike to catch."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", SPIKE, path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 40 * 2**20 <= figures["rss_peak_bytes"] - figures["baseline_bytes"] < 90 * 2**20
    assert figures["peak_allocated_bytes"] is None and figures["nvml_peak_used_bytes"] is None


def test_oom_errors_are_recognised_with_their_sizes():
    from kvray.measure.memory import attempted_bytes, is_oom_error

    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2147483648 bytes.")
    assert is_oom_error(cpu) and attempted_bytes(cpu) == 2**31
    cuda = type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 1.50 GiB.")
    assert is_oom_error(cuda) and attempted_bytes(cuda) == int(1.5 * 2**30)
    assert is_oom_error(MemoryError()) and not is_oom_error(ValueError("allocate"))


# --- the backend contract: what the runner and the planner read comes from the backend's declaration ---------

OPT_KV_BYTES_PER_TOKEN = 24 * 2 * 2048 * 2  # opt-1.3b in fp16: layers × (K and V) × hidden × bytes = 196,608
GPU_80_GIB = 80 * 2**30


class _Engine(SyntheticBackend):
    """A model-less engine that asks for the OOM pre-check on an 80 GiB device, in a layout set per test."""

    oom_precheck = True

    def __init__(self, available_bytes: int = GPU_80_GIB):
        self.available_bytes = available_bytes

    def memory_available_bytes(self, cell: Cell) -> int:
        return self.available_bytes


class _StaticEngine(_Engine):
    kv_layout = "hf"
    queues_when_full = False


class _PagedEngine(_Engine):
    kv_layout = "paged"
    queues_when_full = True


def _opt_cell() -> Cell:
    """256 requests of 1984 + 64 = 2048 tokens of opt-1.3b in fp16."""
    return Cell(
        model="facebook/opt-1.3b",
        backend="synthetic",
        workload=Workload.uniform(256, 1984, 64),
        dtype="fp16",
        warmup=0,
        options=make_options(ttft_s=0.0, tpot_s=0.0),
    )


def test_oom_precheck_follows_the_backends_layout_and_admission():
    from kvray.model.kvmath import kv_bytes_per_token
    from kvray.model.resolve import resolve_geometry

    assert kv_bytes_per_token(resolve_geometry("facebook/opt-1.3b"), "fp16") == OPT_KV_BYTES_PER_TOKEN
    cell = _opt_cell()
    # A static batch holds all 256 × 2048 tokens at once: 256 × 2048 × 196,608 B = 96 GiB > 80 GiB.
    assert 256 * 2048 * OPT_KV_BYTES_PER_TOKEN == 96 * 2**30
    static = run_cell(_StaticEngine(), cell)
    assert static.status == "refused" and "KV 96.00" in static.reason and "of 80.00 GiB" in static.reason
    # A paged engine that queues what does not fit runs them in turns; one request is 2048 × 196,608 B =
    # 0.375 GiB beside 2.45 GiB of weights, so it runs (the old pre-check refused it as a static batch).
    assert oom_refusal(_PagedEngine(), cell) is None
    paged = run_cell(_PagedEngine(), cell)
    assert paged.status == "ok" and len(paged.traces) == 256
    # It is refused only when one request cannot fit alone: here not even the weights fit in 2 GiB.
    alone = oom_refusal(_PagedEngine(available_bytes=2 * 2**30), cell)
    assert alone is not None and "one request of 2048 tokens alone" in alone and "KV 0.38" in alone


def test_backend_names_and_layouts_come_from_the_registry_without_importing_torch():
    code = textwrap.dedent(
        """
        import sys
        from kvray.backends import backend_class, backend_names, kv_layout
        layouts = {name: kv_layout(name) for name in backend_names()}
        heavy = [m for m in ("torch", "transformers", "ray") if m in sys.modules]
        print(layouts["hf"], layouts["hf-paged"], layouts["vllm"], kv_layout("sim", {"layout": "paged"}), heavy)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["hf", "paged", "paged", "paged", "[]"]
    assert set(backend_names()) == {"hf", "synthetic", "sim", "hf-paged", "vllm", "openai", "ollama"}
    for name in backend_names():
        cls = backend_class(name)
        assert issubclass(cls, BackendBase) and cls.name == name


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("tensorrt", {}, "unknown backend 'tensorrt' (known: hf"),
        ("openai", {}, "needs --base-url: it needs a server URL"),
        ("openai", {"base_url": "ftp://x"}, "http://"),
        ("openai", {"base_url": "http://h", "endpoint": "embed"}, "unknown endpoint"),
        ("ollama", {}, "--host"),
        ("hf-paged", {"block_size": 2}, "block_size must be at least 4"),
        ("vllm", {"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must be in (0, 1]"),
        ("sim", {"layout": "ragged"}, "unknown layout"),
        ("synthetic", {"ttft_s": "soon"}, "synthetic: an option has the wrong type"),
    ],
)
def test_validate_backend_is_one_line_per_problem(name, options, message):
    with pytest.raises(KvrayInputError) as info:
        validate_backend(name, options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_option_form_is_checked_anywhere_the_environment_only_where_the_cell_runs(monkeypatch):
    monkeypatch.delenv("KVRAY_NO_SUCH_KEY", raising=False)
    options = {"base_url": "http://127.0.0.1:1", "api_key_env": "KVRAY_NO_SUCH_KEY"}
    assert validate_backend("openai", options).needs_model_geometry is False  # a job may name a worker's key
    cell = Cell(model="x", backend="openai", workload=Workload.uniform(1, 4, 2), options=make_options(**options))
    with pytest.raises(KvrayInputError, match="KVRAY_NO_SUCH_KEY"):
        check_cell(cell)  # kvray bench sends from here: the key must be here
    vllm_cell = Cell(
        model="x",
        backend="vllm",
        workload=Workload.uniform(1, 4, 2),
        options=make_options(vllm_python="/nonexistent/python"),
    )
    validate_backend("vllm", vllm_cell.option_dict)
    with pytest.raises(KvrayInputError, match="not an executable file"):
        check_cell(vllm_cell)
    hf_cell = Cell(model="kvray/tiny-llama", workload=Workload.uniform(1, 4, 2))
    assert check_cell(hf_cell).device in ("cpu", "cuda:0")  # hf pins "auto" so the row says where it ran
    paged = Cell(model="kvray/tiny-llama", backend="hf-paged", workload=Workload.uniform(1, 4, 2))
    assert check_cell(paged).device == "auto"


def test_job_loader_checks_each_backends_options(tmp_path: Path):
    from kvray.plan.job import load_job

    job = tmp_path / "job.yaml"
    job.write_text("models: [kvray/tiny-llama]\nbackends: [hf, openai]\ngrid: {prompt_toks: [8], gen_toks: [2]}\n")
    with pytest.raises(KvrayInputError, match=r"job.yaml: options: the openai backend needs --base-url"):
        load_job(job)
    job.write_text(job.read_text() + "options: {base_url: 'http://127.0.0.1:8000'}\n")
    assert load_job(job).backends == ["hf", "openai"]
