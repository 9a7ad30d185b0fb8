"""A server's memory is the server's: ServerMemoryTracker over a real process tree on 127.0.0.1's machine.

RSS: a real two-process tree whose child allocates a known amount on a known schedule.
GPU: no GPU is part of the test environment, so NVML is a *contract test*: ``FakeNVML`` replays the function
shapes nvidia-ml-py documents (``nvmlDeviceGetComputeRunningProcesses`` → objects with ``pid`` and
``usedGpuMemory`` in bytes, None when the driver hides it; ``nvmlDeviceGetMemoryInfo`` → total/free/used) with
per-process usage on a known schedule, and torch's CUDA entry points are made to fail so that any CUDA context
the client would create shows up as an error.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import types

import psutil
import pytest

from kvray.hardware.devices import device_info
from kvray.measure.memory import ServerMemoryTracker

GIB = 2**30
ALLOC_MB = 200

TREE = f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", '''
import sys, time
sys.stdin.readline()                                # wait for the go
block = bytearray({ALLOC_MB} * 2**20)               # then {ALLOC_MB} MB, every page touched
for i in range(0, len(block), 4096):
    block[i] = 1
print("allocated", flush=True)
time.sleep(60)
'''], stdin=subprocess.PIPE, stdout=sys.stdout)
print(child.pid, flush=True)
sys.stdin.readline()
child.stdin.write(b"go\\n"); child.stdin.flush()
time.sleep(60)
"""


@pytest.fixture
def tree():
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    yield proc, child
    for pid in (child, proc.pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    proc.wait(10)


def tree_pids(proc):
    try:
        parent = psutil.Process(proc.pid)
        return [parent.pid, *(c.pid for c in parent.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def test_the_rss_of_the_servers_whole_tree_is_measured(tree):
    proc, child = tree
    time.sleep(0.3)  # both interpreters started
    with ServerMemoryTracker(lambda: tree_pids(proc), "cpu", interval_s=0.02) as mem:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "allocated"
        time.sleep(0.1)
    figures = mem.figures()
    grown = figures["server_rss_peak_bytes"] - figures["server_rss_baseline_bytes"]
    # the child touched ALLOC_MB; the tracker must see it in the tree (not in this process, which did nothing)
    assert 0.95 * ALLOC_MB * 2**20 <= grown < 1.5 * ALLOC_MB * 2**20
    assert figures["rss_peak_bytes"] == figures["server_rss_peak_bytes"]
    assert figures["baseline_bytes"] == figures["server_rss_baseline_bytes"]  # no GPU: the tree's RSS
    assert figures["peak_allocated_bytes"] is None and figures["server_gpu_peak_bytes"] is None
    assert ServerMemoryTracker.is_cuda is False  # the runner derives no activation peak from a server


class FakeNVML(types.ModuleType):
    """Contract fake of the pynvml functions kvray calls, following nvidia-ml-py's documented return shapes.

    One GPU. ``schedule`` maps a pid to [(seconds since start, bytes)], the process's usedGpuMemory from that
    time on; ``hidden`` pids report usedGpuMemory None (NVML_VALUE_NOT_AVAILABLE, as nvidia-ml-py returns it).
    """

    def __init__(self, schedule: dict[int, list[tuple[float, int]]], total: int = 80 * GIB, hidden=()):
        super().__init__("pynvml")
        self.schedule, self.total, self.hidden = schedule, total, set(hidden)
        self.t0 = time.monotonic()
        self.calls: list[str] = []

    def _used(self, pid: int) -> int:
        now = time.monotonic() - self.t0
        return max((b for t, b in self.schedule[pid] if t <= now), default=0)

    def nvmlInit(self):  # noqa: N802 - NVML's names
        self.calls.append("nvmlInit")

    def nvmlDeviceGetCount(self):  # noqa: N802
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):  # noqa: N802
        assert index == 0
        return "handle-0"

    def nvmlDeviceGetHandleByUUID(self, uuid):  # noqa: N802
        return "handle-0"

    def nvmlDeviceGetComputeRunningProcesses(self, handle):  # noqa: N802
        self.calls.append("procs")
        return [
            types.SimpleNamespace(
                pid=pid,
                usedGpuMemory=None if pid in self.hidden else self._used(pid),
                gpuInstanceId=0xFFFFFFFF,
                computeInstanceId=0xFFFFFFFF,
            )
            for pid in self.schedule
        ]

    def nvmlDeviceGetMemoryInfo(self, handle):  # noqa: N802
        used = sum(self._used(pid) for pid in self.schedule) + 512 * 2**20  # + the driver's own reservation
        return types.SimpleNamespace(total=self.total, free=self.total - used, used=used)

    def nvmlDeviceGetName(self, handle):  # noqa: N802
        return "NVIDIA H100 80GB HBM3"

    def nvmlSystemGetDriverVersion(self):  # noqa: N802
        return "550.54.15"


@pytest.fixture
def no_cuda_context(monkeypatch):
    """Any torch CUDA initialisation in this process fails the test."""
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("the client created a CUDA context")

    for name in ("init", "_lazy_init", "get_device_properties", "memory_allocated", "synchronize", "set_device"):
        monkeypatch.setattr(torch.cuda, name, refuse)


def test_nvml_contract_the_servers_processes_not_the_device_nor_kvray(tree, monkeypatch, no_cuda_context):
    proc, child = tree
    other = 4_000_000  # another tenant's process on the same GPU: not the server's
    fake = FakeNVML(
        {
            proc.pid: [(0.0, 1 * GIB)],  # the API server: a CUDA context and little else
            child: [(0.0, 3 * GIB), (0.3, 5 * GIB)],  # the engine core: weights + KV pool, then activations
            other: [(0.0, 7 * GIB)],
        }
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with ServerMemoryTracker(lambda: tree_pids(proc), "cuda:0", interval_s=0.02) as mem:
        time.sleep(0.6)  # past the schedule's step at 0.3 s
    figures = mem.figures()
    assert figures["server_gpu_baseline_bytes"] == 4 * GIB  # 1 + 3: the tree's two processes at the start
    assert figures["server_gpu_peak_bytes"] == 6 * GIB  # 1 + 5 after the step; the other tenant's 7 excluded
    assert figures["baseline_bytes"] == 4 * GIB  # on a GPU the row's baseline is the server's GPU memory
    assert figures["nvml_baseline_used_bytes"] == (1 + 3 + 7) * GIB + 512 * 2**20  # the device, everyone on it
    assert figures["nvml_peak_used_bytes"] == (1 + 5 + 7) * GIB + 512 * 2**20
    assert figures["peak_allocated_bytes"] is None  # kvray's allocator holds nothing of the server's
    assert figures["server_rss_peak_bytes"] > 0
    assert fake.calls.count("procs") >= 10  # sampled while it ran, not read once
    info = device_info("cuda:0", cuda_context=False)
    assert info["name"] == "NVIDIA H100 80GB HBM3" and info["memory_bytes"] == 80 * GIB


def test_nvml_contract_hidden_per_process_usage_is_unknown_not_zero(tree, monkeypatch, no_cuda_context):
    proc, child = tree
    fake = FakeNVML({proc.pid: [(0.0, GIB)], child: [(0.0, 3 * GIB)]}, hidden={proc.pid, child})
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with ServerMemoryTracker(lambda: tree_pids(proc), "cuda:0", interval_s=0.02) as mem:
        time.sleep(0.1)
    figures = mem.figures()
    assert figures["server_gpu_peak_bytes"] is None and figures["server_gpu_baseline_bytes"] is None
    assert figures["nvml_peak_used_bytes"] == 4 * GIB + 512 * 2**20  # the device figure still stands


def test_the_vllm_backend_declares_a_server_tracker_and_scope():
    from kvray.backends.http import OpenAIBackend
    from kvray.backends.ollama import OllamaBackend
    from kvray.backends.vllm import VLLMBackend

    vllm = VLLMBackend()
    assert isinstance(vllm.memory_tracker(), ServerMemoryTracker)
    assert vllm.ttft_basis == "client-http" and vllm.memory_scope().startswith("server process tree")
    for remote in (OpenAIBackend(), OllamaBackend()):
        assert remote.memory_tracker() is None and remote.memory_scope().startswith("remote server")
        assert remote.ttft_basis == "client-http"
